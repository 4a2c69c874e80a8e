"""The MoE layer: router, dispatch by expert, expert MLPs, combine.

Shapes: T tokens, D hidden, E experts, K top-k, F expert intermediate, R = T*K assignments.
"""

from __future__ import annotations

import logging
import weakref
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.config import ModelConfig

log = logging.getLogger(__name__)


# Pinned tensors at least this large are page-locked in place (cudaHostRegister) instead of
# taken from torch's pinned allocator, which rounds every block up to a power of two (a
# Mixtral-8x7B layer's 1.88 GB of gate/up weights would hold 2.15 GB of locked memory).
_REGISTER_MIN_BYTES = 256 << 20


def _empty(
    *shape: int, dtype: torch.dtype, device: torch.device, pin: bool = False
) -> nn.Parameter:
    if pin:
        return nn.Parameter(_pinned_empty(shape, dtype), requires_grad=False)
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def _pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Page-locked host memory (fast, asynchronous copies to the GPU); pageable with a warning
    when the system refuses to lock more: slower, not fatal."""
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if nbytes < _REGISTER_MIN_BYTES:
        try:
            return torch.empty(*shape, dtype=dtype, pin_memory=True)
        except RuntimeError as e:
            log.warning("cannot pin %s of host memory (%s); copies will be slower", shape, e)
            return torch.empty(*shape, dtype=dtype)
    data = torch.empty(*shape, dtype=dtype)
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(data.data_ptr(), nbytes, 0)
    if int(err) != 0:
        log.warning(
            "cannot lock %.2f GB of host memory (cudaHostRegister error %d); copies will be "
            "slower", nbytes / 1e9, int(err),
        )  # fmt: skip
        return data
    # Unlock when the tensor's memory is freed (a benchmark loads several models in turn).
    weakref.finalize(data.untyped_storage(), cudart.cudaHostUnregister, data.data_ptr())
    return data


class ExpertRunner(Protocol):
    """Runs a layer's routed experts when they do not all live on the compute device
    (the engine's expert cache implements it)."""

    def run(
        self, x_TD: torch.Tensor, x_RD: torch.Tensor, counts_E: torch.Tensor, y_RD: torch.Tensor
    ) -> None:
        """Fill y_RD: rows are grouped by expert in ascending order, counts_E rows each."""


def silu_mul(gate_up_TF2: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up_TF2.chunk(2, dim=-1)
    return F.silu(gate) * up


class DenseMLP(nn.Module):
    """SwiGLU MLP with the gate and up projections stored as one [2F, D] matrix."""

    def __init__(self, hidden: int, inter: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.w_gate_up = _empty(2 * inter, hidden, dtype=dtype, device=device)
        self.w_down = _empty(hidden, inter, dtype=dtype, device=device)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return F.linear(silu_mul(F.linear(x_TD, self.w_gate_up)), self.w_down)


def expert_mlp(x_ND: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    return F.linear(silu_mul(F.linear(x_ND, w_gate_up)), w_down)


def route(
    router_logits_TE: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax (float32) over all experts, top-k, optional renormalisation over the k.

    Mixtral's "top-k over logits, then softmax" is this with renormalize=True.
    """
    probs_TE = torch.softmax(router_logits_TE.float(), dim=-1)
    weights_TK, experts_TK = torch.topk(probs_TE, top_k, dim=-1)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return weights_TK, experts_TK


class MoE(nn.Module):
    """Routed experts (stacked per layer) plus the optional shared expert with a sigmoid gate."""

    def __init__(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        expert_device: torch.device | None = None,
    ) -> None:
        """Routed experts live on `expert_device` (host memory when offloaded, pinned when a
        GPU computes); everything else on `device`."""
        super().__init__()
        e, f, d = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        home = expert_device or device
        pin = home.type == "cpu" and device.type == "cuda"
        self.top_k = cfg.top_k
        self.num_experts = e
        self.renormalize = cfg.norm_topk_prob
        self.router = _empty(e, d, dtype=dtype, device=device)
        self.w_gate_up = _empty(e, 2 * f, d, dtype=dtype, device=home, pin=pin)
        self.w_down = _empty(e, d, f, dtype=dtype, device=home, pin=pin)
        self.offload: ExpertRunner | None = None  # set by the engine when experts are offloaded
        self.count_tokens = True  # off only to measure what counting costs (benchmarks)
        # Batches of at most this many tokens use the fused Triton GEMMs (0: never); they
        # need no host read, so CUDA graphs can capture them.
        self.fused_max_tokens = 0
        self.shared: DenseMLP | None = None
        if cfg.shared_expert_intermediate_size:
            self.shared = DenseMLP(d, cfg.shared_expert_intermediate_size, dtype, device)
            self.shared_gate = _empty(1, d, dtype=dtype, device=device)
        # Tokens routed to each expert since start; stays on the device, read at scrape time.
        self.register_buffer(
            "tokens_per_expert_E",
            torch.zeros(e, dtype=torch.int64, device=device),
            persistent=False,
        )

    def forward(self, x_TD: torch.Tensor, valid_T: torch.Tensor | None = None) -> torch.Tensor:
        """valid_T (0/1 per token, or None): padding rows of a CUDA-graph batch route nowhere."""
        logits_TE = F.linear(x_TD, self.router)
        if self.offload is None and x_TD.shape[0] <= self.fused_max_tokens:
            out_TD = self.fused_experts(x_TD, logits_TE, valid_T)
        else:
            weights_TK, experts_TK = route(logits_TE, self.top_k, self.renormalize)
            out_TD = self.experts(x_TD, weights_TK, experts_TK)
        if self.shared is not None:
            gate_T1 = torch.sigmoid(F.linear(x_TD, self.shared_gate))
            out_TD = out_TD + gate_T1 * self.shared(x_TD)
        return out_TD

    def fused_experts(
        self, x_TD: torch.Tensor, logits_TE: torch.Tensor, valid_T: torch.Tensor | None
    ) -> torch.Tensor:
        """The Triton path: routing and expert alignment on the device, two grouped GEMMs;
        no host synchronisation (CUDA graphs capture it)."""
        from moeserve.kernels import moe_routing
        from moeserve.kernels.fused_moe import fused_moe, moe_block_m

        e, k, t = self.num_experts, self.top_k, x_TD.shape[0]
        counts = self.tokens_per_expert_E if self.count_tokens else None
        if moe_routing.applicable(t, e, k):  # decode-sized: one program instead of ~27 ops
            f, d = self.w_down.shape[2], self.w_down.shape[1]
            weights_TK, experts_TK, align = moe_routing.route_and_align(
                logits_TE, k, self.renormalize, moe_block_m(t, e, k, f, d, x_TD.dtype),
                valid_T, counts,
            )  # fmt: skip
            return fused_moe(x_TD, self.w_gate_up, self.w_down, weights_TK, experts_TK,
                             align=align)  # fmt: skip
        weights_TK, experts_TK = route(logits_TE, k, self.renormalize)
        if valid_T is not None:  # expert id e is the sentinel that routes nowhere
            experts_TK = torch.where(valid_T[:, None].bool(), experts_TK, e)
        if counts is not None:
            ones = torch.ones(experts_TK.numel(), dtype=torch.int64, device=x_TD.device)
            per_e = torch.zeros(e + 1, dtype=torch.int64, device=x_TD.device)
            counts += per_e.scatter_add_(0, experts_TK.flatten(), ones)[:e]
        return fused_moe(x_TD, self.w_gate_up, self.w_down, weights_TK, experts_TK)

    def experts(
        self, x_TD: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor
    ) -> torch.Tensor:
        """Each expert runs once, on exactly the rows routed to it, then a weighted scatter-add."""
        flat_R = experts_TK.flatten()
        order_R = torch.argsort(flat_R, stable=True)
        counts_E = torch.bincount(flat_R, minlength=self.num_experts)
        if self.count_tokens:
            self.tokens_per_expert_E += counts_E
        token_R = order_R // self.top_k
        x_RD = x_TD[token_R]
        y_RD = torch.empty_like(x_RD)
        if self.offload is not None:
            self.offload.run(x_TD, x_RD, counts_E, y_RD)
        else:
            # One host read of the per-expert counts per layer tells the slices.
            start = 0
            for e, n in enumerate(counts_E.tolist()):
                if n:
                    rows = slice(start, start + n)
                    y_RD[rows] = expert_mlp(x_RD[rows], self.w_gate_up[e], self.w_down[e])
                    start += n
        # Weights multiply in float32 before the cast, as the reference does.
        y_RD = (y_RD * weights_TK.flatten()[order_R, None]).to(x_TD.dtype)
        return torch.zeros_like(x_TD).index_add_(0, token_R, y_RD)
