"""The routed experts: where their weights are and how they run.

Two ways, both given the router's choice:
- an ExpertProvider fills the dispatched rows (grouped by expert) with their experts' outputs.
  ResidentExperts runs the experts on the compute device, one at a time on exactly its rows;
  the engine's expert store (engine/expert_store.py) implements the same protocol over its
  device cache slots, host memory and CPU compute, and hands its providers to the forward.
  Either reads the per-expert counts on the host once per layer. On the Triton path the
  store runs the experts in its device slots through the fused kernels (SlotExperts), the
  dispatched rows as the kernels' tokens at top-1.
- the fused path (fused_experts): Triton routing, alignment and two grouped GEMMs over the
  resident weights, the weighted sum over k inside; no host read, so CUDA graphs capture it.
  Its dispatch (block-aligned assignments) and combine live in its kernels, so it takes the
  router's logits rather than dispatched rows. The model picks it when it is built
  (ModelBackend.fused_moe_tokens), for layers the forward hands no provider.

Shapes: T tokens, D hidden, E experts, K top-k, F expert intermediate, R = T*K routed rows,
N a slice of rows, S split-K partials.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

from moeserve.kernels.quant import dequantize
from moeserve.model.activation import SILU, ExpertActivation
from moeserve.model.backend import split_k_rows
from moeserve.model.dispatch import Dispatch, expert_counts
from moeserve.model.quant import ExpertScales
from moeserve.model.router import RouterSpec, route

if TYPE_CHECKING:  # the kernels import Triton, which only the Triton path needs
    from moeserve.kernels.moe_gemv_plan import SharedExpert


class SlotTable(ABC):
    """A layer's routed experts in the slots of device tensors whose map the GPU keeps
    itself: `resolve` is given a call's routing and returns the expert -> slot map for it,
    queuing on the device whatever makes every routed expert present (engine/device_cache.py
    copies misses from host memory and admits them). Nothing reads the device from the host,
    so a CUDA graph holds the whole MoE layer. Calls route at most `max_rows` rows (T*K)."""

    def __init__(self, slots: SlotExperts, max_rows: int) -> None:
        self.slots = slots
        self.max_rows = max_rows

    @abstractmethod
    def resolve(self, experts_TK: torch.Tensor) -> torch.Tensor:
        """int32 [E]: expert e's slot for this call (any valid slot for one it does not use)."""


class ExpertProvider(Protocol):
    """Runs one layer's routed experts on its dispatched rows."""

    def run(self, d: Dispatch) -> None:
        """Fill d.y_RD: rows are grouped by expert in ascending order, d.counts_E rows each.

        May read the device from the host: a CUDA-graph decode step ends its captured stage
        before every layer handed a provider and runs the provider eagerly (model/staged.py).
        """
        ...


def silu_mul(gate_up_NF2: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up_NF2.chunk(2, dim=-1)
    return F.silu(gate) * up


def expert_mlp(
    x_ND: torch.Tensor,
    w_gate_up_FD: torch.Tensor,
    w_down_DF: torch.Tensor,
    b_gate_up_F: torch.Tensor | None = None,
    b_down_D: torch.Tensor | None = None,
    act: ExpertActivation = SILU,
) -> torch.Tensor:
    """One gated expert (gate and up stored as one [2F, D] matrix) on N rows; biases, when the
    family has them, added after each projection as the reference does (x @ W + b)."""
    gate_up = F.linear(x_ND, w_gate_up_FD)
    if b_gate_up_F is not None:
        gate_up = gate_up + b_gate_up_F
    y = F.linear(act(gate_up), w_down_DF)
    return y if b_down_D is None else y + b_down_D


class ResidentExperts:
    """Experts whose weights live on the compute device: each runs once, on exactly the rows
    routed to it."""

    def __init__(
        self,
        w_gate_up_EFD: torch.Tensor,
        w_down_EDF: torch.Tensor,
        b_gate_up_EF: torch.Tensor | None = None,
        b_down_ED: torch.Tensor | None = None,
        act: ExpertActivation = SILU,
        scales: ExpertScales | None = None,
    ) -> None:
        self.w_gate_up_EFD = w_gate_up_EFD
        self.w_down_EDF = w_down_EDF
        self.b_gate_up_EF = b_gate_up_EF
        self.b_down_ED = b_down_ED
        self.act = act
        self.scales = scales

    def weights(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's (gate_up [2F, D], down [D, F]) in `dtype`: quantized ones dequantized
        for this use only (the readable path; the kernels dequantize in registers)."""
        if self.scales is None:
            return self.w_gate_up_EFD[e], self.w_down_EDF[e]
        s = self.scales
        return (
            dequantize(self.w_gate_up_EFD[e], s.gate_up[e], s.kind, dtype),
            dequantize(self.w_down_EDF[e], s.down[e], s.kind, dtype),
        )

    def run(self, d: Dispatch) -> None:
        start = 0  # one host read of the per-expert counts tells the slices
        b_up, b_down = self.b_gate_up_EF, self.b_down_ED
        for e, n in enumerate(d.counts_E.tolist()):
            if n:
                rows = slice(start, start + n)
                w_gate_up, w_down = self.weights(e, d.x_RD.dtype)
                d.y_RD[rows] = expert_mlp(
                    d.x_RD[rows],
                    w_gate_up,
                    w_down,
                    None if b_up is None else b_up[e],
                    None if b_down is None else b_down[e],
                    self.act,
                )
                start += n


def router_logits(
    x_TD: torch.Tensor, router_ED: torch.Tensor, bias_E: torch.Tensor | None = None
) -> torch.Tensor:
    """The router's logits [T, E] (+ its logit bias, gpt-oss) in the router weight's dtype: a
    float32 router (DeepSeek, GLM) runs its GEMM on float32 activations, as the reference does."""
    if router_ED.dtype != x_TD.dtype:
        x_TD = x_TD.to(router_ED.dtype)
    return F.linear(x_TD, router_ED, bias_E)


def router_partials(x_TD: torch.Tensor, router_ED: torch.Tensor, triton_route: bool) -> bool:
    """Whether the fused path takes the router's logits of these rows as split-K partials
    (added up by the routing program) rather than as a tensor."""
    return triton_route and split_k_rows(x_TD) and router_ED.dtype in (x_TD.dtype, torch.float32)


def fused_router_logits(
    x_TD: torch.Tensor,
    router_ED: torch.Tensor,
    triton_route: bool,
    bias_E: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fused path's router logits [T, E] (+ the router's logit bias); at a few rows routed
    by the Triton program, float32 split-K partials [S, T, E] that the program adds up (one
    launch, not cuBLAS's two; for a float32 router, not a conversion and cuBLAS's GEMV).
    Otherwise a float32 router takes router_logits."""
    if router_partials(x_TD, router_ED, triton_route):
        from moeserve.kernels import linear

        return linear.linear_partials(x_TD, router_ED, bias_E)
    if router_ED.dtype != x_TD.dtype:
        return router_logits(x_TD, router_ED, bias_E)
    return F.linear(x_TD, router_ED, bias_E)


def fused_experts(
    x_TD: torch.Tensor,
    logits_TE: torch.Tensor,
    spec: RouterSpec,
    w_gate_up_EFD: torch.Tensor,
    w_down_EDF: torch.Tensor,
    *,
    triton_route: bool,
    bias_E: torch.Tensor | None,
    valid_T: torch.Tensor | None,
    counter_E: torch.Tensor | None,
    residual_TD: torch.Tensor | None = None,
    b_gate_up_EF: torch.Tensor | None = None,
    b_down_ED: torch.Tensor | None = None,
    act: ExpertActivation = SILU,
    scales: ExpertScales | None = None,
    table: SlotTable | None = None,
    shared: SharedExpert | None = None,
    logits_dtype: torch.dtype | None = None,
    extra_TD: torch.Tensor | None = None,
    x_bound: float | None = None,
) -> torch.Tensor:
    """The routed experts' combined output [T, D] (plus residual_TD when given, fused into the
    last kernel), through the Triton kernels; the experts' biases and activation as given;
    quantized weights with their scales (dequantized in the kernels). shared: an ungated
    shared expert added in the same kernels (only where kernel_shared_expert says so).
    logits_dtype: the router's dtype, to which logits given as split-K partials are rounded
    (default x's). extra_TD: a shared expert's output the caller computed, added to the
    routed sum before the residual (in the last kernel where it can). x_bound: a bound on |x|
    (MoE.input_bound; kernels.fused_moe).
    triton_route (router.triton_routable): routing, alignment and counting in one program (a
    decode-sized batch), else the torch routing, its count and the alignment's torch ops.
    counter_E: incremented by the tokens per expert. table: the experts live in these slots
    (an expert cache the GPU maps itself), not in the weights given."""
    from moeserve.kernels.fused_moe import fused_moe
    from moeserve.kernels.moe_gemm import moe_block_m
    from moeserve.kernels.moe_gemv_plan import takes_gemv

    t = x_TD.shape[0]
    quant = scales.kernel_args() if scales is not None else {}
    if table is not None:
        slots = table.slots
        w_gate_up_EFD, w_down_EDF, quant = slots.w_gate_up_SFD, slots.w_down_SDF, slots.quant
        b_gate_up_EF, b_down_ED = slots.b_gate_up_SF, slots.b_down_SD
        assert t * spec.top_k <= table.max_rows, "more routed rows than staging slots"
    if triton_route:
        f, d = w_gate_up_EFD.shape[1] // 2, w_down_EDF.shape[1]
        gemv = takes_gemv(t, f, quant.get("quant", ""))
        # The GEMVs run one program per assignment: no alignment to compute (block_m 0).
        block_m = 0 if gemv else moe_block_m(t, spec.num_experts, spec.top_k, f, d, x_TD.dtype)
        weights_TK, experts_TK, align = route(
            logits_TE,
            spec,
            bias_E=bias_E,
            valid_T=valid_T,
            backend="triton",
            block_m=block_m,
            counts_E=counter_E,
            logits_dtype=logits_dtype or x_TD.dtype,
        )
        return fused_moe(
            x_TD,
            w_gate_up_EFD,
            w_down_EDF,
            weights_TK,
            experts_TK,
            expert_slot_E=table.resolve(experts_TK) if table is not None else None,
            align=align,
            gemv=gemv,
            residual_TD=residual_TD,
            b_gate_up_EF=b_gate_up_EF,
            b_down_ED=b_down_ED,
            activation=(act.kind, act.alpha, act.limit),
            shared=shared,
            extra_TD=extra_TD,
            x_bound=x_bound,
            **quant,
        )
    weights_TK, experts_TK, _ = route(logits_TE, spec, bias_E=bias_E, valid_T=valid_T)
    if counter_E is not None:
        counter_E += expert_counts(experts_TK.flatten(), spec.num_experts)
    slot_E = table.resolve(experts_TK) if table is not None else None
    if spec.scales_input:
        assert shared is None, "kernel_shared_expert keeps Llama 4's shared expert apart"
        return _fused_scaled_input(
            x_TD,
            w_gate_up_EFD,
            w_down_EDF,
            weights_TK,
            experts_TK,
            residual_TD,
            quant,
            slot_E,
            extra_TD,
        )
    return fused_moe(
        x_TD,
        w_gate_up_EFD,
        w_down_EDF,
        weights_TK,
        experts_TK,
        expert_slot_E=slot_E,
        residual_TD=residual_TD,
        b_gate_up_EF=b_gate_up_EF,
        b_down_ED=b_down_ED,
        activation=(act.kind, act.alpha, act.limit),
        shared=shared,
        extra_TD=extra_TD,
        x_bound=x_bound,
        **quant,
    )


def kernel_shared_expert(
    t: int, spec: RouterSpec, intermediate: int, quant: str, gated: bool
) -> bool:
    """Whether fused_experts runs a layer's shared expert in its own kernels for a batch of t
    tokens: where the routed experts take the GEMVs (moe_gemv_plan.takes_gemv) and the shared
    expert is plain SwiGLU added after them (no sigmoid gate as Qwen2-MoE's, no input scaled
    by the routing weight as Llama 4's). At batch 1 that is two launches for the shared
    expert, its sum in the routed one's epilogue, instead of two GEMVs, the activation and
    two adds."""
    from moeserve.kernels.moe_gemv_plan import takes_gemv

    return not gated and not spec.scales_input and takes_gemv(t, intermediate, quant)


def _fused_scaled_input(
    x_TD: torch.Tensor,
    w_gate_up_EFD: torch.Tensor,
    w_down_EDF: torch.Tensor,
    weights_TK: torch.Tensor,
    experts_TK: torch.Tensor,
    residual_TD: torch.Tensor | None,
    quant: dict[str, Any],
    expert_slot_E: torch.Tensor | None = None,
    extra_TD: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fused GEMMs when the weights scale each expert's input (Llama 4): every (token,
    choice) is a row of its own, its input scaled in x's dtype, with weight 1; the K outputs of
    a token are summed after (at top-1, Llama 4's routing, that is the kernel's own output).
    extra_TD (the shared expert's output) is added before the residual."""
    t, k = experts_TK.shape
    x_RD = (x_TD[:, None, :] * weights_TK.to(x_TD.dtype)[:, :, None]).reshape(t * k, -1)
    experts_R = experts_TK.reshape(t * k)
    w = (w_gate_up_EFD, w_down_EDF, quant)
    if k == 1:
        return fused_rows(
            x_RD,
            experts_R,
            *w,
            expert_slot_E=expert_slot_E,
            residual_RD=residual_TD,
            extra_RD=extra_TD,
        )
    out_TD = fused_rows(x_RD, experts_R, *w, expert_slot_E=expert_slot_E)
    out_TD = out_TD.view(t, k, -1).sum(1)
    if extra_TD is not None:
        out_TD = out_TD + extra_TD
    return out_TD if residual_TD is None else residual_TD + out_TD


def fused_rows(
    x_RD: torch.Tensor,
    experts_R: torch.Tensor,
    w_gate_up_EFD: torch.Tensor,
    w_down_EDF: torch.Tensor,
    quant: dict[str, Any],
    *,
    expert_slot_E: torch.Tensor | None = None,
    out_RD: torch.Tensor | None = None,
    residual_RD: torch.Tensor | None = None,
    extra_RD: torch.Tensor | None = None,
    b_gate_up_EF: torch.Tensor | None = None,
    b_down_ED: torch.Tensor | None = None,
    act: ExpertActivation = SILU,
    gemv: bool | None = None,
) -> torch.Tensor:
    """Each row through its own expert (experts_R int64; the sentinel id >= E gives a zero
    row), weight 1, by the fused kernels: the rows are the kernels' tokens at top-1.
    expert_slot_E: expert e's tensors are at index expert_slot_E[e] (an expert cache); quant:
    ExpertScales.kernel_args() or {}. Written into out_RD when given. residual_RD and
    extra_RD: added as fused_moe adds them. gemv: the per-assignment kernels (fused_moe's
    default: by the row count)."""
    from moeserve.kernels.fused_moe import fused_moe

    ones_R1 = torch.ones(x_RD.shape[0], 1, dtype=torch.float32, device=x_RD.device)
    return fused_moe(
        x_RD,
        w_gate_up_EFD,
        w_down_EDF,
        ones_R1,
        experts_R[:, None],
        expert_slot_E=expert_slot_E,
        out_TD=out_RD,
        residual_TD=residual_RD,
        extra_TD=extra_RD,
        b_gate_up_EF=b_gate_up_EF,
        b_down_ED=b_down_ED,
        activation=(act.kind, act.alpha, act.limit),
        gemv=gemv,
        **quant,
    )


class SlotExperts:
    """Experts in the rows ("slots") of device tensors, run by the fused Triton kernels: the
    engine's expert cache (engine/expert_store.py). Which expert sits in which slot changes
    between calls, so each call is given the map as it stands when its work is queued."""

    def __init__(self, slots: list[torch.Tensor], quant: str, act: ExpertActivation) -> None:
        """slots: [S, ...] tensors in MoE.expert_tensors' order: the two weights, their scales
        when quant ("fp8", "mxfp4"), the biases when the family has them."""
        self.w_gate_up_SFD, self.w_down_SDF, *rest = slots
        self.quant = ExpertScales(quant, rest[0], rest[1]).kernel_args() if quant else {}
        biases = rest[2:] if quant else rest
        self.b_gate_up_SF, self.b_down_SD = biases if biases else (None, None)
        self.act = act

    def run(self, d: Dispatch, counts: list[int], slot_of: dict[int, int]) -> None:
        """Fill d.y_RD's rows of the experts in slot_of (expert -> its slot; each has rows);
        every other row keeps what it holds. counts: d.counts_E read on the host.
        One launch sequence over the rows from the first such expert's to the last one's."""
        num_e, dev = len(counts), d.x_RD.device
        first, last = min(slot_of), max(slot_of)
        lo = sum(counts[:first])
        hi = lo + sum(counts[first : last + 1])
        table = [-1] * (num_e + 1)  # expert -> slot, -1: not this call's; index E: the sentinel
        for e, slot in slot_of.items():
            table[e] = slot
        # Pinned, so the copy does not wait for the stream; torch's host allocator keeps the
        # buffer until the copy has run.
        host_E1 = torch.tensor(table, dtype=torch.int32, pin_memory=dev.type == "cuda")
        table_E1 = host_E1.to(dev, non_blocking=True)
        # Rows are grouped by expert, ascending: a row's expert is the first whose end is past it.
        ends_E = d.counts_E.cumsum(0)
        experts_N = torch.searchsorted(ends_E, torch.arange(lo, hi, device=dev), right=True)
        y_ND = d.y_RD[lo:hi]
        whole = all(e in slot_of for e in range(first, last + 1) if counts[e])
        if not whole:  # rows of other experts in the span go to the sentinel, then keep theirs
            mine_N = table_E1[experts_N] >= 0
            experts_N = torch.where(mine_N, experts_N, num_e)
        out_ND = fused_rows(
            d.x_RD[lo:hi],
            experts_N,
            self.w_gate_up_SFD,
            self.w_down_SDF,
            self.quant,
            expert_slot_E=table_E1[:num_e].clamp(min=0),  # never -1: sentinels' bias reads
            out_RD=y_ND if whole else None,
            b_gate_up_EF=self.b_gate_up_SF,
            b_down_ED=self.b_down_SD,
            act=self.act,
            # One row per expert (a decode token's experts): the GEMVs, no alignment and
            # no grouped GEMM launches for blocks of one row.
            gemv=True if max(counts[e] for e in slot_of) == 1 else None,
        )
        if not whole:
            y_ND.copy_(torch.where(mine_N[:, None], out_ND, y_ND))
