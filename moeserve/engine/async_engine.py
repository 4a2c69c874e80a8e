"""The only asyncio in the engine: request streams, aborts, and one background step loop.

Engine.step() runs in a worker thread so the event loop keeps serving HTTP while the model
computes. Adds and aborts never touch the engine while a step runs: they are queued and
applied by the loop between steps, so the engine itself needs no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
        self._adds: list[_Add] = []
        self._aborts: set[str] = set()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None
        self.steps = 0

    @property
    def is_dead(self) -> bool:
        return self.error is not None

    @property
    def num_open_requests(self) -> int:
        return len(self._queues)

    def _ensure_started(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="engine-loop")

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
        self._adds.append(add)
        self._wake.set()  # type: ignore[union-attr]
        finished = False
        try:
            await add.done
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                # A consumer that fell behind the engine (many streams on one event loop) gets
                # what piled up as one delta: one chunk and one socket write instead of one
                # per step, so serving overhead shrinks exactly when it is the bottleneck.
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

    def _request_abort(self, request_id: str) -> None:
        self._aborts.add(request_id)
        if self._wake is not None:
            self._wake.set()

    def _apply_pending(self) -> None:
        adds, self._adds = self._adds, []
        for add in adds:
            if add.request_id in self._aborts or add.done.cancelled():
                self._aborts.discard(add.request_id)
                continue
            try:
                self.engine.add_request(
                    add.request_id, add.prompt, add.params, prompt_ids=add.prompt_ids
                )
            except ValueError as e:
                add.done.set_exception(e)
            else:
                add.done.set_result(None)
        aborts, self._aborts = self._aborts, set()
        for rid in aborts:
            self.engine.abort_request(rid)

    async def _loop(self) -> None:
        assert self._wake is not None
        try:
            while True:
                self._apply_pending()
                if not self.engine.has_unfinished():
                    self._wake.clear()
                    if not self._adds and not self._aborts:
                        await self._wake.wait()
                    continue
                result = await asyncio.to_thread(self.engine.step)
                self.steps += 1
                for out in result.outputs:
                    queue = self._queues.get(out.request_id)
                    if queue is not None:
                        queue.put_nowait(out)
                if result.stats is not None and self.stats_sink is not None:
                    self.stats_sink(result.stats)
        except asyncio.CancelledError:
            self._fail(EngineDeadError("the engine is shutting down"))
            raise
        except Exception as e:  # the step crashed: nobody may hang on a dead engine
            log.exception("engine loop died")
            self.error = e
            self._fail(EngineDeadError(f"the engine loop has stopped: {e}"))

    def _fail(self, error: BaseException) -> None:
        for add in self._adds:
            if not add.done.done():
                add.done.set_exception(error)
        self._adds = []
        for queue in self._queues.values():
            queue.put_nowait(error)

    async def shutdown(self) -> None:
        """Stop the loop; open requests end with EngineDeadError."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
