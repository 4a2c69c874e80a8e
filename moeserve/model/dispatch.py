"""Dispatch and combine: a layer's routed rows grouped by expert and counted, and the experts'
outputs weighed back into their tokens. Nothing here reads the device from the host, so CUDA
graphs capture it.

Tokens are counted per expert here, where they are dispatched (and, on the fused path, in the
Triton routing program, which dispatches too): on the device, never read during a step.

Shapes: T tokens, D hidden, E experts, K top-k, R = T*K routed rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Dispatch:
    """One MoE layer's routed rows between dispatch and combine, grouped by expert."""

    x_TD: torch.Tensor  # the layer's input
    weights_R: torch.Tensor  # float32 routing weight of each row
    token_R: torch.Tensor  # the token each row came from
    counts_E: torch.Tensor  # rows per expert, ascending expert order
    x_RD: torch.Tensor  # the rows' inputs
    y_RD: torch.Tensor  # the experts' outputs, filled by an ExpertProvider


def expert_counts(experts_R: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 [E]: the rows routed to each expert. The sentinel id E (padding rows) takes an
    extra bucket that is dropped."""
    ones_R = torch.ones_like(experts_R)
    counts_E1 = torch.zeros(num_experts + 1, dtype=torch.int64, device=experts_R.device)
    return counts_E1.scatter_add_(0, experts_R, ones_R)[:num_experts]


def sort_by_expert(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    experts_TK: torch.Tensor,
    num_experts: int,
    *,
    padded: bool,
    counter_E: torch.Tensor | None,
    scale_input: bool = False,
) -> Dispatch:
    """Rows grouped by expert, ascending, and the count of each; counter_E (int64 [E]), when
    given, is incremented by the counts. Rows of the sentinel expert E (padding) sort last and
    are not counted; with `padded` the outputs start at zero, so they add nothing.
    scale_input (RouterSpec.scales_input): each row's input is its token's input times its
    weight, rounded to the input's dtype as Llama 4 does, and combine weighs by 1."""
    flat_R = experts_TK.flatten()
    order_R = torch.argsort(flat_R, stable=True)
    counts_E = expert_counts(flat_R, num_experts)
    if counter_E is not None:
        counter_E += counts_E
    token_R = order_R // experts_TK.shape[1]
    x_RD = x_TD[token_R]
    weights_R = weights_TK.flatten()[order_R]
    if scale_input:
        x_RD = x_RD * weights_R.to(x_RD.dtype)[:, None]
        weights_R = torch.ones_like(weights_R)
    # Rows no expert writes (padding) must add nothing, not garbage.
    y_RD = torch.zeros_like(x_RD) if padded else torch.empty_like(x_RD)
    return Dispatch(x_TD, weights_R, token_R, counts_E, x_RD, y_RD)


def combine(d: Dispatch) -> torch.Tensor:
    """[T, D]: the weighted sum of each token's expert outputs."""
    # Weights multiply in float32 before the cast, as the reference does.
    y_RD = (d.y_RD * d.weights_R[:, None]).to(d.x_TD.dtype)
    return torch.zeros_like(d.x_TD).index_add_(0, d.token_R, y_RD)
