"""The MoE router's rules as data (RouterSpec) and the one function that applies them (route).

Shapes: T tokens, E experts, K top-k, G expert groups, E/G experts per group.

    scores_TE  = softmax(logits_TE) over all experts, or sigmoid(logits_TE); float32
    choice_TE  = scores_TE + bias_E                 the correction bias steers selection only
    groups     = the topk_group best of n_group groups, a group scored by the sum of its two
                 best choices (group_score "sum_top2": DeepSeek-V3's noaux_tc, GLM-4.5) or by
                 its best one ("max": DeepSeek-V2's group_limited_greedy); every expert
                 without groups
    chosen_TK  = top-k of choice_TE within those groups
    weights_TK = scores_TE at chosen_TK             unbiased; / their sum if renormalize;
                                                    * routed_scaling_factor
    scales_input                                    the weights scale each expert's input,
                                                    not its output (Llama 4; dispatch.py)

Rows whose valid_T is 0 (the padding of a CUDA-graph batch) get the sentinel expert E: they
route nowhere, are not counted and add nothing.

Two backends of route(): "torch" implements every rule; "triton" (kernels.moe_routing) too, at
decode sizes (the [tokens, experts] tile in one program), and in the same program aligns
the assignments for the fused GEMMs and counts them per expert (the fused path's routing and
dispatch step in one launch). tests/test_router.py checks them against each other and the torch
backend against transformers' DeepSeek-V3 router.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeserve.config import ModelConfig

SCORINGS = ("softmax", "sigmoid")
GROUP_SCORES = ("sum_top2", "max")
# A sigmoid router's weights are renormalised over a sum that may be tiny: the reference
# implementations (DeepSeek-V3, GLM-4.5) add this to it.
_SIGMOID_RENORM_EPS = 1e-20

# (sorted_ids_P, block_expert_Q, num_post_pad_1): kernels.fused_moe.moe_align's result.
Align = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class RouterSpec:
    """How one MoE layer picks and weighs its experts (see the module docstring)."""

    num_experts: int
    top_k: int
    scoring: str = "softmax"
    renormalize: bool = True
    n_group: int | None = None  # None: plain top-k over every expert
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    correction_bias: bool = False  # an e_score_correction_bias [E] steers selection
    group_score: str = "sum_top2"  # how a group is scored (see the module docstring)
    scales_input: bool = False  # the weights multiply each expert's input, not its output

    def __post_init__(self) -> None:
        e, k = self.num_experts, self.top_k
        if self.scoring not in SCORINGS:
            raise ValueError(f"router scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.group_score not in GROUP_SCORES:
            raise ValueError(
                f"router group_score must be one of {GROUP_SCORES}, got {self.group_score!r}"
            )
        if not 0 < k <= e:
            raise ValueError(f"router top_k {k} must be in 1..{e} (the number of experts)")
        if (self.n_group is None) != (self.topk_group is None):
            raise ValueError("router n_group and topk_group go together")
        if self.n_group is not None and self.topk_group is not None:
            g, tg = self.n_group, self.topk_group
            if g < 1 or e % g or e // g < 2:
                raise ValueError(
                    f"router n_group {g} must divide the {e} experts into groups of >= 2"
                )
            if not 0 < tg <= g or k > tg * (e // g):
                raise ValueError(
                    f"router topk_group {tg} must be in 1..{g} and hold top_k {k} experts"
                )

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> RouterSpec:
        return cls(
            num_experts=cfg.num_experts,
            top_k=cfg.top_k,
            scoring=cfg.scoring_func,
            renormalize=cfg.norm_topk_prob,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            routed_scaling_factor=cfg.routed_scaling_factor,
            correction_bias=cfg.router_correction_bias,
            group_score=cfg.router_group_score,
            scales_input=cfg.router_scales_input,
        )

    @property
    def triton_rules(self) -> bool:
        """Whether the Triton backend implements these rules (it may still not fit a batch:
        see triton_routable): every rule of this spec, DeepSeek's and GLM's included;
        not Llama 4's weights on the experts' input (experts._fused_scaled_input)."""
        return (
            self.scoring in SCORINGS and self.group_score in GROUP_SCORES and not self.scales_input
        )


def triton_routable(spec: RouterSpec, num_tokens: int) -> bool:
    """Whether route(..., backend="triton") runs this batch: the rules and the program's
    [tokens, experts] tile. Imports Triton: call it only on the Triton path."""
    from moeserve.kernels import moe_routing

    return spec.triton_rules and moe_routing.applicable(num_tokens, spec.num_experts, spec.top_k)


def route(
    logits_TE: torch.Tensor,
    spec: RouterSpec,
    *,
    bias_E: torch.Tensor | None = None,
    valid_T: torch.Tensor | None = None,
    backend: str = "torch",
    block_m: int = 0,
    counts_E: torch.Tensor | None = None,
    logits_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, Align | None]:
    """(weights_TK float32, experts_TK int64, align): each token's experts and their weights;
    padding rows (valid_T 0) get the sentinel expert E.

    backend "torch": every rule; align is None; nothing is counted (the dispatch counts).
    backend "triton" (triton_routable must hold): also the fused GEMMs' alignment for
    `block_m` (kernels.fused_moe.moe_align's result; None for block_m 0) and, when
    counts_E (int64 [E]) is given, the tokens each expert got added to it. logits_TE may
    then be float32 split-K partials [split, T, E] (kernels.linear) of logits whose dtype
    F.linear would return is `logits_dtype`: they are added and rounded to it first.
    """
    if backend == "triton":
        assert spec.triton_rules and (bias_E is not None) == spec.correction_bias
        from moeserve.kernels import moe_routing

        groups = None
        if spec.n_group is not None and spec.topk_group is not None:
            groups = (spec.n_group, spec.topk_group, spec.group_score == "max")
        return moe_routing.route_and_align(
            logits_TE,
            spec.top_k,
            spec.renormalize,
            block_m,
            valid_T,
            counts_E,
            logits_dtype=logits_dtype,
            sigmoid=spec.scoring == "sigmoid",
            bias_E=bias_E,
            groups=groups,
            scale=spec.routed_scaling_factor,
        )
    assert backend == "torch", backend
    weights_TK, experts_TK = _select(logits_TE, spec, bias_E)
    if valid_T is not None:  # expert id E is the sentinel that routes nowhere
        experts_TK = torch.where(valid_T[:, None].bool(), experts_TK, spec.num_experts)
    return weights_TK, experts_TK, None


def _select(
    logits_TE: torch.Tensor, spec: RouterSpec, bias_E: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if spec.scoring == "softmax":
        scores_TE = torch.softmax(logits_TE.float(), dim=-1)
    else:
        scores_TE = torch.sigmoid(logits_TE.float())
    if bias_E is None and spec.n_group is None and spec.scoring == "sigmoid":
        # Top-k of the logits, as Llama 4 picks: sigmoid is monotone, but saturates to ties.
        top_TK, experts_TK = torch.topk(logits_TE.float(), spec.top_k, dim=-1)
        weights_TK = torch.sigmoid(top_TK)
    elif bias_E is None and spec.n_group is None:
        weights_TK, experts_TK = torch.topk(scores_TE, spec.top_k, dim=-1)
    else:
        choice_TE = scores_TE if bias_E is None else scores_TE + bias_E
        if spec.n_group is not None and spec.topk_group is not None:
            choice_TE = _in_best_groups(choice_TE, spec.n_group, spec.topk_group, spec.group_score)
        experts_TK = torch.topk(choice_TE, spec.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(1, experts_TK)
    if spec.renormalize:
        total_T1 = weights_TK.sum(dim=-1, keepdim=True)
        if spec.scoring == "sigmoid":
            total_T1 = total_T1 + _SIGMOID_RENORM_EPS
        weights_TK = weights_TK / total_T1
    if spec.routed_scaling_factor != 1.0:
        weights_TK = weights_TK * spec.routed_scaling_factor
    return weights_TK, experts_TK


def _in_best_groups(
    choice_TE: torch.Tensor, n_group: int, topk_group: int, group_score: str = "sum_top2"
) -> torch.Tensor:
    """choice_TE with every expert outside each token's topk_group best groups at -inf."""
    t, e = choice_TE.shape
    per_group = e // n_group
    grouped_TGP = choice_TE.view(t, n_group, per_group)
    if group_score == "max":
        group_TG = grouped_TGP.max(dim=-1).values
    else:
        group_TG = grouped_TGP.topk(2, dim=-1).values.sum(dim=-1)
    best_TG = torch.topk(group_TG, topk_group, dim=-1).indices
    keep_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, best_TG, True)
    keep_TE = keep_TG[:, :, None].expand(t, n_group, per_group).reshape(t, e)
    return choice_TE.masked_fill(~keep_TE, float("-inf"))
