"""DeepSeek-style MoE as data: config.json fields -> ModelConfig fields, and the weight plan.

Shared by the families whose MoE follows DeepSeek's layout (deepseek_v2, deepseek_v3,
glm4_moe): a float32 router `mlp.gate` (+ `e_score_correction_bias` for sigmoid routing),
routed experts `mlp.experts.{e}.{gate,up,down}_proj`, n_shared_experts ungated shared experts
as one MLP `mlp.shared_experts.*`, and the first `first_k_dense_replace` layers dense.

The routing rules follow transformers' modeling code per model_type:
- deepseek_v2: softmax scores; topk_method "greedy" (plain top-k) or "group_limited_greedy"
  (groups scored by their best expert); weights never renormalised (transformers ignores
  norm_topk_prob, as every DeepSeek-V2 checkpoint sets it false) and always scaled by
  routed_scaling_factor.
- deepseek_v3, glm4_moe: sigmoid scores, the correction bias steers selection only, groups
  scored by the sum of their two best experts (noaux_tc), weights renormalised when
  norm_topk_prob, then scaled by routed_scaling_factor.
"""

from __future__ import annotations

from typing import Any

from moeserve.config import ConfigError, ModelConfig

# model_type -> transformers' config defaults for the fields a config.json may leave out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v2": dict(
        first_k_dense_replace=0,
        n_shared_experts=2,
        routed_scaling_factor=1.0,
        norm_topk_prob=False,
        n_group=None,
        topk_group=None,
    ),
    "deepseek_v3": dict(
        first_k_dense_replace=3,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        n_group=8,
        topk_group=4,
    ),
    "glm4_moe": dict(
        first_k_dense_replace=1,
        n_shared_experts=1,
        routed_scaling_factor=1.0,
        norm_topk_prob=True,
        n_group=1,
        topk_group=1,
    ),
}
DEEPSEEK_MOE_TYPES = tuple(_DEFAULTS)


def _int(raw: dict[str, Any], key: str, default: Any, minimum: int) -> int:
    value = raw.get(key, default)
    if value is ...:
        raise ConfigError(f"config.json: required field '{key}' is missing")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"config.json: '{key}' must be an integer >= {minimum}, got {value!r}")
    return value


def _sparse_layers(raw: dict[str, Any], num_layers: int, first_dense: int) -> tuple[bool, ...]:
    # DeepSeek's rule (its remote code): MoE from layer first_k_dense_replace on, every
    # moe_layer_freq-th layer. transformers reads only first_k_dense_replace; every released
    # checkpoint has moe_layer_freq 1, where the two agree.
    freq = _int(raw, "moe_layer_freq", 1, 1)
    return tuple(i >= first_dense and i % freq == 0 for i in range(num_layers))


def deepseek_moe_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig keyword fields of a DeepSeek-style MoE config.json (model_type one of
    DEEPSEEK_MOE_TYPES): experts, routing rules, shared experts, dense layers, MTP layers.
    Raises ConfigError naming the field that is wrong."""
    model_type = raw.get("model_type")
    if model_type not in _DEFAULTS:
        raise ConfigError(f"config.json: model_type {model_type!r} has no DeepSeek-style MoE")
    d = _DEFAULTS[model_type]
    v2 = model_type == "deepseek_v2"
    num_layers = _int(raw, "num_hidden_layers", ..., 1)
    key = "n_routed_experts" if "n_routed_experts" in raw else "num_local_experts"
    num_experts = _int(raw, key, ..., 1)
    top_k = _int(raw, "num_experts_per_tok", ..., 1)
    if top_k > num_experts:
        raise ConfigError(
            f"config.json: num_experts_per_tok ({top_k}) exceeds the number of experts "
            f"({num_experts})"
        )
    moe_inter = _int(raw, "moe_intermediate_size", ..., 1)
    scoring = "softmax" if v2 else "sigmoid"
    if raw.get("scoring_func", scoring) != scoring:
        raise ConfigError(
            f"config.json: scoring_func {raw['scoring_func']!r} is not supported for "
            f"{model_type} (only {scoring!r})"
        )
    n_group, topk_group = raw.get("n_group", d["n_group"]), raw.get("topk_group", d["topk_group"])
    group_score = "sum_top2"
    if v2:
        method = raw.get("topk_method") or "greedy"
        if method not in ("greedy", "group_limited_greedy"):
            raise ConfigError(f"config.json: topk_method {method!r} is not supported")
        group_score = "max"
        if method == "greedy":
            n_group = topk_group = None
    elif raw.get("topk_method", "noaux_tc") != "noaux_tc":
        raise ConfigError(f"config.json: topk_method {raw['topk_method']!r} is not supported")
    if n_group is not None or topk_group is not None:
        n_group = _int({"n_group": n_group}, "n_group", None, 1)
        topk_group = _int({"topk_group": topk_group}, "topk_group", None, 1)
        per_group = num_experts // n_group
        if num_experts % n_group or topk_group > n_group or top_k > topk_group * per_group:
            raise ConfigError(
                f"config.json: n_group ({n_group}) must divide the {num_experts} experts and "
                f"topk_group ({topk_group}) be at most n_group and hold top_k ({top_k}) experts"
            )
        if topk_group == n_group:  # every group kept: plain top-k
            n_group = topk_group = None
    scale = raw.get("routed_scaling_factor", d["routed_scaling_factor"])
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
        raise ConfigError(f"config.json: 'routed_scaling_factor' must be > 0, got {scale!r}")
    first_dense = _int(raw, "first_k_dense_replace", d["first_k_dense_replace"], 0)
    sparse = _sparse_layers(raw, num_layers, first_dense)
    dense_inter = _int(raw, "intermediate_size", ..., 1) if not all(sparse) else 0
    n_shared = _int(raw, "n_shared_experts", d["n_shared_experts"], 0) or 0
    mtp_key = "num_nextn_predict_layers" if "num_nextn_predict_layers" in raw else "num_mtp_layers"
    return dict(
        num_experts=num_experts,
        top_k=top_k,
        moe_intermediate_size=moe_inter,
        scoring_func=scoring,
        norm_topk_prob=False if v2 else bool(raw.get("norm_topk_prob", d["norm_topk_prob"])),
        n_group=n_group,
        topk_group=topk_group,
        router_group_score=group_score,
        routed_scaling_factor=float(scale),
        router_correction_bias=not v2,
        router_float32=True,
        shared_expert_intermediate_size=n_shared * moe_inter,
        shared_expert_gate=False,
        sparse_layers=sparse,
        dense_intermediate_size=dense_inter,
        num_mtp_layers=0 if v2 else _int(raw, mtp_key, 0, 0),
    )


def plan_deepseek_moe(
    plan: dict[str, Any], cfg: ModelConfig, src: str, dst: str, mlp: str = "mlp"
) -> None:
    """The MLP tensors of decoder layer `src` (e.g. "model.layers.3") into layer `dst`'s
    parameters ("layers.3"): a dense MLP, or router (+ bias), experts and shared experts."""
    names = ("gate_proj", "up_proj", "down_proj")
    layer = int(src.rsplit(".", 1)[1])
    if not cfg.sparse_layers[layer]:
        _gate_up_down(plan, f"{src}.{mlp}", names, f"{dst}.mlp", cfg.dense_intermediate_size)
        return
    moe = f"{src}.{mlp}"
    plan[f"{moe}.gate.weight"] = (f"{dst}.mlp.router", ())
    if cfg.router_correction_bias:
        plan[f"{moe}.gate.e_score_correction_bias"] = (f"{dst}.mlp.router_bias", ())
    f = cfg.moe_intermediate_size
    for e in range(cfg.num_experts):
        _gate_up_down(plan, f"{moe}.experts.{e}", names, f"{dst}.mlp", f, (e,))
    s = cfg.shared_expert_intermediate_size
    if s:
        _gate_up_down(plan, f"{moe}.shared_experts", names, f"{dst}.mlp.shared", s)


def _gate_up_down(
    plan: dict[str, Any],
    prefix: str,
    names: tuple[str, str, str],
    dst: str,
    size: int,
    expert: tuple[int, ...] = (),
) -> None:
    # families.plan_gate_up_down's rule (families imports this module, not the reverse).
    gate, up, down = (f"{prefix}.{n}.weight" for n in names)
    plan[gate] = (f"{dst}.w_gate_up", (*expert, slice(0, size)))
    plan[up] = (f"{dst}.w_gate_up", (*expert, slice(size, 2 * size)))
    plan[down] = (f"{dst}.w_down", expert)


def mtp_layer_prefixes(cfg: ModelConfig) -> tuple[str, ...]:
    """Checkpoint name prefixes of the multi-token-prediction layers (not run; ignored)."""
    return tuple(f"model.layers.{cfg.num_layers + j}." for j in range(cfg.num_mtp_layers))
