"""How a model computes, chosen once when it is built, with every kernel threshold in one place.

The engine resolves the kernels for its device (engine.placement.resolve_kernels) and builds
the model with a ModelBackend; each layer asks it which path a batch takes. Nothing switches
a built model's path afterwards.

The Triton modules are imported only on the Triton path: a CPU run on the readable path never
imports Triton (tests/test_cli.py).

Shapes: T tokens, D hidden, S split-K partials.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from moeserve.kernels.quant import dequantize
from moeserve.model.layers import rms_norm

if TYPE_CHECKING:
    from moeserve.kernels.norm_rope import RouterRows

# Below this many tokens an eager step launches torch's elementwise ops faster than Triton's
# Python launcher runs; inside a CUDA graph launches cost nothing and one kernel beats six.
FUSED_ELEMENTWISE_MIN_TOKENS = 256

# Every batch of resident experts takes the fused MoE GEMMs: they beat one cuBLAS GEMM per
# expert at every size up to 4k-token prefills (benchmarks/RESULTS.md), and CUDA graphs need
# them.
FUSED_MOE_MAX_TOKENS = 1 << 62


@dataclass(frozen=True)
class ModelBackend:
    """triton: the Triton kernels (RMSNorm, rotary, paged decode attention, split-K few-row
    linears, fused MoE GEMMs and routing); else the readable torch path everywhere.
    fused_moe_max_tokens: resident MoE layers take the fused GEMMs for batches of at most
    this many tokens (Triton only). count_tokens: count the tokens routed to each expert
    (off only to measure what counting costs)."""

    triton: bool = False
    fused_moe_max_tokens: int = FUSED_MOE_MAX_TOKENS
    count_tokens: bool = True

    @property
    def fused_moe_tokens(self) -> int:
        """The largest batch a resident MoE layer runs through the fused GEMMs (0: none)."""
        return self.fused_moe_max_tokens if self.triton else 0

    def fused_elementwise(self, x_TD: torch.Tensor) -> bool:
        """Whether this batch's norms and rotary take the Triton kernels."""
        return self.triton and (
            x_TD.shape[0] >= FUSED_ELEMENTWISE_MIN_TOKENS
            or (x_TD.is_cuda and torch.cuda.is_current_stream_capturing())
        )

    def linear(
        self,
        x_TK: torch.Tensor,
        w_NK: torch.Tensor,
        bias_N: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A dense linear layer, x @ w.T + bias; `scale`: w is FP8 with these per-row scales
        (model/quant.py): on the Triton path a few rows read the FP8 bytes and dequantize in
        registers (kernels.linear), else the weight is dequantized for this use."""
        if scale is None:
            return F.linear(x_TK, w_NK, bias_N)
        if self.triton:
            from moeserve.kernels import linear

            if linear.applicable(x_TK, scaled=True):
                parts = linear.linear_partials(x_TK, w_NK, bias_N, scale)
                return linear.reduce_partials(parts, x_TK.dtype)
        return F.linear(x_TK, dequantize(w_NK, scale, "fp8", x_TK.dtype), bias_N)


# An RMSNorm a layer applies to its input first (weight [D], eps): passed down so that a
# kernel of the layer can fuse it (kernels.linear's GEMV).
InputNorm = tuple[torch.Tensor, float]


def split_k_rows(x_TD: torch.Tensor) -> bool:
    """Whether a linear layer of these few rows returns split-K partials (kernels.linear) for
    its consumer to add up. Triton path only."""
    from moeserve.kernels import linear

    return linear.applicable(x_TD)


def fused_rms_norm(x_TD: torch.Tensor, weight_D: torch.Tensor, eps: float) -> torch.Tensor:
    """The RMSNorm kernel where it applies (rows with unit stride), else the readable twin."""
    if x_TD.shape[0] and x_TD.stride(1) == 1:
        from moeserve.kernels.norm_rope import rms_norm as kernel

        return kernel(x_TD, weight_D, eps)
    return rms_norm(x_TD, weight_D, eps)


def fused_add_rms_norm(
    x_TD: torch.Tensor,
    delta_TD: torch.Tensor,
    weight_D: torch.Tensor,
    eps: float,
    router: RouterRows | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x + delta, rms_norm(x + delta), router logits or None): the residual-add norm kernel
    where it applies, else the readable ops. delta_TD may be float32 split-K partials [S, T, D]
    of a linear layer (kernels.linear), rounded to x's dtype as that layer's output would have
    been. router (weight, bias; MoE.router_in_norm): the kernel also returns the MoE router's
    logits of the normed rows as split-K partials; None where it did not run (the MoE then
    computes them)."""
    rows_ok = x_TD.shape[0] > 0 and x_TD.stride(1) == 1
    if delta_TD.dim() == 3 and not (rows_ok and delta_TD.stride(2) == 1):
        from moeserve.kernels.linear import reduce_partials

        delta_TD = reduce_partials(delta_TD, x_TD.dtype)
    if rows_ok and delta_TD.stride(-1) == 1:
        from moeserve.kernels.norm_rope import add_rms_norm as kernel

        return kernel(x_TD, delta_TD, weight_D, eps, router)
    s_TD = x_TD + delta_TD
    return s_TD, rms_norm(s_TD, weight_D, eps), None
