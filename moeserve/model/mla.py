"""Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2) over a paged latent cache.

The cache holds, per token, one row of the normalised KV latent and the rotated rope key
(ModelConfig.kv_cache_shape: C + R values a layer, shared by every head), not per-head K and V.
Prefill chunks expand their context's latents into per-head keys and values through kv_b_proj
and run causal SDPA, as transformers does. Decodes attend in latent space ("absorbed"): the
query's nope part goes through kv_b_proj's key half into the latent space, the scores are
q_latent . latent + q_rope . k_rope, the output is a weighted sum of latents, and kv_b_proj's
value half then maps it to each head's value. The decode attention is the Triton kernel
(kernels/mla_attention.py, CUDA-graph safe) or its readable twin, SDPA over the gathered rows.

Shapes: T tokens in the flat batch, B decodes, D hidden, H heads, C kv_lora_rank, R rotary dims,
P nope dims, W value dims, Y = C + R (a cache row), L a chunk's context positions, Q its queries,
N blocks, S slots per block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.config import ModelConfig
from moeserve.model.attention import KVCache
from moeserve.model.backend import InputNorm, ModelBackend, fused_rms_norm
from moeserve.model.layers import rms_norm, sdpa_decode
from moeserve.model.metadata import AttentionMetadata
from moeserve.model.params import empty_param
from moeserve.model.rotary import CosSin, apply_rotary


def _yarn_mscale(scale: float, m: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def mla_softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(qk head dim), times YaRN's mscale(factor, mscale_all_dim) squared when the rope
    is scaled and the config sets mscale_all_dim (transformers' yarn_apply_mscale)."""
    scale = (cfg.qk_nope_head_dim + cfg.head_dim) ** -0.5
    p = cfg.rope_params
    m_all = p.get("mscale_all_dim") or 0
    if p.get("rope_type", "default") != "default" and m_all:
        scale *= _yarn_mscale(p["factor"], m_all) ** 2
    return scale


@dataclass(frozen=True)
class LatentAttention:
    """The decode half of MLA over the paged latent cache: the Triton kernel when
    `decode_kernel` (no host reads: CUDA-graph safe), else SDPA over the gathered rows with a
    padding mask. Prefills are never packed: each chunk expands its own context."""

    decode_kernel: bool = False
    packs_prefills: bool = False

    @classmethod
    def for_model(
        cls, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, backend: ModelBackend
    ) -> LatentAttention:
        return cls(decode_kernel=backend.triton)

    def decode(
        self,
        q_lat_BHC: torch.Tensor,
        q_rope_BHR: torch.Tensor,
        cache_NS1Y: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Each decode's latent-space query (absorbed nope part, and rope part) over its
        sequence's cached rows: the softmax-weighted sum of latents [B, H, C]."""
        nd, _, c = q_lat_BHC.shape
        if self.decode_kernel:
            from moeserve.kernels.mla_attention import mla_decode_attention

            return mla_decode_attention(
                q_lat_BHC,
                cache_NS1Y,
                meta.block_tables_BM[:nd],
                meta.context_lens_B[:nd],
                scale,
                c,
                q_rope_BHR=q_rope_BHR,
            )
        q_BHY = torch.cat((q_lat_BHC, q_rope_BHR), dim=-1)
        return sdpa_decode(q_BHY, cache_NS1Y, cache_NS1Y[..., :c], meta, scale, None)


def _causal_sdpa(
    q_QHX: torch.Tensor, k_LHX: torch.Tensor, v_LHW: torch.Tensor, scale: float
) -> torch.Tensor:
    """The last Q of L positions attend causally over all L: [Q, H, W]."""
    n, ctx = q_QHX.shape[0], k_LHX.shape[0]
    q, k, v = (a.transpose(0, 1).unsqueeze(0) for a in (q_QHX, k_LHX, v_LHW))
    if n == ctx:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    elif q.is_cuda:  # the bias lets SDPA pick a fused kernel
        from torch.nn.attention.bias import causal_lower_right

        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=causal_lower_right(n, ctx), scale=scale
        )
    else:
        mask = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril(ctx - n)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return o[0].transpose(0, 1)


class MLAttention(nn.Module):
    """q projection (low-rank with its norm, or plain), the compressed KV projection and its
    norm, rotary on the decoupled rope parts, the latent cache write, attention (expanded for
    prefill chunks, absorbed for decodes), output projection."""

    def __init__(
        self,
        cfg: ModelConfig,
        layer: int,
        dtype: torch.dtype,
        device: torch.device,
        backend: ModelBackend,
        impl: LatentAttention,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.impl = impl
        self.backend = backend
        h, d, c, r = cfg.num_heads, cfg.hidden_size, cfg.kv_lora_rank, cfg.head_dim
        p, w = cfg.qk_nope_head_dim, cfg.v_head_dim
        kw = dict(dtype=dtype, device=device)
        bias = cfg.attention_bias
        lora = cfg.q_lora_rank
        # The q projection (q_a_proj with a q_lora_rank) and kv_a_proj read the same input:
        # one [Q + C + R, D] weight, one GEMV (rows 0..Q-1 q's). Their biases likewise; only
        # kv_a has one without q_lora (transformers' q_proj has none), added apart.
        self.q_rows = h * (p + r) if lora is None else lora
        self.qkv_a_weight = empty_param(self.q_rows + c + r, d, **kw)
        self.qkv_a_bias = empty_param(self.q_rows + c + r, **kw) if bias and lora else None
        self.kv_a_bias = empty_param(c + r, **kw) if bias and not lora else None
        self.q_a_norm = self.q_b_weight = None
        if lora is not None:
            self.q_a_norm = empty_param(lora, **kw)
            self.q_b_weight = empty_param(h * (p + r), lora, **kw)
        self.kv_a_norm = empty_param(c, **kw)
        self.kv_b_weight = empty_param(h * (p + w), c, **kw)
        self.o_weight = empty_param(d, h * w, **kw)
        self.o_bias = empty_param(d, **kw) if bias else None
        self.scale = mla_softmax_scale(cfg)
        # Decode rows may go from the projection's split-K partials straight into the kernel
        # that writes the queries and cache rows: q projected in one step, no biases.
        self._plain_qkv = lora is None and not bias

    def _rotate(self, x_THR: torch.Tensor, cos_sin: CosSin) -> torch.Tensor:
        # Interleaved pairs were moved to rotate-half order at load (families_mla.py).
        cos, sin = cos_sin.pair()
        return apply_rotary(x_THR, cos, sin)

    def _absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj's key half [H, P, C] and value half [H, W, C] (views)."""
        cfg = self.cfg
        p, w = cfg.qk_nope_head_dim, cfg.v_head_dim
        kv_b_HXC = self.kv_b_weight.view(cfg.num_heads, p + w, cfg.kv_lora_rank)
        return kv_b_HXC[:, :p], kv_b_HXC[:, p:]

    def forward(
        self,
        x_TD: torch.Tensor,
        cos_sin: CosSin,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        partials_out: bool = False,
        input_norm: InputNorm | None = None,
    ) -> torch.Tensor:
        """The attention output [T, D]; with partials_out (and no output bias), float32
        split-K partials of it [S, T, D] (kernels.linear) for the residual-add norm.
        input_norm: x_TD is the residual stream, RMSNormed here first (inside the q/kv_a
        projection where a few decode rows take its GEMV)."""
        cfg = self.cfg
        t, h, c, p = x_TD.shape[0], cfg.num_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim
        eps = cfg.rms_norm_eps
        # The Triton norm and rotary kernels (one launch each) where the backend takes them for
        # this batch: at decode the readable ops are some twenty launches a layer.
        fused = self.backend is not None and self.backend.fused_elementwise(x_TD)
        (cache_NS1Y,) = kv_cache
        if partials_out and meta.num_decodes == t and self._plain_qkv:
            # A few decode rows: the projection's split-K partials go into one kernel that
            # writes the absorbed and rope queries and the cache rows (no qkv tensor, no
            # rotary or latent-row launch, no cuBLAS bmm for the absorbed query).
            from moeserve.kernels.linear import linear_partials
            from moeserve.kernels.mla_rows import decode_inputs

            cos, sin, pos = cos_sin.for_kernel()
            q_lat_BHC, q_rope_BHR = decode_inputs(
                linear_partials(x_TD, self.qkv_a_weight, norm=input_norm),
                self._absorbed_weights()[0],
                self.kv_a_norm,
                eps,
                cos,
                sin,
                pos,
                cache_NS1Y,
                meta.slot_mapping_T,
            )
            return self._decode_out(q_lat_BHC, q_rope_BHR, cache_NS1Y, meta, partials_out)
        norm = fused_rms_norm if fused else rms_norm
        if input_norm is not None:
            x_TD = norm(x_TD, *input_norm)
        qkv_TN = F.linear(x_TD, self.qkv_a_weight, self.qkv_a_bias)
        q_TX, kv_TY = qkv_TN[:, : self.q_rows], qkv_TN[:, self.q_rows :]
        if self.kv_a_bias is not None:
            kv_TY = kv_TY + self.kv_a_bias
        if self.q_b_weight is not None:
            q_TX = F.linear(norm(q_TX, self.q_a_norm, eps), self.q_b_weight)
        q_THX = q_TX.view(t, h, -1)
        if fused:
            from moeserve.kernels.mla_rows import write_latent_rows
            from moeserve.kernels.norm_rope import apply_rotary_

            # q's and k's rope parts rotated in place, in one launch; then each token's cache
            # row (the normalised latent, the rope key) written in one more.
            cos, sin, pos = cos_sin.for_kernel()
            apply_rotary_(q_THX[..., p:], kv_TY[:, None, c:], cos, sin, positions_T=pos)
            write_latent_rows(kv_TY, self.kv_a_norm, eps, cache_NS1Y, meta.slot_mapping_T)
            q_rope_THR = q_THX[..., p:]
        else:
            q_rope_THR = self._rotate(q_THX[..., p:], cos_sin)
            latent_TC = rms_norm(kv_TY[:, :c], self.kv_a_norm, eps)
            k_rope_TR = self._rotate(kv_TY[:, None, c:], cos_sin)[:, 0]
            rows_TY = torch.cat((latent_TC, k_rope_TR), dim=-1)
            cache_NS1Y.view(-1, rows_TY.shape[1]).index_copy_(0, meta.slot_mapping_T, rows_TY)
        q_nope_THP = q_THX[..., :p]

        nd = meta.num_decodes
        if nd == t:  # decodes only: no buffer to assemble
            q_lat_BHC = torch.bmm(q_nope_THP.transpose(0, 1), self._absorbed_weights()[0])
            q_lat_BHC = q_lat_BHC.transpose(0, 1)
            return self._decode_out(q_lat_BHC, q_rope_THR, cache_NS1Y, meta, partials_out)
        out_THW = q_THX.new_empty(t, h, cfg.v_head_dim)
        if nd:
            w_k_HPC = self._absorbed_weights()[0]
            q_lat_BHC = torch.bmm(q_nope_THP[:nd].transpose(0, 1), w_k_HPC).transpose(0, 1)
            out_THW[:nd] = self._decode(q_lat_BHC, q_rope_THR[:nd], cache_NS1Y, meta)
        start = nd
        for b in range(nd, len(meta.query_lens)):
            n = meta.query_lens[b]
            q_QHX = torch.cat((q_nope_THP[start : start + n], q_rope_THR[start : start + n]), -1)
            out_THW[start : start + n] = self._prefill(q_QHX, cache_NS1Y, meta, b)
            start += n
        return self._project(out_THW.reshape(t, -1), partials_out)

    def _decode(
        self,
        q_lat_BHC: torch.Tensor,
        q_rope_BHR: torch.Tensor,
        cache_NS1Y: torch.Tensor,
        meta: AttentionMetadata,
        few_rows: bool = False,
    ) -> torch.Tensor:
        """The decodes' attention through kv_b's value half: [B, H, W]. few_rows (a step
        of split-K rows, the Triton path): the value heads in a Triton kernel, not a bmm."""
        o_lat_BHC = self.impl.decode(q_lat_BHC, q_rope_BHR, cache_NS1Y, meta, self.scale)
        w_v_HWC = self._absorbed_weights()[1]
        if few_rows and self.impl.decode_kernel:
            from moeserve.kernels.mla_rows import value_heads

            return value_heads(o_lat_BHC, w_v_HWC)
        # written through a [H, B, W] view of a [B, H, W] buffer (a strided batch for cuBLAS):
        # the output projection then reads it without the copy a transposed result needs
        b, h = o_lat_BHC.shape[:2]
        out_BHW = o_lat_BHC.new_empty(b, h, w_v_HWC.shape[1])
        torch.bmm(o_lat_BHC.transpose(0, 1), w_v_HWC.transpose(1, 2), out=out_BHW.transpose(0, 1))
        return out_BHW

    def _decode_out(
        self,
        q_lat_BHC: torch.Tensor,
        q_rope_BHR: torch.Tensor,
        cache_NS1Y: torch.Tensor,
        meta: AttentionMetadata,
        partials_out: bool,
    ) -> torch.Tensor:
        """A decode-only step's output (projected; partials when asked)."""
        o_BHW = self._decode(q_lat_BHC, q_rope_BHR, cache_NS1Y, meta, partials_out)
        return self._project(o_BHW.reshape(o_BHW.shape[0], -1), partials_out)

    def _project(self, o_TX: torch.Tensor, partials_out: bool) -> torch.Tensor:
        if partials_out and self.o_bias is None:
            from moeserve.kernels.linear import linear_partials

            return linear_partials(o_TX, self.o_weight)
        return F.linear(o_TX, self.o_weight, self.o_bias)

    def _prefill(
        self, q_QHX: torch.Tensor, cache_NS1Y: torch.Tensor, meta: AttentionMetadata, b: int
    ) -> torch.Tensor:
        """One chunk over its context, the latents expanded into per-head K and V: [Q, H, W]."""
        cfg = self.cfg
        ctx, s = meta.context_lens[b], cache_NS1Y.shape[1]
        blocks = meta.block_tables_BM[b, : -(-ctx // s)]
        rows_LY = cache_NS1Y[blocks].reshape(-1, cache_NS1Y.shape[-1])[:ctx]
        c, p, h = cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.num_heads
        kv_LHX = F.linear(rows_LY[:, :c], self.kv_b_weight).view(ctx, h, -1)
        k_rope_LHR = rows_LY[:, None, c:].expand(ctx, h, cfg.head_dim)
        k_LHX = torch.cat((kv_LHX[..., :p], k_rope_LHR), dim=-1)
        return _causal_sdpa(q_QHX, k_LHX, kv_LHX[..., p:], self.scale)
