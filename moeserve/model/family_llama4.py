"""Llama 4 (Scout, Maverick): config parsing and weight plans for `llama4_text` checkpoints and
the text part of multimodal `llama4` ones. Registered into families.PARSERS / PLANS when the
model package is imported (moeserve/model/__init__.py).

What differs from the other families, all as data in ModelConfig:
- MoE on every `interleave_moe_layer_step`-th layer (or the listed `moe_layers`), dense MLPs
  of `intermediate_size_mlp` between; top-k by logit, sigmoid weights that scale each
  expert's INPUT (router_scales_input), an ungated shared expert of `intermediate_size`;
- NoPE layers (`no_rope_layers[i] == 0`) skip rotary and attend globally, with attention
  temperature tuning on q; RoPE layers attend in chunks of `attention_chunk_size` and
  L2-normalise q and k (`use_qk_norm`);
- the rotary rotates interleaved pairs (x[2i], x[2i+1]). The plan permutes the rows of each
  head's q/k projection to the rotate-half layout instead: attention scores only see q.k, which
  a permutation of head dims applied to both leaves alone, so every rotary path (readable and
  Triton) runs unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
from functools import partial
from typing import Any

import torch

from moeserve.config import ConfigError, ModelConfig
from moeserve.model.families import (
    IGNORED_PREFIXES,
    PARSERS,
    PLANS,
    TRANSFORMS,
    Plan,
    _common,
    _experts,
    _get,
    _positive,
    plan_embeddings,
    plan_gate_up_down,
    plan_layer_norms,
)

log = logging.getLogger(__name__)

LAYER_TYPES = ("chunked_attention", "full_attention")
MLP_NAMES = ("gate_proj", "up_proj", "down_proj")


def _flag(raw: dict[str, Any], key: str, default: bool) -> bool:
    # Hub configs may say `"attn_temperature_tuning": 4`: transformers only tests truthiness.
    value = raw.get(key, default)
    if not isinstance(value, (bool, int)):
        raise ConfigError(f"config.json: '{key}' must be true or false, got {value!r}")
    return bool(value)


def _int_list(raw: dict[str, Any], key: str) -> list[int] | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or any(
        isinstance(v, bool) or not isinstance(v, int) for v in value
    ):
        raise ConfigError(f"config.json: '{key}' must be a list of integers, got {value!r}")
    return value


def _moe_layers(raw: dict[str, Any], n: int) -> tuple[bool, ...]:
    listed = _int_list(raw, "moe_layers")
    if listed is None:
        step = _positive(raw, "interleave_moe_layer_step", 1)
        listed = list(range(step - 1, n, step))
    bad = [i for i in listed if not 0 <= i < n]
    if bad:
        raise ConfigError(f"config.json: 'moe_layers' names layer {bad[0]} of {n}")
    return tuple(i in listed for i in range(n))


def _nope_layers(raw: dict[str, Any], n: int) -> tuple[bool, ...]:
    # transformers' naming: no_rope_layers[i] is 1 where layer i USES rotary.
    flags = _int_list(raw, "no_rope_layers")
    if not flags:  # transformers treats an empty list as absent
        interval = _positive(raw, "no_rope_layer_interval", 4)
        flags = [int((i + 1) % interval != 0) for i in range(n)]
    if len(flags) < n:
        raise ConfigError(f"config.json: 'no_rope_layers' has {len(flags)} entries for {n} layers")
    return tuple(not f for f in flags[:n])


def _chunks(raw: dict[str, Any], nope: tuple[bool, ...]) -> tuple[int | None, ...]:
    n = len(nope)
    chunk = _get(raw, "attention_chunk_size", 8192)
    types = raw.get("layer_types")
    if types is None:
        types = [
            "chunked_attention" if not no_rope and chunk is not None else "full_attention"
            for no_rope in nope
        ]
    if not isinstance(types, list) or len(types) != n or any(t not in LAYER_TYPES for t in types):
        raise ConfigError(
            f"config.json: 'layer_types' must list {n} of {', '.join(LAYER_TYPES)}, got {types!r}"
        )
    if "chunked_attention" in types and (chunk is None or chunk < 1):
        raise ConfigError(
            f"config.json: chunked_attention layers need 'attention_chunk_size' >= 1, got {chunk!r}"
        )
    return tuple(chunk if t == "chunked_attention" else None for t in types)


def _llama4_text(raw: dict[str, Any]) -> ModelConfig:
    c = _common(raw, 5e5)
    n = c["num_layers"]
    if _flag(raw, "attention_bias", False):
        raise ConfigError("config.json: 'attention_bias' true is not supported for llama4")
    experts = _experts(raw, "num_local_experts", "intermediate_size")
    sparse = _moe_layers(raw, n)
    nope = _nope_layers(raw, n)
    temperature = None
    if _flag(raw, "attn_temperature_tuning", True):
        floor_scale = _get(raw, "floor_scale", 8192, kind=float)
        attn_scale = _get(raw, "attn_scale", 0.1, kind=float)
        if floor_scale is None or floor_scale <= 0 or attn_scale is None:
            raise ConfigError(
                "config.json: attention temperature tuning needs 'floor_scale' > 0 and "
                f"'attn_scale', got {floor_scale!r} and {attn_scale!r}"
            )
        temperature = (float(floor_scale), float(attn_scale))
    return ModelConfig(
        **c,
        **experts,
        norm_topk_prob=False,
        scoring_func="sigmoid",
        shared_expert_intermediate_size=experts["moe_intermediate_size"],
        sparse_layers=sparse,
        dense_intermediate_size=(
            _positive(raw, "intermediate_size_mlp", 16384) if not all(sparse) else 0
        ),
        qk_norm="l2" if _flag(raw, "use_qk_norm", True) else "none",
        layer_windows=(None,) * n,
        router_scales_input=True,
        shared_expert_gate=False,
        nope_layers=nope,
        layer_chunks=_chunks(raw, nope),
        attn_temperature=temperature,
    )


def _llama4(raw: dict[str, Any]) -> ModelConfig:
    """A multimodal checkpoint: its text model, from `text_config`."""
    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError("config.json: model_type 'llama4' needs a 'text_config' object")
    text = {"model_type": "llama4_text", **text}
    for key in ("dtype", "torch_dtype"):  # transformers writes the dtype at the top level
        if text.get(key) is None and raw.get(key) is not None:
            text[key] = raw[key]
    if text["model_type"] != "llama4_text":
        raise ConfigError(
            f"config.json: text_config.model_type must be 'llama4_text', got {text['model_type']!r}"
        )
    return dataclasses.replace(_llama4_text(text), model_type="llama4")


def _pairs_to_halves(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of a q/k projection [heads * X, ...]: each head's interleaved rotary pairs
    (2i, 2i+1) to the rotate-half positions (i, X/2 + i)."""
    rest = w.shape[1:]
    heads = w.shape[0] // head_dim
    return w.reshape(heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def _rotary_transform(head_dim: int) -> str:
    name = f"rotary_pairs_to_halves_{head_dim}"
    TRANSFORMS.setdefault(name, partial(_pairs_to_halves, head_dim=head_dim))
    return name


def _text_plan(cfg: ModelConfig) -> Plan:
    plan = plan_embeddings(cfg)
    q, kv = cfg.q_size, cfg.kv_size
    pairs = _rotary_transform(cfg.head_dim)
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}", f"layers.{i}"
        plan_layer_norms(plan, src, dst)
        attn, qkv = f"{src}.self_attn", f"{dst}.attn.qkv_weight"
        rope = () if cfg.nope_layers[i] else (pairs,)
        plan[f"{attn}.q_proj.weight"] = (qkv, (slice(0, q),), *rope)  # type: ignore[assignment]
        plan[f"{attn}.k_proj.weight"] = (qkv, (slice(q, q + kv),), *rope)  # type: ignore[assignment]
        plan[f"{attn}.v_proj.weight"] = (qkv, (slice(q + kv, q + 2 * kv),))
        plan[f"{attn}.o_proj.weight"] = (f"{dst}.attn.o_weight", ())
        ff, mlp = f"{src}.feed_forward", f"{dst}.mlp"
        if not cfg.sparse_layers[i]:
            plan_gate_up_down(plan, ff, MLP_NAMES, mlp, cfg.dense_intermediate_size)
            continue
        plan[f"{ff}.router.weight"] = (f"{mlp}.router", ())
        # Fused experts stored [E, D, 2F] (gate then up) and [E, F, D]: ours are [out, in].
        plan[f"{ff}.experts.gate_up_proj"] = (f"{mlp}.w_gate_up", (), "transpose")
        plan[f"{ff}.experts.down_proj"] = (f"{mlp}.w_down", (), "transpose")
        f = cfg.shared_expert_intermediate_size
        plan_gate_up_down(plan, f"{ff}.shared_expert", MLP_NAMES, f"{mlp}.shared", f)
    return plan


def _multimodal_plan(cfg: ModelConfig) -> Plan:
    return {f"language_model.{name}": entry for name, entry in _text_plan(cfg).items()}


PARSERS["llama4_text"] = _llama4_text
PARSERS["llama4"] = _llama4
PLANS["llama4_text"] = _text_plan
PLANS["llama4"] = _multimodal_plan
IGNORED_PREFIXES["llama4"] = ("vision_model.", "multi_modal_projector.")
