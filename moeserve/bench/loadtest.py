"""Send a workload to an OpenAI-compatible endpoint and time every streamed token.

Arrivals: at --request-rate R a gamma process with shape `burstiness` and mean gap 1/R (1 is
Poisson; below 1 burstier, above 1 more regular), as `vllm bench serve` does; at R = inf all
at once. --max-concurrency caps the requests in flight (a closed loop when R = inf). The run
stops by itself: after --num-requests, or once --duration has passed (no new requests then),
and every request is bounded by --request-timeout.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

import httpx

from moeserve.bench.server_metrics import Snapshot, metrics_url_for, scrape
from moeserve.bench.sse_client import OnData, SSELines, StreamClient
from moeserve.bench.workloads import RequestSpec

# Upper bounds on the run's size: a typo must not start a load test that never ends.
MAX_REQUESTS = 1_000_000
MAX_DURATION_S = 24 * 3600.0


@dataclass(frozen=True)
class LoadTestConfig:
    """How to reach the server and how to pace the run (see the module docstring)."""

    base_url: str
    model: str | None = None
    api_key: str | None = None
    num_requests: int | None = None
    duration: float | None = None
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    request_timeout: float = 300.0
    temperature: float = 0.0
    ignore_eos: bool = False
    seed: int = 0
    progress: bool = True
    scrape_metrics: bool = True
    metrics_url: str | None = None
    http_client: str = "auto"  # "auto": the built-in client for http://, httpx for https://

    def __post_init__(self) -> None:
        checks = [
            (
                f"--num-requests must be in 1..{MAX_REQUESTS}",
                self.num_requests is None or 1 <= self.num_requests <= MAX_REQUESTS,
            ),
            (
                f"--duration must be in (0, {MAX_DURATION_S:g}] seconds",
                self.duration is None or 0 < self.duration <= MAX_DURATION_S,
            ),
            ("--request-rate must be > 0", self.request_rate > 0),
            ("--burstiness must be > 0", self.burstiness > 0),
            (
                "--max-concurrency must be >= 1",
                self.max_concurrency is None or self.max_concurrency >= 1,
            ),
            ("--request-timeout must be > 0", self.request_timeout > 0),
            ("--http-client must be auto or httpx", self.http_client in ("auto", "httpx")),
            (
                "give --num-requests or --duration: the run must end by itself",
                self.num_requests is not None or self.duration is not None,
            ),
            # Without a count, an infinite rate and no concurrency cap would start requests
            # as fast as the loop spins until the duration ends.
            (
                "--duration without --num-requests needs a finite --request-rate or "
                "--max-concurrency",
                self.num_requests is not None
                or math.isfinite(self.request_rate)
                or self.max_concurrency is not None,
            ),
        ]
        for message, ok in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class RequestResult:
    """One request as the client saw it; times in seconds, `sent` from the run's start."""

    index: int
    endpoint: str
    max_tokens: int
    input_len: int | None = None
    sent: float = 0.0
    ended: float | None = None  # when the client was done with it, success or not
    success: bool = False
    error: str | None = None
    status: int | None = None  # the reply's HTTP status, when one came
    error_latency: float | None = None  # send to the end of a non-200 reply (e.g. a 429)
    ttft: float | None = None
    latency: float | None = None
    itl: list[float] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)  # from the run's start
    prompt_tokens: int | None = None
    output_tokens: int = 0
    finish_reason: str | None = None
    correct: bool | None = None  # the demo tasks' answer check

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (vLLM's TPOT)."""
        if self.ttft is None or self.latency is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


@dataclass
class RunData:
    """Everything a report needs: the config, each request, and the server's /metrics."""

    config: LoadTestConfig
    model: str
    workload: str
    started_at: str
    duration: float
    results: list[RequestResult]
    before: Snapshot | None = None
    after: Snapshot | None = None


def api_base(url: str) -> str:
    """The /v1 root: `http://host:8000` and `http://host:8000/v1/` both become `.../v1`."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


@dataclass(frozen=True)
class ServedModel:
    """A model of /v1/models: its id and, where the server says, its context length."""

    id: str
    max_model_len: int | None = None  # moeserve's and vLLM's model cards have it


def _served_model(models: Any, model: str | None) -> ServedModel:
    """`model` (or the first model) of a /v1/models body; KeyError, IndexError or TypeError
    when there is none."""
    cards = models["data"]
    card = cards[0] if model is None else next((c for c in cards if c.get("id") == model), {})
    ctx = card.get("max_model_len")
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 1:
        ctx = None  # not reported (another server, or moeserve while it loads)
    return ServedModel(model or card["id"], ctx)


async def _resolve_model(client: httpx.AsyncClient, model: str | None) -> ServedModel:
    """The model to ask for and its context; ValueError when `model` is None and the server
    does not list one. With `model` given, a server that does not list it (or has no
    /v1/models) only leaves the context unknown."""
    try:
        resp = await client.get("/models")
        resp.raise_for_status()
        return _served_model(resp.json(), model)
    except (httpx.HTTPError, KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
        if model:
            return ServedModel(model)
        raise ValueError(
            f"could not list models at {client.base_url}/models ({e}); pass --model"
        ) from None


def _auth(cfg: LoadTestConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}


def _client(cfg: LoadTestConfig) -> httpx.AsyncClient:
    """httpx to the server's /v1 root, with the API key and the run's timeouts."""
    # No connection cap in the client: a pool limit would queue requests here and count the
    # wait as server latency. --max-concurrency is the cap, enforced in _drive.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(cfg.request_timeout, connect=_connect_timeout(cfg))
    return httpx.AsyncClient(
        base_url=api_base(cfg.base_url), headers=_auth(cfg), limits=limits, timeout=timeout
    )


def _connect_timeout(cfg: LoadTestConfig) -> float:
    return min(30.0, cfg.request_timeout)


async def served_model(cfg: LoadTestConfig) -> ServedModel:
    """What /v1/models says of the model the run will use, before anything is sent: the
    workload can then be fitted to its context. ValueError as for run_load."""
    async with _client(cfg) as client:
        return await _resolve_model(client, cfg.model)


def _body(cfg: LoadTestConfig, spec: RequestSpec, model: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": spec.max_tokens,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},  # exact token counts
    }
    if cfg.ignore_eos:
        body["ignore_eos"] = True  # a vLLM extension; moeserve accepts it too
    body.update(spec.extra)
    if spec.endpoint == "chat":
        body["messages"] = spec.messages
    else:
        body["prompt"] = spec.prompt
    return body


def _error_text(status: int, raw: bytes) -> str:
    try:
        message = json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = raw[:200].decode("utf-8", "replace")
    return f"HTTP {status}: {message}"


class _Events:
    """One stream's SSE `data:` payloads, parsed into its RequestResult as each arrives: the
    time of a token is when its event is parsed, also when one read brings several."""

    __slots__ = ("res", "chat", "start", "t0", "last", "text", "done")

    def __init__(self, spec: RequestSpec, res: RequestResult, start: float, t0: float) -> None:
        self.res, self.chat, self.start, self.t0 = res, spec.endpoint == "chat", start, t0
        self.last, self.text, self.done = start, [], False

    def __call__(self, data: bytes) -> bool:
        """One payload; True when the stream is over for us: [DONE] or an error chunk."""
        if data == b"[DONE]":
            self.done = True
            return True
        now = time.perf_counter()
        chunk = json.loads(data)
        res = self.res
        if "error" in chunk:  # e.g. the server's drain stopped the request
            res.error = f"stream error: {chunk['error'].get('message', chunk['error'])}"
            return True
        if chunk.get("usage"):
            res.prompt_tokens = chunk["usage"].get("prompt_tokens")
            res.output_tokens = chunk["usage"].get("completion_tokens") or 0
        for choice in chunk.get("choices") or []:
            delta = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
            if delta:
                if res.ttft is None:
                    res.ttft = now - self.start
                else:
                    res.itl.append(now - self.last)
                self.last = now
                res.chunk_times.append(now - self.t0)
                self.text.append(delta)
            res.finish_reason = choice.get("finish_reason") or res.finish_reason
        return False


class _Streams(Protocol):
    """What sends the streaming POSTs: the built-in client (sse_client.py) or httpx."""

    async def post_sse(self, path: str, body: bytes, on_data: OnData) -> tuple[int, bytes]: ...

    async def aclose(self) -> None: ...


class _HttpxStreams:
    """The streaming POSTs over httpx: https://, or --http-client httpx."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def post_sse(self, path: str, body: bytes, on_data: OnData) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"}
        async with self.client.stream("POST", path, content=body, headers=headers) as resp:
            if resp.status_code != 200:
                return resp.status_code, await resp.aread()
            lines = SSELines(on_data)  # the same SSE parsing as the built-in client
            async for data in resp.aiter_bytes():
                if lines.feed(data):
                    return 200, b""
            lines.close()
        return 200, b""

    async def aclose(self) -> None:
        pass  # run_load closes the httpx client


async def _send(
    streams: _Streams,
    cfg: LoadTestConfig,
    spec: RequestSpec,
    model: str,
    res: RequestResult,
    t0: float,
) -> None:
    """Stream one request into `res`; every failure is recorded there, never raised."""
    path = "/chat/completions" if spec.endpoint == "chat" else "/completions"
    start = time.perf_counter()
    res.sent = start - t0
    events = _Events(spec, res, start, t0)
    try:
        # As httpx's json= encodes it (ValueError for a NaN, e.g. from a JSONL line).
        body = json.dumps(
            _body(cfg, spec, model), ensure_ascii=False, separators=(",", ":"), allow_nan=False
        ).encode()
        status, raw = await streams.post_sse(path, body, events)
    except (httpx.HTTPError, ValueError) as e:  # ValueError: also a chunk that is not JSON
        res.error = f"{type(e).__name__}: {e}"
        return
    res.status = status
    if status != 200:
        res.error_latency = time.perf_counter() - start
        res.error = _error_text(status, raw)
        return
    if res.error is not None:  # an error chunk
        return
    if not events.done:
        res.error = "the stream ended without [DONE]"
        return
    res.latency = time.perf_counter() - start
    res.success = True
    if not res.output_tokens:  # no usage chunk (a server without include_usage)
        res.output_tokens = len(res.chunk_times)
    if spec.answer is not None:
        res.correct = "".join(events.text).strip() == spec.answer


def _gaps(cfg: LoadTestConfig) -> Iterator[float]:
    rng = random.Random(cfg.seed + 1)  # its own stream: pacing must not shift the prompts
    while True:
        if math.isinf(cfg.request_rate):
            yield 0.0
        else:  # gamma(shape k, scale 1/(R k)): mean 1/R, k = 1 is exponential (Poisson)
            k = cfg.burstiness
            yield rng.gammavariate(k, 1.0 / (cfg.request_rate * k))


async def run_load(cfg: LoadTestConfig, workload: Iterator[RequestSpec], name: str) -> RunData:
    """Run the load test; ValueError when the server cannot be reached at all."""
    base = api_base(cfg.base_url)
    async with _client(cfg) as client:
        model = cfg.model or (await _resolve_model(client, None)).id
        murl = cfg.metrics_url or metrics_url_for(cfg.base_url)
        before = await scrape(client, murl) if cfg.scrape_metrics else None
        started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        streams: _Streams = _HttpxStreams(client)
        if cfg.http_client == "auto" and base.startswith("http://"):
            # httpx stays for the calls above; the streams, one SSE event per token, cost
            # several times less CPU on the built-in client (benchmarks/RESULTS.md).
            streams = StreamClient(base, _auth(cfg), _connect_timeout(cfg))
        try:
            results, t0, t_end = await _drive(streams, cfg, workload, model)
        finally:
            await streams.aclose()
        after = await scrape(client, murl) if cfg.scrape_metrics else None
    return RunData(cfg, model, name, started_at, t_end - t0, results, before, after)


async def _drive(
    streams: _Streams, cfg: LoadTestConfig, workload: Iterator[RequestSpec], model: str
) -> tuple[list[RequestResult], float, float]:
    """Send the workload on its arrival schedule; (results, start time, end time)."""
    from tqdm import tqdm

    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    bar = tqdm(
        total=cfg.num_requests,
        unit="req",
        disable=not cfg.progress,
        file=sys.stderr,
        desc="requests",
        dynamic_ncols=True,
    )
    results: list[RequestResult] = []
    failed = [0]  # a cell the callbacks can update
    tasks: set[asyncio.Task[None]] = set()

    async def one(spec: RequestSpec, res: RequestResult) -> None:
        try:
            await asyncio.wait_for(_send(streams, cfg, spec, model, res, t0), cfg.request_timeout)
        except asyncio.TimeoutError:
            res.error = f"timed out after {cfg.request_timeout:g}s (--request-timeout)"
        finally:
            res.ended = time.perf_counter() - t0
            if sem is not None:
                sem.release()
            failed[0] += res.error is not None
            bar.update(1)
            bar.set_postfix(failed=failed[0], refresh=False)

    t0 = time.perf_counter()
    deadline = t0 + cfg.duration if cfg.duration is not None else math.inf
    next_at = t0
    gaps = _gaps(cfg)
    try:
        for i, spec in enumerate(workload):
            if cfg.num_requests is not None and i >= cfg.num_requests:
                break
            # Absolute arrival times, so time spent waiting below does not stretch the schedule;
            # never sleep past the deadline only to stop there. (A sleep of 0 still lets the
            # tasks started so far run.) uvloop's timers may fire up to a millisecond early:
            # sleep again until it is time.
            await asyncio.sleep(max(0.0, min(next_at, deadline) - time.perf_counter()))
            while (wait := min(next_at, deadline) - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            if sem is not None:
                await sem.acquire()  # closed loop: wait for a free slot before the next one
            if time.perf_counter() >= deadline:
                if sem is not None:
                    sem.release()
                break
            res = RequestResult(i, spec.endpoint, spec.max_tokens, spec.input_len)
            results.append(res)
            task = asyncio.create_task(one(spec, res))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            next_at += next(gaps)
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        for task in tasks:  # Ctrl-C: stop what is still running, without leaking tasks
            task.cancel()
        bar.close()
    return results, t0, time.perf_counter()
