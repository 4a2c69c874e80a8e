"""Send a workload to an OpenAI-compatible endpoint and time every streamed token.

Arrivals: at --request-rate R a gamma process with shape `burstiness` and mean gap 1/R (1 is
Poisson; below 1 burstier, above 1 more regular), as `vllm bench serve` does; at R = inf all
at once. --max-concurrency caps the requests in flight (a closed loop when R = inf). The run
stops by itself: after --num-requests, or once --duration has passed (no new requests then),
and every request is bounded by --request-timeout. The records it fills are in records.py;
with --client-processes N, processes.py runs N of these drives, one per process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import accumulate, islice
from typing import Any, Protocol, TypeVar

import httpx

from moeserve.bench.conversations import TurnFailed
from moeserve.bench.records import ClientProcess, LoadTestConfig, RequestResult, RunData
from moeserve.bench.server_metrics import metrics_url_for, scrape
from moeserve.bench.sse_client import OnData, SSELines, StreamClient
from moeserve.bench.workloads import RequestSpec

T = TypeVar("T")


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


def api_client(cfg: LoadTestConfig) -> httpx.AsyncClient:
    """httpx to the server's /v1 root, with the API key and the run's timeouts."""
    # No connection cap in the client: a pool limit would queue requests here and count the
    # wait as server latency. --max-concurrency is the cap, enforced in drive().
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
    async with api_client(cfg) as client:
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
        if usage := chunk.get("usage"):
            res.prompt_tokens = usage.get("prompt_tokens")
            res.output_tokens = usage.get("completion_tokens") or 0
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            res.cached_tokens = cached if isinstance(cached, int) else res.cached_tokens
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


class Streams(Protocol):
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
    streams: Streams,
    cfg: LoadTestConfig,
    spec: RequestSpec,
    model: str,
    res: RequestResult,
    t0: float,
) -> None:
    """Stream one request into `res`; every failure is recorded there, never raised. A
    conversation's turn is timed from when the previous turn's answer is in."""
    path = "/chat/completions" if spec.endpoint == "chat" else "/completions"
    conv = spec.conversation
    if conv is not None:
        res.sent = time.perf_counter() - t0
        try:
            spec = dataclasses.replace(spec, messages=await conv.ready(spec.turn))
        except TurnFailed as e:
            res.error = str(e)
            return
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
    if conv is not None:
        conv.answer(spec.turn, "".join(events.text))
    if not res.output_tokens:  # no usage chunk (a server without include_usage)
        res.output_tokens = len(res.chunk_times)
    if spec.answer is not None:
        res.correct = "".join(events.text).strip() == spec.answer


def arrival_gaps(cfg: LoadTestConfig) -> Iterator[float]:
    rng = random.Random(cfg.seed + 1)  # its own stream: pacing must not shift the prompts
    while True:
        if math.isinf(cfg.request_rate):
            yield 0.0
        else:  # gamma(shape k, scale 1/(R k)): mean 1/R, k = 1 is exponential (Poisson)
            k = cfg.burstiness
            yield rng.gammavariate(k, 1.0 / (cfg.request_rate * k))


def arrival_times(cfg: LoadTestConfig) -> Iterator[float]:
    """The run's arrival schedule: request i's time from the start, 0 for the first."""
    return accumulate(arrival_gaps(cfg), initial=0.0)


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """On uvloop where it is installed (the test extra and the GPU image have it): its loop
    takes some 10-15% less of the client's CPU per streamed event than asyncio's own."""
    try:
        from uvloop import run  # 0.18 and later
    except ImportError:
        return asyncio.run(main)
    return run(main)


def open_streams(cfg: LoadTestConfig, client: httpx.AsyncClient) -> Streams:
    """What the run streams over: the built-in client for http:// unless told otherwise (one
    SSE event per token costs several times less CPU there, benchmarks/RESULTS.md), else
    `client`, httpx, which stays for the other calls either way."""
    base = api_base(cfg.base_url)
    if cfg.http_client == "auto" and base.startswith("http://"):
        return StreamClient(base, _auth(cfg), _connect_timeout(cfg))
    return _HttpxStreams(client)


def progress_bar(total: int | None, enabled: bool) -> Any:
    """A tqdm bar of requests on stderr."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="req",
        disable=not enabled,
        file=sys.stderr,
        desc="requests",
        dynamic_ncols=True,
    )


async def run_load(cfg: LoadTestConfig, workload: Iterator[RequestSpec], name: str) -> RunData:
    """Run the load test in this process; ValueError when the server cannot be reached."""
    async with api_client(cfg) as client:
        model = cfg.model or (await _resolve_model(client, None)).id
        murl = cfg.metrics_url or metrics_url_for(cfg.base_url)
        before = await scrape(client, murl) if cfg.scrape_metrics else None
        started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        streams = open_streams(cfg, client)
        bar = progress_bar(cfg.num_requests, cfg.progress)
        failed = 0

        def on_end(res: RequestResult) -> None:
            nonlocal failed
            failed += res.error is not None
            bar.update(1)
            bar.set_postfix(failed=failed, refresh=False)

        results: list[RequestResult] = []
        # The loop's own thread, not the process: a caller (a test's in-process server) may
        # share the process, and the client is this thread's work.
        cpu0 = time.thread_time()
        try:
            requests = enumerate(islice(workload, cfg.num_requests))
            t0, t_end = await drive(streams, cfg, requests, model, results, on_end=on_end)
        finally:
            cpu = time.thread_time() - cpu0
            bar.close()
            await streams.aclose()
        after = await scrape(client, murl) if cfg.scrape_metrics else None
    clients = [ClientProcess(0, len(results), cpu)]
    return RunData(cfg, model, name, started_at, t_end - t0, results, before, after, clients)


async def drive(
    streams: Streams,
    cfg: LoadTestConfig,
    requests: Iterable[tuple[int, RequestSpec]],
    model: str,
    results: list[RequestResult],
    *,
    on_end: Callable[[RequestResult], None] | None = None,
    t0: float | None = None,
    arrivals: Iterator[float] | None = None,
) -> tuple[float, float]:
    """Send `requests` (run-wide index, spec), each at its arrival time: `arrivals` are
    seconds from `t0` in the requests' order (default the run's schedule), and `t0` is a
    time.perf_counter reading (default now; a later one is waited for). (t0, end).
    Each request goes into `results` as it starts, so that a caller that cancels the drive
    keeps what was sent; `on_end` sees each one when it is done."""
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    tasks: set[asyncio.Task[None]] = set()

    async def one(spec: RequestSpec, res: RequestResult) -> None:
        try:
            await asyncio.wait_for(
                _send(streams, cfg, spec, model, res, begin), cfg.request_timeout
            )
        except asyncio.TimeoutError:
            res.error = f"timed out after {cfg.request_timeout:g}s (--request-timeout)"
        except asyncio.CancelledError:  # Ctrl-C, or a client process told to stop
            res.error = "cancelled: the run was stopped"
            raise
        finally:
            res.ended = time.perf_counter() - begin
            if spec.conversation is not None:
                spec.conversation.settle(spec.turn)  # the next turn goes on (or fails)
            if sem is not None:
                sem.release()
            if on_end is not None:
                on_end(res)

    begin = time.perf_counter() if t0 is None else t0
    deadline = begin + cfg.duration if cfg.duration is not None else math.inf
    arrivals = arrival_times(cfg) if arrivals is None else arrivals
    try:
        for i, spec in requests:
            next_at = begin + next(arrivals)
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
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        for task in tasks:  # Ctrl-C: stop what is still running, without leaking tasks
            task.cancel()
        if tasks:  # each records its end before the results are read
            await asyncio.wait(tasks)
    return begin, time.perf_counter()
