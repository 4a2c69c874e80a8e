"""Scrape-time Prometheus series of the expert cache (offloading), one set per sparse layer."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from moeserve.engine.expert_store import ExpertCacheStats

# (series name, ExpertCacheStats field, help); counters get `_total` from prometheus_client.
_COUNTERS = [
    ("moeserve_expert_cache_hits", "hits", "Needed experts found in the device cache."),
    ("moeserve_expert_cache_misses", "misses", "Needed experts not in the device cache."),
    ("moeserve_expert_cache_evictions", "evictions", "Experts evicted from the device cache."),
    (
        "moeserve_expert_cache_prefetches_issued",
        "prefetches_issued",
        "Experts copied ahead because the previous layer's input predicted them.",
    ),
    (
        "moeserve_expert_cache_prefetches_used",
        "prefetches_used",
        "Prefetched experts that were then needed (used / issued = prefetch accuracy).",
    ),
    (
        "moeserve_expert_cache_copied_bytes",
        "bytes_copied",
        "Expert weight bytes copied from host to device memory.",
    ),
    (
        "moeserve_expert_cache_cpu_experts",
        "cpu_experts",
        "Missed experts computed on the CPU instead of copied.",
    ),
    (
        "moeserve_expert_cache_copy_wait_seconds",
        "copy_wait_seconds",
        "Seconds the step waited for expert copies to land.",
    ),
    (
        "moeserve_expert_cache_cpu_seconds",
        "cpu_seconds",
        "Seconds spent computing missed experts on the CPU.",
    ),
]
_GAUGES = [
    ("moeserve_expert_cache_resident", "resident", "Experts resident in the device cache."),
    ("moeserve_expert_cache_slots", "slots", "Device cache slots of the layer."),
]


class ExpertCacheCollector(Collector):
    """Reads the cache's plain counters at scrape time; nothing is recorded per step."""

    def __init__(self, stats_fn: Callable[[], list[ExpertCacheStats]]) -> None:
        self._stats_fn = stats_fn

    def collect(self) -> Iterator[Metric]:
        stats = self._stats_fn()
        for name, field, doc in _COUNTERS:
            fam = CounterMetricFamily(name, doc, labels=["layer"])
            for s in stats:
                fam.add_metric([str(s.layer)], getattr(s, field))
            yield fam
        for name, field, doc in _GAUGES:
            fam = GaugeMetricFamily(name, doc, labels=["layer"])
            for s in stats:
                fam.add_metric([str(s.layer)], getattr(s, field))
            yield fam
