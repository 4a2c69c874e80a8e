"""Loading, disconnects, a dying engine and the expert counters, on in-process servers."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from moeserve.config import EngineConfig
from moeserve.engine.client import EngineClient
from tests.server_fixture import (
    EngineFault,
    RunningServer,
    assert_envelope,
    build_checkpoint,
    serving,
    sse_events,
    start_server,
    wait_for,
)

LONG = {"prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": True}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory)


def _metric_sum(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_loading_is_503_until_ready(ckpt: Path) -> None:
    release = threading.Event()

    def slow_load() -> EngineClient:
        assert release.wait(30)
        config = EngineConfig.from_options(ckpt, block_size=4, max_model_len=128, device="cpu")
        return EngineClient.start(config, process=False)

    running = start_server(ckpt, engine_factory=slow_load, wait_ready=False)
    try:
        http = running.client()
        assert http.get("/health").status_code == 200  # alive while loading
        for resp in (
            http.get("/ready"),
            http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}),
            http.post("/v1/chat/completions", json={"messages": []}),
        ):
            assert_envelope(resp, 503)
            assert int(resp.headers["Retry-After"]) > 0
        assert http.get("/metrics").status_code == 503
        release.set()
        wait_for(lambda: http.get("/ready").status_code == 200, 30, "readiness")
        r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
        assert r.status_code == 200
    finally:
        release.set()
        running.stop()


@pytest.fixture(scope="module")
def long_srv(ckpt: Path) -> Iterator[RunningServer]:
    yield from serving(ckpt, max_model_len=1024)


def test_fifty_cut_streams_free_everything(long_srv: RunningServer) -> None:
    async def main() -> None:
        limits = httpx.Limits(max_connections=60)
        async with httpx.AsyncClient(base_url=long_srv.url, timeout=30, limits=limits) as http:

            async def cut(i: int, route: str) -> None:
                body = {**LONG, "stream": True, "prompt": f"story {i}"}
                if route.endswith("chat/completions"):
                    body = {
                        "messages": [{"role": "user", "content": f"Hi {i}"}],
                        "max_tokens": 900,
                        "ignore_eos": True,
                        "stream": True,
                    }
                async with http.stream("POST", route, json=body) as resp:
                    assert resp.status_code == 200
                    lines = resp.aiter_lines()
                    for _ in range(3):  # a few chunks in, the client goes away
                        await anext(lines)

            routes = ["/v1/completions", "/v1/chat/completions"]
            await asyncio.gather(*(cut(i, routes[i % 2]) for i in range(50)))

    asyncio.run(main())
    long_srv.wait_idle(timeout=10)
    assert long_srv.state.queued == 0
    r = long_srv.client().post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200


def test_non_streaming_disconnect_aborts(long_srv: RunningServer) -> None:
    http = long_srv.client()
    before = _metric_sum(http.get("/metrics").text, "moeserve_generation_tokens_total")

    async def main() -> None:
        async with httpx.AsyncClient(base_url=long_srv.url, timeout=30) as client:
            task = asyncio.create_task(client.post("/v1/completions", json=LONG))
            while not long_srv.engine.has_unfinished():
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)
            task.cancel()  # closes the connection mid-request
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    long_srv.wait_idle(timeout=10)
    after = _metric_sum(http.get("/metrics").text, "moeserve_generation_tokens_total")
    assert 0 < after - before < 900  # stopped early, not run to max_tokens


def test_dead_engine_fails_open_requests_and_health(ckpt: Path) -> None:
    running = start_server(ckpt, max_model_len=1024)
    try:
        fault = EngineFault(running)
        fault.arm(5, rows=2)  # the fifth step that runs both requests
        http = running.client()
        results: dict[str, httpx.Response] = {}
        plain = threading.Thread(
            target=lambda: results.setdefault("plain", http.post("/v1/completions", json=LONG))
        )
        plain.start()
        with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as resp:
            events = sse_events(resp.iter_lines())
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "engine_dead"
        plain.join(30)
        err = assert_envelope(results["plain"], 500)
        assert err["code"] == "engine_dead" and "device lost" in err["message"]
        assert_envelope(http.get("/health"), 503)
        assert_envelope(http.get("/ready"), 503)
        assert_envelope(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}), 503)
    finally:
        running.stop()


def test_expert_counters_sum_to_tokens_through_the_model(ckpt: Path) -> None:
    running = start_server(ckpt, max_model_len=256)  # fresh: counts start at zero
    try:
        http = running.client()
        assert _metric_sum(http.get("/metrics").text, "moeserve_expert_tokens_total") == 0
        tokens = 0
        bodies = [
            ("/v1/completions", {"prompt": "Hello there", "max_tokens": 7}),
            ("/v1/completions", {"prompt": [1, 5, 9, 33], "max_tokens": 1}),
            ("/v1/completions", {"prompt": "Count: 1 2 3", "max_tokens": 20, "ignore_eos": True}),
            (
                "/v1/chat/completions",
                {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 9},
            ),
        ]
        for route, body in bodies:
            r = http.post(route, json={**body, "temperature": 0})
            assert r.status_code == 200, r.text
            usage = r.json()["usage"]
            # every prompt token and every generated token but the last went through the model
            tokens += usage["prompt_tokens"] + usage["completion_tokens"] - 1
        with http.stream(
            "POST",
            "/v1/completions",
            json={
                "prompt": "Stream me",
                "max_tokens": 5,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        ) as resp:
            usage = sse_events(resp.iter_lines())[-2]["usage"]
        tokens += usage["prompt_tokens"] + usage["completion_tokens"] - 1
        running.wait_idle()
        cfg = running.engine.model_config
        text = http.get("/metrics").text
        assert (
            _metric_sum(text, "moeserve_expert_tokens_total")
            == tokens * cfg.top_k * cfg.num_sparse_layers
        )
        assert running.engine.scheduler.stats().num_preemptions_total == 0
        per_layer = re.findall(r"^moeserve_expert_tokens_layer_total{[^}]*} (\S+)$", text, re.M)
        assert [float(v) for v in per_layer] == [tokens * cfg.top_k] * cfg.num_sparse_layers
    finally:
        running.stop()


def test_drain_in_process_stops_long_requests(ckpt: Path) -> None:
    running = start_server(ckpt, max_model_len=1024, shutdown_timeout=0.5)
    http = running.client()
    results: dict[str, httpx.Response] = {}
    t = threading.Thread(
        target=lambda: results.setdefault(
            "plain", http.post("/v1/completions", json={**LONG, "max_tokens": 1000})
        )
    )
    t.start()
    wait_for(running.engine.has_unfinished, 10, "a running request")
    start = time.monotonic()
    running.server.loop.call_soon_threadsafe(running.server.begin_shutdown)
    wait_for(lambda: running.state.phase == "draining", 5, "draining")
    t.join(30)
    resp = results["plain"]
    if resp.status_code != 200:  # it may have finished within the timeout on a fast machine
        assert assert_envelope(resp, 503)["code"] == "server_shutting_down"
    running.thread.join(30)
    assert not running.thread.is_alive() and time.monotonic() - start < 20


def test_huge_prompt_tokenises_off_the_event_loop(
    long_srv: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tokenizer.encode holds the GIL for the whole call (tokenizers' encode_batch releases
    # it), so a thread alone cannot keep the loop responsive; this test gives the tokenizer
    # the GIL-releasing call to check the server's side: the work happens off the loop.
    tok = long_srv.state.client.tokenizer
    backend = tok._tok

    def encode(text: str, add_special_tokens: bool = True) -> list[int]:
        return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    monkeypatch.setattr(tok, "encode", encode)
    # As for a tokenizer with no byte bound (word-level), so the prompt is tokenised in full.
    monkeypatch.setattr(tok, "min_tokens", lambda text: 0)
    http = long_srv.client()
    huge = {"prompt": "The quick brown fox jumps over the lazy dog. " * 40_000, "max_tokens": 1}
    result: dict[str, httpx.Response] = {}
    big = threading.Thread(
        target=lambda: result.setdefault("r", http.post("/v1/completions", json=huge, timeout=60))
    )
    big.start()
    wait_for(lambda: long_srv.state.inflight == 1, 10, "the big request in flight")
    assert http.get("/health").status_code == 200
    assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
    assert big.is_alive()  # seconds of tokenising are still going on
    big.join(60)
    assert assert_envelope(result["r"], 400)["code"] == "context_length_exceeded"


def test_unexpected_error_is_500_envelope(
    long_srv: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(token_id: int) -> str:
        raise RuntimeError("formatting bug")

    monkeypatch.setattr(long_srv.state, "token_text", broken)
    http = long_srv.client()
    body = {"prompt": "Hi", "max_tokens": 2, "logprobs": 1}
    err = assert_envelope(http.post("/v1/completions", json=body), 500)
    assert err["type"] == "server_error" and "formatting bug" not in err["message"]
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
        events = sse_events(resp.iter_lines())
    assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "server_error"
    monkeypatch.undo()
    long_srv.wait_idle()
    assert http.post("/v1/completions", json=body).status_code == 200
