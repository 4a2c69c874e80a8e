"""`moeserve serve`: run the app under uvicorn with our own signal handling.

uvicorn's handlers would stop the server at the first SIGTERM and cut open streams. Ours
drain instead: readiness turns 503 at once, new requests get 503, requests in flight get up to
--shutdown-timeout seconds to finish and the rest end with an explicit error; then uvicorn
shuts down and the process exits 0. A second SIGTERM/SIGINT ends the drain's wait at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import uvicorn

from moeserve.assets import model_or_demo
from moeserve.config import EngineConfig
from moeserve.engine.client import EngineClient
from moeserve.server.app import create_app
from moeserve.server.state import ServerConfig, ServerState

log = logging.getLogger("moeserve.server")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# After the drain, uvicorn waits this long for idle keep-alive connections to close.
_UVICORN_GRACE_S = 5


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose shutdown is a drain (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.exit_code = 0
        self._drain: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        state.on_fatal = self._fatal

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # Replaces uvicorn's handlers, which also re-raise the signal after shutdown (the
        # exit status would then be the signal's, not 0).
        self.loop = asyncio.get_running_loop()
        if threading.current_thread() is not threading.main_thread():
            yield  # in-process servers (tests) are stopped with begin_shutdown()
            return
        for sig in _SIGNALS:
            self.loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            yield
        finally:
            for sig in _SIGNALS:
                self.loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        log.info("received %s", signal.Signals(sig).name)
        self.begin_shutdown()

    def begin_shutdown(self) -> None:
        """Start the drain (on the event loop); a second call stops what is still running."""
        if self._drain is None:
            self.state.begin_drain()
            self._drain = asyncio.ensure_future(self._drain_then_exit())
        else:
            log.warning("asked again to stop: ending the requests in flight now")
            self.state.stop_all()

    async def _drain_then_exit(self) -> None:
        try:
            await self.state.drain(self.state.config.shutdown_timeout)
        finally:
            self.should_exit = True

    def _fatal(self, error: BaseException) -> None:
        self.exit_code = 2 if isinstance(error, ValueError) else 1
        self.should_exit = True


def build_server(state: ServerState, host: str, port: int, **uvicorn_kwargs: Any) -> DrainingServer:
    """A DrainingServer for `state` (not started); tests run it in a thread."""
    config = uvicorn.Config(
        create_app(state),
        host=host,
        port=port,
        access_log=False,
        log_config=None,
        lifespan="on",
        timeout_graceful_shutdown=_UVICORN_GRACE_S,
        **uvicorn_kwargs,
    )
    return DrainingServer(config, state)


def server_config(args: argparse.Namespace) -> ServerConfig:
    """ServerConfig from the `serve` flags; ValueError (exit 2) for a bad value.

    Without --model the packaged demo model is served, under the name "demo-moe".
    """
    model = model_or_demo(args.model)
    if not Path(model).is_dir():
        raise ValueError(f"--model {model}: not a directory")
    checks: list[tuple[str, bool]] = [
        ("--port must be in 0..65535", 0 <= args.port <= 65535),
        ("--max-queued-requests must be >= 1", args.max_queued_requests >= 1),
        ("--shutdown-timeout must be >= 0", args.shutdown_timeout >= 0),
        ("--max-body-bytes must be >= 1", args.max_body_bytes >= 1),
        ("--watchdog-timeout must be >= 0 (0: off)", args.watchdog_timeout >= 0),
    ]
    for message, ok in checks:
        if not ok:
            raise ValueError(message)
    name = args.served_model_name or os.path.basename(os.path.normpath(model))
    return ServerConfig(
        served_model_name=name,
        api_key=args.api_key or None,
        max_queued_requests=args.max_queued_requests,
        shutdown_timeout=args.shutdown_timeout,
        max_body_bytes=args.max_body_bytes,
        log_prompts=args.log_prompts,
        freeze_gc=True,
        watchdog_timeout=args.watchdog_timeout,
        allowed_hosts=allowed_hosts(args.allowed_hosts),
        tool_call_parser=args.tool_call_parser,
        ui=not args.no_ui,
        trust_request_chat_template=args.trust_request_chat_template,
    )


def allowed_hosts(value: str | None) -> tuple[str, ...] | None:
    """--allowed-hosts: comma-separated host names (`*.example.com` for subdomains); None or
    empty: any host."""
    if not value:
        return None
    hosts = tuple(h.strip().lower() for h in value.split(",") if h.strip())
    for h in hosts:
        if ":" in h and not (h.startswith("[") and h.endswith("]")):  # [::1] is a host
            raise ValueError(f"--allowed-hosts: {h!r}: give host names without a port")
        if "*" in h and h != "*" and not (h.startswith("*.") and "*" not in h[2:]):
            raise ValueError(f"--allowed-hosts: {h!r}: a wildcard must be `*` or `*.domain`")
    return hosts or None


def run(
    args: argparse.Namespace,
    engine: EngineConfig,
    *,
    engine_setup: Callable[[], None] | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status (0 after a drain).

    The engine runs in a process of its own unless --no-engine-process; `engine_setup`
    (picklable) runs there before the model loads (benchmarks use it)."""
    config = server_config(args)
    if not args.model:
        log.info("no --model given: serving the packaged demo model (see the README)")

    def load() -> EngineClient:
        log.info("loading %s", engine.model.path)
        process = not args.no_engine_process
        return EngineClient.start(engine, process=process, setup=engine_setup)

    state = ServerState(config, load)
    server = build_server(state, args.host, args.port)
    log.info(
        "serving %r on http://%s:%d (%s)",
        config.served_model_name,
        args.host,
        args.port,
        _uvicorn_choices(),
    )
    server.run()
    if isinstance(state.load_error, ValueError):
        raise state.load_error  # a bad checkpoint: the CLI prints it and exits 2
    return server.exit_code


def _uvicorn_choices() -> str:
    """What uvicorn's "auto" settings pick: its C parser and uvloop when they are installed
    (dependencies on Linux); the pure-Python fallbacks cost a busy server more CPU."""
    have = {m: importlib.util.find_spec(m) is not None for m in ("httptools", "uvloop")}
    http = "httptools" if have["httptools"] else "h11 (slower: pip install httptools)"
    loop = "uvloop" if have["uvloop"] else "asyncio"
    return f"HTTP parser {http}, event loop {loop}"


def start_in_thread(server: DrainingServer, timeout: float = 30.0) -> threading.Thread:
    """Run `server` in a daemon thread and wait until it listens (for tests and embedding)."""
    thread = threading.Thread(target=server.run, name="moeserve-http", daemon=True)
    thread.start()
    end = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > end:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    return thread


def stop_in_thread(server: DrainingServer, thread: threading.Thread, timeout: float = 30) -> None:
    """Drain and stop a server started by start_in_thread."""
    if server.loop is not None and thread.is_alive():
        server.loop.call_soon_threadsafe(server.begin_shutdown)
    thread.join(timeout)
