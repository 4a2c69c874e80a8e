"""moeserve's /metrics before and after a run: what the router and the caches did during it.

The counters are cumulative since the server started, so the run's share is after - before:
tokens routed to each expert of each layer (load balance) and, with offloading on, the
expert cache's hits, misses and bytes copied. Any other server simply has no moeserve_*
series, and the report says so.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

# Sample name -> [(labels, value)]
Snapshot = dict[str, list[tuple[dict[str, str], float]]]

MODEL_INFO = "moeserve_model_info"  # present on every moeserve server: "is this moeserve?"
EXPERT_TOKENS = "moeserve_expert_tokens_total"  # the counter family moeserve_expert_tokens
# Expert cache counters (moeserve/metrics_cache.py), per layer; absent when every expert is
# resident (no offloading), and then the report says so.
CACHE = "moeserve_expert_cache_"
EXPERT_CACHE_HITS = CACHE + "hits_total"
EXPERT_CACHE_MISSES = CACHE + "misses_total"
_CACHE_COUNTERS = {  # report key -> sample name, summed over layers
    "bytes_copied": CACHE + "copied_bytes_total",
    "evictions": CACHE + "evictions_total",
    "prefetches_issued": CACHE + "prefetches_issued_total",
    "prefetches_used": CACHE + "prefetches_used_total",
    "cpu_experts": CACHE + "cpu_experts_total",
    "copy_wait_seconds": CACHE + "copy_wait_seconds_total",
}
# Prefix cache counters, in prompt tokens (looked up, found cached); absent from a server
# without a prefix cache, and then the hit rate is "n/a".
PREFIX_CACHE_QUERIES = "moeserve_prefix_cache_queries_total"
PREFIX_CACHE_HITS = "moeserve_prefix_cache_hits_total"
_SERVER_COUNTERS = {  # report key -> sample name
    "prompt_tokens": "moeserve_prompt_tokens_total",
    "generation_tokens": "moeserve_generation_tokens_total",
    "preemptions": "moeserve_num_preemptions_total",
}


def metrics_url_for(base_url: str) -> str:
    """/metrics sits at the server's root, beside /v1."""
    url = base_url.rstrip("/")
    return (url[: -len("/v1")] if url.endswith("/v1") else url) + "/metrics"


async def scrape(client: httpx.AsyncClient, url: str) -> Snapshot | None:
    """Parse the Prometheus text at `url`; None when there is none (not every server has it)."""
    try:
        resp = await client.get(url)
        if resp.status_code != 200:
            return None
        return parse_metrics(resp.text)
    except (httpx.HTTPError, ValueError):
        return None


def parse_metrics(text: str) -> Snapshot:
    """Prometheus text -> Snapshot; ValueError when it does not parse."""
    snap: Snapshot = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            snap[s.name].append((dict(s.labels), float(s.value)))
    return dict(snap)


def _total(snap: Snapshot, name: str) -> float | None:
    samples = snap.get(name)
    return sum(v for _, v in samples) if samples else None


def _delta(before: Snapshot, after: Snapshot, name: str) -> float | None:
    a = _total(after, name)
    return None if a is None else a - (_total(before, name) or 0.0)


def expert_load(before: Snapshot, after: Snapshot) -> dict[str, Any] | None:
    """Tokens routed to each (layer, expert) during the run and each layer's balance:
    imbalance = max / mean tokens per expert (1 = even), entropy / log(E) (1 = uniform),
    idle = experts that got none. None without per-expert series."""
    counts: dict[tuple[int, int], float] = defaultdict(float)
    for sign, snap in ((1.0, after), (-1.0, before)):
        for labels, value in snap.get(EXPERT_TOKENS, []):
            counts[int(labels["layer"]), int(labels["expert"])] += sign * value
    if not counts:
        return None
    layers = sorted({layer for layer, _ in counts})
    num_experts = max(e for _, e in counts) + 1
    tokens_LE = [
        [max(0.0, counts.get((layer, e), 0.0)) for e in range(num_experts)] for layer in layers
    ]
    imbalance, entropy, idle = [], [], []
    for row in tokens_LE:
        total = sum(row)
        idle.append(sum(1 for x in row if x == 0))
        if total == 0:
            imbalance.append(None)
            entropy.append(None)
            continue
        imbalance.append(max(row) * num_experts / total)
        h = -sum(x / total * math.log(x / total) for x in row if x > 0)
        entropy.append(h / math.log(num_experts) if num_experts > 1 else 1.0)
    busy = [x for x in imbalance if x is not None]
    ent = [x for x in entropy if x is not None]
    return {
        "layers": layers,
        "num_experts": num_experts,
        "tokens": [[int(x) for x in row] for row in tokens_LE],
        "imbalance_per_layer": imbalance,
        "entropy_per_layer": entropy,
        "idle_experts_per_layer": idle,
        "imbalance_mean": sum(busy) / len(busy) if busy else None,
        "imbalance_max": max(busy) if busy else None,
        "entropy_mean": sum(ent) / len(ent) if ent else None,
    }


def _by_layer(before: Snapshot, after: Snapshot, name: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for sign, snap in ((1.0, after), (-1.0, before)):
        for labels, value in snap.get(name, []):
            out[labels.get("layer", "")] += sign * value
    return dict(out)


def expert_cache(before: Snapshot, after: Snapshot) -> dict[str, Any]:
    """The run's expert cache hit rate (overall and per layer), bytes copied to the device,
    prefetch accuracy; or a note that the server has no expert cache (all resident)."""
    if EXPERT_CACHE_HITS not in after or EXPERT_CACHE_MISSES not in after:
        return {
            "hit_rate": None,
            "note": "no expert cache metrics: every expert is resident "
            "(offloading off) or the server predates them",
        }
    hits = _by_layer(before, after, EXPERT_CACHE_HITS)
    misses = _by_layer(before, after, EXPERT_CACHE_MISSES)

    def rate(h: float, m: float) -> float | None:
        return h / (h + m) if h + m > 0 else None

    layers = sorted(hits, key=lambda x: int(x) if x.isdigit() else -1)
    out: dict[str, Any] = {
        "hits": int(sum(hits.values())),
        "misses": int(sum(misses.values())),
        "hit_rate": rate(sum(hits.values()), sum(misses.values())),
        "hit_rate_per_layer": {k: rate(hits[k], misses.get(k, 0.0)) for k in layers},
    }
    for key, name in _CACHE_COUNTERS.items():
        d = _delta(before, after, name)
        out[key] = None if d is None else (d if key.endswith("seconds") else int(d))
    issued, used = out.get("prefetches_issued"), out.get("prefetches_used")
    out["prefetch_accuracy"] = used / issued if issued and used is not None else None
    return out


def server_summary(before: Snapshot | None, after: Snapshot | None) -> dict[str, Any]:
    """The `server` section of the report: what moeserve itself counted during the run."""
    if before is None or after is None:
        return {"moeserve": False, "note": "no /metrics to scrape"}
    if MODEL_INFO not in after:
        return {"moeserve": False, "note": "not a moeserve server: no expert metrics"}
    out: dict[str, Any] = {"moeserve": True}
    for key, name in _SERVER_COUNTERS.items():
        d = _delta(before, after, name)
        out[key] = None if d is None else int(d)
    out["expert_load"] = expert_load(before, after)
    out["expert_cache"] = expert_cache(before, after)
    return out


def prefix_cache(before: Snapshot | None, after: Snapshot | None) -> dict[str, Any]:
    """The run's prefix cache hit rate: prompt tokens found cached / looked up, from the
    server's counters before and after; None (with a note) without them."""
    if before is None or after is None or PREFIX_CACHE_QUERIES not in after:
        return {
            "queries": None,
            "hits": None,
            "hit_rate": None,
            "note": "no prefix cache metrics on the server",
        }
    queries = _delta(before, after, PREFIX_CACHE_QUERIES) or 0.0
    hits = _delta(before, after, PREFIX_CACHE_HITS) or 0.0
    return {
        "queries": int(queries),
        "hits": int(hits),
        "hit_rate": hits / queries if queries > 0 else None,
    }
