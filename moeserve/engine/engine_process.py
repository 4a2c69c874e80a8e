"""The engine in a process of its own, behind the AsyncEngine interface.

With the engine stepping in a thread of the server's process, both share one GIL: at 64
streams the event loop's per-token work (chunks, socket writes) holds it while the step thread
waits to launch the next step. Here the engine steps in its own process (engine_worker.py),
so its loop never waits for the server's; the server tokenises, streams and answers metrics,
as vLLM's API server does beside its engine core (on an H200 at 64 streams: 1.25x the
thread's HTTP throughput, benchmarks/RESULTS.md).

Protocol (pickled tuples over a multiprocessing Pipe):
  server -> engine: ("add", id, prompt text or None, prompt ids, params), ("abort", id),
                    ("call", n, name) for the metrics' reads, ("stop",)
  engine -> server: ("ready", EngineInfo) or ("failed", error) once loaded,
                    ("out", admitted [(id, error or None)], deltas, step stats) per send,
                    ("reply", n, result or error), ("dead", message) if a step crashed.
The engine merges deltas per request until its sender thread gets to send them, so a server
that falls behind gets fewer, larger messages rather than a queue of stale ones.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import multiprocessing as mp
import os
import pickle
import select
import struct
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from moeserve.engine.async_engine import AsyncEngine, EngineDeadError, _Add, _settle
from moeserve.engine.engine import encode_prompt
from moeserve.engine.engine_worker import EngineInfo, engine_main
from moeserve.engine.expert_store import ExpertCacheStats
from moeserve.engine.outputs import StepStats
from moeserve.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# How long a metrics scrape waits for the engine's answer before serving the last known one.
SCRAPE_WAIT_S = 1.0

class _Frames:
    """A Connection's messages read as the bytes arrive, never blocking: the event loop's
    reader may find the descriptor non-blocking (uvloop makes it so) and a message only
    partly written."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray()

    def read(self) -> bool:
        """Take what has arrived; False at end of stream (the engine process is gone)."""
        try:
            data = os.read(self.fd, 1 << 20)
        except (BlockingIOError, InterruptedError):
            return True
        self.buf += data
        return bool(data)

    def ready(self, timeout: float) -> bool:
        return bool(select.select([self.fd], [], [], timeout)[0])

    def messages(self) -> Iterator[Any]:
        """Every complete message in the buffer (multiprocessing's framing: a 4-byte length,
        or -1 and an 8-byte one)."""
        while len(self.buf) >= 4:
            (size,), head = struct.unpack("!i", self.buf[:4]), 4
            if size == -1:
                if len(self.buf) < 12:
                    return
                (size,), head = struct.unpack("!Q", self.buf[4:12]), 12
            if len(self.buf) < head + size:
                return
            payload = bytes(self.buf[head : head + size])
            del self.buf[: head + size]
            yield pickle.loads(payload)


def _write_frame(fd: int, msg: Any) -> None:
    """Send one message in multiprocessing's framing, waiting out a full buffer on a
    non-blocking descriptor (a 2 MB prompt is more than a socket buffer holds)."""
    payload = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    n = len(payload)
    head = struct.pack("!i", n) if n <= 0x7FFFFFFF else struct.pack("!iQ", -1, n)
    view = memoryview(head + payload)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            select.select([], [fd], [], 1.0)


# ------------------------------------------------------------------------ the server's side
class EngineProcess(AsyncEngine):
    """AsyncEngine whose engine runs in a child process. `start()` loads it (blocking, in a
    loader thread); `attach()` on the event loop before the first request."""

    def __init__(
        self,
        proc: mp.process.BaseProcess,
        conn: Connection,
        info: EngineInfo,
        tokenizer: Tokenizer | None,
    ) -> None:
        super().__init__(None)  # type: ignore[arg-type]  # no engine in this process
        self._proc, self._conn = proc, conn
        self.model_config = info.model_config
        self.max_model_len = info.max_model_len
        self.vocab_size = info.vocab_size
        self.offloads_experts = info.offloads_experts
        self.tokenizer = tokenizer
        self._send_lock = threading.Lock()
        self._pending: dict[str, _Add] = {}  # sent adds awaiting their admission
        self._prompts: dict[str, tuple[str | None, list[int]]] = {}  # per open request
        self._calls: dict[int, concurrent.futures.Future[Any]] = {}
        self._scrapes: dict[str, concurrent.futures.Future[Any]] = {}  # unanswered reads
        self._call_ids = itertools.count()
        self._closing = False
        self._last_counts: list[list[int]] | None = None
        self._last_cache_stats: list[ExpertCacheStats] = []
        self._loop_thread: int | None = None
        self._frames = _Frames(conn.fileno())

    @classmethod
    def start(
        cls,
        model: str | Path,
        engine_kwargs: dict[str, Any],
        *,
        setup: Callable[[], None] | None = None,
    ) -> EngineProcess:
        """Spawn the engine process, wait until it has loaded and warmed up; raise its load
        error (a ValueError for a bad checkpoint or option) otherwise. `setup` (picklable)
        runs in the child first."""
        ctx = mp.get_context("spawn")  # a fresh interpreter: no CUDA state inherited
        conn, child = ctx.Pipe()
        level = logging.getLogger().getEffectiveLevel()
        proc = ctx.Process(
            target=engine_main, args=(child, str(model), engine_kwargs, level, setup),
            name="moeserve-engine", daemon=True,
        )  # fmt: skip
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
        if msg[0] == "failed":
            proc.join(10)
            raise msg[1]
        info: EngineInfo = msg[1]
        path = Path(model)
        tok = Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None
        return cls(proc, conn, info, tok)

    def attach(self, stats_sink: Callable[[StepStats], None] | None = None) -> None:
        """Bind to the running event loop, which reads the engine's messages itself: no
        reader thread contends for the GIL with the loop's streaming."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.stats_sink = stats_sink
        self._loop.add_reader(self._conn.fileno(), self._on_readable)

    # ------------------------------------------------------------- what Engine offers
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        return encode_prompt(self.tokenizer, self.model_config.vocab_size, prompt)

    async def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str) and len(prompt) > 2048:
            return await asyncio.to_thread(self.encode_prompt, prompt)
        return self.encode_prompt(prompt)

    def expert_token_counts(self) -> torch.Tensor:
        """[sparse layers, E] from the engine, or its last known counts when it does not
        answer at once (stuck or dead): a scrape never waits on the engine."""
        counts = self._scrape("expert_token_counts")
        if counts is not None:
            self._last_counts = counts
        if self._last_counts is None:
            layers = self.model_config.num_sparse_layers
            return torch.zeros(layers, self.model_config.num_experts, dtype=torch.int64)
        return torch.tensor(self._last_counts, dtype=torch.int64)

    def expert_cache_stats(self) -> list[ExpertCacheStats]:
        """Per-layer cache counters from the engine (its last known ones when it does not
        answer at once)."""
        stats = self._scrape("expert_cache_stats")
        if stats is not None:
            self._last_cache_stats = stats
        return self._last_cache_stats

    def _scrape(self, name: str) -> Any:
        """A metrics read: the engine's answer within SCRAPE_WAIT_S, else None. The receiver
        thread answers between and during steps, so only a stopped or hung process misses
        the wait; its question stays asked (never a second one), and the answer, when it
        comes, serves the next scrape."""
        if self.error is not None:
            return None
        fut = self._scrapes.get(name)
        if fut is None:
            try:
                fut = self._scrapes[name] = self._ask(name)
            except OSError:
                return None
        try:
            result = self._wait(fut, SCRAPE_WAIT_S)
        except concurrent.futures.TimeoutError:
            return None
        except (EngineDeadError, OSError, EOFError):
            result = None
        if fut.done():
            del self._scrapes[name]
        return result

    def _off_loop(self) -> bool:
        return self._loop is not None and threading.get_ident() != self._loop_thread

    def _ask(self, name: str) -> concurrent.futures.Future[Any]:
        """Send a call; the event loop's reader settles the future with the reply."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        n = next(self._call_ids)
        self._calls[n] = fut
        fut.add_done_callback(lambda _: self._calls.pop(n, None))
        self._send(("call", n, name))
        return fut

    def _wait(self, fut: concurrent.futures.Future[Any], timeout: float) -> Any:
        """The call's answer within `timeout` seconds, else TimeoutError."""
        if self._off_loop():
            return fut.result(timeout)  # the event loop reads the reply
        # On the loop itself (or before attach): read until the reply comes.
        deadline = time.monotonic() + timeout
        while not fut.done():
            left = deadline - time.monotonic()
            if left <= 0 or not self._frames.ready(left):
                raise concurrent.futures.TimeoutError("the engine did not answer")
            self._pump()
        return fut.result()

    # ---------------------------------------------------------------- the transport
    def _send(self, msg: tuple) -> None:
        with self._send_lock:
            _write_frame(self._conn.fileno(), msg)

    def _ensure_started(self) -> None:
        assert self._loop is not None, "attach() the engine process before generating"

    def _submit(self, add: _Add) -> None:
        with self._lock:
            self._pending[add.request_id] = add
        prompt = add.prompt if isinstance(add.prompt, str) else None
        self._prompts[add.request_id] = (prompt, add.prompt_ids)
        try:
            self._send(("add", add.request_id, prompt, add.prompt_ids, add.params))
        except OSError as e:
            with self._lock:
                self._pending.pop(add.request_id, None)
            _settle(add.done, EngineDeadError(f"the engine process is gone: {e}"))

    def _request_abort(self, request_id: str) -> None:
        self._prompts.pop(request_id, None)
        if self.error is None:
            with contextlib.suppress(OSError):  # a dead process: the reader reports it
                self._send(("abort", request_id))

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
            self._handle(msg)
        if not alive:
            raise EOFError("the engine process closed its pipe")

    def _handle(self, msg: tuple) -> None:
        if msg[0] == "out":
            _, admitted, outputs, stats = msg
            for rid, err in admitted:
                add = self._pending.pop(rid, None)
                if add is not None:
                    _settle(add.done, err)
            for out in outputs:
                queue = self._queues.get(out.request_id)
                if queue is not None:
                    out.prompt, out.prompt_token_ids = self._prompts.get(out.request_id, (None, []))
                    queue.put_nowait(out)
                if out.finished:
                    self._prompts.pop(out.request_id, None)
            if self.stats_sink is not None:
                for st in stats:
                    self.stats_sink(st)
        elif msg[0] == "reply":
            fut = self._calls.get(msg[1])
            if fut is not None:
                if isinstance(msg[2], BaseException):
                    fut.set_exception(msg[2])
                else:
                    fut.set_result(msg[2])
        elif msg[0] == "dead":
            raise EngineDeadError(f"the engine loop has stopped: {msg[1]}")

    def _lost(self, e: BaseException) -> None:
        """The engine process is gone (or its loop died): every open request fails."""
        if self._loop is not None:
            self._loop.remove_reader(self._conn.fileno())
        if isinstance(e, EngineDeadError):
            err = e
        elif self._closing:
            err = EngineDeadError("the engine is shutting down")
        else:
            self._proc.join(1)
            err = EngineDeadError(
                f"the engine process exited unexpectedly (exit code {self._proc.exitcode})"
            )
            log.error("%s", err, exc_info=None if isinstance(e, EOFError) else e)
        if self.error is None:
            self.error = err
            for fut in list(self._calls.values()):
                fut.set_exception(err)
            self._fail(err)

    def _fail(self, error: BaseException) -> None:
        self._prompts.clear()
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for add in pending:
            _settle(add.done, error)
        super()._fail(error)

    async def shutdown(self) -> None:
        """Stop the engine process (after its current step) and fail what is still open."""
        if self._closing:
            return
        self._closing = True
        with contextlib.suppress(OSError):
            self._send(("stop",))
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
        self._lost(EngineDeadError("the engine is shutting down"))
        self._conn.close()
