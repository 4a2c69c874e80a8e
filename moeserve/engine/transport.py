"""How an EngineClient reaches its engine loop: a thread of this process, or a process of its
own. Both move the same messages (engine/messages.py) and deliver what the loop produced to
the client on its event loop, merged per request while the client was busy.

In one process the server and the engine share one GIL, and the server's per-token work
(chunks, socket writes) delays the engine's next step; in its own process the engine steps
regardless, as vLLM's engine core does (on an H200 at 64 streams: 1.25x the thread's HTTP
throughput, benchmarks/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import multiprocessing as mp
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Protocol

from moeserve.config import EngineConfig
from moeserve.engine.core import EngineCore
from moeserve.engine.frames import Frames, write_frame
from moeserve.engine.loop import CALLS, EngineLoop
from moeserve.engine.messages import (
    Abort,
    Call,
    Dead,
    EngineInfo,
    EngineRequest,
    Failed,
    Outputs,
    Ready,
    Reply,
    Shutdown,
)
from moeserve.engine.worker import engine_main
from moeserve.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Deliver = Callable[[Outputs | Dead | BaseException], None]


class Transport(Protocol):
    def attach(self, loop: asyncio.AbstractEventLoop, deliver: Deliver) -> None:
        """Start delivering the engine's messages to `deliver`, on `loop`."""

    def send(self, msg: EngineRequest | Abort) -> None:
        """Hand a message to the engine (OSError when it is gone)."""

    def ask(self, name: str) -> concurrent.futures.Future[Any]:
        """Ask a CALLS question; the future settles with the answer."""

    def wait(self, fut: concurrent.futures.Future[Any], timeout: float) -> Any:
        """The answer within `timeout` seconds, else concurrent.futures.TimeoutError."""

    async def close(self) -> None:
        """Stop the engine after its current step."""


class ThreadTransport:
    """The engine loop in a daemon thread of this process: it steps back to back while any
    request is pending, so a step never waits for the event loop to get around to it."""

    def __init__(self, loop: EngineLoop) -> None:
        self.engine_loop = loop
        self.core = loop.core
        self._thread: threading.Thread | None = None
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._deliver: Deliver | None = None

    @classmethod
    def start(
        cls, config: EngineConfig, tokenizer: Tokenizer | None, setup: Callable[[], None] | None
    ) -> tuple[ThreadTransport, EngineInfo]:
        if setup is not None:
            setup()
        core = EngineCore(config, progress=False)
        core.warm_up()
        return cls(EngineLoop(core, tokenizer)), core.info()

    def attach(self, loop: asyncio.AbstractEventLoop, deliver: Deliver) -> None:
        self._aloop, self._deliver = loop, deliver
        self.engine_loop.on_output(lambda: loop.call_soon_threadsafe(self._drain))
        self._thread = threading.Thread(target=self._run, name="moeserve-engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.engine_loop.run()
        except BaseException as e:  # the step crashed: nobody may hang on a dead engine
            log.exception("engine loop died")
            assert self._aloop is not None
            self._aloop.call_soon_threadsafe(self._died, f"{type(e).__name__}: {e}")

    def _drain(self) -> None:
        out = self.engine_loop.take()
        if out is not None and self._deliver is not None:
            self._deliver(out)

    def _died(self, message: str) -> None:
        self._drain()  # what finished before the failure still reaches its stream
        if self._deliver is not None:
            self._deliver(Dead(message))

    def send(self, msg: EngineRequest | Abort) -> None:
        if isinstance(msg, Abort):
            self.engine_loop.abort(msg.request_id)
        else:
            self.engine_loop.submit(msg)

    def ask(self, name: str) -> concurrent.futures.Future[Any]:
        # Read here: the counters live on the device, a copy does not need the loop's thread.
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            fut.set_result(CALLS[name](self.core))
        except Exception as e:  # noqa: BLE001 - the caller gets it
            fut.set_exception(e)
        return fut

    def wait(self, fut: concurrent.futures.Future[Any], timeout: float) -> Any:
        return fut.result(timeout)

    async def close(self) -> None:
        if self._thread is not None:
            self.engine_loop.stop()
            await asyncio.to_thread(self._thread.join)
            self._thread = None


class ProcessTransport:
    """The engine loop in a spawned child process (engine/worker.py), messages pickled over a
    pipe that the event loop reads itself: no reader thread contends for the GIL with the
    loop's streaming."""

    def __init__(self, proc: mp.process.BaseProcess, conn: Connection) -> None:
        self._proc, self._conn = proc, conn
        self._frames = Frames(conn.fileno())
        self._send_lock = threading.Lock()
        self._calls: dict[int, concurrent.futures.Future[Any]] = {}
        self._call_ids = itertools.count()
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._deliver: Deliver | None = None
        self._closing = False
        self._lost_error: BaseException | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @property
    def proc(self) -> mp.process.BaseProcess:
        return self._proc

    @classmethod
    def start(
        cls, config: EngineConfig, setup: Callable[[], None] | None
    ) -> tuple[ProcessTransport, EngineInfo]:
        """Spawn the engine process and wait until it has loaded and warmed up; raise its
        load error (a ValueError for a bad checkpoint or option) otherwise."""
        ctx = mp.get_context("spawn")  # a fresh interpreter: no CUDA state inherited
        conn, child = ctx.Pipe()
        level = logging.getLogger().getEffectiveLevel()
        proc = ctx.Process(
            target=engine_main,
            args=(child, config, level, setup),
            name="moeserve-engine",
            daemon=True,
        )
        proc.start()
        child.close()
        while not conn.poll(0.2):
            if not proc.is_alive():
                raise RuntimeError(
                    f"the engine process exited with code {proc.exitcode} while loading"
                )
        try:
            msg = conn.recv()
        except EOFError:
            proc.join(5)
            raise RuntimeError(
                f"the engine process exited with code {proc.exitcode} while loading"
            ) from None
        if isinstance(msg, Failed):
            proc.join(10)
            raise msg.error
        assert isinstance(msg, Ready)
        return cls(proc, conn), msg.info

    def attach(self, loop: asyncio.AbstractEventLoop, deliver: Deliver) -> None:
        self._aloop, self._deliver = loop, deliver
        self._loop_thread = threading.get_ident()
        loop.add_reader(self._conn.fileno(), self._on_readable)

    def send(self, msg: EngineRequest | Abort | Call | Shutdown) -> None:
        if self._lost_error is not None:
            raise OSError(f"the engine process is gone: {self._lost_error}")
        with self._send_lock:
            write_frame(self._conn.fileno(), msg)

    def ask(self, name: str) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        n = next(self._call_ids)
        self._calls[n] = fut
        fut.add_done_callback(lambda _: self._calls.pop(n, None))
        self.send(Call(n, name))
        return fut

    def wait(self, fut: concurrent.futures.Future[Any], timeout: float) -> Any:
        if self._aloop is not None and threading.get_ident() != self._loop_thread:
            return fut.result(timeout)  # the event loop reads the reply
        # On the loop itself (or before attach): read until the reply comes.
        deadline = time.monotonic() + timeout
        while not fut.done():
            left = deadline - time.monotonic()
            if left <= 0 or not self._frames.ready(left):
                raise concurrent.futures.TimeoutError("the engine did not answer")
            self._pump()
        return fut.result()

    def _on_readable(self) -> None:
        """On the event loop: whatever the engine has sent (it merges what arrives while the
        loop streams, so this never falls behind by more than one read)."""
        try:
            self._pump()
        except BaseException as e:  # noqa: BLE001 - EOF or a crash: fail whatever is open
            self._lost(e)

    def _pump(self) -> None:
        alive = self._frames.read()
        for msg in self._frames.messages():
            if isinstance(msg, Reply):
                fut = self._calls.get(msg.call_id)
                if fut is not None and not fut.done():
                    if isinstance(msg.result, BaseException):
                        fut.set_exception(msg.result)
                    else:
                        fut.set_result(msg.result)
            elif self._deliver is not None:
                self._deliver(msg)
        if not alive:
            raise EOFError("the engine process closed its pipe")

    def _lost(self, e: BaseException) -> None:
        """The engine process is gone (or its loop died): every open request fails."""
        if self._aloop is not None:
            self._aloop.remove_reader(self._conn.fileno())
        if self._lost_error is not None:
            return
        if self._closing:
            err: BaseException = RuntimeError("the engine is shutting down")
        else:
            self._proc.join(1)
            err = RuntimeError(
                f"the engine process exited unexpectedly (exit code {self._proc.exitcode})"
            )
            log.error("%s", err, exc_info=None if isinstance(e, EOFError) else e)
        self._lost_error = err
        for fut in list(self._calls.values()):
            fut.set_exception(err)
        if self._deliver is not None:
            self._deliver(err)

    async def close(self) -> None:
        """Stop the engine process (after its current step)."""
        if self._closing:
            return
        self._closing = True
        with contextlib.suppress(OSError):
            self.send(Shutdown())
        # Keep reading while it stops: a sender blocked on a full pipe would never finish.
        deadline = time.monotonic() + 30
        while self._proc.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(BaseException):
                if self._frames.ready(0):
                    self._pump()
            await asyncio.sleep(0.02)
        if self._proc.is_alive():
            log.warning("the engine process did not stop in 30 s: terminating it")
            self._proc.terminate()
            await asyncio.to_thread(self._proc.join, 5)
        self._proc.join(1)
        self._lost(EOFError("closed"))
        self._conn.close()
