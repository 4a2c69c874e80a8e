"""The MoE layer: router, dispatch by expert, expert MLPs, combine.

Shapes: T tokens, D hidden, E experts, K top-k, F expert intermediate, R = T*K assignments.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
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

    def forward(
        self,
        x_TD: torch.Tensor,
        valid_T: torch.Tensor | None = None,
        residual_TD: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """valid_T (0/1 per token, or None): padding rows of a CUDA-graph batch route nowhere.
        residual_TD: return residual + the layer's output (fused into the Triton path's last
        kernel when there is no shared expert to add first)."""
        if self.offload is None and x_TD.shape[0] <= self.fused_max_tokens:
            logits_TE = self.router_logits(x_TD)
            if self.shared is None:
                return self.fused_experts(x_TD, logits_TE, valid_T, residual_TD)
            out = self.add_shared(x_TD, self.fused_experts(x_TD, logits_TE, valid_T))
        else:
            d = self.route_and_dispatch(x_TD, valid_T)
            self.run_experts(x_TD, d)
            out = self.finish(x_TD, d)
        return out if residual_TD is None else residual_TD + out

    def router_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """[T, E] logits for the Triton path; at a few rows float32 split-K partials
        [split, T, E] that the routing program adds up (one launch instead of cuBLAS's two)."""
        from moeserve.kernels import linear, moe_routing

        t = x_TD.shape[0]
        if linear.applicable(x_TD) and moe_routing.applicable(t, self.num_experts, self.top_k):
            return linear.linear_partials(x_TD, self.router)
        return F.linear(x_TD, self.router)

    def route_and_dispatch(self, x_TD: torch.Tensor, valid_T: torch.Tensor | None) -> Dispatch:
        """Router, top-k and dispatch: everything before the experts, graph-safe."""
        weights_TK, experts_TK = route(F.linear(x_TD, self.router), self.top_k, self.renormalize)
        return self.dispatch(x_TD, weights_TK, experts_TK, valid_T)

    def finish(self, x_TD: torch.Tensor, d: Dispatch) -> torch.Tensor:
        """Everything after the experts: combine, plus the shared expert (graph-safe)."""
        return self.add_shared(x_TD, self.combine(x_TD, d))

    def add_shared(self, x_TD: torch.Tensor, routed_TD: torch.Tensor) -> torch.Tensor:
        """The routed experts' output plus the shared expert's, when the family has one."""
        if self.shared is None:
            return routed_TD
        gate_T1 = torch.sigmoid(F.linear(x_TD, self.shared_gate))
        return routed_TD + gate_T1 * self.shared(x_TD)

    def fused_experts(
        self,
        x_TD: torch.Tensor,
        logits_TE: torch.Tensor,
        valid_T: torch.Tensor | None,
        residual_TD: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The Triton path: routing and expert alignment on the device, two grouped GEMMs;
        no host synchronisation (CUDA graphs capture it). residual_TD: see fused_moe."""
        from moeserve.kernels import moe_routing
        from moeserve.kernels.fused_moe import fused_moe, moe_block_m

        e, k, t = self.num_experts, self.top_k, x_TD.shape[0]
        counts = self.tokens_per_expert_E if self.count_tokens else None
        if moe_routing.applicable(t, e, k):  # decode-sized: one program instead of ~27 ops
            f, d = self.w_down.shape[2], self.w_down.shape[1]
            weights_TK, experts_TK, align = moe_routing.route_and_align(
                logits_TE, k, self.renormalize, moe_block_m(t, e, k, f, d, x_TD.dtype),
                valid_T, counts, logits_dtype=x_TD.dtype,
            )  # fmt: skip
            return fused_moe(x_TD, self.w_gate_up, self.w_down, weights_TK, experts_TK,
                             align=align, residual_TD=residual_TD)  # fmt: skip
        weights_TK, experts_TK = route(logits_TE, k, self.renormalize)
        if valid_T is not None:  # expert id e is the sentinel that routes nowhere
            experts_TK = torch.where(valid_T[:, None].bool(), experts_TK, e)
        if counts is not None:
            ones = torch.ones(experts_TK.numel(), dtype=torch.int64, device=x_TD.device)
            per_e = torch.zeros(e + 1, dtype=torch.int64, device=x_TD.device)
            counts += per_e.scatter_add_(0, experts_TK.flatten(), ones)[:e]
        return fused_moe(x_TD, self.w_gate_up, self.w_down, weights_TK, experts_TK,
                         residual_TD=residual_TD)

    def experts(
        self,
        x_TD: torch.Tensor,
        weights_TK: torch.Tensor,
        experts_TK: torch.Tensor,
        valid_T: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Each expert runs once, on exactly the rows routed to it, then a weighted scatter-add."""
        d = self.dispatch(x_TD, weights_TK, experts_TK, valid_T)
        self.run_experts(x_TD, d)
        return self.combine(x_TD, d)

    def dispatch(
        self,
        x_TD: torch.Tensor,
        weights_TK: torch.Tensor,
        experts_TK: torch.Tensor,
        valid_T: torch.Tensor | None = None,
    ) -> Dispatch:
        """Rows grouped by expert, ascending, and the count of each; no host read (CUDA graphs
        capture it). Padding rows (valid_T 0) take the sentinel expert E: they sort last, are
        not counted and get zero output."""
        e = self.num_experts
        if valid_T is not None:
            experts_TK = torch.where(valid_T[:, None].bool(), experts_TK, e)
        flat_R = experts_TK.flatten()
        order_R = torch.argsort(flat_R, stable=True)
        ones_R = torch.ones_like(flat_R)
        counts_E = torch.zeros(e + 1, dtype=torch.int64, device=x_TD.device)
        counts_E = counts_E.scatter_add_(0, flat_R, ones_R)[:e]
        if self.count_tokens:
            self.tokens_per_expert_E += counts_E
        token_R = order_R // self.top_k
        x_RD = x_TD[token_R]
        # Rows no expert writes (padding) must add nothing, not garbage.
        y_RD = torch.zeros_like(x_RD) if valid_T is not None else torch.empty_like(x_RD)
        return Dispatch(weights_TK.flatten()[order_R], token_R, counts_E, x_RD, y_RD)

    def run_experts(self, x_TD: torch.Tensor, d: Dispatch) -> None:
        """Fill d.y_RD: through the expert cache when offloaded, else one expert at a time."""
        if self.offload is not None:
            self.offload.run(x_TD, d.x_RD, d.counts_E, d.y_RD)
            return
        start = 0  # one host read of the per-expert counts per layer tells the slices
        for e, n in enumerate(d.counts_E.tolist()):
            if n:
                rows = slice(start, start + n)
                d.y_RD[rows] = expert_mlp(d.x_RD[rows], self.w_gate_up[e], self.w_down[e])
                start += n

    def combine(self, x_TD: torch.Tensor, d: Dispatch) -> torch.Tensor:
        """The weighted sum of each token's expert outputs (graph-safe)."""
        # Weights multiply in float32 before the cast, as the reference does.
        y_RD = (d.y_RD * d.weights_R[:, None]).to(x_TD.dtype)
        return torch.zeros_like(x_TD).index_add_(0, d.token_R, y_RD)


@dataclass
class Dispatch:
    """One MoE layer's routed rows between dispatch and combine (R = T*K, grouped by expert)."""

    weights_R: torch.Tensor  # float32 routing weight of each row
    token_R: torch.Tensor  # the token each row came from
    counts_E: torch.Tensor  # rows per expert, ascending expert order
    x_RD: torch.Tensor  # the rows' inputs
    y_RD: torch.Tensor  # the experts' outputs, filled by run_experts
