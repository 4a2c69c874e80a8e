"""A few-row linear layer as split-K partial sums, added up by the kernel that reads it.

At batch 1 cuBLAS runs the router (8 x 4096) as a split-K GEMV plus a reduction kernel, and
the attention output projection the same way: two launches and a gap each, for a handful of
microseconds of work. Here the K range is cut among programs that each write a float32
partial [split, T, N]; the consumer (the routing program, the residual-add norm) adds the
partials in a fixed order and rounds to the model dtype, where F.linear would have rounded
its output. One launch fewer per use, and the reduction costs nothing extra. One row (batch-1
decode) takes a GEMV (_gemv_partials_kernel): each program streams whole weight rows against
the activation row with several K tiles in flight, where a tensor-core dot would pad the row to
16 and leave a dense projection a few programs an SM.
Twin: F.linear (what `reduce_partials` of these partials equals, up to float32 summation order).

FP8 weights (kernels.quant: float8_e4m3fn [N, K] with a float32 scale per row and 128
columns) are dequantized tile by tile in registers, rounded to the activations' dtype as the
readable path's `dequantize` rounds them, then multiplied on the tensor cores: half the
weight bytes of bf16, for up to FP8_MAX_ROWS rows (beyond that a GEMM on the dequantized
weight is cheaper than re-reading it per 64-row tile). One row (batch-1 decode) instead takes
the MoE GEMVs' group dot (kernels.moe_gemv): no 16-row dot for one real row, each group's dot
scaled once rather than each weight converted and rounded, so the weight streams near the
copy rate (the dot path spent about twice the bytes' time dequantizing).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import interpreting, k_splits, pdl
from moeserve.kernels.moe_gemv_plan import gemv_config
from moeserve.kernels.moe_quant import quant_tile, x_tile
from moeserve.kernels.norm_rope import inv_rms, load_partials, rms_norm, scale_normed
from moeserve.kernels.pdl import wait_prior
from moeserve.kernels.quant import FP8_GROUP

# Rows up to which the split path is used: beyond this the partials' traffic and the
# register tile grow while cuBLAS's one GEMM is already efficient.
MAX_ROWS = 16
FP8_MAX_ROWS = 64
_MAX_SPLIT = 32
# An RMSNorm the projection applies to its input first: (weight [K], eps).
InputNorm = tuple[torch.Tensor, float]
# 1: a one-row GEMV norms its input itself; 0: the norm kernel runs first (A/B: gpu_speed.py
# --set linear.NORM_IN_GEMV=0).
NORM_IN_GEMV = 1


def applicable(x_TD: torch.Tensor, scaled: bool = False) -> bool:
    """Whether linear_partials takes x (`scaled`: for an FP8 weight)."""
    rows = FP8_MAX_ROWS if scaled else MAX_ROWS
    return 0 < x_TD.shape[0] <= rows and x_TD.stride(-1) == 1


def config(t: int, n: int, k: int, scaled: bool = False) -> dict[str, int]:
    """Tiles and splits: enough programs to fill the SMs; a split streams at least
    `min_k` K blocks when the weight is large (short splits only pay off for a tiny N).
    `scaled` (FP8 weights): K tiles inside one 128-column scale group."""
    if interpreting():
        block_n, block_k = 16, 16
    else:
        block_n = 16 if n <= 16 else 32 if n <= 64 else 64
        block_k = 256 if n <= 16 and not scaled else 128
    block_m = 16 if t <= 16 else 64  # tl.dot's smallest M is 16; rows past T are masked
    programs = triton.cdiv(t, block_m) * triton.cdiv(n, block_n)
    min_k = 8 if n * k >= 1 << 20 else 1
    split = k_splits(programs, triton.cdiv(k, block_k), min_k, _MAX_SPLIT)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=split)


@triton.jit(do_not_specialize=["T"])
def _linear_partials_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    bias_ptr,
    scale_ptr,  # [N, ceil(K/GROUP)] float32 (HAS_SCALE)
    T,
    N,
    K,
    stride_xt,
    stride_wn,
    stride_os,
    stride_ot,
    stride_sn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    W_FLOAT32: tl.constexpr,
    GROUP: tl.constexpr,
):
    wait_prior()
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < T
    col_ok = offs_n < N
    k_blocks = tl.cdiv(K, BLOCK_K)
    per = tl.cdiv(k_blocks, SPLIT)
    k_first = s * per
    k_last = tl.minimum(k_first + per, k_blocks)
    offs_k = k_first * BLOCK_K + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xt + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(k_first, k_last):
        k_ok = offs_k < K - (kb - k_first) * BLOCK_K
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if W_FLOAT32:  # a float32 router: the reference's GEMM on float32 activations
            a = a.to(tl.float32)
        if HAS_SCALE:  # the tile's scale group: BLOCK_K divides GROUP
            g = (kb * BLOCK_K) // GROUP
            sc = tl.load(scale_ptr + offs_n * stride_sn + g, mask=col_ok, other=0.0)
            b = (b.to(tl.float32) * sc[None, :]).to(a.dtype)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:  # in the first partial only, so the sum holds it once
        bias = tl.load(bias_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)
        acc += bias[None, :] * (s == 0).to(tl.float32)
    out = out_ptr + s * stride_os + offs_m[:, None] * stride_ot + offs_n[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _gemv_partials_kernel(
    x_ptr,  # [1, K]
    w_ptr,  # [N, K]: the model dtype, float32 (a router) or float8_e4m3fn (QUANT)
    out_ptr,  # [SPLIT, 1, N] float32
    bias_ptr,
    scale_ptr,  # [N, ceil(K/GROUP)] float32 (QUANT)
    norm_ptr,  # [K] (NORM)
    N,
    K,
    stride_wn,
    stride_os,
    stride_sn,
    eps,
    HAS_BIAS: tl.constexpr,
    QUANT: tl.constexpr,  # 0 plain, 1 fp8 (moe_quant.QUANT_CODES)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
    LOOP_STAGES: tl.constexpr,
    NORM: tl.constexpr = False,  # x is RMSNormed first (norm_rope.rms_norm's rounding)
    BLOCK_ROW: tl.constexpr = 1,  # (NORM) K padded to a power of two
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    s = tl.program_id(1)
    # This program's K range: whole tiles (of whole scale groups), as in moe_gemv's down.
    per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), tl.num_programs(1)) * BLOCK_K
    k_first = s * per_split
    k_end = tl.minimum(k_first + per_split, K)
    if QUANT == 0:  # float32 products of the stored values, summed in float32 (as a dot)
        # The first K tile's weights load before the wait (pdl.wait_prior): no kernel writes
        # them, and the kernels before are short ones whose run they overlap. (Two or four
        # tiles there ran decode at 0.44x and 0.28x: benchmarks/RESULTS.md.)
        kk0 = k_first + tl.arange(0, BLOCK_K)
        k_ok0 = kk0 < k_end
        w_rows = w_ptr + offs_n[:, None] * stride_wn
        w0 = tl.load(w_rows + kk0[None, :], mask=n_ok[:, None] & k_ok0[None, :], other=0.0)
        wait_prior()
        inv = _row_inv_rms(x_ptr, K, eps, NORM, BLOCK_ROW)
        x0 = tl.load(x_ptr + kk0, mask=k_ok0, other=0.0).to(tl.float32)
        if NORM:
            x0 = scale_normed(x0, inv, norm_ptr, kk0, k_ok0, x_ptr.dtype.element_ty)
            x0 = x0.to(tl.float32)
        acc = w0.to(tl.float32) * x0[None, :]
        for k0 in tl.range(k_first + BLOCK_K, k_end, BLOCK_K, num_stages=LOOP_STAGES):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < k_end
            x = tl.load(x_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
            if NORM:
                x = scale_normed(x, inv, norm_ptr, kk, k_ok, x_ptr.dtype.element_ty)
                x = x.to(tl.float32)
            m = n_ok[:, None] & k_ok[None, :]
            w = tl.load(w_rows + kk[None, :], mask=m, other=0.0)
            acc += w.to(tl.float32) * x[None, :]
    else:
        wait_prior()
        inv = _row_inv_rms(x_ptr, K, eps, NORM, BLOCK_ROW)
        G: tl.constexpr = BLOCK_K // GROUP
        acc = tl.zeros((BLOCK_N, G), dtype=tl.float32)
        for k0 in tl.range(k_first, k_end, BLOCK_K, num_stages=LOOP_STAGES):
            x = x_tile(x_ptr, k0, K, GROUP, G)
            if NORM:  # x_tile's [1, G, GROUP] indices
                kk = (k0 + tl.arange(0, G)[:, None] * GROUP + tl.arange(0, GROUP)[None, :])[None]
                x = scale_normed(x, inv, norm_ptr, kk, kk < K, x_ptr.dtype.element_ty)
                x = x.to(tl.float32)
            acc += quant_tile(
                w_ptr, scale_ptr, offs_n, n_ok, x, k0, K, stride_wn, stride_sn, 1, GROUP, G
            )
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:  # in the first partial only, so the sum holds it once
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        out += bias * (s == 0).to(tl.float32)
    tl.store(out_ptr + s * stride_os + offs_n, out, mask=n_ok)


@triton.jit
def _row_inv_rms(x_ptr, K, eps, NORM: tl.constexpr, BLOCK_ROW: tl.constexpr):
    """With NORM, 1 / RMS of the whole row at x_ptr (each program reads it: a few KB from L2,
    where a norm kernel before the GEMV would cost a launch); else 1."""
    if not NORM:
        return 1.0
    offs = tl.arange(0, BLOCK_ROW)
    return inv_rms(tl.load(x_ptr + offs, mask=offs < K, other=0.0).to(tl.float32), K, eps)


# The one-row GEMV's tiles (BLOCK_N rows, BLOCK_K columns, warps, K tiles in flight), plain
# weights as the MoE gate/up GEMV's (moe_gemv_plan._GEMV_TILES), and the fewest K tiles a split
# streams: a dense projection (Mixtral's qkv: 6144 x 4096) has few rows of tiles, so K is cut
# finer than the MoE down projection's to give each SM several programs. The 16-row tensor-core
# dot at one row left gpt-oss-120b's qkv (5120 x 2880) 160 programs for 132 SMs: 12.8 us,
# 2.3 TB/s (H100 profile, 2026-12-06).
_GEMV_TILES = {"": (16, 256, 4, 3), "fp8": (32, 512, 4, 1)}
_GEMV_MIN_K_TILES = 2


def gemv_partials_config(n: int, k: int, quant: str = "") -> dict[str, int]:
    """The one-row GEMV's launch: its tile and the K splits that fill the SMs."""
    if interpreting():
        return gemv_config(n, k, quant, rows=1)
    block_n, block_k, warps, stages = _GEMV_TILES[quant]
    least = FP8_GROUP if quant else 16
    block_k = max(min(block_k, triton.next_power_of_2(k)), least)
    programs = triton.cdiv(n, block_n)
    # A router's few rows split down to single tiles: its programs are all latency.
    min_k = _GEMV_MIN_K_TILES if n * k >= 1 << 20 else 1
    split = k_splits(programs, triton.cdiv(k, block_k), min_k, _MAX_SPLIT, per_sm=8)
    return dict(
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, SPLIT_K=split, loop_stages=stages
    )


def _gemv_partials(
    x_1K: torch.Tensor,
    w_NK: torch.Tensor,
    bias_N: torch.Tensor | None,
    w_scale: torch.Tensor | None,
    cfg: dict[str, int] | None = None,  # gemv_partials_config's (kernel_bench sweeps it)
    norm: InputNorm | None = None,
) -> torch.Tensor:
    n, k = w_NK.shape
    quant = "fp8" if w_scale is not None else ""
    cfg = cfg or gemv_partials_config(n, k, quant)
    out = torch.empty(cfg["SPLIT_K"], 1, n, dtype=torch.float32, device=x_1K.device)
    _gemv_partials_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"])](
        x_1K,
        w_NK,
        out,
        bias_N if bias_N is not None else out,  # unused pointers
        w_scale if w_scale is not None else out,
        norm[0] if norm is not None else x_1K,
        n,
        k,
        w_NK.stride(0),
        out.stride(0),
        w_scale.stride(0) if w_scale is not None else 0,
        float(norm[1]) if norm is not None else 0.0,
        HAS_BIAS=bias_N is not None,
        QUANT=1 if quant else 0,
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        GROUP=FP8_GROUP,
        LOOP_STAGES=cfg.get("loop_stages", 1),
        NORM=norm is not None,
        BLOCK_ROW=triton.next_power_of_2(k) if norm is not None else 1,
        num_warps=cfg["num_warps"],
        **pdl.LAUNCH,
    )
    return out


def linear_partials(
    x_TK: torch.Tensor,
    w_NK: torch.Tensor,
    bias_N: torch.Tensor | None = None,
    w_scale: torch.Tensor | None = None,
    norm: InputNorm | None = None,
) -> torch.Tensor:
    """float32 [split, T, N] whose sum over dim 0 is x @ w.T (+ bias_N, held by the first).
    w_scale: w is FP8 with these scales [N, ceil(K/128)] (kernels.quant). A float32 w (a
    float32 router) takes x in float32, as F.linear(x.float(), w) does. norm: x is first
    RMSNormed as norm_rope.rms_norm does; one row does it inside the GEMV (one launch fewer
    ahead of an attention block), more take the norm kernel."""
    t, k = x_TK.shape
    assert w_NK.shape[1] == k and x_TK.stride(1) == 1 and w_NK.stride(1) == 1
    scaled = w_scale is not None
    assert not scaled or (w_NK.dtype == torch.float8_e4m3fn and w_scale.stride(1) == 1)
    if t == 1 and (norm is None or NORM_IN_GEMV):  # a GEMV: one row needs no 16-row dot
        return _gemv_partials(x_TK, w_NK, bias_N, w_scale, norm=norm)
    if norm is not None:
        x_TK = rms_norm(x_TK, *norm)
    if t == 1:
        return _gemv_partials(x_TK, w_NK, bias_N, w_scale)
    return dot_partials(x_TK, w_NK, bias_N, w_scale)


def dot_partials(
    x_TK: torch.Tensor,
    w_NK: torch.Tensor,
    bias_N: torch.Tensor | None = None,
    w_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """linear_partials on the tensor cores at any row count (rows past T padded to the dot's
    16); linear_partials takes it from two rows up."""
    t, k = x_TK.shape
    n = w_NK.shape[0]
    scaled = w_scale is not None
    cfg = config(t, n, k, scaled)
    out = torch.empty(cfg["SPLIT"], t, n, dtype=torch.float32, device=x_TK.device)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(t, cfg["BLOCK_M"]), cfg["SPLIT"])
    _linear_partials_kernel[grid](
        x_TK,
        w_NK,
        out,
        bias_N if bias_N is not None else out,  # unused pointer without a bias
        w_scale if scaled else out,
        t,
        n,
        k,
        x_TK.stride(0),
        w_NK.stride(0),
        out.stride(0),
        out.stride(1),
        w_scale.stride(0) if scaled else 0,
        DOT_PRECISION="ieee" if torch.float32 in (x_TK.dtype, w_NK.dtype) else "tf32",
        HAS_BIAS=bias_N is not None,
        HAS_SCALE=scaled,
        W_FLOAT32=w_NK.dtype == torch.float32,
        GROUP=FP8_GROUP,
        num_warps=4,
        num_stages=1 if interpreting() else 4,
        **cfg,
        **pdl.LAUNCH,
    )
    return out


@triton.jit
def _reduce_kernel(part_ptr, out_ptr, M, stride_s, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    wait_prior()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M
    tl.store(out_ptr + offs, load_partials(part_ptr, offs, ok, stride_s, out_ptr, SPLIT), mask=ok)


_REDUCE_BLOCK = 1024


def reduce_partials(partials_STN: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The sum of the partials, rounded as F.linear's output (for a consumer that cannot read
    them): on the GPU one kernel (launched with PDL, so the GEMV's neighbours overlap it as
    they do each other), else the readable sum."""
    if partials_STN.is_cuda and partials_STN.is_contiguous():
        return sum_partials(partials_STN, dtype)
    return partials_STN.sum(0).to(dtype)


def sum_partials(partials_STN: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """reduce_partials' kernel: the S contiguous partials summed in order, rounded once."""
    split, t, n = partials_STN.shape
    out = torch.empty(t, n, dtype=dtype, device=partials_STN.device)
    m = t * n
    _reduce_kernel[(triton.cdiv(m, _REDUCE_BLOCK),)](
        partials_STN,
        out,
        m,
        partials_STN.stride(0),
        SPLIT=split,
        BLOCK=_REDUCE_BLOCK,
        num_warps=4,
        **pdl.LAUNCH,
    )
    return out
