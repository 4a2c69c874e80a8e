"""Builds the flat batch for one step, owns the paged KV cache, runs the model.

Shapes: T tokens in the flat batch, B sequences, M max blocks per sequence, V vocab,
N blocks, S slots per block, G kv heads, X head dim.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from moeserve.config import ModelConfig
from moeserve.engine.batch import Work, as_decode_rows
from moeserve.engine.cuda_graphs import DecodeGraphs, capture_sizes
from moeserve.engine.device_cache import DeviceCache
from moeserve.engine.kv_groups import KVGroups
from moeserve.engine.prompt_logprobs import PromptRows, compute
from moeserve.engine.sampler import to_host
from moeserve.engine.scheduler import ScheduledSeq
from moeserve.engine.sequence import Sequence as SeqRecord
from moeserve.model.decoder import MoEForCausalLM
from moeserve.model.experts import ExpertProvider
from moeserve.model.layers import attention_backends
from moeserve.model.metadata import AttentionMetadata, PrefillPack


class KVCacheTooSmall(ValueError):
    """The KV budget cannot hold even one maximum-length sequence."""


def kv_bytes_per_block(
    cfg: ModelConfig, block_size: int, dtype: torch.dtype, groups: KVGroups | None = None
) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    layers = groups.num_tensors if groups is not None else cfg.num_layers
    tensors, heads, width = cfg.kv_cache_shape
    return layers * tensors * heads * width * block_size * elem


def allocate_kv_cache(
    cfg: ModelConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    groups: KVGroups | None = None,
) -> list[tuple[torch.Tensor, ...]]:
    """Per layer, the tensors of its cache layout (ModelConfig.kv_cache_shape), each
    [N, S, G, X]: (K, V) for paged attention, (latent + rope key,) for MLA; allocated once at
    startup (shared by one layer of each KV group: kv_groups.py)."""
    groups = groups or KVGroups.single(cfg.num_layers)
    tensors, heads, width = cfg.kv_cache_shape
    kv = torch.zeros(
        groups.num_tensors,
        tensors,
        num_blocks,
        block_size,
        heads,
        width,
        dtype=dtype,
        device=device,
    )
    return [tuple(kv[t, j] for j in range(tensors)) for t in groups.tensor_of_layer]


def check_kv_capacity(
    num_blocks: int,
    block_size: int,
    max_model_len: int,
    per_block: int,
    groups: KVGroups | None = None,
) -> None:
    need = (groups or KVGroups.single(1)).blocks_to_run(max_model_len, block_size)
    if num_blocks < need:
        raise KVCacheTooSmall(
            f"the KV cache holds {num_blocks} blocks of {block_size} tokens "
            f"({num_blocks * block_size} tokens) but one sequence of max_model_len "
            f"{max_model_len} needs {need} blocks: raise --kv-cache-memory to at least "
            f"{need * per_block} bytes (or --gpu-memory-utilization), or lower --max-model-len"
        )


@dataclass
class StepInputs:
    input_ids_T: torch.Tensor
    positions_T: torch.Tensor
    meta: AttentionMetadata
    logits_rows: torch.Tensor  # rows of the flat batch whose logits are sampled
    order: list[int]  # work index of each laid-out sequence


class Runner:
    """Turns a list of per-sequence work items into one model forward and sampled-row logits.

    With `decode_graphs_up_to` > 0 (CUDA, Triton kernels), decode-only steps of up to that
    many sequences replay captured CUDA graphs (one per stage between layers with an expert
    provider); the KV cache then holds one extra scratch block for the graphs' padding rows.
    """

    def __init__(
        self,
        model: MoEForCausalLM,
        num_blocks: int,
        block_size: int,
        *,
        decode_graphs_up_to: int = 0,
        max_model_len: int | None = None,
        max_num_seqs: int = 1,
        experts: Mapping[int, ExpertProvider] | None = None,
        kv_groups: KVGroups | None = None,
        device_cache: DeviceCache | None = None,
    ) -> None:
        """max_num_seqs bounds the rows a step samples: `keep_sampled` holds that many.
        experts: layer index -> the provider of its routed experts (the expert store's, when
        offloading), handed to every forward; other layers run their resident experts.
        kv_groups: with a sliding group, its layers read `window_block_ids` (kv_groups.py).
        device_cache: the expert store's maps on the device, for the decode graphs of the
        batches it takes (device_cache.py)."""
        self.model = model
        self.experts = dict(experts or {})
        self.device = model.device
        self.block_size = block_size
        self.num_blocks = num_blocks
        extra = 1 if decode_graphs_up_to else 0
        self.kv_groups = kv_groups or KVGroups.single(model.cfg.num_layers)
        self.windowed = self.kv_groups.window is not None
        self.kv_caches = allocate_kv_cache(
            model.cfg, num_blocks + extra, block_size, model.dtype, model.device, self.kv_groups
        )
        # The last step's sampled tokens, on the device: a step launched before they reach
        # the host (async scheduling) reads its decodes' input tokens from here.
        self.max_model_len = max_model_len or model.cfg.max_position_embeddings
        self.fed_R = torch.zeros(
            max(max_num_seqs, decode_graphs_up_to), dtype=torch.int64, device=model.device
        )
        # Prefills as one flash-attention call rather than a Python loop of SDPAs.
        self.pack_prefills = model.attention.packs_prefills
        self.graphs: DecodeGraphs | None = None
        if decode_graphs_up_to:
            self.graphs = DecodeGraphs(
                model,
                self.kv_caches,
                block_size,
                -(-self.max_model_len // block_size),
                scratch_block=num_blocks,
                sizes=capture_sizes(decode_graphs_up_to),
                fed_R=self.fed_R,
                experts=self.experts,
                windowed=self.windowed,
                device_cache=device_cache,
            )
            self.graphs.capture()

    def _scratch_prefills(self, n: int, first_block: int) -> list[ScheduledSeq]:
        """Prefills of n scratch tokens (id 0) in all, as sequences of at most max_model_len
        tokens (no position past the model's), on consecutive blocks from first_block."""
        work, bs, block = [], self.block_size, first_block
        for i, start in enumerate(range(0, n, self.max_model_len)):
            m = min(self.max_model_len, n - start)
            seq = SeqRecord(seq_id=-3 - i, request_id="scratch", prompt_ids=[0] * m, max_tokens=1)
            seq.block_ids = list(range(block, block + -(-m // bs)))
            seq.window_block_ids = seq.block_ids  # scratch: both groups' garbage, one block
            block += len(seq.block_ids)
            work.append(ScheduledSeq(seq, 0, m, True))
        return work

    def scratch_prefill(self, n: int) -> None:
        """One step of n scratch prefill tokens on blocks 0.. (free at startup: nothing of
        it outlives the call but the K/V garbage in blocks the pool still counts as free;
        its routed tokens are not counted as traffic)."""
        with self.model.expert_counts_excluded():
            self.execute(self._scratch_prefills(n, 0))

    def scratch_mixed(self, n: int) -> None:
        """One eager step of a decode beside prefills of n scratch tokens (blocks 0..):
        the decode kernels as a mixed step calls them, outside the CUDA graphs."""
        dec = SeqRecord(seq_id=-2, request_id="scratch-decode", prompt_ids=[0, 0], max_tokens=1)
        dec.block_ids = dec.window_block_ids = [0]
        with self.model.expert_counts_excluded():
            self.execute([ScheduledSeq(dec, 1, 1, True), *self._scratch_prefills(n, 1)])

    def warm_up(self, max_tokens: int) -> float:
        """Per power-of-two token count up to max_tokens, one prefill and one mixed step
        (decode + prefill): every Triton kernel variant a step can pick is compiled now, not
        while a request waits. Returns seconds."""
        t0 = time.monotonic()
        n = 1

        # Blocks the split prefills may need: one partial block per sequence at most.
        def blocks(tokens: int) -> int:
            return -(-tokens // self.block_size) + -(-tokens // self.max_model_len)

        while n <= max_tokens and blocks(n) <= self.num_blocks:
            self.scratch_prefill(n)
            if n + 1 <= max_tokens and 1 + blocks(n) <= self.num_blocks:
                self.scratch_mixed(n)
            n *= 2
        return time.monotonic() - t0

    def keep_sampled(self, tokens_R: torch.Tensor) -> None:
        """Hold a step's sampled tokens (row order) on the device for the next step's feed
        (nothing to copy when the sampler wrote them there)."""
        if tokens_R.data_ptr() != self.fed_R.data_ptr():
            self.fed_R[: tokens_R.numel()].copy_(tokens_R)

    def prepare(self, work: Sequence[Work], feed: Sequence[int] | None = None) -> StepInputs:
        # Decodes first (one token each): the attention batches them in one call.
        order = sorted(range(len(work)), key=lambda i: work[i].num_tokens != 1)
        fed_at: list[int] = []  # flat positions whose token comes from fed_R ...
        fed_rows: list[int] = []  # ... and the row of fed_R it is
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        tables: list[list[int]] = []
        w_slots: list[int] = []  # the sliding group's (windowed)
        w_tables: list[list[int]] = []
        rows: list[int] = []
        bs = self.block_size
        for i in order:
            w = work[i]
            end = w.start + w.num_tokens
            blocks = w.seq.block_ids
            if self.windowed:
                w_blocks = w.seq.window_block_ids
                w_slots.extend(w_blocks[p // bs] * bs + p % bs for p in range(w.start, end))
                w_tables.append(w_blocks)
            if feed is not None and feed[i] >= 0:  # a decode of a token still on the device
                fed_at.append(len(ids))
                fed_rows.append(feed[i])
            ids.extend(w.seq.token_ids[w.start : end])
            positions.extend(range(w.start, end))
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(w.start, end))
            query_lens.append(w.num_tokens)
            context_lens.append(end)
            tables.append(blocks)
            if w.sample:
                rows.append(len(ids) - 1)
        width = max(len(t) for t in tables)
        table = [t + [0] * (width - len(t)) for t in tables]
        nd = sum(1 for n in query_lens if n == 1)
        meta = AttentionMetadata(
            query_lens=query_lens,
            context_lens=context_lens,
            num_decodes=nd,
            block_tables_BM=self._on_device(table),
            context_lens_B=self._on_device(context_lens),
            slot_mapping_T=self._on_device(slots),
        )
        if self.pack_prefills and nd < len(query_lens):
            meta.prefill_pack = self._pack_prefills(query_lens[nd:], context_lens[nd:], tables[nd:])
        if self.windowed:
            meta.window = self._window_meta(meta, w_tables, w_slots, width)
        ids_T = self._on_device(ids)
        if fed_at:
            ids_T[self._on_device(fed_at)] = self.fed_R[self._on_device(fed_rows)]
        return StepInputs(
            input_ids_T=ids_T,
            positions_T=self._on_device(positions),
            meta=meta,
            logits_rows=self._on_device(rows),
            order=order,
        )

    def _window_meta(
        self,
        meta: AttentionMetadata,
        tables: list[list[int]],
        slots: list[int],
        width: int,
    ) -> AttentionMetadata:
        """The sliding layers' metadata: meta with their own block tables and slots."""
        table = [t + [0] * (width - len(t)) for t in tables]
        out = AttentionMetadata(
            query_lens=meta.query_lens,
            context_lens=meta.context_lens,
            num_decodes=meta.num_decodes,
            block_tables_BM=self._on_device(table),
            context_lens_B=meta.context_lens_B,
            slot_mapping_T=self._on_device(slots),
            valid_T=meta.valid_T,
        )
        nd = meta.num_decodes
        if meta.prefill_pack is not None:
            out.prefill_pack = self._pack_prefills(
                meta.query_lens[nd:], meta.context_lens[nd:], tables[nd:], self.kv_groups.window
            )
        return out

    def _pack_prefills(
        self,
        query_lens: list[int],
        context_lens: list[int],
        tables: list[list[int]],
        window: int | None = None,
    ) -> PrefillPack:
        """The prefills' contexts as cache slots end to end, for metadata.PrefillPack. With a
        sliding window, each context from the first position its chunk's queries see (the
        causal mask aligns queries to the context's end, so nothing else changes): the
        blocks the window released before it are never gathered."""
        bs = self.block_size
        offsets = np.arange(bs)

        def first(n: int, ctx: int) -> int:
            return 0 if window is None else max(0, ctx - n - window + 1)

        def context_slots(table: list[int], n: int, ctx: int) -> np.ndarray:
            lo = first(n, ctx)
            blocks = np.asarray(table[lo // bs : -(-ctx // bs)], dtype=np.int64)
            return (blocks[:, None] * bs + offsets).ravel()[lo % bs : lo % bs + ctx - lo]

        keys = [c - first(n, c) for n, c in zip(query_lens, context_lens)]
        slots = np.concatenate(
            [context_slots(t, n, c) for t, n, c in zip(tables, query_lens, context_lens)]
        )
        cu_q = np.cumsum([0, *query_lens], dtype=np.int32)
        cu_k = np.cumsum([0, *keys], dtype=np.int32)
        slots_C, cu_q_P1, cu_k_P1 = (
            torch.from_numpy(a).to(self.device, non_blocking=True) for a in (slots, cu_q, cu_k)
        )
        return PrefillPack(slots_C, cu_q_P1, cu_k_P1, max_q=max(query_lens), max_k=max(keys))

    def _on_device(self, values: list[int] | list[list[int]]) -> torch.Tensor:
        # non_blocking: a pageable host->device copy is staged at once and does not wait for
        # the kernels already queued (a step launched ahead must not wait for the one before).
        return torch.tensor(values, dtype=torch.int64).to(self.device, non_blocking=True)

    def execute(
        self,
        work: Sequence[Work],
        feed: Sequence[int] | None = None,
        prompt: PromptRows | None = None,
    ) -> tuple[torch.Tensor, list[int]]:
        """Run one step; returns logits [R, V] (float32, or the model dtype from a decode
        graph: the sampler casts what it needs) and, per row, the index into `work`.

        feed: per work item, the row of `fed_R` (the last step's sampled tokens, see
        `keep_sampled`) that holds its input token, or -1 where the host knows it.
        prompt: prompt positions whose log-probs this step also computes (never a graph
        replay); `prompt.result` then holds them, copied to the host without waiting.
        """
        if self.graphs is not None and not (prompt and prompt.spans):
            if self.graphs.covers(work):
                logits_BV = self.graphs.run(work, feed)
                sampled = [i for i, w in enumerate(work) if w.sample]
                # A view of the graph's buffer: the engine samples from it before the next
                # replay.
                return (logits_BV[sampled] if len(sampled) < len(work) else logits_BV), sampled
            expanded = as_decode_rows(work, self.graphs.max_size)
            if expanded is not None:
                rows, owner = expanded
                row_feed = None
                if feed is not None:  # only one-token items can have a token on the device
                    row_feed = [feed[i] if work[i].num_tokens == 1 else -1 for i in owner]
                logits_BV = self.graphs.run(rows, row_feed)
                at = [k for k, r in enumerate(rows) if r.sample]
                return logits_BV[at], [owner[k] for k in at]
        inp = self.prepare(work, feed)
        with attention_backends():
            hidden_TD = self.model(
                inp.input_ids_T, inp.positions_T, inp.meta, self.kv_caches, self.experts
            )
        if prompt is not None and prompt.spans:
            self._prompt_logprobs(work, inp.order, hidden_TD, prompt)
        logits = self.model.compute_logits(hidden_TD[inp.logits_rows])
        sampled = [i for i in inp.order if work[i].sample]
        return logits, sampled

    def _prompt_logprobs(
        self, work: Sequence[Work], order: list[int], hidden_TD: torch.Tensor, prompt: PromptRows
    ) -> None:
        offset, at = {}, 0  # each work item's first row in the flat batch
        for i in order:
            offset[i], at = at, at + work[i].num_tokens
        rows = [
            offset[i] + p - work[i].start
            for i, first, end in prompt.spans
            for p in range(first, end)
        ]
        lp = compute(
            self.model.compute_logits,
            hidden_TD[self._on_device(rows)],
            self._on_device(prompt.targets),
            prompt.n_top,
            self.model.cfg.vocab_size,
        )
        prompt.result = to_host(lp)
