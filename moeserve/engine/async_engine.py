"""The only asyncio in the engine: request streams, aborts, and the engine's own step thread.

Engine.step() runs back to back in a dedicated thread, so the next step never waits for the
event loop to get around to it (with many streams the loop is busy serialising chunks). Adds
and aborts are handed to that thread, which applies them between steps: the engine itself
needs no locks. Each step's deltas are merged per request into an outbox that the event loop
drains when it can; a stream the loop fell behind on gets several steps' tokens as one delta.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from moeserve.engine.engine import Engine
from moeserve.engine.outputs import RequestOutput, StepStats
from moeserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The step loop crashed; every open and future request fails with this."""


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    prompt_ids: list[int]
    params: SamplingParams
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class AsyncEngine:
    """`async for out in engine.generate(prompt, params, request_id)` yields per-step deltas."""

    def __init__(
        self, engine: Engine, stats_sink: Callable[[StepStats], None] | None = None
    ) -> None:
        self.engine = engine
        self.stats_sink = stats_sink
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._lock = threading.Lock()  # guards everything the two threads exchange below
        self._adds: list[_Add] = []
        self._aborts: set[str] = set()
        self._outbox: dict[str, RequestOutput] = {}
        self._stats: list[StepStats] = []
        self._delivery_pending = False
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self.steps = 0

    @property
    def is_dead(self) -> bool:
        return self.error is not None

    @property
    def num_open_requests(self) -> int:
        return len(self._queues)

    def _ensure_started(self) -> None:
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="moeserve-engine", daemon=True)
            self._thread.start()

    async def encode(self, prompt: str | list[int]) -> list[int]:
        """Tokenise in a worker thread: a huge prompt must not stall other requests."""
        if isinstance(prompt, str) and len(prompt) > 2048:
            return await asyncio.to_thread(self.engine.encode_prompt, prompt)
        return self.engine.encode_prompt(prompt)

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        *,
        prompt_ids: list[int] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's deltas until it finishes; leaving the loop early aborts it.

        Admission errors (ValueError) are raised before the first delta.
        """
        if self.error is not None:
            raise EngineDeadError(f"the engine loop has stopped: {self.error}")
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = prompt_ids if prompt_ids is not None else await self.encode(prompt)
        self._ensure_started()
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = queue
        add = _Add(request_id, prompt, ids, params)
        self._submit(add)
        finished = False
        try:
            await add.done
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                # Deltas that piled up while this stream waited go out as one (one chunk, one
                # socket write), so serving overhead shrinks exactly when it is the bottleneck.
                error: BaseException | None = None
                while not item.finished and not queue.empty():
                    later = queue.get_nowait()
                    if isinstance(later, BaseException):
                        error = later
                        break
                    item.absorb(later)
                finished = item.finished
                yield item
                if error is not None:
                    raise error
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._request_abort(request_id)

    async def abort(self, request_id: str) -> None:
        """Abort a request; its KV blocks are free before the next step runs."""
        self._request_abort(request_id)
        queue = self._queues.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(asyncio.CancelledError(f"request {request_id} aborted"))

    # The transport: how adds and aborts reach the engine (here its thread; a subclass sends
    # them to an engine process). Outputs come back through _post.
    def _submit(self, add: _Add) -> None:
        with self._lock:
            self._adds.append(add)
        self._wake.set()

    def _request_abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.add(request_id)
        self._wake.set()

    def _post(self, outputs: list[RequestOutput], stats: list[StepStats]) -> None:
        """From the engine's side (any thread): merge deltas per request into the outbox and
        have the event loop deliver them, once however many posts pile up meanwhile."""
        loop = self._loop
        assert loop is not None
        with self._lock:
            merge_outputs(self._outbox, outputs)
            self._stats.extend(stats)
            schedule = not self._delivery_pending
            self._delivery_pending = True
        if schedule:
            loop.call_soon_threadsafe(self._deliver)

    # ------------------------------------------------------------ engine thread
    def _apply_pending(self) -> None:
        with self._lock:
            adds, self._adds = self._adds, []
            aborts, self._aborts = self._aborts, set()
        loop = self._loop
        assert loop is not None
        results = admit(self.engine, [(a.request_id, a.prompt, a.prompt_ids, a.params)
                                      for a in adds], aborts)  # fmt: skip
        for add, (_, error) in zip(adds, results):
            loop.call_soon_threadsafe(_settle, add.done, error)

    def _run(self) -> None:
        loop = self._loop
        assert loop is not None
        try:
            while not self._stop:
                self._wake.clear()
                self._apply_pending()
                if not self.engine.has_work():
                    self._wake.wait()
                    continue
                result = self.engine.step()
                self.steps += 1
                self._post(result.outputs, [result.stats] if result.stats is not None else [])
        except BaseException as e:  # the step crashed: nobody may hang on a dead engine
            log.exception("engine loop died")
            self.error = e
            dead = EngineDeadError(f"the engine loop has stopped: {e}")
            loop.call_soon_threadsafe(self._fail, dead)

    # --------------------------------------------------------------- event loop
    def _deliver(self) -> None:
        with self._lock:
            outbox, self._outbox = self._outbox, {}
            stats, self._stats = self._stats, []
            self._delivery_pending = False
        for rid, out in outbox.items():
            queue = self._queues.get(rid)
            if queue is not None:
                queue.put_nowait(out)
        if self.stats_sink is not None:
            for st in stats:
                self.stats_sink(st)

    def _fail(self, error: BaseException) -> None:
        self._deliver()  # what finished before the failure still reaches its stream
        with self._lock:
            adds, self._adds = self._adds, []
        for add in adds:
            _settle(add.done, error)
        for queue in self._queues.values():
            queue.put_nowait(error)

    async def shutdown(self) -> None:
        """Stop the engine thread (after its current step); open requests end with
        EngineDeadError."""
        if self._thread is not None:
            self._stop = True
            self._wake.set()
            await asyncio.to_thread(self._thread.join)
            self._thread = None
            if self.error is None:
                self._fail(EngineDeadError("the engine is shutting down"))


def admit(
    engine: Engine,
    adds: list[tuple[str, str | list[int], list[int], SamplingParams]],
    aborts: set[str],
) -> list[tuple[str, ValueError | None]]:
    """Between steps: queue the (id, prompt, prompt ids, params) adds and drop the aborted
    requests. Returns each add's admission error (None when admitted, or when it was aborted
    before it got in: nothing to wait for then)."""
    results: list[tuple[str, ValueError | None]] = []
    for rid, prompt, ids, params in adds:
        if rid in aborts:  # gone before it was admitted
            aborts.discard(rid)
            results.append((rid, None))
            continue
        try:
            engine.add_request(rid, prompt, params, prompt_ids=ids)
        except ValueError as e:
            results.append((rid, e))
        else:
            results.append((rid, None))
    for rid in aborts:
        engine.abort_request(rid)
    return results


def merge_outputs(outbox: dict[str, RequestOutput], outputs: list[RequestOutput]) -> None:
    """Fold a step's deltas into the undelivered ones, one merged delta per request."""
    for out in outputs:
        held = outbox.get(out.request_id)
        if held is None:
            outbox[out.request_id] = out
        else:
            held.absorb(out)


def _settle(fut: asyncio.Future[None], error: BaseException | None) -> None:
    """Resolve an add's future on the event loop, unless its caller already gave up."""
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)
