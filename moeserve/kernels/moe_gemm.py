"""The grouped GEMM of the fused MoE: rows sorted and block-aligned by expert (moe_align), one
expert's weights per row block, split-K partial sums at decode; and its launch configs.

Nothing here reads device memory on the host and every grid follows from the input shapes
alone, so a CUDA graph captured once replays for any routing of the same T.

Shapes: R = T*K assignments, P aligned slots, Q row blocks, E experts, N output and K reduced
columns of a weight [E, N, K], S split-K partials.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import interpreting, k_splits, pdl
from moeserve.kernels.moe_quant import (
    load_weights,
    quant_code,
)
from moeserve.kernels.mxfp4 import mxfp4_group_scale, mxfp4_nibbles, packed_decode
from moeserve.kernels.pdl import wait_prior
from moeserve.kernels.quant import FP8_GROUP, real_k

# Launch configs tuned by vLLM for Mixtral (E=8, top-2, D=4096) in bf16 on an H100 SXM, keyed by
# the token count M: vllm/model_executor/layers/fused_moe/configs/
# E=8,N=7168,device_name=NVIDIA_H100_80GB_HBM3.json (there is no bf16 H100 table for N=14336;
# the H200 one makes much the same choices). Its noisy rows for M <= 32 are merged into their
# most common choice. vLLM takes the entry of the nearest key, so each row here runs up to the
# midpoint between its key and the next one.
# (max M, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
_H100_TABLE: tuple[tuple[int, int, int, int, int, int, int], ...] = (
    (40, 16, 128, 128, 1, 4, 4),  # decode: a few rows per expert, so one 16-row block each
    (112, 32, 128, 128, 1, 4, 4),
    (384, 64, 128, 128, 1, 4, 4),
    (768, 64, 256, 64, 16, 4, 4),
    (1 << 62, 128, 256, 64, 16, 8, 4),  # prefill
)


def pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def gemm_config(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    N: int,
    K: int,
    dtype: torch.dtype,
    quant: str = "",
) -> dict[str, int]:
    """Block sizes for one grouped GEMM of M = num_tokens * top_k rows, [N, K] weights
    (stored as `quant`; BLOCK_M does not depend on it: the alignment is computed before)."""
    if interpreting():  # the interpreter runs every program in Python: tiny tiles keep CI fast
        block_m, block_n, block_k, group_m, warps, stages = 16, 16, 16, 1, 4, 1
    else:
        # The table is for Mixtral's 2 of 8 experts; other models look it up at the same
        # average rows per expert, which is what BLOCK_M has to fit.
        mixtral_m = num_tokens * top_k * 4 // max(num_experts, 1)
        row = next(r for r in _H100_TABLE if mixtral_m <= r[0])
        _, block_m, block_n, block_k, group_m, warps, stages = row
        if block_m == 16 and N <= 8192:
            # A down projection at decode: 128-wide tiles leave most SMs idle (4096 / 128 x 2
            # experts = 64 programs); 64 wide with a deeper pipeline streams the weights faster
            # (benchmarks/kernel_bench.py).
            block_n, stages = 64, 5
        if quant == "fp8" and block_m > 16:
            # Quantized tiles need a second accumulator-sized product per K tile (scaled
            # before it is added): 256 columns spill registers. vLLM's block-FP8 MoE shape.
            block_n, block_k, stages = 128, 128, 3
            warps = 8 if block_m >= 128 else 4
        if dtype == torch.float32:
            # Twice the bytes per element: keep the shared-memory ring of A and B tiles under
            # the H100's 227 KiB.
            block_k, stages = min(block_k, 32), min(stages, 3)
    if quant == "mxfp4":
        # K tiles of one exponent group (the kernel's mxfp4 path needs it): the scale
        # multiplies each tile's product, not each weight.
        block_k = 32
    block_n, block_k = min(block_n, pow2_at_least_16(N)), min(block_k, pow2_at_least_16(K))
    split = 1
    if not interpreting() and block_m == 16:
        split = _split_k(num_tokens * top_k, num_experts, N, K, block_n, block_k)
    return dict(
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=group_m,
        num_warps=warps,
        num_stages=stages,
        SPLIT_K=split,
    )


# The fewest K blocks a split may have.
_MIN_K_BLOCKS = 8


def _split_k(assignments: int, num_experts: int, N: int, K: int, block_n: int, block_k: int) -> int:
    """K splits for a decode GEMM: enough programs to fill the SMs, each split long enough to
    stream (few experts, one row block each: the grid is experts x N tiles)."""
    programs = min(assignments, num_experts) * triton.cdiv(N, block_n)
    return k_splits(programs, triton.cdiv(K, block_k), _MIN_K_BLOCKS, 8)


def moe_block_m(
    num_tokens: int, num_experts: int, top_k: int, inter: int, hidden: int, dtype: torch.dtype
) -> int:
    """The row block fused_moe groups assignments by, for an alignment computed outside."""
    return gemm_config(num_tokens, num_experts, top_k, 2 * inter, hidden, dtype)["BLOCK_M"]


# Arguments that change from step to step are not specialised on (Triton would compile a
# variant per divisibility-by-16 pattern, in the middle of serving).
@triton.jit(do_not_specialize=["P", "num_assignments"])
def _moe_gemm_kernel(
    a_ptr,  # [rows, K]: x_TD for GEMM 1, h_RF for GEMM 2
    b_ptr,  # [slots, N, K]: one nn.Linear weight per expert
    c_ptr,  # [R, N], row = assignment id; [SPLIT_K, R, N] float32 partial sums when split
    routed_weight_ptr,  # [R] float32
    bias_ptr,  # [slots, N] (HAS_BIAS)
    sorted_ids_ptr,
    block_expert_ptr,
    num_post_pad_ptr,
    expert_slot_ptr,
    b_scale_ptr,  # [slots, N, ceil(K/GROUP)] (QUANT)
    a_scale_ptr,  # [rows, ceil(K/128)] float32 (FP8_DOT: a is float8_e4m3fn)
    N,
    K,
    P,
    num_assignments,
    stride_am,
    stride_ak,
    stride_be,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    stride_cs,
    stride_bias,
    stride_bse,
    stride_bsn,
    stride_bsk,
    stride_as,
    ROWS_PER_A: tl.constexpr,  # top_k for GEMM 1 (token = id // top_k), 1 for GEMM 2
    MUL_ROUTED_WEIGHT: tl.constexpr,
    HAS_EXPERT_SLOT: tl.constexpr,
    HAS_BIAS: tl.constexpr,  # add the expert's bias to its rounded output (x @ W + b)
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 models: torch's matmul uses no TF32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
    QUANT: tl.constexpr,  # moe_quant.QUANT_CODES: 0 plain weights, 1 fp8, 2 mxfp4
    GROUP: tl.constexpr,  # K elements per weight scale
    FP8_DOT: tl.constexpr,  # fp8 x fp8 tensor-core dots (QUANT 1, BLOCK_K divides 128)
    PACKED: tl.constexpr,  # mxfp4: mxfp4.e2m1x4_as_fp16's packed decode
):
    wait_prior()
    # Programs that run back to back take GROUP_M row blocks for one column tile, so a B tile
    # (weights: the big operand) is read from L2 rather than HBM by the blocks of one expert.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(P, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    # The grid covers the worst case P; blocks past the used length have nothing to do.
    if pid_m * BLOCK_M >= tl.load(num_post_pad_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    if HAS_EXPERT_SLOT:
        expert = tl.load(expert_slot_ptr + expert)
    expert = expert.to(tl.int64)  # slot * stride_be can pass 2**31 elements

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ids = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)  # P is a multiple of BLOCK_M
    row_ok = ids < num_assignments  # padding entries hold num_assignments
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    # This program's share of the K blocks (all of them unless split).
    k_blocks = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_blocks, SPLIT_K)
    k_first = tl.program_id(1) * per_split
    k_last = tl.minimum(k_first + per_split, k_blocks)
    a_rows = a_ptr + (ids // ROWS_PER_A)[:, None] * stride_am
    b_base = b_ptr + expert * stride_be
    s_base = b_scale_ptr + expert * stride_bse
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_first, k_last):
        kk = k * BLOCK_K + offs_k
        k_ok = kk < K
        if QUANT == 2:
            # mxfp4, a K tile of one exponent group (BLOCK_K == GROUP): its 16 bytes a column
            # give the even k (low nibbles) and the odd k (high nibbles), each a dot with
            # those columns of the activations, so no register shuffle interleaves them; the
            # group's scale then multiplies the tile's product once.
            # K is a multiple of the group, so the tile lies inside K: masks by row and column
            # only, which lets a thread load its bytes (and activations) as vectors; a mask
            # on `bk * 2 < K` made every byte a load of its own. The activations load as
            # one [BLOCK_M, BLOCK_K] tile split into even and odd columns in registers.
            bk = k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
            b_ptrs = b_base + offs_n[None, :] * stride_bn + bk[:, None] * stride_bk
            byte = tl.load(b_ptrs, mask=col_ok[None, :], other=0)
            a = tl.load(a_rows + kk[None, :] * stride_ak, mask=row_ok[:, None], other=0.0)
            a_even, a_odd = tl.split(tl.reshape(a, (BLOCK_M, BLOCK_K // 2, 2)))
            lo, hi = mxfp4_nibbles(byte, PACKED)
            part = tl.dot(a_even, lo.to(a_even.dtype), input_precision=DOT_PRECISION)
            part = tl.dot(a_odd, hi.to(a_even.dtype), part, input_precision=DOT_PRECISION)
            e = tl.load(s_base + offs_n * stride_bsn + k * stride_bsk, mask=col_ok, other=0)
            acc += part * mxfp4_group_scale(e, PACKED)[None, :]
        else:
            a_mask = row_ok[:, None] & k_ok[None, :]
            a = tl.load(a_rows + kk[None, :] * stride_ak, mask=a_mask, other=0.0)
            b_mask = k_ok[:, None] & col_ok[None, :]
            b_ptrs = b_base + offs_n[None, :] * stride_bn + kk[:, None] * stride_bk
            if FP8_DOT:
                # other=0: a NaN byte past K would poison the dot even against a's zeros
                b = tl.load(b_ptrs, mask=b_mask, other=0.0)
                g = (k * BLOCK_K) // GROUP  # the tile's scale group, activations and weights
                a_s = tl.load(
                    a_scale_ptr + (ids // ROWS_PER_A) * stride_as + g, mask=row_ok, other=0.0
                )
                b_s = tl.load(s_base + offs_n * stride_bsn + g * stride_bsk, mask=col_ok, other=0.0)
                acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
            elif QUANT == 1 and BLOCK_K <= GROUP:
                # One scale per column of the tile: the float8 values go to the tensor cores
                # in the activations' dtype (exact) and the scale multiplies the tile's
                # product, BLOCK_N multiplies instead of BLOCK_K * BLOCK_N.
                b = tl.load(b_ptrs, mask=b_mask)
                g = (k * BLOCK_K) // GROUP
                b_s = tl.load(s_base + offs_n * stride_bsn + g * stride_bsk, mask=col_ok, other=0.0)
                part = tl.dot(a, b.to(a.dtype), input_precision=DOT_PRECISION)
                acc += part * b_s[None, :]
            else:
                b = load_weights(
                    b_base, s_base, offs_n[None, :], kk[:, None], b_mask,
                    stride_bn, stride_bk, stride_bsn, stride_bsk, QUANT, GROUP,
                )  # fmt: skip
                acc = tl.dot(a, b.to(a.dtype), acc, input_precision=DOT_PRECISION)

    if SPLIT_K > 1:  # the reader adds the partials, rounds and weighs
        c_ptrs = c_ptr + tl.program_id(1) * stride_cs + ids[:, None] * stride_cm
        c_ptrs += offs_n[None, :] * stride_cn
        tl.store(c_ptrs, acc, mask=row_ok[:, None] & col_ok[None, :])
        return
    if HAS_BIAS:  # rounded first, as the product would be before the reference's add
        bias = tl.load(bias_ptr + expert * stride_bias + offs_n, mask=col_ok, other=0.0)
        acc = acc.to(c_ptr.dtype.element_ty).to(tl.float32) + bias.to(tl.float32)[None, :]
    if MUL_ROUTED_WEIGHT:
        # The readable path rounds the expert output to the model dtype, then multiplies the
        # float32 weight; do the same so both round alike.
        w = tl.load(routed_weight_ptr + ids, mask=row_ok, other=0.0)
        acc = acc.to(c_ptr.dtype.element_ty).to(tl.float32) * w[:, None]
    c_ptrs = c_ptr + ids[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def moe_gemm(
    a: torch.Tensor,
    b_ENK: torch.Tensor,
    c_RN: torch.Tensor,
    routed_weight_R: torch.Tensor | None,
    sorted_ids_P: torch.Tensor,
    block_expert_Q: torch.Tensor,
    num_post_pad_1: torch.Tensor,
    expert_slot_E: torch.Tensor | None,
    rows_per_a: int,
    cfg: dict[str, int],
    bias_EN: torch.Tensor | None = None,
    *,
    b_scale: torch.Tensor | None = None,
    quant: str = "",
    a_scale: torch.Tensor | None = None,
) -> None:
    """c_RN: [R, N], or [split, R, N] float32 partials when cfg["SPLIT_K"] > 1 (then no
    routed weight and no bias: the reader applies them). bias_EN: each expert's output bias
    (indexed like the weights). quant, b_scale: the weights' storage format (kernels.quant).
    a_scale: the fp8 activations' scales (moe_quant.quantize_fp8_act) when `a` is float8:
    the GEMM then runs on the FP8 tensor cores (fp8 weights only)."""
    N, K = b_ENK.shape[1], real_k(b_ENK, quant)
    code, group = quant_code(quant)
    fp8_dot = a_scale is not None
    assert not fp8_dot or (quant == "fp8" and FP8_GROUP % cfg["BLOCK_K"] == 0), cfg
    assert (b_scale is None) == (quant == ""), "quantized weights need their scales"
    assert quant != "mxfp4" or cfg["BLOCK_K"] == group, "mxfp4 K tiles are one exponent group"
    if b_scale is not None:
        assert b_scale.shape[:2] == b_ENK.shape[:2] and b_scale.shape[2] == -(-K // group)
    P = sorted_ids_P.numel()
    split = cfg["SPLIT_K"]
    assert split == 1 or (c_RN.dim() == 3 and c_RN.dtype == torch.float32)
    assert split == 1 or (routed_weight_R is None and bias_EN is None)
    grid = (triton.cdiv(P, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), split)
    _moe_gemm_kernel[grid](
        a,
        b_ENK,
        c_RN,
        routed_weight_R if routed_weight_R is not None else c_RN,  # unused pointer
        bias_EN if bias_EN is not None else c_RN,  # unused pointer
        sorted_ids_P,
        block_expert_Q,
        num_post_pad_1,
        expert_slot_E if expert_slot_E is not None else block_expert_Q,  # unused pointer
        b_scale if b_scale is not None else c_RN,  # unused pointers
        a_scale if a_scale is not None else c_RN,
        N,
        K,
        P,
        c_RN.shape[-2],
        a.stride(0),
        a.stride(1),
        b_ENK.stride(0),
        b_ENK.stride(1),
        b_ENK.stride(2),
        c_RN.stride(-2),
        c_RN.stride(-1),
        c_RN.stride(0) if split > 1 else 0,
        bias_EN.stride(0) if bias_EN is not None else 0,
        *(b_scale.stride() if b_scale is not None else (0, 0, 0)),
        a_scale.stride(0) if a_scale is not None else 0,
        ROWS_PER_A=rows_per_a,
        MUL_ROUTED_WEIGHT=routed_weight_R is not None,
        HAS_EXPERT_SLOT=expert_slot_E is not None,
        HAS_BIAS=bias_EN is not None,
        # "tf32" is Triton's default, and only affects float32 inputs.
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        SPLIT_K=split,
        QUANT=code,
        GROUP=group,
        FP8_DOT=fp8_dot,
        PACKED=packed_decode(),
        **pdl.LAUNCH,
    )
