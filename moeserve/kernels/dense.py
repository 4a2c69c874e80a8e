"""Dense linear layers at decode sizes (a few rows) in Triton: x @ W.T (+ bias).

At one token the attention projections are matrix-vector products that only stream their
weights; cuBLAS picks split-K kernels for them whose partial sums take a second launch and
whose tiles leave part of the HBM bandwidth unused (benchmarks/RESULTS.md). One program per
BLOCK_N output features reads its weight rows once, for every row of x, in one launch.
The readable twin is torch.nn.functional.linear; both accumulate in float32 and round once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import interpreting

MAX_ROWS = 16  # x rows one program holds (tl.dot needs 16); more rows go to cuBLAS


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def small_linear(
    x_MK: torch.Tensor,
    w_NK: torch.Tensor,
    bias_N: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """x @ w.T + bias for at most MAX_ROWS rows of x (contiguous rows; float32 with IEEE
    dots, as torch's matmul without TF32)."""
    M, K = x_MK.shape
    N = w_NK.shape[0]
    assert M <= MAX_ROWS and x_MK.stride(1) == 1 and w_NK.is_contiguous()
    out = torch.empty(M, N, dtype=x_MK.dtype, device=x_MK.device)
    if config is not None:  # (BLOCK_N, BLOCK_K, num_warps, num_stages): benchmarks
        block_n, block_k, warps, stages = config
    elif interpreting():
        block_n, block_k, warps, stages = 16, 16, 4, 1
    else:
        block_n, block_k, warps, stages = 16, 256, 4, 5
    _linear_kernel[(triton.cdiv(N, block_n),)](
        x_MK, w_NK, bias_N if bias_N is not None else w_NK, out, M, N, K,
        x_MK.stride(0), w_NK.stride(0), out.stride(0), HAS_BIAS=bias_N is not None,
        DOT_PRECISION="ieee" if x_MK.dtype == torch.float32 else "tf32",
        BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


@triton.jit
def _argmax_kernel(x_ptr, out_ptr, V, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    best = tl.full((), float("-inf"), tl.float32)
    best_i = tl.full((), 0, tl.int64)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + offs, mask=offs < V, other=float("-inf"))
        x = x.to(tl.float32)
        m = tl.max(x, 0)
        i = tl.argmax(x, 0, tie_break_left=True).to(tl.int64) + start
        take = m > best  # strictly: an equal value later in the row loses, as torch's argmax
        best_i = tl.where(take, i, best_i)
        best = tl.where(take, m, best)
    tl.store(out_ptr + row, best_i)


def argmax_rows(x_BV: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, dim=-1) (first index of the maximum) for rows free of NaN, in one
    program per row: torch's reduction runs a 32k-wide row in a single slow block."""
    B, V = x_BV.shape
    assert x_BV.stride(1) == 1
    out = torch.empty(B, dtype=torch.int64, device=x_BV.device)
    if B:
        block = 16 if interpreting() else 4096
        _argmax_kernel[(B,)](x_BV, out, V, x_BV.stride(0), BLOCK=block, num_warps=8)
    return out
