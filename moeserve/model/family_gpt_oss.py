"""gpt-oss (20b, 120b): config parsing and the weight plan. Registered into families.PARSERS
/ PLANS / TRANSFORMS when the model package is imported (moeserve/model/__init__.py).

What differs from the other families, all as data in ModelConfig: a learned per-head sink
logit in every attention softmax, biases on q/k/v/o, alternating sliding-window and full
layers (`layer_types`), a router with a logit bias (top-k of the logits, softmax over those
k: the same weights as softmax, top-k, renormalise), experts with biases and the clamped
SwiGLU (model/activation.py), stored as four fused tensors per layer with gate and up
interleaved on the last dimension and [in, out] layouts (TRANSFORMS below). MXFP4 checkpoints
(as OpenAI ships them) hold the expert weights as E2M1 blocks and E8M0 scales per output row,
[out, in] already: only their rows are de-interleaved and the blocks flattened (model/quant.py).
"""

from __future__ import annotations

from typing import Any

import torch

from moeserve.config import ConfigError, ModelConfig
from moeserve.model.families import (
    PARSERS,
    PLANS,
    TRANSFORMS,
    Plan,
    _common,
    _experts,
    _get,
    _positive,
    _transpose,
    plan_attention,
    plan_embeddings,
    plan_layer_norms,
)


def _gpt_oss(raw: dict[str, Any]) -> ModelConfig:
    c = _common(raw, 150000.0)
    n = c["num_layers"]
    layer_types = raw.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)
    ]
    if len(layer_types) != n or not set(layer_types) <= {"sliding_attention", "full_attention"}:
        raise ConfigError(
            f"config.json: 'layer_types' must be {n} of sliding_attention / full_attention"
        )
    window = raw.get("sliding_window")
    if "sliding_attention" in layer_types:
        window = _positive(raw, "sliding_window")
    alpha = _get(raw, "swiglu_alpha", 1.702, kind=float)
    limit = _get(raw, "swiglu_limit", 7.0, kind=float)
    if alpha is None or limit is None or limit <= 0:
        raise ConfigError(f"config.json: 'swiglu_limit' must be > 0, got {limit!r}")
    bias = bool(raw.get("attention_bias", True))
    return ModelConfig(
        **c,
        **_experts(raw, "num_local_experts", "intermediate_size"),
        norm_topk_prob=True,  # top-k of the logits, softmax over those k: the same weights
        sparse_layers=(True,) * n,
        qkv_bias=bias,
        o_bias=bias,
        layer_windows=tuple(window if t == "sliding_attention" else None for t in layer_types),
        attention_sinks=True,
        router_logit_bias=True,
        expert_bias=True,
        expert_activation="clamped_swiglu",
        swiglu_alpha=float(alpha),
        swiglu_limit=float(limit),
    )


def _gpt_oss_plan(cfg: ModelConfig) -> Plan:
    """gpt-oss: biased attention with sinks; the router with a bias; each layer's experts as
    four fused tensors (gate/up interleaved on the last dim, stored [in, out])."""
    plan = plan_embeddings(cfg)
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}", f"layers.{i}"
        plan_layer_norms(plan, src, dst)
        plan_attention(plan, cfg, src, dst)
        if cfg.o_bias:
            plan[f"{src}.self_attn.o_proj.bias"] = (f"{dst}.attn.o_bias", ())
        plan[f"{src}.self_attn.sinks"] = (f"{dst}.attn.sinks", ())
        mlp = f"{src}.mlp"
        plan[f"{mlp}.router.weight"] = (f"{dst}.mlp.router", ())
        plan[f"{mlp}.router.bias"] = (f"{dst}.mlp.router_logit_bias", ())
        experts, w = f"{mlp}.experts", f"{dst}.mlp"
        if cfg.expert_quant == "mxfp4":
            plan[f"{experts}.gate_up_proj_blocks"] = (f"{w}.w_gate_up", (), "mxfp4_rows")
            plan[f"{experts}.gate_up_proj_scales"] = (
                f"{w}.w_gate_up_scale",
                (),
                "deinterleave_rows",
            )
            plan[f"{experts}.down_proj_blocks"] = (f"{w}.w_down", (), "mxfp4_flat")
            plan[f"{experts}.down_proj_scales"] = (f"{w}.w_down_scale", ())
        else:
            plan[f"{experts}.gate_up_proj"] = (f"{w}.w_gate_up", (), "deinterleave_transpose")
            plan[f"{experts}.down_proj"] = (f"{w}.w_down", (), "transpose")
        plan[f"{experts}.gate_up_proj_bias"] = (f"{w}.b_gate_up", (), "deinterleave")
        plan[f"{experts}.down_proj_bias"] = (f"{w}.b_down", ())
    return plan


def _deinterleave(t: torch.Tensor) -> torch.Tensor:
    """[..., 2F] with gate and up alternating (gate at even indices) -> gate half, up half."""
    return torch.cat([t[..., ::2], t[..., 1::2]], dim=-1)


def _deinterleave_transpose(t: torch.Tensor) -> torch.Tensor:
    return _transpose(_deinterleave(t))


def _deinterleave_rows(t: torch.Tensor) -> torch.Tensor:
    """[E, 2F, ...] with gate and up rows alternating -> gate rows, then up rows."""
    return torch.cat([t[:, ::2], t[:, 1::2]], dim=1)


def _mxfp4_flat(t: torch.Tensor) -> torch.Tensor:
    """MXFP4 blocks [E, N, K/32, 16] -> [E, N, K/2] bytes (two E2M1 values a byte)."""
    return t.flatten(-2)


def _mxfp4_rows(t: torch.Tensor) -> torch.Tensor:
    return _deinterleave_rows(_mxfp4_flat(t))


PARSERS["gpt_oss"] = _gpt_oss
PLANS["gpt_oss"] = _gpt_oss_plan
TRANSFORMS["deinterleave"] = _deinterleave
TRANSFORMS["deinterleave_transpose"] = _deinterleave_transpose
TRANSFORMS["deinterleave_rows"] = _deinterleave_rows
TRANSFORMS["mxfp4_flat"] = _mxfp4_flat
TRANSFORMS["mxfp4_rows"] = _mxfp4_rows
