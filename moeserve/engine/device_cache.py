"""The expert cache's maps on the device, so a decode step with offloaded experts is one graph.

The host-side cache (expert_store.LayerCache) reads each layer's routing back before its
experts run: with 48 offloaded layers that is 48 waits for the GPU and the host's bookkeeping
and launches between them, every step. For decode batches of up to `max_batch` rows the GPU
does the cache's work itself (kernels/expert_fetch.py): each layer finds its missed experts,
copies them from pinned host memory into staging slots of the pool and admits them, evicting
its least recently used; the whole step is then one CUDA graph replay.

One state, two keepers. Graph replays change the device's maps; an eager step (a prefill, a
mixed or a larger batch) first pulls them into the host caches (one device->host read), and
the next replay pushes the host's changes back. Both evict by LRU. Staging slots belong to no
layer: a layer's admission swaps one of its slots for the staged one.

Shapes: L offloaded layers, E experts, M staging slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch

from moeserve.config import ConfigError, OffloadConfig, flag_of
from moeserve.engine.cache_policy import LRUPolicy
from moeserve.model.experts import SlotTable

# An expert_store.LayerCache (not imported: the store builds this module's DeviceCache).
LayerCache = Any


def expert_fetch() -> ModuleType:
    """kernels.expert_fetch, imported when a device cache is built (a CPU run never
    imports Triton)."""
    from moeserve.kernels import expert_fetch

    return expert_fetch


class LayerTable(SlotTable):
    """One layer's experts as the in-graph fetch sees them: resolve stages its misses and
    admits them; the call then reads the pool through the returned map."""

    def __init__(self, cache: DeviceCache, index: int, layer: LayerCache, pool: list) -> None:
        assert layer.fused is not None, "the in-graph fetch runs the fused kernels"
        super().__init__(layer.fused, cache.max_rows)
        self.cache, self.index = cache, index
        byte_rows = expert_fetch().byte_rows
        host = layer._host_tensors()
        self.copies = [(byte_rows(h), byte_rows(p)) for h, p in zip(host, pool)]

    def resolve(self, experts_TK: torch.Tensor) -> torch.Tensor:
        c, i = self.cache, self.index
        scratch = (c.table_LE[i], c.missed_LM[i], c.needed_LE[i])
        fetch = expert_fetch()
        table_E = fetch.resolve(
            experts_TK.reshape(-1), c.slot_LE[i], c.staging_M, self.copies, scratch
        )
        state = (c.slot_LE[i], c.stamp_LE[i], c.clock_L1[i], c.counters_L3[i])
        fetch.adopt(c.needed_LE[i], c.missed_LM[i], state, c.staging_M)
        return table_E


class DeviceCache:
    """The maps of every offloaded layer on the device, and their LayerTables."""

    def __init__(
        self, layers: Sequence[LayerCache], staging: range, max_batch: int, pool: list
    ) -> None:
        """staging: the pool slots no layer owns; max_batch: the decode rows a call may have
        (each routes top_k rows: staging holds every miss of the largest call)."""
        self.layers = list(layers)
        first = self.layers[0].moe
        e, dev = first.num_experts, pool[0].device
        self.max_batch = max_batch
        self.max_rows = max_batch * first.spec.top_k
        assert len(staging) >= min(e, self.max_rows), "a call's misses must fit in staging"
        n = len(self.layers)
        i32 = dict(dtype=torch.int32, device=dev)
        self.slot_LE = torch.full((n, e), -1, **i32)
        self.stamp_LE = torch.zeros(n, e, **i32)
        self.clock_L1 = torch.zeros(n, 1, **i32)
        self.counters_L3 = torch.zeros(n, 3, dtype=torch.int64, device=dev)
        self.staging_M = torch.tensor(list(staging), **i32)
        self.table_LE = torch.zeros(n, e, **i32)
        self.missed_LM = torch.zeros(n, len(staging), **i32)
        self.needed_LE = torch.zeros(n, e, **i32)
        self.tables = {
            layer.layer: LayerTable(self, i, layer, pool) for i, layer in enumerate(self.layers)
        }
        self._clock = [0] * n  # the device clocks as of the last pull or push
        self.device_changed = False  # a replay ran since the host caches last pulled
        self.host_changed = True  # the host caches changed since the device last pulled
        self._counted = [[0, 0, 0]] * n  # the counters as reset_counters found them

    def providers(self) -> dict[int, SlotTable]:
        return dict(self.tables)

    # ------------------------------------------------------------- the two keepers
    def before_replay(self) -> None:
        """Push the host caches' changes (an eager step's fetches and uses) to the device."""
        if not self.host_changed:
            return
        slots, stamps = [], []
        for i, layer in enumerate(self.layers):
            order = layer.policy.order() if isinstance(layer.policy, LRUPolicy) else []
            stamp = [0] * len(layer.slot_of)
            for rank, e in enumerate(order):  # least recently used first
                stamp[e] = self._clock[i] + 1 + rank
            self._clock[i] += len(order)
            slots.append(layer.slot_of)
            stamps.append(stamp)
        # Pinned sources, so the copies are queued behind the work before them, not waited on.
        pin = self.slot_LE.is_cuda
        for dst, rows in ((self.slot_LE, slots), (self.stamp_LE, stamps)):
            dst.copy_(torch.tensor(rows, dtype=torch.int32, pin_memory=pin), non_blocking=pin)
        clock = torch.tensor(self._clock, dtype=torch.int32, pin_memory=pin)[:, None]
        self.clock_L1.copy_(clock, non_blocking=pin)
        self.host_changed = False

    def after_replay(self) -> None:
        self.device_changed = True

    def pull(self) -> None:
        """Before an eager step: the device's maps into the host caches (waits for the GPU)."""
        if not self.device_changed:
            return
        slots, stamps, clocks = (t.tolist() for t in (self.slot_LE, self.stamp_LE, self.clock_L1))
        for i, layer in enumerate(self.layers):
            layer.adopt_map(slots[i], stamps[i])
            self._clock[i] = clocks[i][0]
        self.device_changed = False
        self.host_changed = True

    def counters(self) -> list[list[int]]:
        """Per layer [hits, misses, evictions] of the in-graph calls since reset_counters."""
        now = self.counters_L3.tolist()
        return [[a - b for a, b in zip(x, y)] for x, y in zip(now, self._counted)]

    def reset_counters(self) -> None:
        self._counted = self.counters_L3.tolist()


def staging_slots(num_experts: int, top_k: int, graph_batch: int) -> int:
    """Staging slots the pool needs for the misses of a call of graph_batch rows."""
    return min(num_experts, top_k * graph_batch)


# The default: batches of up to AUTO_GRAPH_BATCH rows run in the graph when an expert (as
# stored) is at most AUTO_GRAPH_EXPERT_BYTES. Many small experts make a step's cost the host's
# per-lookup bookkeeping (~0.1 ms each, layers x top-k of them), which the graph removes: 5.0x
# the decode rate for FP8 Qwen3-30B-A3B (4.5 MiB experts) on a 16 GB card. Large experts make
# it the copies, which the host path overlaps with compute on the copy engine: 0.97x for FP8
# Mixtral-8x7B (168 MiB experts) on a 24 GB card (H100, benchmarks/RESULTS.md, 2026-12-05).
AUTO_GRAPH_BATCH = 4
AUTO_GRAPH_EXPERT_BYTES = 32 << 20


def graph_fetch_batch(
    offload: OffloadConfig, graphs: bool, fused: bool, max_num_seqs: int, expert_bytes: int
) -> int:
    """The decode batch up to which the expert cache runs on the GPU inside the decode graph
    (0: never). It needs what the in-graph path does: graphs, the fused kernels, every miss
    copied (not computed on the CPU), LRU, no prefetch. Unset, it is AUTO_GRAPH_BATCH where
    that path can run and experts are small (above), else 0; asked for where it cannot run, a
    ConfigError names what is missing."""
    missing = None
    if not graphs:
        missing = "decode CUDA graphs (CUDA, the Triton kernels, no --enforce-eager)"
    elif not fused:
        missing = f"{flag_of('expert_cache_kernels')} fused or auto"
    elif offload.mode == "cpu":
        missing = f"{flag_of('offload_mode')} fetch or auto (the GPU copies its misses)"
    elif offload.prefetch:
        missing = f"no {flag_of('prefetch')}"
    elif offload.policy != "lru":
        missing = f"{flag_of('expert_cache_policy')} lru"
    want = offload.graph_batch
    if missing is not None:
        if want:
            raise ConfigError(f"{flag_of('expert_cache_graph_batch')} {want} needs {missing}")
        return 0
    if want is None:
        want = AUTO_GRAPH_BATCH if expert_bytes <= AUTO_GRAPH_EXPERT_BYTES else 0
    return min(want, max_num_seqs)
