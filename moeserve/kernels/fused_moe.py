"""Fused MoE experts in Triton: grouped GEMMs over expert-sorted rows, capturable in a CUDA graph.

The readable twin is moeserve.model.moe.MoE.experts. Pipeline, with R = T*K assignments:

    moe_align:      the R (token, k) assignments grouped by expert, each group padded to BLOCK_M
    GEMM 1:         x[token] @ w_gate_up[e].T          -> gate_up_RF2 [R, 2F] (model dtype)
    silu_mul:       act(gate_up + b_gate_up[e])         -> h_RF [R, F]; act: silu(gate) * up,
                    or gpt-oss's clamped SwiGLU (model/activation.py)
    GEMM 2:         weight * (h @ w_down[e].T + b_down[e]) -> y_RD [R, D] (model dtype)
    sum over k:                                         -> out_TD [T, D]

At decode the weights of a few experts are all a step reads, and one program per output tile
leaves most SMs idle: both GEMMs then split K (split_k partial sums in float32), and the
next kernel adds the partials where it reads them (silu_mul for GEMM 1, the sum over k for
GEMM 2), rounding where the unsplit path rounds.

Nothing here reads device memory on the host and every shape and grid size follows from the
input shapes alone, so a CUDA graph captured once replays for any routing of the same T.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import interpreting, pdl
from moeserve.kernels.moe_epilogue import SUM_KERNEL_MAX_TOKENS, activate, rnd, sum_over_k
from moeserve.kernels.moe_gemm import gemm_config, moe_gemm, pow2_at_least_16
from moeserve.kernels.moe_gemv import DownSum, gemv_down, gemv_gate_up_act
from moeserve.kernels.moe_gemv_plan import SharedExpert, gemv_config, sums_in_down, takes_gemv
from moeserve.kernels.moe_quant import fp8_dot_config, quantize_fp8_act, takes_fp8_dot
from moeserve.kernels.mxfp4 import half_products
from moeserve.kernels.pdl import wait_prior
from moeserve.kernels.quant import real_k


def moe_align(
    experts_TK: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the T*K (token, k) assignments by expert, each group padded to a multiple of block_m.

    Returns sorted_ids_P int32 (P = T*K + num_experts*(block_m-1), rounded up to a multiple of
    block_m; entry = flat assignment index t*K+k, padding entries = T*K), block_expert_Q int32
    (Q = P // block_m; the expert of each block, -1 for blocks past the last used one),
    num_post_pad_1 int32 [1] (used length).
    Assignments whose expert id is >= num_experts (the sentinel the caller uses for padding rows)
    are dropped.
    """
    device = experts_TK.device
    flat_R = experts_TK.flatten()
    R = flat_R.numel()
    P = triton.cdiv(R + num_experts * (block_m - 1), block_m) * block_m
    # Sentinels share one extra bucket, num_experts, that sorts last and gets no slots.
    key_R = flat_R.long().clamp(max=num_experts)
    counts_E1 = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts_E1.scatter_add_(0, key_R, torch.ones_like(key_R))
    padded_E = (counts_E1[:num_experts] + block_m - 1) // block_m * block_m
    end_E = torch.cumsum(padded_E, 0)
    start_E1 = torch.cat([end_E - padded_E, end_E.new_zeros(1)])  # first slot of each bucket

    order_R = torch.argsort(key_R, stable=True)  # stable: within an expert, in token order
    key_sorted_R = key_R[order_R]
    first_E1 = torch.cumsum(counts_E1, 0) - counts_E1  # bucket starts in the unpadded order
    rank_R = torch.arange(R, device=device) - first_E1[key_sorted_R]
    # Sentinel assignments all go to scratch slot P, cut off below.
    dest_R = torch.where(key_sorted_R < num_experts, start_E1[key_sorted_R] + rank_R, P)
    sorted_ids = torch.full((P + 1,), R, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest_R, order_R.to(torch.int32))

    # Block b belongs to the expert whose padded range holds b*block_m: the number of experts
    # that end at or before it (empty experts end where the previous one did, so they never
    # own a block).
    block_start_Q = torch.arange(0, P, block_m, device=device)
    block_expert_Q = torch.searchsorted(end_E, block_start_Q, right=True)
    block_expert_Q = torch.where(block_expert_Q < num_experts, block_expert_Q, -1)
    return sorted_ids[:P], block_expert_Q.to(torch.int32), end_E[-1:].to(torch.int32)


@triton.jit
def _silu_mul_kernel(
    gate_up_ptr,
    out_ptr,
    bias_ptr,  # [slots, 2F] (HAS_BIAS)
    experts_ptr,  # [R] the expert of each row (HAS_BIAS)
    slot_ptr,  # [E] expert -> weight index (HAS_SLOT)
    F,
    num_experts,
    stride_in,
    stride_out,
    stride_split,
    stride_bias,
    alpha,
    limit,
    SPLIT: tl.constexpr,
    BLOCK_F: tl.constexpr,
    CLAMPED: tl.constexpr,  # gpt-oss's clamped SwiGLU instead of silu(gate) * up
    HAS_BIAS: tl.constexpr,
    HAS_SLOT: tl.constexpr,
):
    wait_prior()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    ok = offs < F
    gate = tl.zeros((BLOCK_F,), dtype=tl.float32)
    up = tl.zeros((BLOCK_F,), dtype=tl.float32)
    for s in range(SPLIT):  # split GEMM 1: add its partials, then round as its store would
        base = gate_up_ptr + s * stride_split + row * stride_in + offs
        gate += tl.load(base, mask=ok, other=0.0).to(tl.float32)
        up += tl.load(base + F, mask=ok, other=0.0).to(tl.float32)
    if SPLIT > 1:
        gate = rnd(gate, out_ptr)
        up = rnd(up, out_ptr)
    if HAS_BIAS:  # x @ W + b: added to the rounded product, rounded again
        # Sentinel rows (expert >= E) are garbage nobody reads: any real expert's bias will do.
        expert = tl.minimum(tl.load(experts_ptr + row), num_experts - 1)
        if HAS_SLOT:
            expert = tl.load(slot_ptr + expert)
        b_row = bias_ptr + expert.to(tl.int64) * stride_bias + offs
        gate = rnd(gate + tl.load(b_row, mask=ok, other=0.0).to(tl.float32), out_ptr)
        up = rnd(up + tl.load(b_row + F, mask=ok, other=0.0).to(tl.float32), out_ptr)
    h = activate(gate, up, out_ptr, alpha, limit, CLAMPED)
    tl.store(out_ptr + row * stride_out + offs, h, mask=ok)


# (kind, alpha, limit) of model.activation.ExpertActivation: kernels import no model code.
Activation = tuple[str, float, float]
SILU: Activation = ("silu", 1.702, 7.0)


def activation_bound(activation: Activation) -> float | None:
    """A bound on |act(gate, up)|, the down projection's inputs, where there is one: gpt-oss's
    clamped SwiGLU has |gate * sigmoid(alpha * gate)| <= max(limit, 0.279 / alpha) (the
    minimum of x * sigmoid(alpha * x) is -0.2785 / alpha) and |up + 1| <= limit + 1, with 2%
    for the roundings; silu(gate) * up has none."""
    kind, alpha, limit = activation
    if kind != "clamped_swiglu" or not alpha > 0:
        return None
    return max(limit, 0.279 / alpha) * (limit + 1) * 1.02


def silu_mul(
    gate_up_RF2: torch.Tensor,
    out_RF: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    *,
    activation: Activation = SILU,
    bias_EF2: torch.Tensor | None = None,
    experts_R: torch.Tensor | None = None,
    expert_slot_E: torch.Tensor | None = None,
) -> torch.Tensor:
    """silu(gate) * up (or the activation given) of a [R, 2F] tensor whose halves are gate
    then up (rows may be strided); of [S, R, 2F] float32 partial sums, their sum rounded to
    `dtype` first. bias_EF2: the gate_up bias of the expert of each row (experts_R, mapped
    through expert_slot_E when given), added first; rows of the sentinel expert get none."""
    parts = gate_up_RF2 if gate_up_RF2.dim() == 3 else gate_up_RF2[None]
    S, R, F2 = parts.shape
    F = F2 // 2
    dtype = dtype or gate_up_RF2.dtype
    if out_RF is None:
        out_RF = torch.empty(R, F, dtype=dtype, device=gate_up_RF2.device)
    assert parts.stride(2) == 1 and out_RF.stride(1) == 1, "rows must be contiguous"
    kind, alpha, limit = activation
    assert kind in ("silu", "clamped_swiglu"), kind
    assert bias_EF2 is None or (experts_R is not None and bias_EF2.stride(1) == 1)
    num_experts = 0
    if bias_EF2 is not None:
        num_experts = expert_slot_E.numel() if expert_slot_E is not None else bias_EF2.shape[0]
    # A few rows (decode): narrower blocks, so more than a handful of programs share the work.
    block_f = 16 if interpreting() else min(1024 if R > 16 else 256, pow2_at_least_16(F))
    if R:
        grid = (R, triton.cdiv(F, block_f))
        _silu_mul_kernel[grid](
            parts,
            out_RF,
            bias_EF2 if bias_EF2 is not None else out_RF,  # unused pointers without a bias
            experts_R if experts_R is not None else out_RF,
            expert_slot_E if expert_slot_E is not None else out_RF,
            F,
            num_experts,
            parts.stride(1),
            out_RF.stride(0),
            parts.stride(0),
            bias_EF2.stride(0) if bias_EF2 is not None else 0,
            float(alpha),
            float(limit),
            SPLIT=S,
            BLOCK_F=block_f,
            CLAMPED=kind == "clamped_swiglu",
            HAS_BIAS=bias_EF2 is not None,
            HAS_SLOT=expert_slot_E is not None,
            **pdl.LAUNCH,
        )
    return out_RF


def fused_moe(
    x_TD: torch.Tensor,
    w_gate_up_EF2D: torch.Tensor,
    w_down_EDF: torch.Tensor,
    weights_TK: torch.Tensor,
    experts_TK: torch.Tensor,
    *,
    expert_slot_E: torch.Tensor | None = None,
    out_TD: torch.Tensor | None = None,
    align: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    split_k: int | None = None,
    residual_TD: torch.Tensor | None = None,
    b_gate_up_EF: torch.Tensor | None = None,
    b_down_ED: torch.Tensor | None = None,
    activation: Activation = SILU,
    gemv: bool | None = None,
    w_gate_up_scale: torch.Tensor | None = None,
    w_down_scale: torch.Tensor | None = None,
    quant: str = "",
    fp8_dot: bool | None = None,
    shared: SharedExpert | None = None,
    extra_TD: torch.Tensor | None = None,
    x_bound: float | None = None,
) -> torch.Tensor:
    """out[t] = sum_k weights[t,k] * down_e( silu(gate_e(x_t)) * up_e(x_t) ), e = experts[t,k].

    With b_gate_up_EF [E, 2F] / b_down_ED [E, D] each projection adds its expert's bias, and
    `activation` (kind, alpha, limit) may replace silu(gate) * up (model/activation.py).

    w_gate_up is [E, 2F, D] (rows 0..F-1 gate, F..2F-1 up, as MoE.w_gate_up), w_down [E, D, F];
    weights_TK float32, experts_TK int64. expert_slot_E (optional int32/int64 [num_experts]):
    expert e's weights live at index expert_slot_E[e] of the weight tensors (for an expert
    cache); default identity. Rows whose experts are all the sentinel (>= num_experts) get 0.
    align: moe_align's result for these experts with block_m = moe_block_m(...), when the
    caller computed it already (moe_routing.route_and_align). split_k: K splits of both
    GEMMs instead of the config's (tests). residual_TD: returns residual + out instead (the
    decoder layer's residual add, done in the sum over k when K is split: one launch fewer).
    gemv: the per-assignment kernels of kernels.moe_gemv instead of the grouped GEMMs
    (default: moe_gemv_plan.takes_gemv, unless split_k is given).
    quant ("fp8", "mxfp4"; kernels.quant): the weights are stored quantized, with their
    scales w_gate_up_scale / w_down_scale (indexed like the weights); the kernels dequantize
    them in registers. fp8_dot: fp8 weights times per-token-group fp8 activations on the FP8
    tensor cores in the grouped GEMMs (default: moe_quant.takes_fp8_dot, i.e. prefill sizes).
    shared: an ungated shared expert whose output the sum over k adds before the residual
    (the GEMV path only). extra_TD: a shared expert's output computed apart, added (rounded as
    torch's add) to the routed sum before the residual: in the sum over k where it runs.
    x_bound: a bound on |x| the caller knows (an RMSNorm's, model.decoder): with it MXFP4's
    GEMVs multiply in float16 (mxfp4.half_products), as its down projection does after an
    activation_bound.
    """
    T, D = x_TD.shape
    K = experts_TK.shape[1]
    F = w_gate_up_EF2D.shape[1] // 2  # not w_down's last dim: mxfp4 packs two per byte
    scales_up = dict(b_scale=w_gate_up_scale, quant=quant)
    scales_down = dict(b_scale=w_down_scale, quant=quant)
    R = T * K
    num_experts = expert_slot_E.numel() if expert_slot_E is not None else w_gate_up_EF2D.shape[0]
    dtype, device = x_TD.dtype, x_TD.device
    if out_TD is None:
        out_TD = torch.empty(T, D, dtype=dtype, device=device)

    alloc = torch.zeros if interpreting() else torch.empty
    if gemv is None:
        gemv = split_k is None and takes_gemv(T, F, quant)
    assert shared is None or gemv, "a shared expert runs in the GEMV path only"
    assert shared is None or extra_TD is None, "a shared expert is run or given, not both"
    if gemv:
        experts_R = experts_TK.reshape(R)
        # Before gate/up: no launch may come between it and the down GEMV (moe_gemv).
        into = DownSum(
            weights_TK.to(torch.float32).contiguous(), out_TD, residual_TD, b_down_ED, extra_TD
        )
        h_RF, h_TS = gemv_gate_up_act(
            x_TD,
            w_gate_up_EF2D,
            experts_R,
            K,
            num_experts,
            expert_slot_E=expert_slot_E,
            bias_EF2=b_gate_up_EF,
            activation=activation,
            w_scale=w_gate_up_scale,
            quant=quant,
            shared=shared,
            x_bound=x_bound,
        )
        shared_rows = shared.down_rows(F) if shared is not None else 0
        rows = R + T * shared_rows
        h_bound = activation_bound(activation)
        half = quant == "mxfp4" and half_products(h_bound)
        cfg = gemv_config(D, real_k(w_down_EDF, quant), quant, rows=rows, half=half)
        part_SRD = alloc(cfg["SPLIT_K"], rows, D, dtype=torch.float32, device=device)
        if gemv_down(
            h_RF,
            w_down_EDF,
            part_SRD,
            experts_R,
            num_experts,
            expert_slot_E=expert_slot_E,
            cfg=cfg,
            w_scale=w_down_scale,
            quant=quant,
            shared=(shared, h_TS) if shared is not None else None,
            x_bound=h_bound,
            sum_into=into if sums_in_down(T, cfg["SPLIT_K"]) else None,
        ):
            return out_TD
        return sum_over_k(
            part_SRD,
            experts_TK,
            into.weights_TK,  # float32 already: no second conversion
            out_TD,
            residual_TD,
            b_down_ED,
            expert_slot_E,
            num_experts,
            shared_rows,
            extra_TD,
        )

    cfg_up = gemm_config(T, num_experts, K, 2 * F, D, dtype, quant)
    cfg_down = gemm_config(T, num_experts, K, D, F, dtype, quant)
    cfg_down["BLOCK_M"] = cfg_up["BLOCK_M"]  # one alignment serves both GEMMs
    if split_k is not None:
        cfg_up["SPLIT_K"] = cfg_down["SPLIT_K"] = split_k
    if fp8_dot is None:
        fp8_dot = takes_fp8_dot(quant, cfg_up["BLOCK_M"])
    assert not fp8_dot or quant == "fp8", "the FP8 tensor-core path needs fp8 weights"
    if fp8_dot:
        cfg_up, cfg_down = fp8_dot_config(cfg_up, D), fp8_dot_config(cfg_down, F)
    if align is None:
        align = moe_align(experts_TK, num_experts, cfg_up["BLOCK_M"])
    sorted_ids_P, block_expert_Q, num_post_pad_1 = align

    # Rows of sentinel assignments are never written by GEMM 1 nor read by GEMM 2; under the
    # interpreter silu_mul's numpy would warn about the garbage in them, so zero them there.
    split_up, split_down = cfg_up["SPLIT_K"], cfg_down["SPLIT_K"]
    if split_up > 1:
        gate_up_RF2 = alloc(split_up, R, 2 * F, dtype=torch.float32, device=device)
    else:
        gate_up_RF2 = alloc(R, 2 * F, dtype=dtype, device=device)
    a_TD, a_scale = quantize_fp8_act(x_TD) if fp8_dot else (x_TD, None)
    moe_gemm(
        a_TD,
        w_gate_up_EF2D,
        gate_up_RF2,
        None,
        sorted_ids_P,
        block_expert_Q,
        num_post_pad_1,
        expert_slot_E,
        K,
        cfg_up,
        a_scale=a_scale,
        **scales_up,
    )
    h_RF = silu_mul(
        gate_up_RF2,
        dtype=dtype,
        activation=activation,
        bias_EF2=b_gate_up_EF,
        experts_R=experts_TK.reshape(R) if b_gate_up_EF is not None else None,
        expert_slot_E=expert_slot_E,
    )
    a_RF, a_scale = quantize_fp8_act(h_RF) if fp8_dot else (h_RF, None)
    if split_down > 1 or T <= SUM_KERNEL_MAX_TOKENS:
        part_SRD = alloc(split_down, R, D, dtype=torch.float32, device=device)
        moe_gemm(
            a_RF,
            w_down_EDF,
            part_SRD,
            None,
            sorted_ids_P,
            block_expert_Q,
            num_post_pad_1,
            expert_slot_E,
            1,
            cfg_down,
            a_scale=a_scale,
            **scales_down,
        )
        return sum_over_k(
            part_SRD,
            experts_TK,
            weights_TK,
            out_TD,
            residual_TD,
            b_down_ED,
            expert_slot_E,
            num_experts,
            extra_TD=extra_TD,
        )
    # Zeroed because GEMM 2 skips sentinel assignments and the sum below reads every row.
    y_RD = torch.zeros(R, D, dtype=dtype, device=device)
    moe_gemm(
        a_RF,
        w_down_EDF,
        y_RD,
        weights_TK.reshape(R).to(torch.float32),
        sorted_ids_P,
        block_expert_Q,
        num_post_pad_1,
        expert_slot_E,
        1,
        cfg_down,
        bias_EN=b_down_ED,
        a_scale=a_scale,
        **scales_down,
    )
    torch.sum(y_RD.view(T, K, D), dim=1, out=out_TD)
    if extra_TD is not None:
        out_TD = out_TD + extra_TD
    return out_TD if residual_TD is None else residual_TD + out_TD
