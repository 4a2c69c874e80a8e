"""Real uvicorn servers for the server tests: in a background thread, on 127.0.0.1, port 0."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from moeserve.config import EngineConfig
from moeserve.engine.client import EngineClient
from moeserve.engine.core import EngineCore
from moeserve.server.serve import DrainingServer, build_server, start_in_thread, stop_in_thread
from moeserve.server.state import ServerConfig, ServerState
from tests.checkpoints import make_checkpoint

MODEL_NAME = "tiny-moe"


def build_checkpoint(tmp_path_factory: pytest.TempPathFactory, positions: int = 1024) -> Path:
    """A tiny Mixtral with the test tokenizer and chat template; `positions` (1024) so that
    slow (long) generations are possible. Test modules wrap this in their `ckpt` fixture."""
    path = tmp_path_factory.mktemp("srv") / "mixtral"
    return make_checkpoint(path, "mixtral", tokenizer=True, max_position_embeddings=positions)


@dataclass
class RunningServer:
    url: str
    state: ServerState
    server: DrainingServer
    thread: Any
    clients: list[httpx.Client] = field(default_factory=list)

    @property
    def engine(self) -> EngineCore:
        """The engine core (servers started with process=False: it runs in this process)."""
        assert self.state.client is not None and self.state.client.core is not None
        return self.state.client.core

    def client(self, **kw: Any) -> httpx.Client:
        c = httpx.Client(base_url=self.url, timeout=30, **kw)
        self.clients.append(c)
        return c

    def stop(self) -> None:
        for c in self.clients:
            c.close()
        stop_in_thread(self.server, self.thread)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until no request runs anywhere: engine, admission, KV pool."""
        wait_for(
            lambda: (
                not self.engine.has_unfinished()
                and self.state.inflight == 0
                and self.engine.scheduler.stats().kv_blocks_used == 0
            ),
            timeout,
        )


def wait_for(cond: Callable[[], bool], timeout: float, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.01)


def start_server(
    ckpt: Path,
    *,
    engine_factory: Callable[[], EngineClient] | None = None,
    wait_ready: bool = True,
    max_model_len: int = 128,
    engine_kwargs: dict[str, Any] | None = None,
    process: bool = False,
    **config: Any,
) -> RunningServer:
    """Start a server in this process, its engine in a thread (or, with process=True, in an
    engine process); engine options are the tests' small defaults."""
    config.setdefault("served_model_name", MODEL_NAME)

    def load() -> EngineClient:
        kwargs = {"block_size": 4, "max_model_len": max_model_len, **(engine_kwargs or {})}
        kwargs.setdefault("device", "cpu")
        return EngineClient.start(EngineConfig.from_options(ckpt, **kwargs), process=process)

    state = ServerState(ServerConfig(**config), engine_factory or load)
    server = build_server(state, "127.0.0.1", 0)
    thread = start_in_thread(server)
    port = server.servers[0].sockets[0].getsockname()[1]
    running = RunningServer(f"http://127.0.0.1:{port}", state, server, thread)
    if wait_ready:
        wait_for(lambda: state.ready, 60, "readiness")
    return running


def serving(ckpt: Path, **kwargs: Any) -> Iterator[RunningServer]:
    """Body of a server fixture: start, yield, stop."""
    running = start_server(ckpt, **kwargs)
    try:
        yield running
    finally:
        running.stop()


def sse_events(lines: Iterator[str]) -> list[Any]:
    """Parse an SSE body: JSON payloads, and the string "[DONE]" for the end marker."""
    events: list[Any] = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_envelope(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


GREEDY: dict[str, Any] = {"temperature": 0.0}


class EngineFault:
    """Makes a running server's engine die: `arm(n, rows)` and the n-th step from now that
    runs at least `rows` sequences raises RuntimeError("device lost") inside the runner, as a
    lost device would. Counting such steps (not arming once a stream has begun) keeps a test
    from racing the engine: on a loaded machine a short request may finish before a client
    thread gets to arm."""

    def __init__(self, running: RunningServer) -> None:
        runner = running.engine.executor.runner
        self._real, self._left, self._rows = runner.execute, None, 1
        runner.execute = self._execute

    def arm(self, steps: int, rows: int = 1) -> None:
        self._left, self._rows = steps, rows

    def _execute(self, work: Any, feed: Any = None, prompt: Any = None) -> Any:
        if self._left is not None and len(work) >= self._rows:
            self._left -= 1
            if self._left <= 0:
                raise RuntimeError("device lost")
        return self._real(work, feed, prompt)
