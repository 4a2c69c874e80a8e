"""The fused MoE's two projections for a few tokens, shaped as GEMVs: one program per (output
tile, assignment), no expert sorting, no padded rows.

At batch 1 a step's expert weights are a few small matrices (Qwen3-30B-A3B: 8 of 768 x 2048);
the grouped GEMM's 16-row blocks for one row each and its K splits (moe_gemm.py) left its
grid short and uneven, reading weights at about half the copy bandwidth. Here every program
streams BLOCK_N whole weight rows (K contiguous) against one activation row, so the grid is
assignments x N / BLOCK_N programs of equal work, and GEMM 1 applies the activation to its
gate and up rows where it has them (no silu_mul launch, no [R, 2F] intermediate).

Rounding follows the grouped path: GEMM 1's products are rounded to the model dtype, its bias
added and rounded, then the activation as kernels.fused_moe's silu_mul; GEMM 2 writes float32
rows that the sum over k rounds, weighs and adds (moe_epilogue's _sum_split_kernel). Sentinel
assignments (expert >= num_experts) are skipped; the sum drops their rows.

Shapes: R = T*K assignments, E experts (or cache slots), F intermediate, D hidden.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import interpreting
from moeserve.kernels.moe_epilogue import activate, rnd
from moeserve.kernels.moe_quant import load_weights, quant_code
from moeserve.kernels.quant import real_k

# Up to this many tokens, and for experts up to this intermediate width, the fused MoE takes
# these kernels (kernels.fused_moe). Beyond that many tokens the experts repeat across tokens,
# and the grouped GEMM reads each expert's weights once for all its rows where these read them
# once per row; for wide experts the grouped GEMM's K splits already fill the device. Batch-1
# decode on an H200 (benchmarks/RESULTS.md): Qwen3-30B-A3B (F 768) and DeepSeek-V2-Lite (F
# 1408) 4% faster with these, gpt-oss-20b (F 2880) 6% slower.
GEMV_MAX_TOKENS = 1
GEMV_MAX_INTERMEDIATE = 2048


def takes_gemv(num_tokens: int, intermediate: int) -> bool:
    return num_tokens <= GEMV_MAX_TOKENS and intermediate <= GEMV_MAX_INTERMEDIATE


def gemv_config(N: int, K: int, quant: str = "") -> dict[str, int]:
    """BLOCK_N output rows per program, BLOCK_K columns per load, warps (kernel_bench --gemv).
    fp8 weights: K blocks of at most one scale group (one scale load per row and block)."""
    if interpreting():  # every program runs in Python: few, small ones
        return dict(BLOCK_N=16, BLOCK_K=16, num_warps=4)
    most = 128 if quant == "fp8" else 256
    return dict(BLOCK_N=16, BLOCK_K=min(most, triton.next_power_of_2(K)), num_warps=4)


@triton.jit
def _gate_up_act_kernel(
    x_ptr,  # [T, K]
    w_ptr,  # [slots, 2F, K]: gate rows then up rows
    h_ptr,  # [R, F] model dtype
    experts_ptr,  # [R]
    slot_ptr,  # [E] expert -> weight index (HAS_SLOT)
    bias_ptr,  # [slots, 2F] (HAS_BIAS)
    s_ptr,  # [slots, 2F, ceil(K/GROUP)] weight scales (QUANT)
    F,
    K,
    num_experts,
    stride_x,
    stride_we,
    stride_wn,
    stride_h,
    stride_bias,
    stride_se,
    stride_sn,
    stride_sk,
    alpha,
    limit,
    ROWS_PER_X: tl.constexpr,  # top_k: assignment r reads token r // top_k
    HAS_SLOT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CLAMPED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    QUANT: tl.constexpr,  # moe_quant.QUANT_CODES
    GROUP: tl.constexpr,
):
    r = tl.program_id(1).to(tl.int64)
    expert = tl.load(experts_ptr + r).to(tl.int64)
    if expert >= num_experts:  # a sentinel: the sum over k drops its row
        return
    if HAS_SLOT:
        expert = tl.load(slot_ptr + expert).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < F
    offs_k = tl.arange(0, BLOCK_K)
    x_row = x_ptr + (r // ROWS_PER_X) * stride_x
    w_e = w_ptr + expert * stride_we
    s_e = s_ptr + expert * stride_se
    n = offs_n[:, None]
    acc_g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        x = tl.load(x_row + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        m = n_ok[:, None] & k_ok[None, :]
        gate = load_weights(
            w_e, s_e, n, kk[None, :], n_ok[:, None], m, k0,
            stride_wn, 1, stride_sn, stride_sk, QUANT, GROUP, BLOCK_K <= GROUP,
        )  # fmt: skip
        up = load_weights(
            w_e, s_e, n + F, kk[None, :], n_ok[:, None], m, k0,
            stride_wn, 1, stride_sn, stride_sk, QUANT, GROUP, BLOCK_K <= GROUP,
        )  # fmt: skip
        acc_g += gate.to(tl.float32) * x
        acc_u += up.to(tl.float32) * x
    gate = rnd(tl.sum(acc_g, axis=1), h_ptr)
    up = rnd(tl.sum(acc_u, axis=1), h_ptr)
    if HAS_BIAS:
        b_row = bias_ptr + expert * stride_bias + offs_n
        gate = rnd(gate + tl.load(b_row, mask=n_ok, other=0.0).to(tl.float32), h_ptr)
        up = rnd(up + tl.load(b_row + F, mask=n_ok, other=0.0).to(tl.float32), h_ptr)
    h = activate(gate, up, h_ptr, alpha, limit, CLAMPED)
    tl.store(h_ptr + r * stride_h + offs_n, h, mask=n_ok)


@triton.jit
def _down_kernel(
    h_ptr,  # [R, K] (K = F)
    w_ptr,  # [slots, N, K] (N = D)
    out_ptr,  # [R, N] float32
    experts_ptr,
    slot_ptr,
    s_ptr,  # [slots, N, ceil(K/GROUP)] weight scales (QUANT)
    N,
    K,
    num_experts,
    stride_h,
    stride_we,
    stride_wn,
    stride_out,
    stride_se,
    stride_sn,
    stride_sk,
    HAS_SLOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    QUANT: tl.constexpr,
    GROUP: tl.constexpr,
):
    r = tl.program_id(1).to(tl.int64)
    expert = tl.load(experts_ptr + r).to(tl.int64)
    if expert >= num_experts:  # a sentinel: the sum over k drops its row
        return
    if HAS_SLOT:
        expert = tl.load(slot_ptr + expert).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    h_row = h_ptr + r * stride_h
    w_e = w_ptr + expert * stride_we
    s_e = s_ptr + expert * stride_se
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        h = tl.load(h_row + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        m = n_ok[:, None] & k_ok[None, :]
        w = load_weights(
            w_e, s_e, offs_n[:, None], kk[None, :], n_ok[:, None], m, k0,
            stride_wn, 1, stride_sn, stride_sk, QUANT, GROUP, BLOCK_K <= GROUP,
        )  # fmt: skip
        acc += w.to(tl.float32) * h
    tl.store(out_ptr + r * stride_out + offs_n, tl.sum(acc, axis=1), mask=n_ok)


def gemv_gate_up_act(
    x_TD: torch.Tensor,
    w_gate_up_EF2D: torch.Tensor,
    experts_R: torch.Tensor,
    top_k: int,
    num_experts: int,
    *,
    expert_slot_E: torch.Tensor | None = None,
    bias_EF2: torch.Tensor | None = None,
    activation: tuple[str, float, float],
    cfg: dict[str, int] | None = None,
    w_scale: torch.Tensor | None = None,
    quant: str = "",
) -> torch.Tensor:
    """act(x[r // top_k] @ w_gate_up[e_r].T + b[e_r]) for every assignment r: [R, F].
    quant, w_scale: the weights' storage format (kernels.quant)."""
    R, F2, D = experts_R.numel(), w_gate_up_EF2D.shape[1], real_k(w_gate_up_EF2D, quant)
    F = F2 // 2
    code, group = quant_code(quant)
    assert (w_scale is None) == (quant == ""), "quantized weights need their scales"
    alloc = torch.zeros if interpreting() else torch.empty  # sentinel rows stay unwritten
    h_RF = alloc(R, F, dtype=x_TD.dtype, device=x_TD.device)
    assert x_TD.stride(1) == 1 and w_gate_up_EF2D.stride(2) == 1
    assert bias_EF2 is None or bias_EF2.stride(1) == 1
    cfg = cfg or gemv_config(F, D, quant)
    kind, alpha, limit = activation
    if R:
        _gate_up_act_kernel[(triton.cdiv(F, cfg["BLOCK_N"]), R)](
            x_TD,
            w_gate_up_EF2D,
            h_RF,
            experts_R,
            expert_slot_E if expert_slot_E is not None else experts_R,  # unused pointers
            bias_EF2 if bias_EF2 is not None else h_RF,
            w_scale if w_scale is not None else h_RF,
            F,
            D,
            num_experts,
            x_TD.stride(0),
            w_gate_up_EF2D.stride(0),
            w_gate_up_EF2D.stride(1),
            h_RF.stride(0),
            bias_EF2.stride(0) if bias_EF2 is not None else 0,
            *(w_scale.stride() if w_scale is not None else (0, 0, 0)),
            float(alpha),
            float(limit),
            ROWS_PER_X=top_k,
            HAS_SLOT=expert_slot_E is not None,
            HAS_BIAS=bias_EF2 is not None,
            CLAMPED=kind == "clamped_swiglu",
            BLOCK_N=cfg["BLOCK_N"],
            BLOCK_K=cfg["BLOCK_K"],
            QUANT=code,
            GROUP=group,
            num_warps=cfg["num_warps"],
        )
    return h_RF


def gemv_down(
    h_RF: torch.Tensor,
    w_down_EDF: torch.Tensor,
    out_RD: torch.Tensor,
    experts_R: torch.Tensor,
    num_experts: int,
    *,
    expert_slot_E: torch.Tensor | None = None,
    cfg: dict[str, int] | None = None,
    w_scale: torch.Tensor | None = None,
    quant: str = "",
) -> None:
    """out_RD[r] = h[r] @ w_down[e_r].T in float32 (unrounded: the sum over k rounds)."""
    R, D, F = experts_R.numel(), w_down_EDF.shape[1], real_k(w_down_EDF, quant)
    code, group = quant_code(quant)
    assert (w_scale is None) == (quant == ""), "quantized weights need their scales"
    assert out_RD.dtype == torch.float32 and out_RD.stride(1) == 1
    assert h_RF.stride(1) == 1 and w_down_EDF.stride(2) == 1
    cfg = cfg or gemv_config(D, F, quant)
    if R:
        _down_kernel[(triton.cdiv(D, cfg["BLOCK_N"]), R)](
            h_RF,
            w_down_EDF,
            out_RD,
            experts_R,
            expert_slot_E if expert_slot_E is not None else experts_R,
            w_scale if w_scale is not None else out_RD,
            D,
            F,
            num_experts,
            h_RF.stride(0),
            w_down_EDF.stride(0),
            w_down_EDF.stride(1),
            out_RD.stride(0),
            *(w_scale.stride() if w_scale is not None else (0, 0, 0)),
            HAS_SLOT=expert_slot_E is not None,
            BLOCK_N=cfg["BLOCK_N"],
            BLOCK_K=cfg["BLOCK_K"],
            QUANT=code,
            GROUP=group,
            num_warps=cfg["num_warps"],
        )
