"""DeepSeek-V2/V3 (and Kimi-K2) and GLM-4.5: config parsing and weight plans. Registered into
families.PARSERS / PLANS when the model package is imported (moeserve/model/__init__.py).

Both share DeepSeek-style MoE layers (model/deepseek_moe.py: sigmoid or softmax routing with
a correction bias, group-limited top-k, ungated shared experts, dense first layers, a float32
router, MTP layers ignored). DeepSeek attends with multi-head latent attention over a latent
cache (model/families_mla.py, model/mla.py); GLM-4.5 with standard attention, partial rotary,
qkv biases and optional per-head q/k norms.
"""

from __future__ import annotations

from typing import Any

from moeserve.config import ConfigError, ModelConfig
from moeserve.model.deepseek_moe import deepseek_moe_fields, plan_deepseek_moe
from moeserve.model.families import (
    PARSERS,
    PLANS,
    Plan,
    _common,
    plan_attention,
    plan_embeddings,
    plan_layer_norms,
)
from moeserve.model.families_mla import deepseek_config, mla_fields, plan_deepseek_layers


def _glm4_moe(raw: dict[str, Any]) -> ModelConfig:
    c = _common(raw, 1e4)
    rope = c["rope_params"]
    # Hub configs give partial_rotary_factor at the top level, transformers 5 inside
    # rope_parameters; transformers defaults it to 0.5 for GLM-4.5.
    factor = rope.pop("partial_rotary_factor", None)
    factor = raw.get("partial_rotary_factor", 0.5 if factor is None else factor)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        raise ConfigError(f"config.json: 'partial_rotary_factor' must be in (0, 1], got {factor!r}")
    rotary = int(c["head_dim"] * factor)
    if rotary < 2 or rotary % 2:
        raise ConfigError(
            f"config.json: head_dim * partial_rotary_factor ({rotary}) must be even and >= 2"
        )
    return ModelConfig(
        **c,
        **deepseek_moe_fields(raw),
        qkv_bias=bool(raw.get("attention_bias", False)),
        qk_norm="head" if raw.get("use_qk_norm", False) else "none",
        rotary_dim=0 if rotary == c["head_dim"] else rotary,
        layer_windows=(None,) * c["num_layers"],
    )


def _deepseek(raw: dict[str, Any]) -> ModelConfig:
    mla = mla_fields(raw, always_interleaved=raw["model_type"] == "deepseek_v2")
    # head_dim is MLA's rotary part (transformers' rule), whatever hidden / heads gives.
    return deepseek_config({**_common({**raw, "head_dim": mla["head_dim"]}, 1e4), **mla}, raw)


def _glm4_moe_plan(cfg: ModelConfig) -> Plan:
    """GLM-4.5: standard attention (+ biases, q/k norms), DeepSeek-style MoE layers."""
    plan = plan_embeddings(cfg)
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}", f"layers.{i}"
        plan_layer_norms(plan, src, dst)
        plan_attention(plan, cfg, src, dst)
        plan_deepseek_moe(plan, cfg, src, dst)
    return plan


def _deepseek_plan(cfg: ModelConfig) -> Plan:
    """DeepSeek-V2/V3: MLA attention, DeepSeek-style MoE layers (families_mla.py)."""
    plan = plan_embeddings(cfg)
    for i in range(cfg.num_layers):
        plan_layer_norms(plan, f"model.layers.{i}", f"layers.{i}")
    return plan_deepseek_layers(plan, cfg)


PARSERS |= {"glm4_moe": _glm4_moe, "deepseek_v2": _deepseek, "deepseek_v3": _deepseek}
PLANS |= {"glm4_moe": _glm4_moe_plan, "deepseek_v2": _deepseek_plan, "deepseek_v3": _deepseek_plan}
