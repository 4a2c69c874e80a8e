"""Attention: the backend that attends over the paged KV cache (one per model and device, behind
AttentionBackend) and the layer around it (projections, q/k norms, rotary, cache writes).

Shapes: T tokens in the flat batch, D hidden, H heads, G kv heads, X head dim, Q H*X, S split-K
partials, N blocks, also S slots per block in a cache's [N, S, G, X].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from moeserve.config import ModelConfig
from moeserve.model.backend import InputNorm, ModelBackend, fused_rms_norm
from moeserve.model.layers import (
    l2_norm,
    rms_norm,
    sdpa_decode,
    sdpa_prefill,
    varlen_prefill,
    varlen_prefill_supported,
    write_kv,
)
from moeserve.model.metadata import AttentionMetadata
from moeserve.model.params import empty_param
from moeserve.model.quant import dense_weight
from moeserve.model.rotary import CosSin, apply_rotary

# A layer's cache tensors, each [N, S, G, X]: (K, V), or (latent,) for MLA (model/mla.py).
KVCache = tuple[torch.Tensor, ...]


@dataclass(frozen=True, eq=False)
class LayerMask:
    """What one layer's attention sees beyond plain causal attention, and its softmax scale.
    Families add their rules here (a chunked local window, per-head sink logits, ...), and
    every backend honours them or refuses the model when it is built."""

    scale: float
    window: int | None = None  # sliding window: a query sees the last `window` positions
    # Chunked local attention (Llama 4): a query at p sees keys from p // chunk * chunk on.
    chunk: int | None = field(default=None, kw_only=True)
    # gpt-oss: a learned logit per query head [H] in every softmax's denominator (a key that
    # every query sees and whose value is zero).
    sinks_H: torch.Tensor | None = field(default=None, kw_only=True)


class AttentionBackend(Protocol):
    """Causal attention of a flat batch's new tokens over everything cached for their
    sequences (the new tokens' K/V already stored)."""

    # Whether the runner lays a step's prefills out for one call (AttentionMetadata.prefill_pack).
    packs_prefills: bool

    def attend(
        self,
        q_THX: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        mask: LayerMask,
    ) -> torch.Tensor:
        """[T, H, X] attention outputs."""
        ...


@dataclass(frozen=True)
class PagedAttention:
    """Paged MHA/GQA, with the layer's sliding window and sinks. Decodes are one batched call:
    the Triton paged kernel when `decode_kernel` (no host reads: CUDA-graph safe), else the
    readable gather + SDPA with a padding mask. Prefill chunks are one varlen FlashAttention
    call when the metadata packs them, else one SDPA each over its own context."""

    decode_kernel: bool = False
    packs_prefills: bool = False

    @classmethod
    def for_model(
        cls, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, backend: ModelBackend
    ) -> PagedAttention:
        return cls(
            decode_kernel=backend.triton,
            packs_prefills=varlen_prefill_supported(device, dtype, cfg.head_dim),
        )

    def attend_rotating(
        self,
        qkv_STN: torch.Tensor,
        rope: tuple[
            torch.Tensor,
            torch.Tensor,
            torch.Tensor | None,
            tuple[torch.Tensor, torch.Tensor, float] | None,
        ],
        kv_cache: KVCache,
        meta: AttentionMetadata,
        mask: LayerMask,
    ) -> torch.Tensor | None:
        """Decodes only, from the qkv projection's split-K partials: the decode kernel rotates
        the queries and writes the new keys and values itself (kernels.paged_attention's
        ROPE_IN_DECODE); None where it does not (the caller runs the rotary kernel first).
        rope: (cos, sin, positions, per-head q/k norms) as the rotary kernel takes them."""
        from moeserve.kernels import paged_attention as pa

        cos, sin, pos, qk_norm = rope
        k_cache_NSGX, v_cache_NSGX = kv_cache
        x = k_cache_NSGX.shape[-1]
        if not (self.decode_kernel and pa.ROPE_IN_DECODE and pa.rotates(x, cos.shape[1])):
            return None
        nd, h = meta.num_decodes, qkv_STN.shape[-1] // x - 2 * k_cache_NSGX.shape[2]
        out_THX = torch.empty(nd, h, x, dtype=k_cache_NSGX.dtype, device=qkv_STN.device)
        return pa.paged_decode_attention(
            out_THX,
            k_cache_NSGX,
            v_cache_NSGX,
            meta.block_tables_BM[:nd],
            meta.context_lens_B[:nd],
            mask.scale,
            mask.window,
            out_BHX=out_THX,
            chunk=mask.chunk,
            sinks_H=mask.sinks_H,
            rope=pa.RopeFromQKV(qkv_STN, cos, sin, pos, meta.slot_mapping_T[:nd], qk_norm),
        )

    def attend(
        self,
        q_THX: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        mask: LayerMask,
    ) -> torch.Tensor:
        k_cache_NSGX, v_cache_NSGX = kv_cache
        scale, window, chunk, sinks = mask.scale, mask.window, mask.chunk, mask.sinks_H
        nd = meta.num_decodes
        pack = meta.prefill_pack
        if pack is not None and chunk is not None and chunk < pack.max_k:
            pack = None  # an attention chunk's start inside the contexts: one SDPA per chunk
        if pack is not None and nd == 0:
            return varlen_prefill(q_THX, k_cache_NSGX, v_cache_NSGX, pack, scale, window, sinks)
        out_THX = torch.empty_like(q_THX)
        if nd and self.decode_kernel:
            from moeserve.kernels.paged_attention import paged_decode_attention

            paged_decode_attention(
                q_THX[:nd],
                k_cache_NSGX,
                v_cache_NSGX,
                meta.block_tables_BM[:nd],
                meta.context_lens_B[:nd],
                scale,
                window,
                out_BHX=out_THX[:nd],
                chunk=chunk,
                sinks_H=sinks,
            )
        elif nd:
            q = q_THX[:nd]
            out_THX[:nd] = sdpa_decode(
                q, k_cache_NSGX, v_cache_NSGX, meta, scale, window, chunk, sinks
            )
        if pack is not None:
            out_THX[nd:] = varlen_prefill(
                q_THX[nd:], k_cache_NSGX, v_cache_NSGX, pack, scale, window, sinks
            )
            return out_THX
        start = nd
        for b in range(nd, len(meta.query_lens)):
            n, ctx = meta.query_lens[b], meta.context_lens[b]
            o_HQX = sdpa_prefill(
                q_THX[start : start + n],
                k_cache_NSGX,
                v_cache_NSGX,
                meta.block_tables_BM[b],
                ctx,
                scale,
                window,
                chunk,
                sinks,
            )
            out_THX[start : start + n] = o_HQX.transpose(0, 1)
            start += n
        return out_THX


class Attention(nn.Module):
    """qkv projection (+ bias), q/k norms and clipping as the family says, rotary, the K/V
    store, attention through the model's backend, output projection."""

    def __init__(
        self,
        cfg: ModelConfig,
        layer: int,
        dtype: torch.dtype,
        device: torch.device,
        backend: ModelBackend,
        impl: AttentionBackend,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.backend = backend
        self.impl = impl
        q, kv, d = cfg.q_size, cfg.kv_size, cfg.hidden_size
        self.qkv_weight, self.qkv_weight_scale = dense_weight(
            q + 2 * kv, d, dtype, device, cfg.dense_quant
        )
        self.qkv_bias = (
            empty_param(q + 2 * kv, dtype=dtype, device=device) if cfg.qkv_bias else None
        )
        self.o_weight, self.o_weight_scale = dense_weight(d, q, dtype, device, cfg.dense_quant)
        self.o_bias = empty_param(d, dtype=dtype, device=device) if cfg.o_bias else None
        self.sinks = (
            empty_param(cfg.num_heads, dtype=dtype, device=device) if cfg.attention_sinks else None
        )
        if cfg.qk_norm == "head":
            self.q_norm = empty_param(cfg.head_dim, dtype=dtype, device=device)
            self.k_norm = empty_param(cfg.head_dim, dtype=dtype, device=device)
        elif cfg.qk_norm == "full":
            self.q_norm = empty_param(q, dtype=dtype, device=device)
            self.k_norm = empty_param(kv, dtype=dtype, device=device)
        # Llama 4: NoPE layers skip rotary (and may scale q by position); L2 q/k norms on
        # rotary layers only.
        self.rope = not (cfg.nope_layers and cfg.nope_layers[layer])
        self.l2_norm = cfg.qk_norm == "l2" and self.rope
        self.temperature = None if self.rope else cfg.attn_temperature
        chunk = cfg.layer_chunks[layer] if cfg.layer_chunks else None
        self.mask = LayerMask(
            scale=cfg.head_dim**-0.5,
            window=cfg.layer_windows[layer],
            chunk=chunk,
            sinks_H=self.sinks,
        )
        # The qkv projection may go straight from split-K partials (bias in the first) into
        # the rotary kernel, which also takes per-head q/k norms.
        plain = cfg.qk_norm in ("none", "head") and cfg.clip_qkv is None
        self._qkv_into_rotary = plain and self.rope

    def forward(
        self,
        x_TD: torch.Tensor,
        cos_sin: CosSin,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        partials_out: bool = False,
        input_norm: InputNorm | None = None,
    ) -> torch.Tensor:
        """The attention output [T, D]; with partials_out, float32 split-K partials of it
        [S, T, D] (kernels.linear) for a consumer that adds them (the residual-add norm).
        input_norm: x_TD is the residual stream, RMSNormed here first (inside the qkv
        projection where a few decode rows take its GEMV)."""
        cfg = self.cfg
        t = x_TD.shape[0]
        k_cache, v_cache = kv_cache
        meta = meta.for_window(self.mask.window)
        if partials_out and self._qkv_into_rotary and meta.num_decodes == t:
            # A few decode rows: qkv partials go straight into the rotary kernel, which adds
            # them and stores q, and k and v in the cache (no qkv tensor, no reduction).
            from moeserve.kernels.linear import linear_partials
            from moeserve.kernels.norm_rope import rotary_from_partials

            cos, sin, pos = cos_sin.for_kernel()
            qkv_STN = linear_partials(
                x_TD, self.qkv_weight, self.qkv_bias, self.qkv_weight_scale, input_norm
            )
            if isinstance(self.impl, PagedAttention):  # the decode kernel may rotate q itself
                o_THX = self.impl.attend_rotating(
                    qkv_STN, (cos, sin, pos, self._kernel_qk_norm()), kv_cache, meta, self.mask
                )
                if o_THX is not None:
                    return self._project(o_THX, partials_out)
            q_THX = rotary_from_partials(
                qkv_STN,
                cfg.num_heads,
                cfg.num_kv_heads,
                cos,
                sin,
                (k_cache, v_cache, meta.slot_mapping_T),
                x_TD.dtype,
                pos,
                self._kernel_qk_norm(),
            )
            return self._attend_and_project(q_THX, kv_cache, meta, partials_out)
        if input_norm is not None:
            x_TD = fused_rms_norm(x_TD, *input_norm)
        qkv = self.backend.linear(x_TD, self.qkv_weight, self.qkv_bias, self.qkv_weight_scale)
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        if cfg.qk_norm == "full":
            q = rms_norm(q, self.q_norm, cfg.rms_norm_eps)
            k = rms_norm(k, self.k_norm, cfg.rms_norm_eps)
        if cfg.clip_qkv is not None:
            q, k, v = (a.clamp(-cfg.clip_qkv, cfg.clip_qkv) for a in (q, k, v))
        q_THX = q.reshape(t, cfg.num_heads, cfg.head_dim)
        k_TGX = k.reshape(t, cfg.num_kv_heads, cfg.head_dim)
        v_TGX = v.reshape(t, cfg.num_kv_heads, cfg.head_dim)
        fused = self.backend.fused_elementwise(q_THX)
        # On the fused path the rotary kernel norms the heads itself.
        if cfg.qk_norm == "head" and not (fused and self.rope):
            q_THX = self._head_norm(q_THX, self.q_norm, fused)
            k_TGX = self._head_norm(k_TGX, self.k_norm, fused)
        if not self.rope:
            if self.temperature is not None:
                q_THX = self._temper(q_THX, cos_sin.positions_T)
            write_kv(k_cache, v_cache, k_TGX, v_TGX, meta.slot_mapping_T)
            return self._attend_and_project(q_THX, kv_cache, meta, partials_out)
        if fused:
            if self.l2_norm:  # before the rotation, which keeps every pair's norm
                q_THX = l2_norm(q_THX, cfg.rms_norm_eps)
                k_TGX = l2_norm(k_TGX, cfg.rms_norm_eps)
            from moeserve.kernels.norm_rope import apply_rotary_

            # One launch rotates q and k and stores k and v in the cache (write_kv's job); it
            # reads cos/sin rows from the table by position (no gather).
            cos, sin, pos = cos_sin.for_kernel()
            kv_write = (v_TGX, k_cache, v_cache, meta.slot_mapping_T)
            apply_rotary_(q_THX, k_TGX, cos, sin, kv_write, pos, self._kernel_qk_norm())
        else:
            cos, sin = cos_sin.pair()
            q_THX, k_TGX = apply_rotary(q_THX, cos, sin), apply_rotary(k_TGX, cos, sin)
            if self.l2_norm:  # after the rotation, as the reference does
                q_THX = l2_norm(q_THX, cfg.rms_norm_eps)
                k_TGX = l2_norm(k_TGX, cfg.rms_norm_eps)
            write_kv(k_cache, v_cache, k_TGX, v_TGX, meta.slot_mapping_T)
        return self._attend_and_project(q_THX, kv_cache, meta, partials_out)

    def _kernel_qk_norm(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """The per-head q/k norms for the rotary kernel (norm_rope.QKNorm), if the family has
        them."""
        if self.cfg.qk_norm != "head":
            return None
        return self.q_norm, self.k_norm, self.cfg.rms_norm_eps

    def _head_norm(self, x_THX: torch.Tensor, weight_X: torch.Tensor, fused: bool) -> torch.Tensor:
        """RMSNorm over each head: one kernel over [T*H, X] rows on the fused path (the
        readable twin is seven elementwise launches, per layer, for q and for k)."""
        if not fused:
            return rms_norm(x_THX, weight_X, self.cfg.rms_norm_eps)
        rows = x_THX.reshape(-1, x_THX.shape[-1])
        return fused_rms_norm(rows, weight_X, self.cfg.rms_norm_eps).view(x_THX.shape)

    def _temper(self, q_THX: torch.Tensor, positions_T: torch.Tensor) -> torch.Tensor:
        """Attention temperature tuning: q scaled by log1p(floor((p + 1) / floor_scale)) *
        attn_scale + 1 at position p (float32, as the reference)."""
        assert self.temperature is not None
        floor_scale, attn_scale = self.temperature
        p_T = positions_T.float()
        scale_T = torch.log1p(torch.floor((p_T + 1.0) / floor_scale)) * attn_scale + 1.0
        return (q_THX * scale_T[:, None, None]).to(q_THX.dtype)

    def _attend_and_project(
        self,
        q_THX: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        partials_out: bool,
    ) -> torch.Tensor:
        return self._project(self.impl.attend(q_THX, kv_cache, meta, self.mask), partials_out)

    def _project(self, o_THX: torch.Tensor, partials_out: bool) -> torch.Tensor:
        o_TQ = o_THX.reshape(o_THX.shape[0], self.cfg.q_size)
        if partials_out:
            from moeserve.kernels.linear import linear_partials

            return linear_partials(o_TQ, self.o_weight, self.o_bias, self.o_weight_scale)
        return self.backend.linear(o_TQ, self.o_weight, self.o_bias, self.o_weight_scale)
