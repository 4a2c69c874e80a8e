"""The per-family differences, as data.

`parse_config` turns a Hugging Face config.json (hub style or the transformers-5 style) into a
ModelConfig; `weight_plan` says, for every tensor name the checkpoint must hold, which slice of
which moeserve parameter it fills. Nothing here imports the model code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from moeserve.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn", "llama3")

# An index into a parameter: an expert index and/or a row slice.
Index = tuple[int | slice, ...]
# (parameter name, index) or (parameter name, index, TRANSFORMS key).
PlanEntry = tuple[str, Index] | tuple[str, Index, str]


def _get(raw: dict[str, Any], key: str, default: Any = ..., *, kind: type = int) -> Any:
    value = raw.get(key, default)
    if value is ...:
        raise ConfigError(f"config.json: required field '{key}' is missing")
    if value is None:
        return None
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"config.json: '{key}' must be an integer, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"config.json: '{key}' must be a number, got {value!r}")
    return value


def _positive(raw: dict[str, Any], key: str, default: Any = ...) -> int:
    value = _get(raw, key, default)
    if value is None or value < 1:
        raise ConfigError(f"config.json: '{key}' must be >= 1, got {value!r}")
    return value


def _rope(raw: dict[str, Any], default_theta: float) -> tuple[float, dict[str, Any]]:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"config.json: 'rope_parameters' must be an object, got {params!r}")
    if params and all(isinstance(v, dict) for v in params.values()):
        # Per-layer-type RoPE (transformers 5); the families we run use one for all layers.
        kinds = {tuple(sorted(v.items())) for v in params.values()}
        if len(kinds) > 1:
            raise ConfigError("config.json: per-layer-type rope_parameters are not supported")
        params = next(iter(params.values()))
    params = dict(params)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = raw.get("rope_theta", default_theta)
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigError(f"config.json: 'rope_theta' must be a positive number, got {theta!r}")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"config.json: rope type '{rope_type}' is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type != "default":
        factor = params.get("factor")
        if not isinstance(factor, (int, float)) or factor <= 0:
            raise ConfigError(f"config.json: rope '{rope_type}' needs a positive 'factor'")
    if rope_type in ("yarn", "llama3"):
        params.setdefault(
            "original_max_position_embeddings",
            raw.get("original_max_position_embeddings", raw.get("max_position_embeddings")),
        )
    params["rope_type"] = rope_type
    return float(theta), params


def _eos(raw: dict[str, Any]) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _common(raw: dict[str, Any], default_theta: float) -> dict[str, Any]:
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"config.json: hidden_act '{act}' is not supported (only 'silu')")
    hidden = _positive(raw, "hidden_size")
    heads = _positive(raw, "num_attention_heads")
    kv_heads = _positive(raw, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise ConfigError(
            f"config.json: num_attention_heads ({heads}) must be a multiple of "
            f"num_key_value_heads ({kv_heads})"
        )
    head_dim = raw.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ConfigError(
                f"config.json: hidden_size ({hidden}) is not divisible by "
                f"num_attention_heads ({heads}) and no head_dim is given"
            )
        head_dim = hidden // heads
    if not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        raise ConfigError(f"config.json: 'head_dim' must be an even integer >= 2, got {head_dim!r}")
    eps = _get(raw, "rms_norm_eps", 1e-6, kind=float)
    if eps is None or eps <= 0:
        raise ConfigError(f"config.json: 'rms_norm_eps' must be > 0, got {eps!r}")
    theta, rope_params = _rope(raw, default_theta)
    dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(
            f"config.json: dtype '{dtype}' is not supported (float32, bfloat16, float16)"
        )
    bos = raw.get("bos_token_id")
    return dict(
        model_type=raw["model_type"],
        vocab_size=_positive(raw, "vocab_size"),
        hidden_size=hidden,
        num_layers=_positive(raw, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(eps),
        max_position_embeddings=_positive(raw, "max_position_embeddings"),
        rope_theta=theta,
        rope_params=rope_params,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        dtype=dtype,
        bos_token_id=bos if isinstance(bos, int) else None,
        eos_token_ids=_eos(raw),
    )


def _experts(raw: dict[str, Any], num_key: str, size_key: str) -> dict[str, Any]:
    # transformers 5 may write num_local_experts where hub configs say num_experts.
    if num_key not in raw and "num_local_experts" in raw:
        num_key = "num_local_experts"
    num = _positive(raw, num_key)
    top_k = _positive(raw, "num_experts_per_tok")
    if top_k > num:
        raise ConfigError(
            f"config.json: num_experts_per_tok ({top_k}) exceeds the number of experts ({num})"
        )
    return dict(num_experts=num, top_k=top_k, moe_intermediate_size=_positive(raw, size_key))


def _qwen_sparse_layers(raw: dict[str, Any], num_layers: int) -> tuple[bool, ...]:
    step = _positive(raw, "decoder_sparse_step", 1)
    mlp_only = raw.get("mlp_only_layers") or []
    if not isinstance(mlp_only, list) or any(not isinstance(i, int) for i in mlp_only):
        raise ConfigError(
            f"config.json: 'mlp_only_layers' must be a list of ints, got {mlp_only!r}"
        )
    return tuple(i not in mlp_only and (i + 1) % step == 0 for i in range(num_layers))


def _all_windows(raw: dict[str, Any], n: int, enabled: bool) -> tuple[int | None, ...]:
    window = raw.get("sliding_window")
    if not enabled or not window:
        return (None,) * n
    return (_positive(raw, "sliding_window"),) * n


def _mixtral(raw: dict[str, Any]) -> ModelConfig:
    c = _common(raw, 1e6)
    n = c["num_layers"]
    return ModelConfig(
        **c,
        **_experts(raw, "num_local_experts", "intermediate_size"),
        norm_topk_prob=True,
        sparse_layers=(True,) * n,
        layer_windows=_all_windows(raw, n, True),
    )


def _qwen2_moe(raw: dict[str, Any]) -> ModelConfig:
    c = _common(raw, 1e4)
    n = c["num_layers"]
    layer_types = raw.get("layer_types")
    if layer_types is None:
        max_window = raw.get("max_window_layers", n)
        use = bool(raw.get("use_sliding_window", False))
        layer_types = [
            "sliding_attention" if use and (i + 1) % 2 and i < max_window else "full_attention"
            for i in range(n)
        ]
    if len(layer_types) != n:
        raise ConfigError(
            f"config.json: 'layer_types' has {len(layer_types)} entries for {n} layers"
        )
    window = raw.get("sliding_window") if raw.get("use_sliding_window") else None
    windows = tuple(window if t == "sliding_attention" and window else None for t in layer_types)
    return ModelConfig(
        **c,
        **_experts(raw, "num_experts", "moe_intermediate_size"),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=_get(raw, "shared_expert_intermediate_size", 0) or 0,
        sparse_layers=_qwen_sparse_layers(raw, n),
        dense_intermediate_size=_get(raw, "intermediate_size", 0) or 0,
        qkv_bias=bool(raw.get("qkv_bias", True)),
        layer_windows=windows,
    )


def _qwen3_moe(raw: dict[str, Any]) -> ModelConfig:
    c = _common(raw, 1e4)
    n = c["num_layers"]
    return ModelConfig(
        **c,
        **_experts(raw, "num_experts", "moe_intermediate_size"),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        sparse_layers=_qwen_sparse_layers(raw, n),
        dense_intermediate_size=_get(raw, "intermediate_size", 0) or 0,
        qkv_bias=bool(raw.get("attention_bias", False)),
        qk_norm="head",
        layer_windows=_all_windows(raw, n, bool(raw.get("use_sliding_window", False))),
    )


def _olmoe(raw: dict[str, Any]) -> ModelConfig:
    c = _common(raw, 1e4)
    n = c["num_layers"]
    clip = _get(raw, "clip_qkv", None, kind=float)
    if clip is not None and clip <= 0:
        raise ConfigError(f"config.json: 'clip_qkv' must be > 0, got {clip}")
    return ModelConfig(
        **c,
        **_experts(raw, "num_experts", "intermediate_size"),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        sparse_layers=(True,) * n,
        qkv_bias=bool(raw.get("attention_bias", False)),
        qk_norm="full",
        clip_qkv=clip,
        layer_windows=(None,) * n,
    )


PARSERS: dict[str, Callable[[dict[str, Any]], ModelConfig]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
}


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """Parse a config.json dict; raises ConfigError naming the field that is wrong."""
    model_type = raw.get("model_type")
    if model_type not in PARSERS:
        raise ConfigError(
            f"config.json: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(sorted(PARSERS))})"
        )
    if raw.get("auto_map"):
        log.warning("config.json has 'auto_map': custom model code is ignored, never executed")
    cfg = PARSERS[model_type](raw)
    if any(cfg.sparse_layers) is False:
        raise ConfigError("config.json: no layer is a MoE layer (check decoder_sparse_step)")
    if not all(cfg.sparse_layers) and cfg.dense_intermediate_size < 1:
        raise ConfigError("config.json: dense layers need 'intermediate_size' >= 1")
    return cfg


def _mlp_names(prefix: str, names: tuple[str, str, str]) -> tuple[str, str, str]:
    return tuple(f"{prefix}.{n}.weight" for n in names)  # type: ignore[return-value]


Plan = dict[str, PlanEntry]


def plan_gate_up_down(
    plan: Plan, prefix: str, names: tuple[str, str, str], dst: str, size: int, expert: Index = ()
) -> None:
    """A SwiGLU MLP stored as separate gate, up and down tensors -> dst.w_gate_up / dst.w_down
    (of one expert when `expert` is given)."""
    gate, up, down = _mlp_names(prefix, names)
    plan[gate] = (f"{dst}.w_gate_up", (*expert, slice(0, size)))
    plan[up] = (f"{dst}.w_gate_up", (*expert, slice(size, 2 * size)))
    plan[down] = (f"{dst}.w_down", expert)


def plan_embeddings(cfg: ModelConfig) -> Plan:
    plan: Plan = {
        "model.embed_tokens.weight": ("embed_tokens", ()),
        "model.norm.weight": ("norm", ()),
    }
    if not cfg.tie_word_embeddings:
        plan["lm_head.weight"] = ("lm_head", ())
    return plan


def plan_attention(plan: Plan, cfg: ModelConfig, src: str, dst: str) -> None:
    """Separate q/k/v projections (+ biases, q/k norms) into the fused qkv parameter."""
    q, kv = cfg.q_size, cfg.kv_size
    attn = f"{src}.self_attn"
    qkv_rows = (slice(0, q), slice(q, q + kv), slice(q + kv, q + 2 * kv))
    for name, rows in zip("qkv", qkv_rows):
        plan[f"{attn}.{name}_proj.weight"] = (f"{dst}.attn.qkv_weight", (rows,))
        if cfg.qkv_bias:
            plan[f"{attn}.{name}_proj.bias"] = (f"{dst}.attn.qkv_bias", (rows,))
    plan[f"{attn}.o_proj.weight"] = (f"{dst}.attn.o_weight", ())
    if cfg.qk_norm != "none":
        plan[f"{attn}.q_norm.weight"] = (f"{dst}.attn.q_norm", ())
        plan[f"{attn}.k_norm.weight"] = (f"{dst}.attn.k_norm", ())


def plan_layer_norms(plan: Plan, src: str, dst: str) -> None:
    plan[f"{src}.input_layernorm.weight"] = (f"{dst}.input_norm", ())
    plan[f"{src}.post_attention_layernorm.weight"] = (f"{dst}.post_norm", ())


def _standard_plan(cfg: ModelConfig) -> Plan:
    """Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE: one tensor per expert projection."""
    plan = plan_embeddings(cfg)
    mixtral = cfg.model_type == "mixtral"
    expert_names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    mlp_names = ("gate_proj", "up_proj", "down_proj")
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}", f"layers.{i}"
        plan_layer_norms(plan, src, dst)
        plan_attention(plan, cfg, src, dst)
        if not cfg.sparse_layers[i]:
            plan_gate_up_down(
                plan, f"{src}.mlp", mlp_names, f"{dst}.mlp", cfg.dense_intermediate_size
            )
            continue
        moe = f"{src}.block_sparse_moe" if mixtral else f"{src}.mlp"
        plan[f"{moe}.gate.weight"] = (f"{dst}.mlp.router", ())
        if cfg.router_correction_bias:
            plan[f"{moe}.gate.e_score_correction_bias"] = (f"{dst}.mlp.router_bias", ())
        f = cfg.moe_intermediate_size
        for e in range(cfg.num_experts):
            plan_gate_up_down(plan, f"{moe}.experts.{e}", expert_names, f"{dst}.mlp", f, (e,))
        s = cfg.shared_expert_intermediate_size
        if s:
            plan_gate_up_down(plan, f"{moe}.shared_expert", mlp_names, f"{dst}.mlp.shared", s)
            plan[f"{moe}.shared_expert_gate.weight"] = (f"{dst}.mlp.shared_gate", ())
    return plan


# model_type -> its weight plan; a family missing here takes the standard one.
PLANS: dict[str, Callable[[ModelConfig], Plan]] = {}


def weight_plan(cfg: ModelConfig) -> Plan:
    """Checkpoint tensor name -> (moeserve parameter name, index of the slice it fills[,
    the name of a TRANSFORMS entry applied to the tensor first])."""
    return PLANS.get(cfg.model_type, _standard_plan)(cfg)


def _transpose(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(-1, -2)


# Layout changes a checkpoint tensor may need before it is copied into its slice (fused hub
# tensors stored [in, out] where our parameters are [out, in], interleaved gate/up, ...).
# They must work on meta tensors: the loader checks shapes through them before reading data.
TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "transpose": _transpose,
}


# Tensors some checkpoints carry that hold nothing we need (recomputed buffers).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# model_type -> name prefixes of checkpoint tensors we do not run (a multimodal checkpoint's
# vision tower): skipped by the loader with one log line.
IGNORED_PREFIXES: dict[str, tuple[str, ...]] = {}
