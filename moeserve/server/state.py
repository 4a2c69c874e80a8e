"""The server's life: loading in the background, admission (queue limit), draining.

Phases: loading -> ready -> draining (or failed when the model does not load). Inference
routes admit a request only while ready; each admitted HTTP request holds a `Ticket` until its
response has been sent, so the drain knows what is still in flight.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry

from moeserve.engine.client import EngineClient
from moeserve.engine.output import token_text
from moeserve.engine.outputs import StepStats
from moeserve.metrics import Metrics
from moeserve.metrics_cache import ExpertCacheCollector
from moeserve.runtime import freeze_startup_heap
from moeserve.server.errors import (
    RETRY_DRAINING,
    RETRY_LOADING,
    RETRY_QUEUE_FULL,
    APIError,
    bad_request,
    unavailable,
)

log = logging.getLogger("moeserve.server")
T = TypeVar("T")
# Inputs longer than this (characters, token ids or body bytes) are handled off the event loop.
OFFLOAD_LEN = 2048


@dataclass(frozen=True)
class ServerConfig:
    """The operator's server options (the engine's live in the engine factory)."""

    served_model_name: str
    api_key: str | None = None
    max_queued_requests: int = 256
    shutdown_timeout: float = 30.0
    max_body_bytes: int = 2_000_000
    log_prompts: bool = False
    # Once loaded, freeze the startup heap out of the garbage collector's scans
    # (runtime.freeze_startup_heap): for a process the server owns, as `moeserve serve` does.
    freeze_gc: bool = False
    # Seconds without a finished engine step, while requests are open, after which the engine
    # counts as stuck: /health and /ready turn 503 and new requests get 503 (0: never).
    watchdog_timeout: float = 30.0
    # Host header values the server answers (None: any); `*.example.com` matches subdomains.
    allowed_hosts: tuple[str, ...] | None = None
    # The tool-call format to parse (moeserve/tool_parsers.py PARSERS); None: from the
    # checkpoint (model_type and chat template).
    tool_call_parser: str | None = None
    # The web page at / and /ui and its JSON at /ui/stats (server/ui.py); off: --no-ui.
    ui: bool = True
    # A request's own chat_template renders (in the sandbox, under its budgets); off: a 400.
    trust_request_chat_template: bool = False


class ServerState:
    """Shared by the routes; touched only from the event loop (the load thread hands over
    through call_soon_threadsafe)."""

    def __init__(self, config: ServerConfig, engine_factory: Callable[[], EngineClient]) -> None:
        """engine_factory loads the model (in a loader thread) and returns its client, the
        engine running in a thread of this process or in a process of its own."""
        self.config = config
        self._factory = engine_factory
        self.phase = "loading"  # loading | ready | draining | failed
        self.client: EngineClient | None = None
        self.metrics: Metrics | None = None
        self.load_error: BaseException | None = None
        self.created = int(time.time())
        self.queued = 0  # admitted prompts that have not produced a token yet
        self.inflight = 0  # admitted HTTP requests whose response is not finished
        self.stopped = False  # the drain gave up on what is still running
        self._stop_hooks: set[Callable[[], None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.on_fatal: Callable[[BaseException], None] | None = None
        self._token_text: dict[int, str] = {}
        self.stalled = False  # the watchdog's verdict: requests wait and no step finishes
        self._last_step = time.monotonic()
        self._busy_since: float | None = None
        self._watchdog: asyncio.Task[None] | None = None
        # Parsing, tokenising and chat templates run here, not in the default executor: the
        # engine's steps run there, and a burst of big prompts must not delay them.
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="moeserve-cpu")

    # ----------------------------------------------------------------------- loading
    def start_loading(self) -> None:
        """Load weights and run one warm-up step in a daemon thread (a SIGTERM during a long
        load must not wait for it), then switch to ready on the event loop."""
        loop = asyncio.get_running_loop()

        def work() -> None:
            try:
                t0 = time.monotonic()
                client = self._factory()
                log.info("model loaded and warmed up in %.1fs", time.monotonic() - t0)
            except BaseException as e:  # noqa: BLE001 - reported, not swallowed
                loop.call_soon_threadsafe(self._failed, e)
            else:
                loop.call_soon_threadsafe(self._loaded, client)

        threading.Thread(target=work, name="moeserve-load", daemon=True).start()

    def _loaded(self, client: EngineClient) -> None:
        cfg = client.model_config
        self.client = client
        self.metrics = Metrics(
            model_name=self.config.served_model_name,
            num_sparse_layers=cfg.num_sparse_layers,
            num_experts=cfg.num_experts,
            expert_counts=client.expert_token_counts,
            sparse_layer_ids=[i for i, sparse in enumerate(cfg.sparse_layers) if sparse],
            registry=CollectorRegistry(),  # private: several servers may share a process
            weight_bytes=client.weight_bytes,
        )
        if client.offloads_experts:
            self.metrics.registry.register(ExpertCacheCollector(client.expert_cache_stats))
        client.attach(stats_sink=self._on_step)
        if self.config.watchdog_timeout > 0:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())
        if self.config.freeze_gc:
            freeze_startup_heap("server")
        if self.phase == "loading":
            self.phase = "ready"

    def _failed(self, error: BaseException) -> None:
        # A bad checkpoint (ValueError) is a message; anything else is a bug: keep the trace.
        log.error(
            "the model failed to load: %s",
            error,
            exc_info=None if isinstance(error, ValueError) else error,
        )
        self.load_error, self.phase = error, "failed"
        if self.on_fatal is not None:
            self.on_fatal(error)

    def _on_step(self, stats: StepStats) -> None:
        self._last_step = time.monotonic()
        assert self.metrics is not None
        self.metrics.observe_step(stats)

    async def _watch(self) -> None:
        """The watchdog: flags the engine as stalled while requests are open and no step has
        finished for watchdog_timeout seconds (a hung device, a stopped engine process), so
        an orchestrator restarts the pod instead of routing more requests into it."""
        timeout = self.config.watchdog_timeout
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            client = self.client
            if client is None or client.num_open_requests == 0:
                self._busy_since = None
                self._set_stalled(False)
                continue
            now = time.monotonic()
            if self._busy_since is None:
                self._busy_since = now
            quiet = now - max(self._last_step, self._busy_since)
            self._set_stalled(quiet > timeout)

    def _set_stalled(self, stalled: bool) -> None:
        if stalled == self.stalled:
            return
        self.stalled = stalled
        if stalled:
            log.error(
                "watchdog: no engine step finished for %.0f s while %d requests are open; "
                "reporting unhealthy",
                self.config.watchdog_timeout,
                self.client.num_open_requests if self.client else 0,
            )
        else:
            log.warning("watchdog: the engine is stepping again")

    def stalled_error(self) -> APIError:
        return APIError(
            503,
            f"the engine has not finished a step in over {self.config.watchdog_timeout:g} "
            "s while requests wait; it looks stuck",
            type="server_error",
            code="engine_stalled",
            headers={"Retry-After": str(RETRY_DRAINING)},
        )

    @property
    def alive(self) -> bool:
        return self.phase != "failed" and not (self.client is not None and self.client.is_dead)

    @property
    def ready(self) -> bool:
        return self.phase == "ready" and self.alive and not self.stalled

    def reject(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.request_rejected(reason)

    def count_response(self, route: str, status: int) -> None:
        """One answered inference request of `route` (/v1/chat/completions, /v1/messages...)."""
        if self.metrics is not None:
            self.metrics.http_requests.labels(route, str(status)).inc()

    # --------------------------------------------------------------------- admission
    def check_serving(self) -> None:
        """503 (+ Retry-After while loading or draining) unless requests are admitted now."""
        if self.phase == "loading":
            raise unavailable("the model is still loading", RETRY_LOADING, reason=None)
        if self.phase == "draining":
            raise unavailable("the server is shutting down", RETRY_DRAINING)
        if not self.alive:
            why = "the model failed to load" if self.load_error else "the engine loop stopped"
            raise APIError(503, why, type="server_error", code="engine_dead")
        if self.stalled:
            raise self.stalled_error()

    def check_admissible(self) -> None:
        """check_serving, and 429 when the queue is already full: decided before the body is
        read or parsed, so that refusing a flood stays cheap."""
        self.check_serving()
        if self.queued >= self.config.max_queued_requests:
            raise self._queue_full()

    def _queue_full(self) -> APIError:
        limit = self.config.max_queued_requests
        return APIError(
            429,
            f"too many requests are queued ({self.queued} of {limit}); retry later",
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(RETRY_QUEUE_FULL)},
            reject_reason="queue_full",
        )

    def admit(self, num_prompts: int) -> Ticket:
        """Admit an HTTP request of `num_prompts` engine requests, or raise 503/429/400."""
        self.check_serving()
        limit = self.config.max_queued_requests
        if num_prompts > limit:
            raise bad_request(
                f"a batch of {num_prompts} prompts is more than the server queues at once "
                f"({limit}, --max-queued-requests)",
                param="prompt",
            )
        if self.queued + num_prompts > limit:
            raise self._queue_full()
        return Ticket(self, num_prompts)

    # ------------------------------------------------------------------------- drain
    def begin_drain(self) -> None:
        """Stop admitting now: called by the signal handler itself, so that no request that
        arrives after the signal is admitted while the drain task is still to start."""
        if self.phase in ("loading", "ready"):
            self.phase = "draining"

    async def drain(self, timeout: float) -> None:
        """Stop admitting, let in-flight requests finish for up to `timeout` seconds, then end
        the rest with an explicit error and wait (briefly) for those responses to go out."""
        self.begin_drain()
        log.info("draining: %d requests in flight, up to %.1fs", self.inflight, timeout)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("shutdown timeout: stopping %d requests in flight", self.inflight)
            self.stop_all()
            try:
                await asyncio.wait_for(self._idle.wait(), 5.0)
            except asyncio.TimeoutError:
                log.error("%d requests did not stop within 5s", self.inflight)

    def on_stop(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Call `hook` when the drain gives up on the requests in flight (at once if it has);
        returns what unregisters it."""
        if self.stopped:
            hook()
        self._stop_hooks.add(hook)
        return lambda: self._stop_hooks.discard(hook)

    def stop_all(self) -> None:
        """End every request still running with an explicit error (the drain's last resort)."""
        self.stopped = True
        for hook in list(self._stop_hooks):
            hook()

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.client is not None:
            await self.client.shutdown()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def offload(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run CPU work (tokenising, templating, parsing) in the server's worker threads."""
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def encode(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        """Engine.encode_prompt (ValueError for an empty prompt or ids outside the vocab),
        off the event loop when the prompt is long."""
        assert self.client is not None
        if len(prompt) > OFFLOAD_LEN:
            return await self.offload(self.client.encode_prompt, prompt, add_special_tokens)
        return self.client.encode_prompt(prompt, add_special_tokens)

    def token_text(self, token_id: int) -> str:
        """The text of one token alone, for logprobs (output.token_text), cached."""
        text = self._token_text.get(token_id)
        if text is None:
            tok = self.client.tokenizer if self.client is not None else None
            text = self._token_text[token_id] = token_text(tok, token_id)
        return text


class Ticket:
    """One admitted HTTP request: holds queue slots until each prompt's first token, and an
    in-flight slot until close()."""

    def __init__(self, state: ServerState, num_prompts: int) -> None:
        self._state = state
        self._waiting = set(range(num_prompts))
        state.queued += num_prompts
        state.inflight += 1
        state._idle.clear()
        self._open = True

    def started(self, index: int) -> None:
        """Prompt `index` is running in the engine (or over): free its queue slot."""
        if index in self._waiting:
            self._waiting.discard(index)
            self._state.queued -= 1

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        for i in list(self._waiting):
            self.started(i)
        self._state.inflight -= 1
        if self._state.inflight == 0:
            self._state._idle.set()
