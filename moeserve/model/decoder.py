"""One decoder for every supported family; the differences are data in ModelConfig.

Shapes: T tokens in the flat batch, D hidden, H heads, G kv heads, X head dim, V vocab,
N KV blocks, S slots per block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.config import ModelConfig
from moeserve.model.layers import (
    AttentionMetadata,
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

    def forward(
        self,
        x_TD: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        cfg = self.cfg
        t = x_TD.shape[0]
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
        cos, sin = cos_sin
        q_THX, k_TGX = apply_rotary(q_THX, cos, sin), apply_rotary(k_TGX, cos, sin)
        k_cache, v_cache = kv_cache
        write_kv(k_cache, v_cache, k_TGX, v_TGX, meta.slot_mapping_T)
        o_THX = paged_attention(q_THX, k_cache, v_cache, meta, self.scale, self.window)
        return F.linear(o_THX.reshape(t, cfg.q_size), self.o_weight)


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

    def forward(
        self,
        x_TD: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x_TD = x_TD + self.attn(rms_norm(x_TD, self.input_norm, self.eps), cos_sin, kv_cache, meta)
        return x_TD + self.mlp(rms_norm(x_TD, self.post_norm, self.eps))


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
        self.rotary = Rotary(cfg, device)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens if self.cfg.tie_word_embeddings else self.lm_head

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
    def compute_logits(self, hidden_XD: torch.Tensor) -> torch.Tensor:
        """Float32 logits [X, V] for the selected rows of forward()'s output."""
        h = rms_norm(hidden_XD, self.norm, self.cfg.rms_norm_eps)
        return F.linear(h, self.lm_head_weight).float()

    def reset_expert_counts(self) -> None:
        for _, moe in self.moe_layers():
            moe.tokens_per_expert_E.zero_()

    def tokens_per_expert(self) -> torch.Tensor:
        """[L_sparse, E] token assignments per expert since start (device tensor, no sync)."""
        return torch.stack([m.tokens_per_expert_E for _, m in self.moe_layers()])
