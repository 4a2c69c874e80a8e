"""EngineClient: what the server (and any asyncio program) talks to, whatever runs the engine.

`async for out in client.generate(request)` streams a request's deltas; leaving the loop early
(or `abort`) aborts it, and its KV blocks are free before the next step. The engine loop runs
behind a transport (engine/transport.py): in a thread of this process, or in a process of its
own; the client never knows which, and neither does the server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import torch

from moeserve.config import EngineConfig
from moeserve.engine.expert_store import ExpertCacheStats
from moeserve.engine.messages import Abort, Dead, EngineInfo, EngineRequest, Outputs
from moeserve.engine.outputs import RequestOutput, StepStats
from moeserve.engine.transport import ProcessTransport, ThreadTransport, Transport
from moeserve.tokenizer import Tokenizer, encode_prompt

log = logging.getLogger(__name__)

# How long a metrics read waits for the engine's answer before serving the last known one.
SCRAPE_WAIT_S = 1.0


class EngineDeadError(RuntimeError):
    """The engine loop stopped; every open and future request fails with this."""


class EngineClient:
    """Request streams over one engine; see the module docstring."""

    def __init__(self, transport: Transport, info: EngineInfo, tokenizer: Tokenizer | None):
        self._transport = transport
        self.model_config = info.model_config
        self.max_model_len = info.max_model_len
        self.vocab_size = info.vocab_size
        self.offloads_experts = info.offloads_experts
        self.weight_bytes = info.weight_bytes
        self.by_priority = info.by_priority
        self.tokenizer = tokenizer
        self.stats_sink: Callable[[StepStats], None] | None = None
        self.error: BaseException | None = None
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._pending: dict[str, asyncio.Future[None]] = {}  # sent adds awaiting admission
        self._prompts: dict[str, tuple[str | None, list[int]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scrapes: dict[str, concurrent.futures.Future[Any]] = {}
        self._last_counts: list[list[int]] | None = None
        self._last_cache_stats: list[ExpertCacheStats] = []

    @classmethod
    def start(
        cls,
        config: EngineConfig,
        *,
        process: bool = True,
        setup: Callable[[], None] | None = None,
    ) -> EngineClient:
        """Load the model and warm it up (blocking: call it from a loader thread), in a process
        of its own or in a thread of this one. Raises the load error (a ValueError for a bad
        checkpoint or option). `setup` (picklable) runs first where the engine runs."""
        path = Path(config.model.path)
        tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None
        transport: Transport
        if process:
            transport, info = ProcessTransport.start(config, setup)
        else:
            transport, info = ThreadTransport.start(config, tokenizer, setup)
        return cls(transport, info, tokenizer)

    @property
    def core(self) -> Any:
        """The EngineCore when it runs in this process (tests, embedding), else None."""
        return getattr(self._transport, "core", None)

    @property
    def is_dead(self) -> bool:
        return self.error is not None

    @property
    def num_open_requests(self) -> int:
        return len(self._queues)

    def encode_prompt(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        """Token ids of a prompt; ValueError for an empty one or ids outside the vocabulary."""
        vocab = self.model_config.vocab_size
        return encode_prompt(self.tokenizer, vocab, prompt, add_special_tokens)

    def attach(self, stats_sink: Callable[[StepStats], None] | None = None) -> None:
        """Bind to the running event loop (before the first request); each step's statistics
        go to `stats_sink` there."""
        self._loop = asyncio.get_running_loop()
        self.stats_sink = stats_sink
        self._transport.attach(self._loop, self._on_message)

    # -------------------------------------------------------------------- requests
    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Stream a request's deltas until it finishes; leaving the loop early aborts it.
        Admission errors (ValueError) are raised before the first delta."""
        rid = request.request_id
        if self.error is not None:
            raise EngineDeadError(f"the engine loop has stopped: {self.error}")
        if rid in self._queues:
            raise ValueError(f"request id {rid!r} is already in use")
        assert self._loop is not None, "attach() the client before generating"
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[rid] = queue
        self._prompts[rid] = (request.prompt, request.prompt_ids)
        admitted = self._pending[rid] = self._loop.create_future()
        finished = False
        try:
            try:
                self._transport.send(request)
            except OSError as e:
                raise EngineDeadError(f"the engine is gone: {e}") from None
            await admitted
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
            self._queues.pop(rid, None)
            self._pending.pop(rid, None)
            self._prompts.pop(rid, None)
            if not finished:
                self._send_abort(rid)

    async def abort(self, request_id: str) -> None:
        """Abort a request; its KV blocks are free before the next step runs."""
        self._send_abort(request_id)
        queue = self._queues.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(asyncio.CancelledError(f"request {request_id} aborted"))

    def _send_abort(self, request_id: str) -> None:
        if self.error is None:
            with contextlib.suppress(OSError):  # a dead engine: the transport reports it
                self._transport.send(Abort(request_id))

    # ------------------------------------------------------------ from the engine
    def _on_message(self, msg: Outputs | Dead | BaseException) -> None:
        """On the event loop: a transport's delivery."""
        if isinstance(msg, Outputs):
            for rid, err in msg.admitted:
                fut = self._pending.pop(rid, None)
                if fut is not None and not fut.done():
                    if err is None:
                        fut.set_result(None)
                    else:
                        fut.set_exception(err)
            for out in msg.outputs:
                queue = self._queues.get(out.request_id)
                if queue is not None:
                    out.prompt, out.prompt_token_ids = self._prompts.get(out.request_id, (None, []))
                    queue.put_nowait(out)
            if self.stats_sink is not None:
                for st in msg.stats:
                    self.stats_sink(st)
        elif isinstance(msg, Dead):
            self._fail(EngineDeadError(f"the engine loop has stopped: {msg.message}"))
        else:
            self._fail(msg)

    def _fail(self, error: BaseException) -> None:
        if self.error is not None:
            return
        if not isinstance(error, EngineDeadError):
            error = EngineDeadError(str(error))
        self.error = error
        for fut in self._scrapes.values():
            fut.cancel()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(error)
        self._pending.clear()
        for queue in self._queues.values():
            queue.put_nowait(error)

    # --------------------------------------------------------------------- metrics
    def expert_token_counts(self) -> torch.Tensor:
        """[sparse layers, E] from the engine, or its last known counts when it does not
        answer within SCRAPE_WAIT_S (stuck or dead): a scrape never waits on the engine."""
        counts = self._scrape("expert_token_counts")
        if counts is not None:
            self._last_counts = counts
        if self._last_counts is None:
            cfg = self.model_config
            return torch.zeros(cfg.num_sparse_layers, cfg.num_experts, dtype=torch.int64)
        return torch.tensor(self._last_counts, dtype=torch.int64)

    def expert_cache_stats(self) -> list[ExpertCacheStats]:
        """Per-layer cache counters (the last known ones when the engine does not answer)."""
        stats = self._scrape("expert_cache_stats")
        if stats is not None:
            self._last_cache_stats = stats
        return self._last_cache_stats

    def _scrape(self, name: str) -> Any:
        """The engine's answer within SCRAPE_WAIT_S, else None. An unanswered question stays
        asked (never a second one); its answer, when it comes, serves the next scrape."""
        if self.error is not None:
            return None
        fut = self._scrapes.get(name)
        if fut is None:
            try:
                fut = self._scrapes[name] = self._transport.ask(name)
            except OSError:
                return None
        try:
            result = self._transport.wait(fut, SCRAPE_WAIT_S)
        except concurrent.futures.TimeoutError:
            return None
        except (concurrent.futures.CancelledError, EngineDeadError, OSError, EOFError):
            result = None
        if fut.done():
            del self._scrapes[name]
        if isinstance(result, BaseException):
            return None
        return result

    async def shutdown(self) -> None:
        """Stop the engine (after its current step); open requests end with EngineDeadError."""
        await self._transport.close()
        self._fail(EngineDeadError("the engine is shutting down"))
