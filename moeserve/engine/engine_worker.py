"""Inside the engine process: load, warm up, then step while threads receive and send.

The server's side and the protocol are in engine_process.py. Here a receiver thread takes adds,
aborts and metric reads off the pipe, the main thread steps the engine back to back, and a
sender thread sends what the steps produced, merged per request while the pipe is busy.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from moeserve.config import ModelConfig
from moeserve.engine.async_engine import admit, merge_outputs
from moeserve.engine.engine import Engine
from moeserve.engine.outputs import RequestOutput, StepStats
from moeserve.runtime import freeze_startup_heap

log = logging.getLogger(__name__)

# The GIL switch interval of the engine process. A step waits for the device (the sampled
# tokens; on the torch path also each MoE layer's expert counts) and releases the GIL
# meanwhile; if the sender or receiver thread takes it, the step thread gets it back only
# when that thread blocks or the interval (Python's default: 5 ms) runs out. (On an H200 the
# change went with HTTP mixed steps of 46 -> 30 ms, but the offline ones moved too; most of
# that gap was cuDNN compiling attention plans, benchmarks/RESULTS.md, fourth pass.)
SWITCH_INTERVAL_S = 0.0005

# What the server may ask the engine between steps (read at scrape time, never per step).
_CALLS = {
    "expert_token_counts": lambda e: e.expert_token_counts().tolist(),
    "expert_cache_stats": lambda e: e.expert_cache_stats(),
}


@dataclass(frozen=True)
class EngineInfo:
    """What the server needs to know of the loaded engine."""

    model_config: ModelConfig
    max_model_len: int
    vocab_size: int
    offloads_experts: bool


def _portable(e: BaseException) -> BaseException:
    """The exception itself if it survives pickling (a ValueError keeps exit status 2)."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - anything unpicklable travels as its text
        return RuntimeError(f"{type(e).__name__}: {e}")


def engine_main(
    conn: Connection,
    model: str,
    engine_kwargs: dict[str, Any],
    log_level: int,
    setup: Callable[[], None] | None,
) -> None:
    """The engine process's entry point: report ("ready", EngineInfo) or ("failed", error),
    then serve the pipe until "stop" or the server's end of it closes."""
    # The server handles SIGINT/SIGTERM (it drains, then stops this process).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if setup is not None:
            setup()
        from moeserve.engine.llm import LLM

        engine = LLM(model, progress=False, **engine_kwargs).engine
        engine.warm_up()
        freeze_startup_heap("engine process")  # this process is the engine's alone
    except BaseException as e:  # noqa: BLE001 - reported to the server, which exits with it
        conn.send(("failed", _portable(e)))
        return
    info = EngineInfo(
        engine.model_config, engine.max_model_len, engine.vocab_size, engine.offloads_experts
    )
    conn.send(("ready", info))
    _EngineLoop(engine, conn).run()


class _EngineLoop:
    """Inside the engine process: a receiver thread, the step loop, a sender thread."""

    def __init__(self, engine: Engine, conn: Connection) -> None:
        self.engine, self.conn = engine, conn
        self.send_lock = threading.Lock()
        self.cond = threading.Condition()  # guards everything below
        self.adds: list[tuple[str, str | None, list[int], Any]] = []
        self.aborts: set[str] = set()
        self.admitted: list[tuple[str, BaseException | None]] = []
        self.outbox: dict[str, RequestOutput] = {}
        self.stats: list[StepStats] = []
        self.stop = False
        self.done: str | None = None  # set when the step loop ends: "" stopped, else an error
        self.wake = threading.Event()

    def send(self, msg: tuple) -> None:
        with self.send_lock:
            self.conn.send(msg)

    def run(self) -> None:
        sys.setswitchinterval(SWITCH_INTERVAL_S)  # this process steps; its threads only relay
        threading.Thread(target=self._receive, name="moeserve-recv", daemon=True).start()
        sender = threading.Thread(target=self._send_loop, name="moeserve-send")
        sender.start()
        error = ""
        try:
            self._step_loop()
        except BaseException as e:  # noqa: BLE001 - every open request must learn of it
            log.exception("engine loop died")
            error = f"{type(e).__name__}: {e}"
        with self.cond:
            self.done = error
            self.cond.notify()
        sender.join()

    def _receive(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                os._exit(0)  # the server is gone: nobody is left to serve
            kind = msg[0]
            if kind == "add":
                with self.cond:
                    self.adds.append(msg[1:])
                self.wake.set()
            elif kind == "abort":
                with self.cond:
                    self.aborts.add(msg[1])
                self.wake.set()
            elif kind == "call":
                _, n, name = msg
                try:
                    result: Any = _CALLS[name](self.engine)
                except BaseException as e:  # noqa: BLE001 - the caller gets it
                    result = _portable(e)
                self.send(("reply", n, result))
            elif kind == "stop":
                self.stop = True
                self.wake.set()
                return

    def _apply_pending(self) -> None:
        with self.cond:
            adds, self.adds = self.adds, []
            aborts, self.aborts = self.aborts, set()
        # Text prompts travel for the outputs' record; the ids are what the engine runs.
        results = admit(self.engine, [(rid, prompt if prompt is not None else ids, ids, params)
                                      for rid, prompt, ids, params in adds], aborts)  # fmt: skip
        if results:
            with self.cond:
                self.admitted.extend((rid, err and _portable(err)) for rid, err in results)
                self.cond.notify()

    def _step_loop(self) -> None:
        while not self.stop:
            self.wake.clear()
            self._apply_pending()
            if not self.engine.has_work():
                self.wake.wait()
                continue
            result = self.engine.step()
            for out in result.outputs:
                # The server knows each request's prompt: no need to send it every step.
                out.prompt_token_ids, out.prompt = [], None
            with self.cond:
                merge_outputs(self.outbox, result.outputs)
                if result.stats is not None:
                    self.stats.append(result.stats)
                self.cond.notify()

    def _send_loop(self) -> None:
        while True:
            with self.cond:
                while not (self.outbox or self.stats or self.admitted) and self.done is None:
                    self.cond.wait()
                admitted, self.admitted = self.admitted, []
                outbox, self.outbox = self.outbox, {}
                stats, self.stats = self.stats, []
                done = self.done
            try:
                if admitted or outbox or stats:
                    self.send(("out", admitted, list(outbox.values()), stats))
                if done is not None and not (admitted or outbox or stats):
                    if done:
                        self.send(("dead", done))
                    return
            except (BrokenPipeError, OSError):
                return
