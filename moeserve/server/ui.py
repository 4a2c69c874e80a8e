"""The built-in web page (GET / and /ui): a chat playground and a live map of the experts.

The page and its two assets are static files shipped in the package (moeserve/assets/ui/):
no build step, nothing fetched from elsewhere. They are public even with --api-key: they hold
no data, and the page has an API-key field. Everything it shows comes through routes that
need the key: /v1/models, /v1/chat/completions and GET /ui/stats, the expert map's JSON.

/ui/stats is computed from the counters behind /metrics when it is asked (about once a second
per open page): nothing is recorded per request or per step. A small ring of snapshots gives
the sliding window.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import torch
from fastapi import APIRouter
from fastapi.params import Depends
from fastapi.responses import JSONResponse
from starlette.responses import Response

from moeserve.engine.expert_store import ExpertCacheStats
from moeserve.server.errors import RETRY_LOADING, APIError, unavailable
from moeserve.server.state import ServerState

WINDOW_SECONDS = 10.0
_INTERVAL = 0.5  # at most one snapshot per half second, so at most ~21 in the ring
# name -> media type; a fixed list, so no request path ever reaches the file system.
_ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "ui.css": "text/css; charset=utf-8",
    "ui.js": "text/javascript; charset=utf-8",
}
# The page may only load what it ships (no CDN), talk to its own origin, and not be framed.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


def asset(name: str) -> bytes:
    return (files("moeserve.assets") / "ui" / name).read_bytes()


@dataclass
class Snapshot:
    """The cumulative counters at one moment."""

    time: float
    experts_LE: torch.Tensor
    prompt_tokens: float
    generation_tokens: float
    hits_L: list[int]
    misses_L: list[int]
    cache: list[ExpertCacheStats] | None = None  # None: no offloading


class LiveStats:
    """Sliding-window figures over cumulative counters, from snapshots taken when asked.

    The window's baseline is the newest snapshot at least WINDOW_SECONDS old, else the oldest
    one: polled every second, the window spans the last 10 s (the first 10 s after the first
    ask, less). The first ask has no baseline: it shows an empty window rather than
    everything since start, which is what the cumulative /metrics counters are for.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._ring: deque[Snapshot] = deque(maxlen=int(WINDOW_SECONDS / _INTERVAL) + 3)
        self._lock = threading.Lock()  # two pages polling at once: one ring update at a time

    def window(self, now_snap: Snapshot) -> tuple[Snapshot, float]:
        """(baseline, seconds) for `now_snap`, which is recorded when the last is old enough."""
        with self._lock:
            ring, now = self._ring, now_snap.time
            while len(ring) > 1 and now - ring[1].time >= WINDOW_SECONDS:
                ring.popleft()  # keep only the newest snapshot older than the window
            base = ring[0] if ring else now_snap
            if bool((now_snap.experts_LE < base.experts_LE).any()):  # counts restarted
                ring.clear()
                base = now_snap
            if not ring or now - ring[-1].time >= _INTERVAL:
                ring.append(now_snap)
            return base, now - base.time

    def snapshot(self, state: ServerState) -> Snapshot:
        """Read the counters: one device-to-host copy of the expert counts (and the cache's
        counters when offloading), so call it off the event loop."""
        client, metrics = state.client, state.metrics
        assert client is not None and metrics is not None
        cache = client.expert_cache_stats() if client.offloads_experts else None
        return Snapshot(
            time=self._clock(),
            experts_LE=client.expert_token_counts().to(torch.int64),
            # prometheus_client has no public getter for one value; collecting the registry
            # instead would also scrape the engine for the per-expert series.
            prompt_tokens=metrics.prompt_tokens._value.get(),
            generation_tokens=metrics.generation_tokens._value.get(),
            hits_L=[s.hits for s in cache or ()],
            misses_L=[s.misses for s in cache or ()],
            cache=cache,
        )

    def report(self, state: ServerState) -> dict[str, Any]:
        """The JSON of GET /ui/stats (fields in the README, "Web page")."""
        snap = self.snapshot(state)
        base, seconds = self.window(snap)
        client, metrics = state.client, state.metrics
        assert client is not None and metrics is not None
        cfg = client.model_config
        per_s = (lambda n: n / seconds) if seconds > 0 else (lambda n: 0.0)
        return {
            "model": state.config.served_model_name,
            "max_model_len": client.max_model_len,
            "window_seconds": round(seconds, 3),
            "layers": [i for i, sparse in enumerate(cfg.sparse_layers) if sparse],
            "num_experts": cfg.num_experts,
            "expert_tokens": (snap.experts_LE - base.experts_LE).tolist(),
            "serving": {
                "running": int(metrics.num_running._value.get()),
                "waiting": int(metrics.num_waiting._value.get()),
                "kv_cache_usage": metrics.kv_usage._value.get(),
                "prompt_tokens_per_s": per_s(snap.prompt_tokens - base.prompt_tokens),
                "generation_tokens_per_s": per_s(snap.generation_tokens - base.generation_tokens),
            },
            "expert_cache": None if snap.cache is None else _cache_rows(snap.cache, snap, base),
        }


def _cache_rows(cache: list[ExpertCacheStats], snap: Snapshot, base: Snapshot) -> list[dict]:
    rows = []
    for i, s in enumerate(cache):
        hits = snap.hits_L[i] - (base.hits_L[i] if i < len(base.hits_L) else 0)
        misses = snap.misses_L[i] - (base.misses_L[i] if i < len(base.misses_L) else 0)
        rows.append(
            {
                "layer": s.layer,
                "resident": s.resident,
                "slots": s.slots,
                "hit_rate": hits / (hits + misses) if hits + misses > 0 else None,
            }
        )
    return rows


def ui_router(state: ServerState, require_key: Depends) -> APIRouter:
    """GET /, /ui, /ui/{asset} (public) and /ui/stats (behind the API key, as /v1 is)."""
    router = APIRouter()
    live = LiveStats()

    def serve(name: str) -> Response:
        headers = {"Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff"}
        return Response(asset(name), media_type=_ASSETS[name], headers=headers)

    # The page refers to everything by relative URL (ui/ui.js, v1/...), which resolves the
    # same from / and /ui, and behind a proxy that serves the server under a path prefix.
    @router.get("/")
    @router.get("/ui")
    async def page() -> Response:
        return serve("index.html")

    @router.get("/ui/stats", dependencies=[require_key])
    async def stats() -> JSONResponse:
        if state.metrics is None or state.client is None:
            raise unavailable("the model is still loading", RETRY_LOADING, None)
        body = await state.offload(live.report, state)
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    @router.get("/ui/{name}")
    async def static(name: str) -> Response:
        if name not in _ASSETS or name == "index.html":
            raise APIError(404, f"no such file: /ui/{name}", type="not_found_error")
        return serve(name)

    return router
