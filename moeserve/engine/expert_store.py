"""Where each routed expert lives: a bounded per-layer device cache over host memory.

Each sparse layer's cache is an ExpertProvider (model/experts.py) that the engine hands to
the model's forward. Per step and layer, after routing, the batch's distinct experts are known
(one host read of the per-expert counts, which the dispatch needs anyway). Each missed expert
is copied once for the whole batch on a copy stream into a cache slot chosen by the eviction
policy, or computed on the CPU from its host weights when that is cheaper (mode "cpu", or
"auto" with a cost model measured at startup). Layer L also routes its own input with layer
L+1's router (the same route() as the layer's) and starts copying the experts it predicts, so
they arrive while layer L computes; a wrong guess costs bandwidth, never correctness. On a
CPU-only machine both tiers are host memory and the same logic runs, so CI tests it.
With the Triton kernels (`--expert-cache-kernels` auto or fused) the device experts run through
the fused kernels over the slots (model/experts.SlotExperts): the hits in one launch sequence
queued before the CPU experts run, the fetched misses in another once the compute stream
waits for their copies; otherwise one torch expert at a time, in the same order.

Semantics (what tests replay): for each forward of a layer, `needed` = experts with tokens,
ascending. Resident ones are hits (touched in order); the others are misses. Fetched misses
take a free slot (lowest first) or evict the policy's victim among residents that this step
no longer needs; misses that find no such slot wait until the experts before them have run.
Shapes: D hidden, F expert intermediate, E experts, S slots, R routed rows.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass

import torch

from moeserve.config import OffloadConfig
from moeserve.engine.cache_policy import CachePolicy, make_policy
from moeserve.engine.device_cache import DeviceCache, staging_slots
from moeserve.kernels.quant import dequantize
from moeserve.model.decoder import MoEForCausalLM
from moeserve.model.dispatch import Dispatch, expert_counts
from moeserve.model.experts import ExpertProvider, SlotExperts, expert_mlp
from moeserve.model.moe import MoE
from moeserve.model.quant import ExpertScales


@dataclass
class ExpertCacheStats:
    """Cumulative counters of one sparse layer's cache (plain record for the metrics)."""

    layer: int
    slots: int
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    prefetches_issued: int = 0
    prefetches_used: int = 0
    bytes_copied: int = 0
    cpu_experts: int = 0  # misses computed on the CPU instead of copied
    copy_wait_seconds: float = 0.0  # time the compute stream waited for copies (device clock)
    cpu_seconds: float = 0.0  # time spent computing missed experts on the CPU
    resident: int = 0


@dataclass(frozen=True)
class CostModel:
    """Copy a missed expert, or compute its rows on the CPU: whichever the clock says is faster."""

    expert_bytes: int
    copy_bytes_per_s: float
    cpu_fixed_s: float
    cpu_per_token_s: float

    def prefer_cpu(self, tokens: int) -> bool:
        cpu = self.cpu_fixed_s + tokens * self.cpu_per_token_s
        return cpu < self.expert_bytes / self.copy_bytes_per_s


class LayerCache:
    """One sparse layer's slots; the ExpertProvider of that layer's routed experts."""

    def __init__(self, layer: int, moe: MoE, slot_ids: range, store: ExpertStore) -> None:
        """slot_ids: this layer's slots in the store's pool (the device cache may trade them
        for others later; see pull)."""
        self.layer, self.moe, self.store = layer, moe, store
        e = moe.num_experts
        self.scales = ExpertScales.of(moe)
        self._host = host = moe.expert_tensors()
        self._slots = store.pool
        # Fused (store.fused): the device experts of a call run as one fused launch over
        # the slots; otherwise one at a time (_mlp).
        kind = self.scales.kind if self.scales is not None else ""
        self.fused = SlotExperts(self._slots, kind, moe.activation) if store.fused else None
        self.slot_of = [-1] * e
        self.expert_in = {s: -1 for s in slot_ids}  # pool slot -> its expert (-1: empty)
        self.policy: CachePolicy = make_policy(store.config.policy, e, store.config.lfu_decay)
        self.prefetched: set[int] = set()
        self.ready: dict[int, torch.cuda.Event] = {}  # expert -> its copy has landed
        # (compute stream reached its wait, copy landed) event pairs, timed once both ran:
        # the host never blocks on a copy, so the wait is measured on the device.
        self._waits: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.next: LayerCache | None = None
        self.stats = ExpertCacheStats(layer=layer, slots=len(slot_ids))
        self.trace: list[tuple[str, tuple[int, ...]]] | None = [] if store.record_trace else None
        self.expert_bytes = sum(t[0].numel() * t.element_size() for t in host)

    def _host_tensors(self) -> list[torch.Tensor]:
        """The layer's per-expert tensors [E, ...] in host memory: weights, scales, biases."""
        return self._host

    def _slot_tensors(self) -> list[torch.Tensor]:
        """The device pool's slots [P, ...] matching _host_tensors (this layer's: expert_in)."""
        return self._slots

    def _mlp(self, x_ND: torch.Tensor, tensors: list[torch.Tensor], index: int) -> torch.Tensor:
        """One expert on N rows, from the tensors' row `index` (a slot, or a host expert);
        quantized weights dequantized for this use."""
        w = [t[index] for t in tensors]
        if self.scales is not None:
            kind = self.scales.kind
            w = [
                dequantize(w[0], w[2], kind, x_ND.dtype),
                dequantize(w[1], w[3], kind, x_ND.dtype),
                *w[4:],
            ]
        return expert_mlp(x_ND, *w, act=self.moe.activation)

    # ----------------------------------------------------------------- residency
    def _acquire(self, expert: int, pending: set[int]) -> bool:
        """Give `expert` a slot and start its copy; False if every slot is still needed."""
        slot = next((s for s, e in self.expert_in.items() if e < 0), None)
        if slot is None:
            victim = self.policy.victim(e for e in self.expert_in.values() if e not in pending)
            if victim is None:
                return False
            slot = self.slot_of[victim]
            self.policy.evict(victim)
            self.slot_of[victim] = -1
            self.prefetched.discard(victim)
            self.ready.pop(victim, None)
            self.stats.evictions += 1
        self.expert_in[slot], self.slot_of[expert] = expert, slot
        self.policy.admit(expert)
        self._copy_in(expert, slot)
        self.stats.bytes_copied += self.expert_bytes
        self.stats.resident = sum(1 for x in self.expert_in.values() if x >= 0)
        return True

    def _copy_in(self, expert: int, slot: int) -> None:
        stream = self.store.copy_stream
        pairs = list(zip(self._slot_tensors(), self._host_tensors()))
        if stream is None:
            for dev, host in pairs:
                dev[slot].copy_(host[expert])
            return
        # The slot's previous expert may still be in use by work already queued.
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for dev, host in pairs:
                dev[slot].copy_(host[expert], non_blocking=True)
            event = torch.cuda.Event(enable_timing=True)
            event.record(stream)
        self.ready[expert] = event

    def _landing(self, expert: int) -> bool:
        """The expert's copy (a prefetch) is still on its way."""
        event = self.ready.get(expert)
        return event is not None and not event.query()

    def _wait(self, expert: int) -> None:
        """Make the compute stream wait for the expert's copy; the host runs on, so it queues
        the next layer's attention while the copy is still landing."""
        event = self.ready.pop(expert, None)
        if event is None or event.query():
            return
        arrived = torch.cuda.Event(enable_timing=True)
        arrived.record()
        torch.cuda.current_stream().wait_event(event)
        with self.store.lock:
            self._waits.append((arrived, event))

    def settle_waits(self) -> None:
        """Add the copy waits the device has finished timing to the stats."""
        with self.store.lock:
            keep = []
            for arrived, landed in self._waits:
                if arrived.query() and landed.query():
                    wait_ms = arrived.elapsed_time(landed)  # negative: landed first
                    self.stats.copy_wait_seconds += max(wait_ms, 0.0) / 1e3
                else:
                    keep.append((arrived, landed))
            self._waits = keep

    def fill(self, experts: list[int]) -> None:
        """Initial residents (startup): copies that count as neither misses nor prefetches."""
        for e in experts:
            self._acquire(e, set())
        self.stats.bytes_copied = 0

    def prefetch(self, experts: list[int]) -> None:
        """Start copying predicted experts; never evicts another predicted one."""
        if self.trace is not None:
            self.trace.append(("prefetch", tuple(experts)))
        keep = set(experts)
        for e in experts:
            if self.slot_of[e] < 0 and self._acquire(e, keep):
                self.prefetched.add(e)
                self.stats.prefetches_issued += 1

    def adopt_map(self, slot_E: list[int], stamp_E: list[int]) -> None:
        """Take the device cache's map of this layer (device_cache.py): expert -> pool slot
        (-1: in host memory), and the residents' last uses (LRU order)."""
        self.slot_of = list(slot_E)
        self.expert_in = {s: e for e, s in sorted(enumerate(slot_E), key=lambda x: x[1]) if s >= 0}
        self.policy = make_policy("lru", len(slot_E), self.store.config.lfu_decay)
        for e in sorted(self.expert_in.values(), key=lambda e: (stamp_E[e], e)):
            self.policy.admit(e)

    # ------------------------------------------------------------------- compute
    def run(self, d: Dispatch) -> None:
        x_RD, counts_E, y_RD = d.x_RD, d.counts_E, d.y_RD
        device_cache = self.store.device_cache
        if device_cache is not None:  # the device's map is the truth after a graph replay
            device_cache.pull()
            device_cache.host_changed = True
        num_e = counts_E.shape[0]
        predict = self.next is not None and self.store.config.prefetch
        if predict:
            assert self.next is not None
            _, guess_TK = self.next.moe.select_experts(d.x_TD)
            both = torch.cat([counts_E, expert_counts(guess_TK.flatten(), num_e)])
            host = both.tolist()  # the one device->host read of this layer
        else:
            host = counts_E.tolist()
        counts = host[:num_e]
        starts = [0] * num_e
        for e in range(1, num_e):
            starts[e] = starts[e - 1] + counts[e - 1]
        needed = [e for e in range(num_e) if counts[e]]
        if self.trace is not None:
            self.trace.append(("use", tuple(needed)))
        hits = [e for e in needed if self.slot_of[e] >= 0]
        misses = [e for e in needed if self.slot_of[e] < 0]
        on_cpu = self._split(misses, counts)
        fetch = [e for e in misses if e not in on_cpu]
        st = self.stats
        st.hits += len(hits)
        st.misses += len(misses)
        st.cpu_experts += len(on_cpu)
        for e in hits:
            self.policy.touch(e)
            if e in self.prefetched:
                self.prefetched.discard(e)
                st.prefetches_used += 1
        pending = set(hits) | set(fetch)
        started = []
        for e in fetch:  # copies start before any compute, so they overlap it
            if not self._acquire(e, pending):
                break
            started.append(e)
        if predict:
            assert self.next is not None
            self.next.prefetch([e for e in range(num_e) if host[num_e + e]])

        def run_on_device(experts: list[int]) -> None:
            """Queue the experts' rows on their slots after their copies; then their slots
            may be given to others (a copy into one waits for the work queued before it)."""
            for e in experts:
                self._wait(e)
            if self.fused is not None:
                if experts:
                    self.fused.run(d, counts, {e: self.slot_of[e] for e in experts})
            else:
                for e in experts:
                    rows = slice(starts[e], starts[e] + counts[e])
                    y_RD[rows] = self._mlp(x_RD[rows], self._slot_tensors(), self.slot_of[e])
            pending.difference_update(experts)

        # The CPU experts' inputs leave the device before any expert work is queued, so
        # this read waits only for the routing, not for the hits' compute.
        host_dev = self.moe.w_gate_up.device
        x_host = {e: x_RD[starts[e] : starts[e] + counts[e]].to(host_dev) for e in on_cpu}
        # Prefetched hits still landing run with the fetched experts, so the GPU need not
        # wait for them before the others.
        landing = [e for e in hits if self._landing(e)]
        run_on_device([e for e in hits if e not in landing])
        # The host computes its experts while the copies land and the GPU runs the hits.
        t0 = time.perf_counter()
        for e in on_cpu:
            y = self._mlp(x_host[e], self._host_tensors(), e)
            y_RD[starts[e] : starts[e] + counts[e]].copy_(y)
        if on_cpu:
            st.cpu_seconds += time.perf_counter() - t0
        run_on_device(landing + started)
        for e in fetch[len(started) :]:  # one at a time: each frees a slot for the next
            assert self._acquire(e, pending), "a slot frees once earlier experts have run"
            run_on_device([e])
        self.policy.end_step()
        if self._waits:
            self.settle_waits()

    def _split(self, misses: list[int], counts: list[int]) -> list[int]:
        """The misses to compute on the CPU. In auto mode each goes to the resource (copy
        engine or CPU) that would finish it first, given what each already has queued."""
        mode, cost = self.store.config.mode, self.store.cost
        if mode == "cpu":
            return list(misses)
        if mode == "fetch" or cost is None:
            return []
        copy_busy = cpu_busy = 0.0
        on_cpu = []
        for e in misses:
            fetch_s = cost.expert_bytes / cost.copy_bytes_per_s
            cpu_s = cost.cpu_fixed_s + counts[e] * cost.cpu_per_token_s
            if cpu_busy + cpu_s < copy_busy + fetch_s:
                on_cpu.append(e)
                cpu_busy += cpu_s
            else:
                copy_busy += fetch_s
        return on_cpu


class ExpertStore:
    """The expert caches of every sparse layer of a model whose experts live in host memory."""

    def __init__(
        self,
        model: MoEForCausalLM,
        config: OffloadConfig,
        slots: int,
        *,
        fused: bool = False,
        record_trace: bool = False,
        graph_batch: int = 0,
    ) -> None:
        """fused: run device experts through the fused Triton kernels (the engine's kernels
        are Triton's), else with torch one at a time. graph_batch: decode calls of up to this
        many rows may also run with the device's own cache maps (device_cache.py), whose
        staging slots the pool then adds (top_k for each row, at most E)."""
        self.config = config
        self.fused = fused
        self.device = model.device
        self.record_trace = record_trace
        self.copy_stream = torch.cuda.Stream() if self.device.type == "cuda" else None
        self.lock = threading.Lock()  # the metrics thread settles copy waits too
        moes = model.moe_layers()
        first = moes[0][1]
        num_e = first.num_experts
        self.slots = max(1, min(slots, num_e))
        # One pool of slots for every layer (a layer's slots are its own until the device
        # cache trades one for a staging slot), then the staging slots.
        owned = len(moes) * self.slots
        self.staging = staging_slots(num_e, first.spec.top_k, graph_batch)
        shapes = [(t.shape[1:], t.dtype) for t in first.expert_tensors()]
        assert all([(t.shape[1:], t.dtype) for t in m.expert_tensors()] == shapes for _, m in moes)
        self.pool = [
            torch.empty(owned + self.staging, *shape, dtype=dt, device=self.device)
            for shape, dt in shapes
        ]
        self.layers = [
            LayerCache(i, moe, range(j * self.slots, (j + 1) * self.slots), self)
            for j, (i, moe) in enumerate(moes)
        ]
        for a, b in zip(self.layers, self.layers[1:]):
            a.next = b
        self.cost = measure_cost(self.layers[0]) if config.mode == "auto" else None
        for layer in self.layers:
            layer.fill(list(range(self.slots)))
        self.device_cache: DeviceCache | None = None
        if graph_batch:
            staging = range(owned, owned + self.staging)
            self.device_cache = DeviceCache(self.layers, staging, graph_batch, self.pool)

    def providers(self) -> dict[int, ExpertProvider]:
        """Layer index -> the provider of its routed experts, for the model's forward."""
        return {layer.layer: layer for layer in self.layers}

    def stats(self) -> list[ExpertCacheStats]:
        """Per layer: the host cache's counters plus the device cache's (its misses are
        copied by the GPU itself: bytes_copied counts them)."""
        for layer in self.layers:
            layer.settle_waits()
        if self.device_cache is None:
            return [layer.stats for layer in self.layers]
        out = []
        for layer, (hits, misses, evictions) in zip(self.layers, self.device_cache.counters()):
            st = layer.stats
            out.append(
                dataclasses.replace(
                    st,
                    hits=st.hits + hits,
                    misses=st.misses + misses,
                    evictions=st.evictions + evictions,
                    bytes_copied=st.bytes_copied + misses * layer.expert_bytes,
                )
            )
        return out

    def reset_stats(self) -> None:
        """Zero the traffic counters (after startup work that is not traffic); the cache keeps
        its contents and the gauges their values."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # every timed copy wait settles into the old counters
        for layer in self.layers:
            layer.settle_waits()
            old = layer.stats
            layer.stats = ExpertCacheStats(layer=old.layer, slots=old.slots, resident=old.resident)
        if self.device_cache is not None:
            self.device_cache.reset_counters()


def measure_cost(layer: LayerCache) -> CostModel:
    """Time one expert's copy and its CPU compute at 1 and 64 tokens (startup, < 1 s)."""
    moe, dev = layer.moe, layer.store.device

    def timed(fn, reps: int = 3) -> float:
        fn()  # warm-up
        times = []
        for _ in range(reps):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    def copy() -> None:
        for dev, host in zip(layer._slot_tensors(), layer._host_tensors()):
            dev[0].copy_(host[0], non_blocking=True)

    d, host = moe.w_down.shape[1], moe.w_gate_up.device
    x1 = torch.randn(1, d, dtype=moe.dtype, device=host)
    x64 = torch.randn(64, d, dtype=moe.dtype, device=host)
    t_copy = timed(copy)
    t1 = timed(lambda: layer._mlp(x1, layer._host_tensors(), 0))
    t64 = timed(lambda: layer._mlp(x64, layer._host_tensors(), 0))
    # 64 tokens: the CPU's cost per token shows clearly above the weight-streaming time.
    per_token = max(t64 - t1, 0.0) / 63
    return CostModel(
        expert_bytes=layer.expert_bytes,
        copy_bytes_per_s=layer.expert_bytes / max(t_copy, 1e-9),
        cpu_fixed_s=max(t1 - per_token, 0.0),
        cpu_per_token_s=per_token,
    )
