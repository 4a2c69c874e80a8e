"""A stuck engine is visible: with requests open and no step finishing, /health and /ready
turn 503, new requests are refused at once, and /metrics answers from its last figures.
Also: admission stops in the signal handler itself, and a full queue refuses before parsing."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from moeserve.server.errors import APIError
from tests.server_fixture import (
    RunningServer,
    assert_envelope,
    build_checkpoint,
    start_server,
    wait_for,
)

LONG = {"prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": True}
OK = {"prompt": "Hello", "max_tokens": 2}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory)


def _engine_pid(running: RunningServer) -> int | None:
    client = running.state.client
    return getattr(client._transport, "pid", None) if client is not None else None


@pytest.fixture
def srv(ckpt: Path) -> Iterator[RunningServer]:
    running = start_server(
        ckpt,
        process=True,
        max_model_len=1024,
        watchdog_timeout=1.5,
    )
    try:
        yield running
    finally:
        pid = _engine_pid(running)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        running.stop()


def test_a_stopped_engine_turns_the_probes_503(srv: RunningServer) -> None:
    pid = _engine_pid(srv)
    assert pid is not None
    http = srv.client()
    http.get("/metrics")  # a first scrape, whose figures serve while the engine is stuck
    with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as s:
        lines = s.iter_lines()
        next(lines)
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_for(lambda: http.get("/health").status_code == 503, 15, "an unhealthy probe")
            err = assert_envelope(http.get("/health"), 503)
            assert err["code"] == "engine_stalled"
            assert_envelope(http.get("/ready"), 503)
            resp = http.post("/v1/completions", json=OK)
            assert assert_envelope(resp, 503)["code"] == "engine_stalled"
            assert "retry-after" in resp.headers
            # Scrapes answer from the last known figures (they waited 10 s on the engine).
            for _ in range(3):
                t0 = time.monotonic()
                assert http.get("/metrics").status_code == 200
                assert time.monotonic() - t0 < 8  # bounded, not a performance claim
        finally:
            os.kill(pid, signal.SIGCONT)
        # Once it steps again, the server recovers by itself.
        wait_for(lambda: http.get("/health").status_code == 200, 15, "a healthy probe")
    assert http.get("/ready").status_code == 200
    assert http.post("/v1/completions", json=OK).status_code == 200


def test_an_idle_engine_is_not_stuck(ckpt: Path) -> None:
    running = start_server(ckpt, watchdog_timeout=0.3)
    try:
        time.sleep(1.0)  # longer than the timeout, with nothing to do
        assert running.client().get("/health").status_code == 200
        assert not running.state.stalled
    finally:
        running.stop()


def test_the_signal_handler_stops_admission_itself(ckpt: Path) -> None:
    running = start_server(ckpt)
    try:
        seen: dict[str, object] = {}
        done = threading.Event()

        def on_loop() -> None:
            # What the signal handler runs; nothing else may run on the loop in between.
            running.server.begin_shutdown()
            seen["phase"] = running.state.phase
            try:
                running.state.check_admissible()
            except APIError as e:
                seen["status"] = e.status
            done.set()

        assert running.server.loop is not None
        running.server.loop.call_soon_threadsafe(on_loop)
        assert done.wait(10)
        assert seen == {"phase": "draining", "status": 503}
    finally:
        running.stop()


def test_a_full_queue_refuses_before_reading_the_body(ckpt: Path) -> None:
    running = start_server(ckpt, max_queued_requests=1)
    try:
        loop, state = running.server.loop, running.state
        assert loop is not None
        tickets = []
        admitted = threading.Event()
        # One admitted request holds the only queue slot (admit() runs on the event loop).
        loop.call_soon_threadsafe(lambda: (tickets.append(state.admit(1)), admitted.set()))
        assert admitted.wait(10) and state.queued == 1
        # A body that never arrives: the 429 must not wait for it.
        host, port = running.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                b'{"prompt": "'
            )
            head = sock.recv(65536).decode()
        assert head.startswith("HTTP/1.1 429"), head
        assert "queue_full" in head
        loop.call_soon_threadsafe(tickets[0].close)
        wait_for(lambda: state.queued == 0, 10, "the slot back")
        assert running.client().post("/v1/completions", json=OK).status_code == 200
    finally:
        running.stop()


def test_watchdog_flag_reaches_the_config(ckpt: Path) -> None:
    running = start_server(ckpt, watchdog_timeout=0)
    try:
        assert running.state._watchdog is None  # 0 turns it off
        assert httpx.get(running.url + "/health").status_code == 200
    finally:
        running.stop()
