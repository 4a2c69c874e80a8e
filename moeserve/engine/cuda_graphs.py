"""CUDA graphs for decode steps: one captured forward (embedding -> logits) per batch size.

A decode step of B sequences replays the graph of the smallest captured size >= B, its inputs
written into static device buffers by two host->device copies; padding rows write their K/V to
a scratch block that the block pool never hands out, attend to it alone, and route to no
expert. Python, the launch of every kernel and the dispatcher's overhead vanish: at batch 1 the
step costs what the GPU spends reading the weights. Needs the Triton kernels (no host reads
inside the forward).

With expert providers (offloaded experts), each size gets one graph per stage of a
StagedForward (the forward cut at every layer with a provider): a step replays stage 0, runs
that layer's provider eagerly (the routing read, cache fetches), replays stage 1, and so on.
Attention, norms, routers and dispatch then cost no launch overhead, so the host's time goes to
the expert cache alone.

Shapes: P padded batch (a captured size), M max blocks per sequence, V vocab.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import torch

from moeserve.engine.batch import Work
from moeserve.engine.device_cache import DeviceCache
from moeserve.model.attention import KVCache
from moeserve.model.decoder import MoEForCausalLM
from moeserve.model.experts import ExpertProvider
from moeserve.model.metadata import AttentionMetadata
from moeserve.model.staged import StagedForward

log = logging.getLogger(__name__)

# Powers of two, then steps of 32: padding wastes at most half of a small batch's rows (rows
# cost little at decode: the weights dominate) and few graphs cover large batches.
_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
# input id, position, slot, context length, valid, feed row (-1: id from host), the sliding
# KV group's slot (windowed)
_FIELDS = 7


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in _SIZES if s < max_num_seqs]
    return sizes + [max_num_seqs]


class DecodeGraphs:
    """Captured decode forwards for every size in `sizes`, sharing one memory pool."""

    def __init__(
        self,
        model: MoEForCausalLM,
        kv_caches: list[KVCache],
        block_size: int,
        max_blocks_per_seq: int,
        scratch_block: int,
        sizes: Sequence[int],
        fed_R: torch.Tensor | None = None,
        experts: Mapping[int, ExpertProvider] | None = None,
        windowed: bool = False,
        device_cache: DeviceCache | None = None,
    ) -> None:
        """fed_R: the runner's device copy of the last step's sampled tokens (see run).
        experts: layer index -> the provider of its routed experts (offloading): the graphs
        are then captured in stages between those layers, except for sizes up to
        device_cache.max_batch, which run the expert cache on the GPU (device_cache.py) in one
        graph. windowed: the sliding layers read their own block tables (engine/kv_groups.py)."""
        self.model = model
        self.experts = dict(experts or {})
        self.device_cache = device_cache
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.windowed = windowed
        self.sizes = sorted(sizes)
        self.max_size = self.sizes[-1]
        p, m, dev = self.max_size, max_blocks_per_seq, model.device
        self.fed_R = fed_R if fed_R is not None else torch.zeros(p, dtype=torch.int64, device=dev)
        # Host staging (pinned: the copies are asynchronous), two sets used in turn: with async
        # scheduling the host fills the next step's while this step's copy may still be queued.
        self._host = [
            (
                torch.zeros(_FIELDS, p, dtype=torch.int64, pin_memory=True),
                torch.zeros(p, m, dtype=torch.int64, pin_memory=True),
                torch.zeros(p, m, dtype=torch.int64, pin_memory=True),
            )
            for _ in range(2)
        ]
        self._turn = 0
        self._use_host(0)
        self._vec = torch.zeros(_FIELDS, p, dtype=torch.int64, device=dev)
        self._tables = torch.zeros(p, m, dtype=torch.int64, device=dev)
        self._w_tables = torch.zeros(p, m, dtype=torch.int64, device=dev)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # Expert providers: per size, a graph per stage and the staged forward they replay
        # (the sizes the device cache does not take).
        in_graph = device_cache.max_batch if device_cache is not None else 0
        self.staged = {s for s in self.sizes if self.experts and s > in_graph}
        self._stages: dict[int, tuple[list[torch.cuda.CUDAGraph], StagedForward]] = {}
        for turn in (1, 0):
            self._use_host(turn)
            self._pad_rows(0)
        self._vec.copy_(self._host_vec)
        self._tables.copy_(self._host_tables)
        self._w_tables.copy_(self._host_w_tables)

    def _use_host(self, turn: int) -> None:
        self._host_vec, self._host_tables, self._host_w_tables = self._host[turn]
        self._vec_np = self._host_vec.numpy()
        self._tables_np = self._host_tables.numpy()
        self._w_tables_np = self._host_w_tables.numpy()

    def _pad_rows(self, start: int) -> None:
        """Rows from `start` on: token 0 at position 0, written to and reading the scratch
        block only, routed to no expert."""
        v = self._vec_np
        v[0, start:] = 0
        v[1, start:] = 0
        v[2, start:] = self.scratch_block * self.block_size
        v[3, start:] = 1
        v[4, start:] = 0
        v[5, start:] = -1
        v[6, start:] = self.scratch_block * self.block_size
        self._tables_np[start:, 0] = self.scratch_block
        self._w_tables_np[start:, 0] = self.scratch_block

    def _inputs(self, size: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        ids, pos, slots, ctx, valid, _, w_slots = (self._vec[i, :size] for i in range(_FIELDS))
        meta = AttentionMetadata(
            query_lens=[1] * size,
            context_lens=[1] * size,  # host copy unused: the decode kernel reads ctx
            num_decodes=size,
            block_tables_BM=self._tables[:size],
            context_lens_B=ctx,
            slot_mapping_T=slots,
            valid_T=valid,
        )
        if self.windowed:
            meta.window = AttentionMetadata(
                query_lens=meta.query_lens,
                context_lens=meta.context_lens,
                num_decodes=size,
                block_tables_BM=self._w_tables[:size],
                context_lens_B=ctx,
                slot_mapping_T=w_slots,
                valid_T=valid,
            )
        return ids, pos, meta

    def _forward(self, size: int) -> torch.Tensor:
        ids, pos, meta = self._inputs(size)
        from moeserve.kernels.tokens import feed_ids

        # Captured: rows whose token the last step sampled read it from fed_R (one kernel).
        ids = feed_ids(ids, self._vec[5, :size], self.fed_R)
        tables = self.device_cache.providers() if self.device_cache is not None else None
        hidden_PD = self.model(ids, pos, meta, self.kv_caches, tables)
        return self.model.compute_logits(hidden_PD, float32=False)

    def capture(self) -> None:
        t0 = time.monotonic()
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        for size in reversed(self.sizes):  # largest first: smaller graphs reuse its memory
            if size in self.staged:
                self._capture_stages(size, pool, side)
                continue
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # compiles the kernels, settles the allocator
                for _ in range(2):
                    self._forward(size)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits_PV = self._forward(size)
            self._graphs[size] = (graph, logits_PV)
        torch.cuda.synchronize()
        if self.device_cache is not None:  # the warm-ups ran it (padding rows: no change)
            self.device_cache.after_replay()
        log.info(
            "captured %d decode CUDA graphs (batch %d..%d%s) in %.1f s",
            len(self.sizes),
            self.sizes[0],
            self.max_size,
            self._describe_offload(),
            time.monotonic() - t0,
        )

    def _capture_stages(self, size: int, pool: tuple[int, int], side: torch.cuda.Stream) -> None:
        staged = StagedForward(self.model, *self._inputs(size), self.kv_caches, self.experts)
        # Warm-up without the expert steps: every row is padding (routed nowhere), so there
        # is nothing to fetch and nothing reaches the cache's counters.
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                for j in range(staged.num_stages):
                    staged.stage(j)
        torch.cuda.current_stream().wait_stream(side)
        graphs = []
        for j in range(staged.num_stages):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                staged.stage(j)
            graphs.append(graph)
        self._stages[size] = (graphs, staged)

    def covers(self, work: Sequence[Work]) -> bool:
        return len(work) <= self.max_size and all(w.num_tokens == 1 for w in work)

    def run(self, work: Sequence[Work], feed: Sequence[int] | None = None) -> torch.Tensor:
        """Logits [B, V] in the model dtype (a view of the graph's static output: read it
        before the next run).

        feed: per row, the row of fed_R that holds its input token (-1: the host knows it)."""
        b = len(work)
        size = next(s for s in self.sizes if s >= b)
        self._turn ^= 1
        self._use_host(self._turn)
        v, tables, bs = self._vec_np, self._tables_np, self.block_size
        w_tables = self._w_tables_np
        width = 1
        fed = False
        for i, w in enumerate(work):
            p = w.start
            blocks = w.seq.block_ids
            row = feed[i] if feed is not None else -1
            fed |= row >= 0
            v[0, i] = w.seq.token_ids[p] if row < 0 else 0
            v[5, i] = row
            v[1, i] = p
            v[2, i] = blocks[p // bs] * bs + p % bs
            v[3, i] = p + 1
            v[4, i] = 1
            n = p // bs + 1  # blocks the kernel reads
            tables[i, :n] = blocks[:n]
            if self.windowed:
                w_blocks = w.seq.window_block_ids
                v[6, i] = w_blocks[p // bs] * bs + p % bs
                w_tables[i, :n] = w_blocks[:n]
            width = max(width, n)
        self._pad_rows(b)
        self._vec.copy_(self._host_vec, non_blocking=True)
        # Only the columns in use: entries past a row's context are never read.
        self._tables[:size, :width].copy_(self._host_tables[:size, :width], non_blocking=True)
        if self.windowed:
            self._w_tables[:size, :width].copy_(
                self._host_w_tables[:size, :width], non_blocking=True
            )
        staged = size in self.staged
        if fed and staged:  # the plain graphs resolve fed tokens themselves
            ids, rows = self._vec[0, :b], self._vec[5, :b]
            torch.where(rows >= 0, self.fed_R[rows.clamp(min=0)], ids, out=ids)
        if staged:
            graphs, forward = self._stages[size]
            for j, graph in enumerate(graphs):
                graph.replay()
                if j < len(graphs) - 1:
                    forward.run_experts(j)
            assert forward.logits_TV is not None
            return forward.logits_TV[:b]
        graph, logits_PV = self._graphs[size]
        if self.device_cache is None:
            graph.replay()
            return logits_PV[:b]
        self.device_cache.before_replay()
        graph.replay()
        self.device_cache.after_replay()
        return logits_PV[:b]

    def _describe_offload(self) -> str:
        if not self.experts:
            return ""
        if not self.staged:
            return ", offloaded experts fetched inside them"
        if self.device_cache is None:
            return ", one per stage between offloaded experts"
        return (
            f", offloaded experts fetched inside them up to batch {self.device_cache.max_batch}"
            ", then one per stage between them"
        )
