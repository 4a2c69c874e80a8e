"""One decoder for every supported family; the differences are data in ModelConfig.

Shapes: T tokens in the flat batch, D hidden, H heads, G kv heads, X head dim, V vocab,
N KV blocks, S slots per block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.config import ModelConfig
from moeserve.model.layers import (
    AttentionMetadata,
    CosSin,
    Rotary,
    apply_rotary,
    paged_attention,
    rms_norm,
    write_kv,
)
from moeserve.model.moe import DenseMLP, MoE, _empty

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.cfg = cfg
        q, kv, d = cfg.q_size, cfg.kv_size, cfg.hidden_size
        self.qkv_weight = _empty(q + 2 * kv, d, dtype=dtype, device=device)
        self.qkv_bias = _empty(q + 2 * kv, dtype=dtype, device=device) if cfg.qkv_bias else None
        self.o_weight = _empty(d, q, dtype=dtype, device=device)
        if cfg.qk_norm == "head":
            self.q_norm = _empty(cfg.head_dim, dtype=dtype, device=device)
            self.k_norm = _empty(cfg.head_dim, dtype=dtype, device=device)
        elif cfg.qk_norm == "full":
            self.q_norm = _empty(q, dtype=dtype, device=device)
            self.k_norm = _empty(kv, dtype=dtype, device=device)
        self.window = cfg.layer_windows[layer]
        self.scale = cfg.head_dim**-0.5
        self.decode_kernel = False  # Triton kernels on (MoEForCausalLM.use_kernels)
        # The qkv projection may go straight from split-K partials into the rotary kernel.
        self._plain_qkv = not cfg.qkv_bias and cfg.qk_norm == "none" and cfg.clip_qkv is None

    def forward(
        self,
        x_TD: torch.Tensor,
        cos_sin: CosSin,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        partials_out: bool = False,
    ) -> torch.Tensor:
        """The attention output [T, D]; with partials_out, float32 split-K partials of it
        [split, T, D] (kernels.linear) for a consumer that adds them (add_rms_norm)."""
        cfg = self.cfg
        t = x_TD.shape[0]
        k_cache, v_cache = kv_cache
        if partials_out and self._plain_qkv and meta.num_decodes == t:
            # A few decode rows: qkv partials go straight into the rotary kernel, which adds
            # them and stores q, and k and v in the cache (no qkv tensor, no reduction).
            from moeserve.kernels.linear import linear_partials
            from moeserve.kernels.norm_rope import rotary_from_partials

            cos, sin, pos = cos_sin.for_kernel()
            q_THX = rotary_from_partials(
                linear_partials(x_TD, self.qkv_weight), cfg.num_heads, cfg.num_kv_heads,
                cos, sin, (k_cache, v_cache, meta.slot_mapping_T), x_TD.dtype, pos,
            )  # fmt: skip
            return self._attend_and_project(q_THX, kv_cache, meta, partials_out)
        qkv = F.linear(x_TD, self.qkv_weight, self.qkv_bias)
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        if cfg.qk_norm == "full":
            q = rms_norm(q, self.q_norm, cfg.rms_norm_eps)
            k = rms_norm(k, self.k_norm, cfg.rms_norm_eps)
        if cfg.clip_qkv is not None:
            q, k, v = (a.clamp(-cfg.clip_qkv, cfg.clip_qkv) for a in (q, k, v))
        q_THX = q.reshape(t, cfg.num_heads, cfg.head_dim)
        k_TGX = k.reshape(t, cfg.num_kv_heads, cfg.head_dim)
        v_TGX = v.reshape(t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm == "head":
            q_THX = rms_norm(q_THX, self.q_norm, cfg.rms_norm_eps)
            k_TGX = rms_norm(k_TGX, self.k_norm, cfg.rms_norm_eps)
        if _fused_elementwise(self.decode_kernel, q_THX):
            from moeserve.kernels.norm_rope import apply_rotary_

            # One launch rotates q and k and stores k and v in the cache (write_kv's job); it
            # reads cos/sin rows from the table by position (no gather).
            cos, sin, pos = cos_sin.for_kernel()
            apply_rotary_(
                q_THX, k_TGX, cos, sin, (v_TGX, k_cache, v_cache, meta.slot_mapping_T), pos
            )
        else:
            cos, sin = cos_sin.pair()
            q_THX, k_TGX = apply_rotary(q_THX, cos, sin), apply_rotary(k_TGX, cos, sin)
            write_kv(k_cache, v_cache, k_TGX, v_TGX, meta.slot_mapping_T)
        return self._attend_and_project(q_THX, kv_cache, meta, partials_out)

    def _attend_and_project(
        self,
        q_THX: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        partials_out: bool,
    ) -> torch.Tensor:
        t = q_THX.shape[0]
        o_THX = paged_attention(
            q_THX, *kv_cache, meta, self.scale, self.window, self.decode_kernel
        )
        o_TQ = o_THX.reshape(t, self.cfg.q_size)
        if partials_out:
            from moeserve.kernels.linear import linear_partials

            return linear_partials(o_TQ, self.o_weight)
        return F.linear(o_TQ, self.o_weight)


# Below this many tokens an eager step launches torch's elementwise ops faster than Triton's
# Python launcher runs; inside a CUDA graph launches cost nothing and one kernel beats six.
_FUSED_ELEMENTWISE_MIN_TOKENS = 256


def _fused_elementwise(kernels: bool, x: torch.Tensor) -> bool:
    return kernels and (
        x.shape[0] >= _FUSED_ELEMENTWISE_MIN_TOKENS
        or (x.is_cuda and torch.cuda.is_current_stream_capturing())
    )


def _few_rows(x_TD: torch.Tensor) -> bool:
    from moeserve.kernels import linear

    return linear.applicable(x_TD)


def _norm_fn(kernels: bool) -> Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]:
    if kernels:
        from moeserve.kernels.norm_rope import rms_norm as fused

        return fused
    return rms_norm


class DecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layer: int,
        dtype: torch.dtype,
        device: torch.device,
        expert_device: torch.device | None = None,
    ):
        super().__init__()
        self.eps = cfg.rms_norm_eps
        self.input_norm = _empty(cfg.hidden_size, dtype=dtype, device=device)
        self.post_norm = _empty(cfg.hidden_size, dtype=dtype, device=device)
        self.attn = Attention(cfg, layer, dtype, device)
        self.mlp: MoE | DenseMLP
        if cfg.sparse_layers[layer]:
            self.mlp = MoE(cfg, dtype, device, expert_device)
        else:
            self.mlp = DenseMLP(cfg.hidden_size, cfg.dense_intermediate_size, dtype, device)

    def attention_block(
        self,
        x_TD: torch.Tensor,
        cos_sin: CosSin,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream after attention, and its post-attention norm (the MLP's input)."""
        fused = _fused_elementwise(self.attn.decode_kernel, x_TD)
        norm = _norm_fn(fused)
        # A few rows (a captured decode step): the projections return split-K partials, which
        # the residual-add norm (and the rotary kernel, for qkv) add up themselves.
        partials = fused and _few_rows(x_TD)
        attn_TD = self.attn(norm(x_TD, self.input_norm, self.eps), cos_sin, kv_cache, meta,
                            partials_out=partials)  # fmt: skip
        if fused:
            from moeserve.kernels.norm_rope import add_rms_norm

            return add_rms_norm(x_TD, attn_TD, self.post_norm, self.eps)
        x_TD = x_TD + attn_TD
        return x_TD, norm(x_TD, self.post_norm, self.eps)

    def forward(
        self,
        x_TD: torch.Tensor,
        cos_sin: CosSin,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x_TD, h_TD = self.attention_block(x_TD, cos_sin, kv_cache, meta)
        if isinstance(self.mlp, MoE):  # the residual add happens inside (fused when it can)
            return self.mlp(h_TD, meta.valid_T, residual_TD=x_TD)
        return x_TD + self.mlp(h_TD)


class MoEForCausalLM(nn.Module):
    """The model over one flat batch of tokens and a paged KV cache.

    Parameters are allocated uninitialised on `device`; the loader fills them.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        expert_device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.device = device
        self.embed_tokens = _empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, dtype, device, expert_device) for i in range(cfg.num_layers)
        )
        self.norm = _empty(cfg.hidden_size, dtype=dtype, device=device)
        if not cfg.tie_word_embeddings:
            self.lm_head = _empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.rotary = Rotary(cfg, device, dtype)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens if self.cfg.tie_word_embeddings else self.lm_head

    def use_kernels(self, enabled: bool = True, fused_moe_max_tokens: int = 256) -> None:
        """Switch the Triton fast path on or off: RMSNorm, rotary and paged decode attention
        kernels everywhere, and the fused MoE GEMMs for batches of at most
        `fused_moe_max_tokens` tokens (0: none). Offloaded layers keep their runner."""
        for layer in self.layers:
            layer.attn.decode_kernel = enabled
            if isinstance(layer.mlp, MoE):
                layer.mlp.fused_max_tokens = fused_moe_max_tokens if enabled else 0

    def moe_layers(self) -> list[tuple[int, MoE]]:
        return [(i, l.mlp) for i, l in enumerate(self.layers) if isinstance(l.mlp, MoE)]

    @torch.inference_mode()
    def forward(
        self,
        input_ids_T: torch.Tensor,
        positions_T: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """Hidden states [T, D] before the final norm, for every token of the batch."""
        x_TD = F.embedding(input_ids_T, self.embed_tokens)
        cos_sin = self.rotary.cos_sin(positions_T, self.dtype)
        for layer, kv in zip(self.layers, kv_caches):
            x_TD = layer(x_TD, cos_sin, kv, meta)
        return x_TD

    @torch.inference_mode()
    def compute_logits(self, hidden_XD: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """Logits [X, V] for the selected rows of forward()'s output: float32, or with
        float32=False the model dtype they are computed in (a decode graph leaves the cast,
        a kernel of its own, to the sampler, which only needs it off the greedy path)."""
        norm = _norm_fn(_fused_elementwise(self.layers[0].attn.decode_kernel, hidden_XD))
        h = norm(hidden_XD, self.norm, self.cfg.rms_norm_eps)
        logits = F.linear(h, self.lm_head_weight)
        return logits.float() if float32 else logits

    def reset_expert_counts(self) -> None:
        for _, moe in self.moe_layers():
            moe.tokens_per_expert_E.zero_()

    def tokens_per_expert(self) -> torch.Tensor:
        """[L_sparse, E] token assignments per expert since start (device tensor, no sync)."""
        return torch.stack([m.tokens_per_expert_E for _, m in self.moe_layers()])
