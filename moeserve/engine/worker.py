"""Inside the engine process: load, warm up, then run the engine loop while a receiver
thread takes messages off the pipe and a sender thread sends what the steps produced
(merged per request while the pipe is busy)."""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from moeserve.config import EngineConfig
from moeserve.engine.loop import CALLS, EngineLoop
from moeserve.engine.messages import (
    Abort,
    Call,
    Dead,
    EngineRequest,
    Failed,
    Ready,
    Reply,
    Shutdown,
)
from moeserve.runtime import freeze_startup_heap

log = logging.getLogger(__name__)

# The GIL switch interval of the engine process. A step waits for the device (the sampled
# tokens; on the torch path also each MoE layer's expert counts) and releases the GIL
# meanwhile; if the sender or receiver thread takes it, the step thread gets it back only
# when that thread blocks or the interval (Python's default: 5 ms) runs out.
SWITCH_INTERVAL_S = 0.0005


def _portable(e: BaseException) -> BaseException:
    """The exception itself if it survives pickling (a ValueError keeps exit status 2)."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - anything unpicklable travels as its text
        return RuntimeError(f"{type(e).__name__}: {e}")


def engine_main(
    conn: Connection, config: EngineConfig, log_level: int, setup: Callable[[], None] | None
) -> None:
    """The engine process's entry point: report Ready or Failed, then serve the pipe until
    Shutdown or the server's end of it closes."""
    # The server handles SIGINT/SIGTERM (it drains, then stops this process).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if setup is not None:
            setup()
        from moeserve.engine.core import EngineCore
        from moeserve.tokenizer import Tokenizer

        core = EngineCore(config, progress=False)
        core.warm_up()
        path = Path(config.model.path)
        tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None
        loop = EngineLoop(core, tokenizer)
        freeze_startup_heap("engine process")  # this process is the engine's alone
    except BaseException as e:  # noqa: BLE001 - reported to the server, which exits with it
        conn.send(Failed(_portable(e)))
        return
    conn.send(Ready(core.info()))
    _Pipe(loop, conn).run()


class _Pipe:
    """The engine loop's two relays: a receiver thread and a sender thread."""

    def __init__(self, loop: EngineLoop, conn: Connection) -> None:
        self.loop, self.conn = loop, conn
        self.send_lock = threading.Lock()
        self.done: str | None = None  # set when the step loop ends: "" stopped, else an error

    def send(self, msg: Any) -> None:
        with self.send_lock:
            self.conn.send(msg)

    def run(self) -> None:
        sys.setswitchinterval(SWITCH_INTERVAL_S)  # this process steps; its threads only relay
        threading.Thread(target=self._receive, name="moeserve-recv", daemon=True).start()
        sender = threading.Thread(target=self._send_loop, name="moeserve-send")
        sender.start()
        error = ""
        try:
            self.loop.run()
        except BaseException as e:  # noqa: BLE001 - every open request must learn of it
            log.exception("engine loop died")
            error = f"{type(e).__name__}: {e}"
        self.done = error
        self.loop.wake_waiters()
        sender.join()

    def _receive(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                os._exit(0)  # the server is gone: nobody is left to serve
            if isinstance(msg, EngineRequest):
                self.loop.submit(msg)
            elif isinstance(msg, Abort):
                self.loop.abort(msg.request_id)
            elif isinstance(msg, Call):
                try:
                    result: Any = CALLS[msg.name](self.loop.core)
                except BaseException as e:  # noqa: BLE001 - the caller gets it
                    result = _portable(e)
                self.send(Reply(msg.call_id, result))
            elif isinstance(msg, Shutdown):
                self.loop.stop()
                return

    def _send_loop(self) -> None:
        while True:
            done = self.done
            out = self.loop.take()
            try:
                if out is not None:
                    out.admitted = [(rid, e and _portable(e)) for rid, e in out.admitted]
                    self.send(out)
                elif done is not None:
                    if done:
                        self.send(Dead(done))
                    return
            except (BrokenPipeError, OSError):
                return
            if out is None:
                self.loop.wait(0.5)
