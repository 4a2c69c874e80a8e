"""The engine loop: steps a core back to back while requests are pending, and sleeps when
none is. One implementation for every transport: in a thread of the server's process, in an
engine process of its own, or driven inline by the offline LLM.

Adds and aborts may arrive from any thread; they apply between steps, so the core needs no
locks. Each step's deltas go through the output processor, then into an outbox merged per
request until the transport takes them: a consumer that falls behind gets fewer, larger
deltas, never a stalled engine.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from moeserve.engine.core import EngineCore
from moeserve.engine.messages import EngineRequest, Outputs
from moeserve.engine.output import OutputProcessor
from moeserve.engine.outputs import RequestOutput, StepStats
from moeserve.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# What a client may ask the engine between steps (read at scrape time, never per step).
CALLS: dict[str, Callable[[EngineCore], Any]] = {
    "expert_token_counts": lambda core: core.expert_token_counts().tolist(),
    "expert_cache_stats": lambda core: core.expert_cache_stats(),
}


class EngineLoop:
    """A core, its output processor, an inbox and an outbox; see the module docstring."""

    def __init__(self, core: EngineCore, tokenizer: Tokenizer | None) -> None:
        self.core = core
        self.processor = OutputProcessor(tokenizer, core)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            core.set_eos({tokenizer.eos_token_id})
        if tokenizer is not None:
            core.set_tokenizer(tokenizer)
        self._cond = threading.Condition()  # guards the inbox and the outbox
        self._adds: list[EngineRequest] = []
        self._aborts: set[str] = set()
        self._admitted: list[tuple[str, BaseException | None]] = []
        self._outbox: dict[str, RequestOutput] = {}
        self._stats: list[StepStats] = []
        self._notify: Callable[[], None] | None = None
        self._notified = False
        self._wake = threading.Event()
        self._stop = False
        self.steps = 0

    # ------------------------------------------------------------------ any thread
    def submit(self, req: EngineRequest) -> None:
        with self._cond:
            self._adds.append(req)
        self._wake.set()

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._aborts.add(request_id)
        self._wake.set()

    def stop(self) -> None:
        """End run() after the current step."""
        self._stop = True
        self._wake.set()

    def on_output(self, notify: Callable[[], None]) -> None:
        """Call `notify` (from the stepping thread) when the outbox fills after a take()."""
        self._notify = notify

    def take(self) -> Outputs | None:
        """Everything produced since the last take, or None."""
        with self._cond:
            self._notified = False
            if not (self._admitted or self._outbox or self._stats):
                return None
            out = Outputs(self._admitted, list(self._outbox.values()), self._stats)
            self._admitted, self._outbox, self._stats = [], {}, []
            return out

    def wait(self, timeout: float | None = None) -> None:
        """Block until the outbox holds something (or `timeout`)."""
        with self._cond:
            if not (self._admitted or self._outbox or self._stats):
                self._cond.wait(timeout)

    def wake_waiters(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -------------------------------------------------------------- stepping thread
    def admit(self, req: EngineRequest) -> None:
        """Add a request now (the stepping thread only); ValueError if the core refuses it."""
        self.core.add_request(req)
        self.processor.add(req)

    def apply_pending(self) -> None:
        """Apply the adds and aborts that arrived since the last call."""
        with self._cond:
            adds, self._adds = self._adds, []
            aborts, self._aborts = self._aborts, set()
        admitted: list[tuple[str, BaseException | None]] = []
        for req in adds:
            rid = req.request_id
            if rid in aborts:  # gone before it was admitted: nothing to wait for
                aborts.discard(rid)
                admitted.append((rid, None))
                continue
            try:
                self.admit(req)
            except ValueError as e:
                admitted.append((rid, e))
            else:
                admitted.append((rid, None))
        for rid in aborts:
            self.core.abort_request(rid)
            self.processor.abort(rid)
        if admitted:
            self._put(admitted, [], None)

    def step(self) -> tuple[list[RequestOutput], StepStats | None]:
        """One core step and its output processing."""
        result = self.core.step()
        self.steps += 1
        self.processor.process(result.outputs, result.stats)
        return result.outputs, result.stats

    def run(self) -> None:
        """Step while there is work, sleep while there is none, until stop()."""
        while not self._stop:
            self._wake.clear()
            self.apply_pending()
            if not self.core.has_work():
                self._wake.wait()
                continue
            outputs, stats = self.step()
            if outputs or stats is not None:
                self._put([], outputs, stats)

    def _put(
        self,
        admitted: list[tuple[str, BaseException | None]],
        outputs: list[RequestOutput],
        stats: StepStats | None,
    ) -> None:
        with self._cond:
            self._admitted.extend(admitted)
            for out in outputs:
                held = self._outbox.get(out.request_id)
                if held is None:
                    self._outbox[out.request_id] = out
                else:
                    held.absorb(out)
            if stats is not None:
                self._stats.append(stats)
            notify = not self._notified
            self._notified = True
            self._cond.notify_all()
        if notify and self._notify is not None:
            self._notify()
