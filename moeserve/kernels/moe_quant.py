"""Quantized expert weights inside the fused MoE's Triton kernels (formats: kernels.quant).

load_weights reads a tile of a stored weight and dequantizes it in registers (weight-only
quantization: the GEMM then runs in the activation dtype). x_tile and quant_tile are the fp8
GEMVs' form (moe_gemv, linear): a tile's dot with one activation row per scale group, each
group's sum scaled once (MXFP4's: kernels.mxfp4). For prefill with fp8
weights the grouped GEMM instead runs on the FP8 tensor cores: quantize_fp8_act quantizes the
activations per row and group of 128 (dynamic scales, as vLLM's per-token-group fp8 path),
and moe_gemm multiplies each 128-wide K tile's float32 product by both scales.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import interpreting, pdl
from moeserve.kernels.pdl import wait_prior
from moeserve.kernels.quant import FP8_GROUP, group_size

# constexpr codes of the formats in the kernels
QUANT_CODES = {"": 0, "fp8": 1, "mxfp4": 2}


def quant_code(quant: str) -> tuple[int, int]:
    """(QUANT, GROUP) constexprs for a format; GROUP is 1 for plain weights (unused)."""
    if quant not in QUANT_CODES:
        raise ValueError(f"unknown weight quantization {quant!r}; known: {tuple(QUANT_CODES)}")
    return QUANT_CODES[quant], group_size(quant) if quant else 1


@triton.jit
def load_weights(
    w_ptr,  # one expert's stored weight [N, K]
    s_ptr,  # its scales [N, ceil(K/GROUP)] (fp8)
    n,  # output-row indices, broadcastable against k
    k,  # K indices
    mask,  # the tile's mask, shaped as n + k
    stride_wn,
    stride_wk,
    stride_sn,
    stride_sk,
    QUANT: tl.constexpr,  # 0 plain, 1 fp8 (a tile across scale groups: a scale per element)
    GROUP: tl.constexpr,
):
    """The weights at [n, k]: as stored when plain, else dequantized to float32. (The grouped
    GEMM takes MXFP4, and FP8 tiles inside one group, apart: a scale per tile column.)"""
    tl.static_assert(QUANT < 2, "mxfp4 tiles decode in moe_gemm")
    w = tl.load(w_ptr + n * stride_wn + k * stride_wk, mask=mask, other=0.0)
    if QUANT == 1:
        scale = tl.load(s_ptr + n * stride_sn + (k // GROUP) * stride_sk, mask=mask, other=0)
        w = w.to(tl.float32) * scale
    return w


@triton.jit
def _round_to_e4m3(x):
    """x (|x| <= 448) rounded to nearest-even on the float8_e4m3fn grid, in float32: Triton
    3.9's interpreter converts float32 to float8 without carrying a rounded-up mantissa into
    the exponent (7.98 becomes 4), so under it the cast gets values it need not round."""
    a = tl.abs(x)
    e = tl.maximum(tl.floor(tl.log2(tl.maximum(a, 1e-30))), -6.0)  # e4m3's subnormals: -6
    step = tl.exp2(e - 3.0)  # 3 mantissa bits
    # 1.5 * 2**23 has ulp 1: adding it rounds a / step (< 16) to an integer, ties to even
    r = ((a / step + 12582912.0) - 12582912.0) * step
    return tl.where(x < 0, -r, r)


@triton.jit
def _quant_fp8_act_kernel(
    x_ptr,  # [M, K] activations
    q_ptr,  # [M, K] float8_e4m3fn
    s_ptr,  # [M, ceil(K/128)] float32
    K,
    stride_x,
    stride_q,
    stride_s,
    GROUP: tl.constexpr,
    PRE_ROUND: tl.constexpr,  # under the interpreter (see _round_to_e4m3)
):
    wait_prior()
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    offs = g * GROUP + tl.arange(0, GROUP)
    ok = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    # 448: float8_e4m3fn's largest; an all-zero group gets scale 1 (no division by zero)
    scale = tl.where(amax > 0, amax / 448.0, 1.0)
    q = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)  # amax / scale may round past 448
    if PRE_ROUND:
        q = _round_to_e4m3(q)
    tl.store(q_ptr + row * stride_q + offs, q.to(tl.float8e4nv), mask=ok)
    tl.store(s_ptr + row * stride_s + g, scale)


def quantize_fp8_act(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn [M, K], float32 [M, ceil(K/128)]): per row and group of 128 elements,
    scale = amax / 448 (1 for an all-zero group)."""
    M, K = x_MK.shape
    assert x_MK.stride(1) == 1
    G = triton.cdiv(K, FP8_GROUP)
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x_MK.device)
    s = torch.empty(M, G, dtype=torch.float32, device=x_MK.device)
    if M:
        _quant_fp8_act_kernel[(M, G)](
            x_MK,
            q,
            s,
            K,
            x_MK.stride(0),
            q.stride(0),
            s.stride(0),
            GROUP=FP8_GROUP,
            PRE_ROUND=interpreting(),
            **pdl.LAUNCH,
        )
    return q, s


# The grouped GEMM takes the FP8 tensor cores from this row block up. A Mixtral layer on an
# H200 (benchmarks/RESULTS.md, issue 22), against the bf16 kernels: at 64 tokens (32-row
# blocks) 1.42x with fp8 dots, 0.99x weight-only; at 512 1.05x vs 0.65x; at 16 tokens
# (16-row blocks) weight-only is 1.21x, and the activations' quantization pass would be one
# launch more per GEMM for little compute.
FP8_DOT_MIN_BLOCK_M = 32


def takes_fp8_dot(quant: str, block_m: int) -> bool:
    return quant == "fp8" and block_m >= FP8_DOT_MIN_BLOCK_M and not interpreting()


def fp8_dot_config(cfg: dict[str, int], k_dim: int) -> dict[str, int]:
    """A grouped GEMM config for the FP8 tensor cores: K tiles within one scale group and at
    least 32 wide (fp8 dots need it), and a pipeline that fits the wider tiles' ring."""
    most = 32 if interpreting() else FP8_GROUP
    block_k = max(32, min(most, triton.next_power_of_2(k_dim)))
    return cfg | dict(BLOCK_K=block_k, num_stages=min(cfg["num_stages"], 3))


@triton.jit
def x_tile(x_row, k0, K, GROUP: tl.constexpr, G: tl.constexpr):
    """The activations of the K tile [k0, k0 + G*GROUP) as [1, G, GROUP] float32, loaded once
    for every weight row of the program (fp8's quant_tile)."""
    kk = (k0 + tl.arange(0, G)[:, None] * GROUP + tl.arange(0, GROUP)[None, :])[None, :, :]
    return tl.load(x_row + kk, mask=kk < K, other=0.0).to(tl.float32)


@triton.jit
def quant_tile(
    w_e,  # one expert's stored fp8 weight [N, K]
    s_e,  # its scales [N, ceil(K/GROUP)]
    rows,  # [BLOCK_N] output rows
    n_ok,
    x,  # x_tile's activations
    k0,  # the tile's first K index (a multiple of GROUP)
    K,
    stride_wn,
    stride_sn,
    stride_sk,
    GROUP: tl.constexpr,
    G: tl.constexpr,  # scale groups in the tile
):
    """Sum over the K tile [k0, k0 + G*GROUP) of w[n, k] * x[k], per row and scale group:
    [BLOCK_N, G] float32, each group's dot scaled once (not each weight)."""
    g = k0 // GROUP + tl.arange(0, G)
    kk = (k0 + tl.arange(0, G)[:, None] * GROUP + tl.arange(0, GROUP)[None, :])[None, :, :]
    m = n_ok[:, None, None] & (kk < K)
    w = tl.load(w_e + rows[:, None, None] * stride_wn + kk, mask=m, other=0.0)
    part = tl.sum(w.to(tl.float32) * x, axis=2)
    s_ok = n_ok[:, None] & (g[None, :] * GROUP < K)
    s_at = s_e + rows[:, None] * stride_sn + g[None, :] * stride_sk
    return part * tl.load(s_at, mask=s_ok, other=0.0)
