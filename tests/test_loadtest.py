"""`moeserve bench serve` against a real server on 127.0.0.1: the report, the bounds, failures.

The server runs the packaged demo model when it is installed (moeserve/assets/demo-moe),
else a tiny random checkpoint; offloading is on, so the report has expert cache numbers.
Every run is a handful of short requests: seconds, not minutes.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from moeserve.assets import demo_model_path
from moeserve.bench.loadtest import LoadTestConfig, RequestResult, arrival_gaps, run_load
from moeserve.bench.records import MAX_REQUESTS
from moeserve.bench.report import parse_goodput, summarize
from moeserve.bench.workloads import RequestSpec, length_sampler
from moeserve.cli import main
from tests.server_fixture import RunningServer, serving

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    yield from serving(
        demo_model_path(),  # ships inside the package
        max_model_len=None,  # the model's own context
        # Caching off: the report checks the server's computed prompt tokens against the
        # client's input tokens, which cached prefixes would make differ.
        engine_kwargs={
            "expert_cache_slots": 2,
            "offload_mode": "fetch",
            "enable_prefix_caching": False,
        },
    )


def bench(server: RunningServer, tmp_path: Path, *args: str) -> tuple[int, dict[str, Any]]:
    """Run `moeserve bench serve` in this process; (exit status, JSON result)."""
    out = tmp_path / "result.json"
    rc = main(
        [
            "bench",
            "serve",
            "--base-url",
            server.url,
            "--result-json",
            str(out),
            "--no-progress",
            "--save-detailed",
            *args,
        ]
    )
    return rc, json.loads(out.read_text()) if out.exists() else {}


def test_random_workload_report(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    n = 12
    rc, rep = bench(
        server,
        tmp_path,
        "--num-requests",
        str(n),
        "--request-rate",
        "30",
        "--burstiness",
        "0.5",
        "--input-len",
        "uniform:4:12",
        "--output-len",
        "uniform:3:8",
        "--ignore-eos",
        "--goodput",
        "ttft:600000",
        "tpot:600000",
        "e2e:600000",
        "--plot-dir",
        str(tmp_path / "plots"),
    )
    assert rc == 0
    table = capsys.readouterr().out
    for line in (
        "Successful requests:",
        "Median TTFT (ms):",
        "P99 ITL (ms):",
        "Request goodput (req/s):",
        "Expert imbalance",
        "Expert cache hit rate:",
    ):
        assert line in table, line
    assert (rep["completed"], rep["failed"], rep["num_requests"]) == (n, 0, n)
    reqs = rep["requests"]
    # --ignore-eos: every request generates exactly its drawn max_tokens.
    assert all(r["output_tokens"] == r["max_tokens"] for r in reqs)
    assert rep["total_output_tokens"] == sum(r["max_tokens"] for r in reqs)
    assert rep["total_input_tokens"] == sum(r["prompt_tokens"] for r in reqs) > 0
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        s = rep[key]
        assert s["count"] > 0 and 0 < s["median"] <= s["p90"] <= s["p99"], (key, s)
    assert rep["ttft_ms"]["mean"] <= rep["e2el_ms"]["mean"]
    # (A token that decodes to no text, e.g. EOS under --ignore-eos, sends no chunk: so not
    # one ITL per token, but some.)
    assert rep["itl_ms"]["count"] > 0
    assert rep["goodput"]["good_requests"] == n  # generous SLOs: all of them
    duration = rep["duration_s"]
    assert math.isclose(rep["request_throughput"], n / duration)
    assert math.isclose(rep["output_throughput"], rep["total_output_tokens"] / duration)
    # What the server counted agrees with what the client saw.
    srv = rep["server"]
    assert srv["moeserve"] and srv["generation_tokens"] == rep["total_output_tokens"]
    if srv["preemptions"] == 0:  # else recomputation counts prompt tokens twice
        assert srv["prompt_tokens"] == rep["total_input_tokens"]
        # Each token is routed to top_k experts in every sparse layer: the prompt, and each
        # generated token but the last (it is sampled, never fed back).
        top_k = server.engine.model_config.top_k
        fed = rep["total_input_tokens"] + rep["total_output_tokens"] - n
        assert [sum(row) for row in srv["expert_load"]["tokens"]] == [top_k * fed] * len(
            srv["expert_load"]["layers"]
        )
    load = srv["expert_load"]
    assert all(x >= 1.0 for x in load["imbalance_per_layer"])
    cache = srv["expert_cache"]
    assert cache["hits"] + cache["misses"] > 0 and 0 <= cache["hit_rate"] <= 1
    assert cache["bytes_copied"] > 0  # offload_mode fetch: every miss is a copy
    timeline = rep["timeline"]
    assert sum(x * timeline["bin_s"] for x in timeline["completed_per_s"][:-1]) <= n
    assert "api_key" not in rep["config"]
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["expert_load.png", "latency.png", "throughput.png"]
    for name in pngs:
        assert (tmp_path / "plots" / name).read_bytes()[:8] == PNG_MAGIC


def test_jsonl_workload_chat_and_completions(server: RunningServer, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    lines = [
        {"prompt": "The river runs", "max_tokens": 3},
        {"messages": [{"role": "user", "content": "Say something"}], "max_tokens": 2},
        {"prompt": "Once upon a time"},  # max_tokens from --output-len
    ]
    prompts.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    rc, rep = bench(
        server,
        tmp_path,
        "--workload",
        "jsonl",
        "--prompts-file",
        str(prompts),
        "--num-requests",
        "5",
        "--max-concurrency",
        "2",
        "--output-len",
        "4",
        "--ignore-eos",
        "--no-metrics",
    )
    assert rc == 0 and rep["completed"] == 5
    reqs = rep["requests"]
    # The file replays from its start; chat lines go to /v1/chat/completions.
    assert [r["endpoint"] for r in reqs] == (["completions", "chat", "completions"] * 2)[:5]
    assert [r["output_tokens"] for r in reqs] == [3, 2, 4, 3, 2]
    # --max-concurrency 2: never more than two requests in flight.
    events = sorted([(r["sent"], 1) for r in reqs] + [(r["ended"], -1) for r in reqs])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    assert peak <= 2
    assert rep["server"] == {"moeserve": False, "note": "no /metrics to scrape"}


def test_demo_workload(server: RunningServer, tmp_path: Path) -> None:
    pytest.importorskip("moeserve.demo_tasks")
    rc, rep = bench(
        server,
        tmp_path,
        "--workload",
        "demo",
        "--num-requests",
        "6",
        "--demo-tasks",
        "add,reverse",
        "--demo-max-tokens",
        "8",
    )
    assert rc == 0 and rep["completed"] == 6 and rep["workload"] == "demo"
    acc = rep["demo_accuracy"]
    assert acc["checked"] == 6 and 0 <= acc["correct"] <= 6
    assert all(r["endpoint"] == "chat" for r in rep["requests"])


def test_duration_bounds_the_run(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t0 = time.monotonic()
    out = tmp_path / "r.json"
    rc = main(
        [
            "bench",
            "serve",
            "--base-url",
            server.url,
            "--duration",
            "1.5",
            "--request-rate",
            "6",
            "--output-len",
            "2",
            "--input-len",
            "4",
            "--result-json",
            str(out),
            "--save-detailed",
        ]
    )
    elapsed = time.monotonic() - t0
    rep = json.loads(out.read_text())
    assert rc == 0 and rep["failed"] == 0
    # Poisson arrivals at 6/s for 1.5 s: ~9; none start after the deadline.
    assert 1 <= rep["num_requests"] <= 30
    assert max(r["sent"] for r in rep["requests"]) <= 1.5
    assert elapsed < 30  # stopped by itself, shortly after the last reply
    assert "requests:" in capsys.readouterr().err  # the progress bar (on by default)


def test_failures_are_counted_not_raised(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, rep = bench(server, tmp_path, "--model", "no-such-model", "--num-requests", "3")
    assert rc == 1  # nothing succeeded
    assert (rep["completed"], rep["failed"]) == (0, 3)
    [(message, count)] = rep["errors"].items()
    assert count == 3 and message.startswith("HTTP 404")
    assert rep["ttft_ms"]["mean"] is None
    assert "no request succeeded" in capsys.readouterr().err


def test_unbounded_or_invalid_runs_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="must end by itself"):
        LoadTestConfig("http://127.0.0.1:1")
    with pytest.raises(ValueError, match="finite --request-rate or --max-concurrency"):
        LoadTestConfig("http://127.0.0.1:1", duration=10)
    with pytest.raises(ValueError, match="--num-requests"):
        LoadTestConfig("http://127.0.0.1:1", num_requests=MAX_REQUESTS + 1)
    with pytest.raises(ValueError, match="--duration"):
        LoadTestConfig("http://127.0.0.1:1", duration=1e9, request_rate=1)
    LoadTestConfig("http://127.0.0.1:1", duration=10, max_concurrency=4)  # closed loop: fine
    assert main(["bench", "serve", "--goodput", "ttft=500"]) == 2
    assert "KEY:MS" in capsys.readouterr().err


def test_length_specs_and_slos() -> None:
    import random

    rng = random.Random(0)
    assert {length_sampler("7", rng)() for _ in range(5)} == {7}
    draws = [length_sampler("uniform:10:20", rng)() for _ in range(200)]
    assert min(draws) >= 10 and max(draws) <= 20
    draws = [length_sampler("lognormal:100:0.5", rng)() for _ in range(2000)]
    assert 80 < sorted(draws)[1000] < 120  # the median
    assert min(length_sampler("normal:2:50", rng)() for _ in range(200)) == 1  # clipped
    for bad in ("0", "x", "uniform:1", "gamma:1:2", "normal:-1:2"):
        with pytest.raises(ValueError):
            length_sampler(bad, rng)
    assert parse_goodput(["ttft:500", "tpot:50", "e2e:10000"]) == {
        "ttft": 500.0,
        "tpot": 50.0,
        "e2el": 10000.0,
    }
    for bad in (["ttft"], ["itl:5"], ["ttft:0"], ["ttft:abc"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)
    s = summarize([0.001 * x for x in range(1, 101)])  # 1..100 ms
    assert (s["count"], s["mean"], s["median"]) == (100, pytest.approx(50.5), pytest.approx(50.5))
    assert s["p90"] == pytest.approx(90.1) and s["p99"] == pytest.approx(99.01)


def test_random_prompts_from_a_tokenizer_with_special_tokens() -> None:
    """--tokenizer: exact-length prompts that never contain the tokenizer's special tokens."""
    from tokenizers import Tokenizer

    from moeserve.assets import demo_model_path
    from moeserve.bench.workloads import random_workload

    path = demo_model_path()
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    work = random_workload("40", "8", seed=3, tokenizer=str(path))
    for _ in range(5):
        spec = next(work)
        assert spec.prompt is not None and spec.max_tokens == 8
        assert len(tok.encode(spec.prompt, add_special_tokens=False).ids) == 40
        assert not any(s in spec.prompt for s in special)


# ---- The streaming client: the built-in HTTP/1.1 one (--http-client auto) and httpx ----

CLIENTS = [("auto", "asyncio"), ("auto", "uvloop"), ("httpx", "asyncio")]
HEAD_200 = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
DONE = b"data: [DONE]\n\n"
Script = Callable[[asyncio.StreamWriter], Awaitable[bool]]  # True: keep the connection


def _event(
    text: str | None = None, finish: str | None = None, chat: bool = False, **top: Any
) -> bytes:
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
    if chat:
        choice["delta"] = {} if text is None else {"content": text}
    else:
        choice["text"] = text or ""
    body = {
        "id": "x",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [choice] if text is not None or finish else [],
        **top,
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _chunked(*events: bytes, end: bool = True) -> bytes:
    """Each event in its own chunk, as uvicorn writes them; then the last chunk."""
    return b"".join(b"%x\r\n%b\r\n" % (len(e), e) for e in events) + (b"0\r\n\r\n" * end)


USAGE = _event(usage={"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5})
ABC = [_event("a"), _event("b"), _event("c", "length"), USAGE, DONE]


def _scripted(
    script: Script,
    client: tuple[str, str],
    *,
    n: int = 1,
    timeout: float = 5.0,
    endpoint: str = "completions",
    answer: str | None = None,
    api_key: str | None = None,
    port: int | None = None,
    rate: float = math.inf,
) -> tuple[list[RequestResult], list[bytes], int]:
    """Run the load tester against a server on 127.0.0.1 that answers every request with
    `script`, one request at a time (or at `rate` per second); (results, request heads,
    connections accepted)."""
    heads: list[bytes] = []
    accepted = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted[0] += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
                heads.append(head)
                if not await script(writer):
                    return
        except asyncio.CancelledError:  # the test is over (a script that outlives the client)
            pass
        finally:
            writer.close()

    async def main() -> list[RequestResult]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{port or server.sockets[0].getsockname()[1]}"
        messages = [{"role": "user", "content": "hi"}]
        spec = RequestSpec(
            endpoint,
            3,
            prompt=None if endpoint == "chat" else "hi",
            messages=messages if endpoint == "chat" else None,
            answer=answer,
        )
        cfg = LoadTestConfig(
            url,
            model="m",
            api_key=api_key,
            num_requests=n,
            request_rate=rate,
            max_concurrency=None if math.isfinite(rate) else 1,
            request_timeout=timeout,
            progress=False,
            scrape_metrics=False,
            http_client=client[0],
        )
        try:  # bounded: a hang here is a failure, not a stuck suite
            run = await asyncio.wait_for(run_load(cfg, itertools.repeat(spec), "t"), 20)
        finally:
            server.close()
        return run.results

    if client[1] == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.run(main()), heads, accepted[0]
    return asyncio.run(main()), heads, accepted[0]


def _unused_port() -> int:
    """A port on 127.0.0.1 that nobody listens on: connecting to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _writes(*parts: bytes, keep: bool = True, pause: float = 0.0) -> Script:
    """Write `parts`, each its own send (`pause` s after each); keep: the connection."""

    async def script(writer: asyncio.StreamWriter) -> bool:
        for part in parts:
            writer.write(part)
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        return keep

    return script


@pytest.mark.parametrize("client", CLIENTS, ids="-".join)
@pytest.mark.parametrize(
    ("reply", "keep", "error"),
    [
        (
            b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n"
            b"content-length: 37\r\n\r\n"
            b'{"error":{"message":"no such model"}}',
            True,
            "HTTP 404: no such model",
        ),
        (
            b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n"
            + _chunked(b"busy"),
            True,
            "HTTP 503: busy",
        ),
        (
            HEAD_200 + _chunked(_event("a"), b'data: {"error": {"message": "stopped"}}\n\n', DONE),
            True,
            "stream error: stopped",
        ),
        (
            HEAD_200 + _chunked(_event("a"), _event("b", "length")),
            True,
            "the stream ended without [DONE]",
        ),
        (
            HEAD_200 + _chunked(_event("a"), _event("b"), end=False)[:-20],
            False,
            "RemoteProtocolError: peer closed connection without sending complete message body "
            "(incomplete chunked read)",
        ),
        (b"", False, "RemoteProtocolError: Server disconnected without sending a response."),
        (
            HEAD_200 + _chunked(b"data: {oops\n\n", DONE),
            True,
            "JSONDecodeError: Expecting property "
            "name enclosed in double quotes: line 1 column 2 (char 1)",
        ),
    ],
    ids=["404", "503-chunked", "error-chunk", "no-done", "truncated", "no-response", "not-json"],
)
def test_stream_failures_are_recorded_not_raised(
    client: tuple[str, str], reply: bytes, keep: bool, error: str
) -> None:
    """Each failure reads the same on both clients, and the run goes on (3 requests)."""
    results, _, _ = _scripted(_writes(reply, keep=keep), client, n=3)
    assert [r.error for r in results] == [error] * 3
    assert not any(r.success or r.latency is not None for r in results)


@pytest.mark.parametrize("client", CLIENTS, ids="-".join)
def test_stream_timeout_and_refused_connection(client: tuple[str, str]) -> None:
    # One token, then nothing until well past --request-timeout: the token counts, the one
    # that comes after the timeout reaches nothing.
    t0 = time.monotonic()
    script = _writes(HEAD_200 + _chunked(_event("a"), end=False), _chunked(_event("b")), pause=1.0)
    [res], _, _ = _scripted(script, client, timeout=0.5)
    assert res.error == "timed out after 0.5s (--request-timeout)"
    assert len(res.chunk_times) == 1 and res.ttft is not None and not res.success
    assert time.monotonic() - t0 < 10
    [res], _, _ = _scripted(_writes(), client, port=_unused_port())
    assert res.error is not None and res.error.startswith("ConnectError: ")


def _split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("client", CLIENTS, ids="-".join)
@pytest.mark.parametrize("framing", ["split", "crlf", "cr", "length", "until-close"])
def test_stream_framings(client: tuple[str, str], framing: str) -> None:
    """Chunk sizes, payloads and CRLFs cut across reads; lines ended by CRLF or CR (as SSE
    allows), cut after a CR; Content-Length; a body ended by the close, its last line not."""
    body = b"".join(ABC)
    if framing == "split":
        script = _writes(HEAD_200, *_split(_chunked(*ABC), 5), pause=0.002)
    elif framing in ("crlf", "cr"):
        pieces = _split(body.replace(b"\n", b"\r\n" if framing == "crlf" else b"\r"), 40)
        assert any(p.endswith(b"\r") for p in pieces)  # a CR, and what follows in a later read
        script = _writes(
            HEAD_200, *(_chunked(p, end=False) for p in pieces), b"0\r\n\r\n", pause=0.002
        )
    elif framing == "length":
        script = _writes(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"content-length: %d\r\n\r\n%b" % (len(body), body)
        )
    else:
        script = _writes(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n",
            body.rstrip(b"\n"),
            keep=False,
        )
    results, _, _ = _scripted(script, client, n=2, answer="abc")
    for res in results:
        assert res.error is None and res.success and res.correct
        assert (res.prompt_tokens, res.output_tokens, res.finish_reason) == (2, 3, "length")
        assert len(res.chunk_times) == 3 and len(res.itl) == 2


@pytest.mark.parametrize("client", CLIENTS, ids="-".join)
def test_stream_events_are_timed_when_they_arrive(client: tuple[str, str]) -> None:
    """A chat stream: one token, a pause, then two tokens in one read; each event gets the
    time it is parsed at, so the pause shows as the first ITL, not spread or lost."""
    first = HEAD_200 + _chunked(_event(None, chat=True), _event("a", chat=True), end=False)
    rest = _chunked(
        _event("b", chat=True), _event("c", chat=True), _event(None, "stop", chat=True), DONE
    )
    [res], _, _ = _scripted(_writes(first, rest, pause=0.3), client, endpoint="chat", answer="abc")
    assert res.success and res.correct and res.finish_reason == "stop"
    assert res.output_tokens == 3  # no usage chunk: one per content chunk
    assert res.ttft is not None and res.latency is not None
    assert res.chunk_times[0] == pytest.approx(res.sent + res.ttft)
    assert res.itl[0] >= 0.29 and 0 <= res.itl[1] < res.itl[0] and res.ttft < res.itl[0]
    assert res.latency >= res.chunk_times[-1] - res.sent


@pytest.mark.parametrize("client", CLIENTS, ids="-".join)
@pytest.mark.parametrize("keep", [True, False], ids=["keep-alive", "server-closes"])
def test_stream_connections_and_headers(client: tuple[str, str], keep: bool) -> None:
    """The built-in client reuses connections while the server keeps them (and none after
    the server has closed it); every request carries the API key."""
    script = _writes(HEAD_200 + _chunked(*ABC), keep=keep)
    results, heads, accepted = _scripted(script, client, n=4, api_key="sk-test")
    assert all(r.success for r in results)
    # httpx closes a connection whose body it left unread after [DONE], so it never reuses one.
    assert accepted == (1 if keep and client[0] == "auto" else 4)
    for head in heads:
        assert head.startswith(b"POST /v1/completions HTTP/1.1\r\n")
        assert b"authorization: bearer sk-test\r\n" in head.lower()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_requests_are_never_sent_before_their_arrival_time(loop: str) -> None:
    """uvloop's timers fire up to a millisecond early (libuv's cached clock, in ms): the
    schedule is kept in real time all the same."""
    n, rate = 40, 400.0
    results, _, _ = _scripted(_writes(HEAD_200 + _chunked(*ABC)), ("auto", loop), n=n, rate=rate)
    cfg = LoadTestConfig("http://127.0.0.1:1", num_requests=n, request_rate=rate)
    arrivals = [0.0, *itertools.accumulate(itertools.islice(arrival_gaps(cfg), n - 1))]
    assert all(r.success for r in results)
    early = [at - r.sent for r, at in zip(results, arrivals) if r.sent < at]
    assert not early, early


def test_https_and_http_client_httpx_stream_over_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    """The built-in client is for http:// only; https:// and --http-client httpx use httpx
    (its own message for a refused connection shows which client tried)."""
    import moeserve.bench.loadtest as loadtest
    from moeserve.bench.sse_client import StreamClient

    with pytest.raises(ValueError, match="http:// only"):
        StreamClient("https://127.0.0.1:1/v1")

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the built-in client was used")

    monkeypatch.setattr(loadtest, "StreamClient", refuse)
    port = _unused_port()
    for scheme, client in (("https", "auto"), ("http", "httpx")):
        cfg = LoadTestConfig(
            f"{scheme}://127.0.0.1:{port}",
            model="m",
            num_requests=1,
            request_timeout=5,
            progress=False,
            scrape_metrics=False,
            http_client=client,
        )
        spec = RequestSpec("completions", 3, prompt="hi")
        [res] = asyncio.run(run_load(cfg, itertools.repeat(spec), "t")).results
        assert res.error == "ConnectError: All connection attempts failed"


def test_builtin_client_against_moeserve(
    server: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Completions and chat against the real server: the built-in client sees what httpx
    sees, and reuses its connections (at most two per --max-concurrency slot: a stream's
    last chunk may still be on its way, after [DONE], when the slot's next request starts)."""
    from moeserve.bench.sse_client import StreamClient

    connects = [0]
    real_connect = StreamClient._connect

    async def counting_connect(self: StreamClient) -> Any:
        connects[0] += 1
        return await real_connect(self)

    monkeypatch.setattr(StreamClient, "_connect", counting_connect)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "The river runs", "max_tokens": 5})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "Hi"}]})
        + "\n"
    )
    seen = {}
    for client in ("auto", "httpx"):
        rc, rep = bench(
            server,
            tmp_path,
            "--workload",
            "jsonl",
            "--prompts-file",
            str(prompts),
            "--num-requests",
            "10",
            "--max-concurrency",
            "2",
            "--output-len",
            "4",
            "--ignore-eos",
            "--no-metrics",
            "--http-client",
            client,
        )
        assert rc == 0 and rep["completed"] == 10
        for r in rep["requests"]:
            assert 1 <= len(r["chunk_times"]) <= r["output_tokens"]
            assert len(r["itl"]) == len(r["chunk_times"]) - 1
            assert r["chunk_times"][0] == pytest.approx(r["sent"] + r["ttft"])
            assert r["ttft"] <= r["latency"] <= r["ended"] - r["sent"]
        seen[client] = [
            (r["endpoint"], r["prompt_tokens"], r["output_tokens"], r["finish_reason"])
            for r in rep["requests"]
        ]
        if client == "auto":
            assert connects[0] <= 4
    assert seen["auto"] == seen["httpx"]
    assert [x[0] for x in seen["auto"]] == ["completions", "chat"] * 5
    assert [x[2] for x in seen["auto"]] == [5, 4] * 5
