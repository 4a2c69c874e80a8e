"""The DeepSeek-V2/V3 (and Kimi-K2) families as data: multi-head latent attention's
config.json fields and weight names, joined with the DeepSeek-style MoE's (deepseek_moe.py).
model/mla.py computes with them; families.py registers the parsers and plans."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from moeserve.config import ConfigError, ModelConfig
from moeserve.model.deepseek_moe import deepseek_moe_fields, plan_deepseek_moe
from moeserve.model.families import TRANSFORMS

Plan = dict[str, tuple]


def _dim(raw: dict[str, Any], key: str, default: Any = ...) -> int:
    value = raw.get(key, default)
    if value is ...:
        raise ConfigError(f"config.json: required field '{key}' is missing")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"config.json: '{key}' must be an integer >= 1, got {value!r}")
    return value


def mla_fields(raw: dict[str, Any], *, always_interleaved: bool) -> dict[str, Any]:
    """ModelConfig fields of MLA; head_dim becomes the rotary part, as in transformers.
    always_interleaved: DeepSeek-V2 always pairs its rotary dims (even, odd); V3 configs say
    so with rope_interleave (default true)."""
    q_lora = raw.get("q_lora_rank")
    rope = _dim(raw, "qk_rope_head_dim")
    if rope % 2:
        raise ConfigError(f"config.json: 'qk_rope_head_dim' must be even, got {rope}")
    return dict(
        kv_lora_rank=_dim(raw, "kv_lora_rank"),
        q_lora_rank=None if q_lora is None else _dim(raw, "q_lora_rank"),
        qk_nope_head_dim=_dim(raw, "qk_nope_head_dim"),
        v_head_dim=_dim(raw, "v_head_dim"),
        head_dim=rope,
        attention_bias=bool(raw.get("attention_bias", False)),
        rope_interleave=always_interleaved or bool(raw.get("rope_interleave", True)),
    )


def _rope_pairs_to_halves(w: torch.Tensor, group: int, rope: int) -> torch.Tensor:
    """Rows [n * group, ...] whose last `rope` rows of each group hold interleaved rotary pairs
    (2i, 2i+1): those moved to rotate-half order (i, rope/2 + i), the other rows kept."""
    g = w.reshape(w.shape[0] // group, group, *w.shape[1:])
    pairs = g[:, group - rope :].reshape(g.shape[0], rope // 2, 2, *w.shape[1:])
    halves = pairs.transpose(1, 2).reshape(g.shape[0], rope, *w.shape[1:])
    return torch.cat((g[:, : group - rope], halves), dim=1).reshape(w.shape)


def _rope_transform(group: int, rope: int) -> str:
    name = f"mla_rope_pairs_to_halves_{group}_{rope}"
    TRANSFORMS.setdefault(name, partial(_rope_pairs_to_halves, group=group, rope=rope))
    return name


def plan_mla_attention(plan: Plan, cfg: ModelConfig, src: str, dst: str) -> None:
    """One layer's MLA projections and norms -> model/mla.py MLAttention's parameters.

    Interleaved rotary pairs (DeepSeek-V2, V3 by default) are moved to rotate-half order in
    the rows of the q projection (each head's rope part) and of kv_a (its rope part) at load:
    q and the cached k_rope then rotate as halves, their dot products unchanged, and no step
    reorders them."""
    attn, out = f"{src}.self_attn", f"{dst}.attn"
    r, lora = cfg.head_dim, cfg.q_lora_rank
    fold = cfg.rope_interleave
    q_rope = (_rope_transform(cfg.qk_nope_head_dim + r, r),) if fold else ()
    kv_rope = (_rope_transform(cfg.kv_lora_rank + r, r),) if fold else ()
    # q_proj (or q_a_proj) and kv_a_proj_with_mqa fill the rows of one weight (MLAttention).
    n_q = cfg.num_heads * (cfg.qk_nope_head_dim + r) if lora is None else lora
    q, kv = (slice(0, n_q),), (slice(n_q, None),)
    bias = cfg.attention_bias
    if lora is None:
        plan[f"{attn}.q_proj.weight"] = (f"{out}.qkv_a_weight", q, *q_rope)
        if bias:
            plan[f"{attn}.kv_a_proj_with_mqa.bias"] = (f"{out}.kv_a_bias", (), *kv_rope)
    else:
        plan[f"{attn}.q_a_proj.weight"] = (f"{out}.qkv_a_weight", q)
        plan[f"{attn}.q_b_proj.weight"] = (f"{out}.q_b_weight", (), *q_rope)
        plan[f"{attn}.q_a_layernorm.weight"] = (f"{out}.q_a_norm", ())
        if bias:
            plan[f"{attn}.q_a_proj.bias"] = (f"{out}.qkv_a_bias", q)
            plan[f"{attn}.kv_a_proj_with_mqa.bias"] = (f"{out}.qkv_a_bias", kv, *kv_rope)
    plan[f"{attn}.kv_a_proj_with_mqa.weight"] = (f"{out}.qkv_a_weight", kv, *kv_rope)
    plan[f"{attn}.o_proj.weight"] = (f"{out}.o_weight", ())
    if bias:
        plan[f"{attn}.o_proj.bias"] = (f"{out}.o_bias", ())
    plan[f"{attn}.kv_a_layernorm.weight"] = (f"{out}.kv_a_norm", ())
    plan[f"{attn}.kv_b_proj.weight"] = (f"{out}.kv_b_weight", ())


def deepseek_config(fields: dict[str, Any], raw: dict[str, Any]) -> ModelConfig:
    """deepseek_v2 / deepseek_v3: the common and MLA fields with the DeepSeek-style MoE's."""
    return ModelConfig(
        **fields, **deepseek_moe_fields(raw), layer_windows=(None,) * fields["num_layers"]
    )


def plan_deepseek_layers(plan: Plan, cfg: ModelConfig) -> Plan:
    """Every decoder layer's MLA and MLP tensors (embeddings and layer norms are the caller's)."""
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}", f"layers.{i}"
        plan_mla_attention(plan, cfg, src, dst)
        plan_deepseek_moe(plan, cfg, src, dst)
    return plan
