"""Scrape-time Prometheus series of the expert load: tokens routed to each expert (cumulative,
counted on the device and copied once per scrape) and, per sparse layer, the balance of the
load over a sliding window."""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Iterator

import torch
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_RING_SLOTS = 12  # snapshots per window: a scrape at most every window/12 s adds one

_HELP = {
    "moeserve_expert_tokens": (
        "Token assignments routed to each expert since start (a token counts once for each of "
        "its top-k experts). No vLLM equivalent."
    ),
    "moeserve_expert_tokens_layer": (
        "Token assignments routed to the experts of a sparse layer since start (sum over its "
        "experts). No vLLM equivalent."
    ),
    "moeserve_expert_load_imbalance": (
        "Max over mean of tokens per expert in the recent window; 1 = perfectly balanced, "
        "E = all on one expert, NaN = no tokens in the window. No vLLM equivalent."
    ),
    "moeserve_expert_routing_entropy": (
        "Shannon entropy of the recent window's expert load divided by log(E): 1 = uniform, "
        "0 = one expert, NaN = no tokens in the window. No vLLM equivalent."
    ),
    "moeserve_expert_idle": "Experts that got no token in the recent window. No vLLM equivalent.",
}
_EXPERT_FAMILIES: dict[str, tuple[type[Metric], list[str]]] = {
    "moeserve_expert_tokens": (CounterMetricFamily, ["layer", "expert"]),
    "moeserve_expert_tokens_layer": (CounterMetricFamily, ["layer"]),
    "moeserve_expert_load_imbalance": (GaugeMetricFamily, ["layer"]),
    "moeserve_expert_routing_entropy": (GaugeMetricFamily, ["layer"]),
    "moeserve_expert_idle": (GaugeMetricFamily, ["layer"]),
}


def _families() -> dict[str, Metric]:
    return {n: cls(n, _HELP[n], labels=labels) for n, (cls, labels) in _EXPERT_FAMILIES.items()}


def _balance(window_LE: torch.Tensor) -> tuple[list[float], list[float], list[int]]:
    """Per layer: max/mean load, normalised entropy (both NaN if the window routed nothing),
    and the number of experts that got no token."""
    load_LE = window_LE.to(torch.float64)
    e = load_LE.shape[1]
    total_L = load_LE.sum(1)
    busy_L, safe_L = total_L > 0, total_L.clamp_min(1.0)
    p_LE = load_LE / safe_L[:, None]
    h_L = -torch.special.xlogy(p_LE, p_LE).sum(1)  # xlogy: an idle expert adds 0, not NaN
    entropy_L = (h_L / math.log(e)).clamp(0.0, 1.0) if e > 1 else torch.ones_like(h_L)
    imbalance_L = torch.where(busy_L, load_LE.amax(1) * e / safe_L, math.nan)
    entropy_L = torch.where(busy_L, entropy_L, math.nan)
    return imbalance_L.tolist(), entropy_L.tolist(), (window_LE == 0).sum(1).tolist()


class ExpertCollector(Collector):
    """Scrape-time expert series from cumulative [sparse layers, E] counts; nothing per step."""

    def __init__(
        self,
        counts_fn: Callable[[], torch.Tensor],
        layer_ids: list[int],
        num_experts: int,
        per_expert: bool,
        window_seconds: float,
        clock: Callable[[], float],
    ) -> None:
        self._counts_fn, self._clock, self._per_expert = counts_fn, clock, per_expert
        self._layers = [str(i) for i in layer_ids]
        self._experts = [str(e) for e in range(num_experts)]
        self._window, self._interval = window_seconds, window_seconds / _RING_SLOTS
        # (time, counts_LE), oldest first; bounded by the interval, maxlen only as a backstop.
        self._ring: deque[tuple[float, torch.Tensor]] = deque(maxlen=_RING_SLOTS + 3)
        self._lock = threading.Lock()  # concurrent scrapes must not interleave ring updates

    def describe(self) -> Iterator[Metric]:
        # Names only: registering (and its duplicate-name check) must not call expert_counts().
        yield from _families().values()

    def collect(self) -> Iterator[Metric]:
        counts_LE = self._counts_fn().detach().to("cpu", torch.int64)
        want = (len(self._layers), len(self._experts))
        if tuple(counts_LE.shape) != want:
            raise ValueError(
                f"expert_counts() returned shape {tuple(counts_LE.shape)}, "
                f"expected [sparse layers, experts] = {list(want)}"
            )
        with self._lock:
            window_LE = self._advance(self._clock(), counts_LE)
        fams = _families()
        imbalance, entropy, idle = _balance(window_LE)
        for i, (layer, total) in enumerate(zip(self._layers, counts_LE.sum(1).tolist())):
            fams["moeserve_expert_tokens_layer"].add_metric([layer], total)
            fams["moeserve_expert_load_imbalance"].add_metric([layer], imbalance[i])
            fams["moeserve_expert_routing_entropy"].add_metric([layer], entropy[i])
            fams["moeserve_expert_idle"].add_metric([layer], idle[i])
        per_expert = fams.pop("moeserve_expert_tokens")
        if self._per_expert:
            for layer, row in zip(self._layers, counts_LE.tolist()):
                for expert, n in zip(self._experts, row):
                    per_expert.add_metric([layer, expert], n)
            yield per_expert
        yield from fams.values()

    def _advance(self, now: float, counts_LE: torch.Tensor) -> torch.Tensor:
        """Record a snapshot (at most one per interval) and return the counts in the window.

        Baseline: the oldest snapshot aged [interval, window]; else the newest older one (scrapes
        sparser than the window stretch it); else zero, i.e. since start. A snapshot younger
        than one interval is never a baseline, so two scrapers a few ms apart (an HA Prometheus
        pair) see the same window instead of one of them an empty one.
        """
        base_LE: torch.Tensor | None = None
        older: torch.Tensor | None = None
        for t, snap_LE in self._ring:
            age = now - t
            if age > self._window:
                older = snap_LE
            elif age >= self._interval:
                base_LE = snap_LE
                break
        base_LE = base_LE if base_LE is not None else older
        if not self._ring or now - self._ring[-1][0] >= self._interval:
            self._ring.append((now, counts_LE))
        while len(self._ring) > 1 and now - self._ring[1][0] > self._window:
            self._ring.popleft()  # keep only the newest snapshot older than the window
        if base_LE is None:
            return counts_LE
        window_LE = counts_LE - base_LE
        if bool((window_LE < 0).any()):  # counts went back (model reloaded): restart
            self._ring.clear()
            self._ring.append((now, counts_LE))
            return counts_LE
        return window_LE
