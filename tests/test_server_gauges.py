"""Gauges follow the request set even when no step follows: aborted requests leave
/metrics at once, with their KV blocks free, whether the engine runs in a thread or in its
own process."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server_fixture import RunningServer, build_checkpoint, start_server, wait_for

STREAMS, PLAIN = 24, 8
LONG = {"prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": True}
KW = {"max_num_seqs": 64}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory)


@pytest.fixture(params=["thread", "process"])
def srv(request: pytest.FixtureRequest, ckpt: Path) -> Iterator[RunningServer]:
    running = start_server(
        ckpt, process=request.param == "process", max_model_len=1024, engine_kwargs=KW
    )
    try:
        yield running
    finally:
        running.stop()


def _gauges(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    names = (
        "moeserve_num_requests_running",
        "moeserve_num_requests_waiting",
        "moeserve_kv_cache_usage_perc",
    )
    out = {n: float(re.search(rf"^{n} (\S+)$", text, re.M).group(1)) for n in names}
    m = re.search(r'^moeserve_request_success_total\{finished_reason="abort"\} (\S+)$', text, re.M)
    out["aborted"] = float(m.group(1))
    return out


def test_aborts_clear_the_gauges_while_idle(srv: RunningServer) -> None:
    async def run() -> None:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
            started = asyncio.Event()
            seen = 0

            async def stream() -> None:
                nonlocal seen
                async with http.stream(
                    "POST", "/v1/completions", json={**LONG, "stream": True}
                ) as r:
                    async for _ in r.aiter_lines():
                        seen += 1
                        if seen >= STREAMS:
                            started.set()

            async def plain() -> None:
                await http.post("/v1/completions", json=LONG)

            tasks = [asyncio.create_task(stream()) for _ in range(STREAMS)]
            tasks += [asyncio.create_task(plain()) for _ in range(PLAIN)]
            await asyncio.wait_for(started.wait(), 60)
            await asyncio.sleep(0.2)  # the plain requests run too
            busy = _gauges(srv.url)
            assert busy["moeserve_num_requests_running"] > 0
            assert busy["moeserve_kv_cache_usage_perc"] > 0
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run())
    # Nothing else arrives: the gauges must still come down, and every abort be counted.
    wait_for(
        lambda: (
            _gauges(srv.url)
            == {
                "moeserve_num_requests_running": 0.0,
                "moeserve_num_requests_waiting": 0.0,
                "moeserve_kv_cache_usage_perc": 0.0,
                "aborted": float(STREAMS + PLAIN),
            }
        ),
        10,
        "idle gauges",
    )
    if srv.state.client is not None and srv.state.client.core is not None:
        srv.wait_idle()  # the engine runs in this process: its blocks are free too
