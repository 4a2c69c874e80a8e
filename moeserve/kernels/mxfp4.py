"""MXFP4 (E2M1 values, an E8M0 exponent per 32) inside the fused MoE's Triton kernels.

The grouped GEMM (moe_gemm) decodes weight tiles with mxfp4_nibbles and mxfp4_group_scale;
the one-token GEMVs (moe_gemv) take x_pairs and mxfp4_word_dot (float32 products, the
interpreter's) or x_group and mxfp4_group_dot (float16 pairs, a scale group a thread: the
GPU's where half_products says so). The decodes into float16 are exact; e8m0_factor restores
the power of two they leave out. Formats and storage: kernels.quant.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from moeserve.kernels import interpreting


def packed_decode() -> bool:
    """Whether the kernels decode mxfp4 with e2m1x4_as_fp16 (PTX: not under the interpreter,
    which runs e2m1_as_fp16; both give the same values)."""
    return not interpreting()


# e2m1_as_fp16 and e2m1x4_as_fp16 return E2M1 * 2**-OFFSET; e8m0_factor folds 2**OFFSET back.
FP16_EXP_OFFSET = tl.constexpr(14)
PACKED_EXP_OFFSET = tl.constexpr(6)


@triton.jit
def e2m1_as_fp16(byte, SHIFT: tl.constexpr):
    """The E2M1 nibble at bit SHIFT (0 or 4) of int32 `byte`, times 2**-14, as float16 (exact).

    The nibble's three magnitude bits placed at float16's bits 9..11 make its exponent and
    top mantissa bit: a float16 of value E2M1 * 2**-14, the subnormal 0.5 * 2**-14 included;
    the sign goes to bit 15. Five integer operations and no select, where a table or a
    per-case formula costs several times that. The interpreter's decode (e2m1x4_as_fp16 is
    PTX)."""
    bits = ((byte & (0x8 << SHIFT)) << (12 - SHIFT)) | ((byte & (0x7 << SHIFT)) << (9 - SHIFT))
    return bits.to(tl.int16).to(tl.float16, bitcast=True)


def _decode_ptx(byte: str, outs: tuple[str, str, str, str]) -> str:
    """PTX of e2m1x4_as_fp16's decode: the four bytes of operand `byte` into float16 pairs
    `outs` (low nibbles of bytes 0-1, of 2-3, high nibbles of 0-1, of 2-3)."""
    return f"""
        and.b32 lo, {byte}, 0x07070707;
        shl.b32 lo, lo, 2;
        and.b32 t, {byte}, 0x08080808;
        shl.b32 t, t, 4;
        or.b32 lo, lo, t;
        shr.b32 hi, {byte}, 2;
        and.b32 hi, hi, 0x1C1C1C1C;
        and.b32 t, {byte}, 0x80808080;
        or.b32 hi, hi, t;
        mov.b32 {{l0, l1}}, lo;
        mov.b32 {{h0, h1}}, hi;
        cvt.rn.f16x2.e4m3x2 {outs[0]}, l0;
        cvt.rn.f16x2.e4m3x2 {outs[1]}, l1;
        cvt.rn.f16x2.e4m3x2 {outs[2]}, h0;
        cvt.rn.f16x2.e4m3x2 {outs[3]}, h1;
"""


_REGS = "{ .reg .b32 lo, hi, t, w0, w1, w2, w3; .reg .b16 l0, l1, h0, h1;"
_WS = ("w0", "w1", "w2", "w3")
# e2m1x4_as_fp16: $0-$3 the pairs, $4 the bytes
_AS_FP16 = tl.constexpr(_REGS + _decode_ptx("$4", ("$0", "$1", "$2", "$3")) + "}")
# e2m1x4_mul_fp16 / e2m1x4_fma_fp16: $0 the pair of sums ($1 zero), $2 the bytes, $3-$6 the
# activation pairs, $7 the running sums
_PRODUCTS = """
        fma.rn.f16x2 t, w1, $4, t;
        fma.rn.f16x2 t, w2, $5, t;
        fma.rn.f16x2 $0, w3, $6, t;
        mov.b32 $1, 0;
        }"""
_MUL_FP16 = tl.constexpr(_REGS + _decode_ptx("$2", _WS) + "mul.rn.f16x2 t, w0, $3;" + _PRODUCTS)
_FMA_FP16 = tl.constexpr(_REGS + _decode_ptx("$2", _WS) + "fma.rn.f16x2 t, w0, $3, $7;" + _PRODUCTS)


@triton.jit
def e2m1x4_as_fp16(byte):
    """(low nibbles, high nibbles) of uint8 `byte` as float16 E2M1 * 2**-6 (exact), four
    bytes an instruction: decode is ALU-bound (half a byte a weight), and e2m1_as_fp16 spends
    about eight instructions a nibble on 32-bit registers holding one byte each.

    Each nibble's magnitude bits go to bits 2..4 of a byte and its sign to bit 7: an
    float8_e4m3fn of value E2M1 * 2**-6 (0.5 becomes e4m3's subnormal 2**-7), for the four
    low nibbles of a 32-bit word in one and, shift, and, shift, or; the high nibbles likewise;
    then Hopper's cvt.rn.f16x2.e4m3x2 widens two at a time."""
    return tl.inline_asm_elementwise(
        _AS_FP16,
        constraints="=r,=r,=r,=r,r",
        args=[byte],
        dtype=(tl.float16, tl.float16),
        is_pure=True,
        pack=4,
    )


@triton.jit
def e8m0_factor(e, OFFSET: tl.constexpr):
    """2 ** (e - 127) * 2 ** OFFSET in float32 for an E8M0 exponent byte e (the decodes'
    scale): e + OFFSET placed in a float32's exponent field."""
    return ((e.to(tl.int32) + OFFSET) << 23).to(tl.float32, bitcast=True)


@triton.jit
def mxfp4_nibbles(byte, PACKED: tl.constexpr):
    """(low nibbles, high nibbles) of uint8 `byte` as float16 E2M1 values scaled down by
    2**-offset; mxfp4_group_scale(e, PACKED) is the factor that restores them."""
    if PACKED:
        lo, hi = e2m1x4_as_fp16(byte)
    else:
        lo = e2m1_as_fp16(byte.to(tl.int32), 0)
        hi = e2m1_as_fp16(byte.to(tl.int32), 4)
    return lo, hi


@triton.jit
def mxfp4_group_scale(e, PACKED: tl.constexpr):
    """The float32 factor of E8M0 exponents e for values mxfp4_nibbles(..., PACKED) decoded."""
    return e8m0_factor(e, PACKED_EXP_OFFSET if PACKED else FP16_EXP_OFFSET)


def half_products(bound: float | None) -> bool:
    """Whether the MXFP4 GEMVs multiply activations of magnitude at most `bound` (None: not
    known) in float16 pairs, a scale group a thread (mxfp4_group_dot), rather than in float32
    (mxfp4_word_dot): only on the GPU (the float16 forms are PTX) and with a bound, without
    which float16 cannot be trusted. MOESERVE_MXFP4_F16=0 keeps float32 (for A/B runs)."""
    if not packed_decode():
        return False
    value = os.environ.get("MOESERVE_MXFP4_F16", "1")
    if value not in ("0", "1"):
        raise ValueError(f"MOESERVE_MXFP4_F16 must be 0 or 1, got {value!r}")
    return value == "1" and bound is not None and math.isfinite(bound)


# Activations are scaled by x_scale (a power of two, folded back after the K loop) into
# +-X16_LIMIT for the float16 products, and clamped there: a scale group's 16 products a lane
# stay below 16 * 6 * 2**-6 * 2**15 = 49152 < 65504, while small
# activations stay clear of float16's subnormals (below 2**-14, where products of activations
# of 1e-3 lost their digits). An RMSNorm's output is at most max|weight| * sqrt(D), gpt-oss's
# clamped SwiGLU at most limit * (limit + 1): the callers' bounds.
X16_LIMIT = 32768.0
X16_MAX = tl.constexpr(X16_LIMIT)


def x_scale(bound: float | None) -> float:
    """The power of two that takes activations of magnitude at most `bound` up to (at most)
    X16_LIMIT; 1 without a bound."""
    if bound is None or not math.isfinite(bound) or bound <= 0:
        return 1.0
    return 2.0 ** max(-60, min(60, math.floor(math.log2(X16_LIMIT / bound))))


# The MXFP4 GEMVs' tiles are words: 4 bytes of a row, 8 weights (k = 8w .. 8w + 7, even k in
# the low nibbles), against the 8 activations of the same k. Loaded as [rows, words, 4] for
# both the weight bytes and the activation pairs, the two tiles take the same register layout
# (4 contiguous elements a thread, lanes and warps along the words, rows in each thread), so
# the activations meet the weights without going through shared memory and are converted once
# for every row of the program; per word the products are one chain of multiply-adds.
@triton.jit
def x_pairs(
    x_row, k0, K, GW: tl.constexpr, HALF: tl.constexpr = 0, WORD_STRIDE: tl.constexpr = 8, scale=1.0
):
    """The activations of the K tile [k0, k0 + 8*GW) for mxfp4_word_dot: (even k, odd k)
    [1, GW, 4] float32, element [0, w, j] of k = k0 + 8w + 2j and the next. bf16 rows load as
    one int32 per pair, whose halves are the two float32s' top bits (no conversion). HALF:
    as float16 (e2m1x4_mul/fma_fp16's operands) times `scale` (x_scale's) clamped to
    +-X16_MAX, converted once for every row of the program. WORD_STRIDE: k between the words
    (32: one word of each scale group, mxfp4_group_dot's)."""
    pk = (k0 // 2 + tl.arange(0, GW)[:, None] * (WORD_STRIDE // 2) + tl.arange(0, 4)[None, :])[
        None, :, :
    ]
    ok = (pk // 4) * 8 < K  # whole words: K is a multiple of 32
    if x_row.dtype.element_ty == tl.bfloat16:
        pair = tl.load(x_row.to(tl.pointer_type(tl.int32)) + pk, mask=ok, other=0)
        x_even = (pair << 16).to(tl.float32, bitcast=True)
        x_odd = (pair & -65536).to(tl.float32, bitcast=True)
    else:
        x_even = tl.load(x_row + pk * 2, mask=ok, other=0.0).to(tl.float32)
        x_odd = tl.load(x_row + pk * 2 + 1, mask=ok, other=0.0).to(tl.float32)
    if HALF:
        xe = tl.clamp(x_even * scale, -X16_MAX, X16_MAX).to(tl.float16)
        xo = tl.clamp(x_odd * scale, -X16_MAX, X16_MAX).to(tl.float16)
    else:
        xe, xo = x_even, x_odd
    return xe, xo


def pairs_aligned(x: torch.Tensor) -> torch.Tensor:
    """x with every row on a 4-byte boundary, as x_pairs loads bf16 rows (int32 pairs): a
    copy if a view's offset or row stride is odd."""
    if x.dtype == torch.bfloat16 and (x.stride(0) % 2 or x.data_ptr() % 4):
        return x.clone(memory_format=torch.contiguous_format)
    return x


@triton.jit
def e2m1x4_mul_fp16(byte, x_even, x_odd):
    """e2m1x4_fma_fp16 of a group's first word: no running sums yet."""
    return tl.inline_asm_elementwise(
        _MUL_FP16,
        constraints="=r,=r,r,r,r,r,r",
        args=[byte, x_even, x_odd],
        dtype=tl.float16,
        is_pure=True,
        pack=4,
    )


@triton.jit
def e2m1x4_fma_fp16(byte, x_even, x_odd, acc):
    """acc + a word's 8 E2M1 weights (4 bytes) times their float16 activations, as float16
    pairs: acc is float16 [..., 4] whose first two elements are a pair of running sums (the
    others 0). The decode is e2m1x4_as_fp16's; four fma.rn.f16x2 a word, nothing else."""
    return tl.inline_asm_elementwise(
        _FMA_FP16,
        constraints="=r,=r,r,r,r,r,r,r,r",
        args=[byte, x_even, x_odd, acc],
        dtype=tl.float16,
        is_pure=True,
        pack=4,
    )


@triton.jit
def _group_word(byte, x_even, x_odd, acc, FIRST: tl.constexpr):
    xe = tl.broadcast_to(x_even, byte.shape)
    xo = tl.broadcast_to(x_odd, byte.shape)
    return e2m1x4_mul_fp16(byte, xe, xo) if FIRST else e2m1x4_fma_fp16(byte, xe, xo, acc)


@triton.jit
def x_group(x_row, k0, K, GG: tl.constexpr, scale):
    """mxfp4_group_dot's activations of the K tile [k0, k0 + 32*GG): x_pairs of each of a
    group's four words, float16, times `scale`."""
    x0e, x0o = x_pairs(x_row, k0, K, GG, 1, 32, scale)
    x1e, x1o = x_pairs(x_row, k0 + 8, K, GG, 1, 32, scale)
    x2e, x2o = x_pairs(x_row, k0 + 16, K, GG, 1, 32, scale)
    x3e, x3o = x_pairs(x_row, k0 + 24, K, GG, 1, 32, scale)
    return x0e, x0o, x1e, x1o, x2e, x2o, x3e, x3o


@triton.jit
def mxfp4_group_dot(
    w_e,  # one expert's stored weight [N, K/2] bytes
    s_e,  # its E8M0 scales [N, K/GROUP]
    row0,
    rows_end,
    x0e, x0o, x1e, x1o, x2e, x2o, x3e, x3o,  # x_group's
    k0,
    K,
    stride_wn: tl.constexpr,
    stride_sn: tl.constexpr,
    stride_sk,
    BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr,
    GG: tl.constexpr,  # scale groups in the tile
    EVEN_N: tl.constexpr,
):  # fmt: skip
    """[BLOCK_N, GG] float32: each row's scale group g of the tile [k0, k0 + 32*GG) dotted
    with its 32 activations, times the group's scale. A thread takes a whole group of a row
    (its four words loaded apart, each in x_pairs' layout): the 16 products of each lane of
    a float16 pair chain through fma.rn.f16x2, then the group costs one scale, one
    conversion of its two lanes and one float32 multiply-add, where mxfp4_word_dot's words
    cost those each."""
    m = tl.arange(0, BLOCK_N * GG).to(tl.int64)
    row = row0.to(tl.int64) + m // GG
    grp = m % GG
    # the group's 16 bytes in one load, then its four words apart (in-thread reshapes)
    at = (
        (w_e + k0 // 2)
        + (row * stride_wn + grp * 16)[None, :, None]
        + tl.arange(0, 16)[None, None, :]
    )
    ok = k0 + grp * 32 < K
    if not EVEN_N:
        ok = ok & (row < rows_end)
    ok = ok[None, :, None]
    words = tl.reshape(tl.load(at, mask=ok, other=0), (BLOCK_N, GG, 2, 2, 4))
    words = tl.permute(words, (0, 1, 4, 2, 3))  # [rows, groups, byte, word // 2, word % 2]
    w02, w13 = tl.split(words)  # by word % 2: [rows, groups, byte, word // 2]
    w0, w2 = tl.split(w02)
    w1, w3 = tl.split(w13)
    acc = _group_word(w0, x0e, x0o, None, True)
    acc = _group_word(w1, x1e, x1o, acc, False)
    acc = _group_word(w2, x2e, x2o, acc, False)
    acc = _group_word(w3, x3e, x3o, acc, False)
    lane0, lane1, _, _ = _quarters(acc)
    dot = lane0.to(tl.float32) + lane1.to(tl.float32)  # up to 2 * 49152: past float16
    # (k0 + 32 grp) // GROUP, not k0 // GROUP + grp: a contiguous index would have the scales
    # load as vectors of several groups a thread, then shuffled into the weights' layout
    g = (k0 + grp * 32) // GROUP
    return _times_scales(dot, s_e, row, rows_end, g, K, stride_sn, stride_sk, GROUP, True, EVEN_N)


@triton.jit
def _quarters(t):
    """The four elements of [N, W, 4] t's last dimension, as [N, W] tensors."""
    a, b = tl.split(tl.reshape(t, (t.shape[0], t.shape[1], 2, 2)))
    a0, a1 = tl.split(a)
    b0, b1 = tl.split(b)
    return a0, b0, a1, b1


@triton.jit
def mxfp4_word_dot(
    w_e,  # one expert's stored weight [N, K/2] bytes
    s_e,  # its E8M0 scales [N, K/GROUP]
    row0,  # the first of BLOCK_N output rows
    rows_end,  # rows from here on are masked
    x_even,  # x_pairs' activations
    x_odd,
    k0,  # the tile's first K index (a multiple of GROUP)
    K,
    stride_wn: tl.constexpr,  # constants: a row's loads take immediate offsets
    stride_sn: tl.constexpr,
    stride_sk,
    BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr,
    GW: tl.constexpr,  # words in the tile
    PACKED: tl.constexpr,  # e2m1x4_as_fp16's decode (packed_decode)
    EVEN_N: tl.constexpr,  # BLOCK_N divides the rows: no row is masked
):
    """[BLOCK_N, GW] float32: each row's word w of the tile [k0, k0 + 8*GW) dotted with the
    activations of its 8 k, times the word's group scale. Summed over the words by the caller,
    after its K loop.

    The weights and scales load as one row of BLOCK_N*GW words reshaped to [BLOCK_N, GW]: a
    [BLOCK_N, GW] pointer tile has no contiguous dimension but the bytes, and Triton 3.6 lays
    such a tile's lanes along the rows, away from the activations' (a shared-memory round
    trip per word); a single row takes the activations' layout."""
    # 64-bit from the start: a row's offset is then the first row's plus a constant (an
    # immediate of the load), where a 32-bit index widened per element costs four integer
    # ops a word
    m = tl.arange(0, BLOCK_N * GW).to(tl.int64)
    row = row0.to(tl.int64) + m // GW
    word = m % GW
    at = (row * stride_wn + word * 4)[None, :, None] + tl.arange(0, 4)[None, None, :]
    # masked by whole words, constant along a word's bytes (one load each); a row mask
    # would be a compare per word (its row is m // GW)
    ok = k0 + word * 8 < K
    if not EVEN_N:
        ok = ok & (row < rows_end)
    ok = ok[None, :, None]
    byte = tl.load((w_e + k0 // 2) + at, mask=ok, other=0)
    byte = tl.reshape(byte, (BLOCK_N, GW, 4))
    lo, hi = mxfp4_nibbles(byte, PACKED)
    l0, l1, l2, l3 = _quarters(lo.to(tl.float32))
    h0, h1, h2, h3 = _quarters(hi.to(tl.float32))
    e0, e1, e2, e3 = _quarters(x_even)
    o0, o1, o2, o3 = _quarters(x_odd)
    # one chain: each addition fuses with its product
    dot = l0 * e0 + h0 * o0
    dot = dot + l1 * e1
    dot = dot + h1 * o1
    dot = dot + l2 * e2
    dot = dot + h2 * o2
    dot = dot + l3 * e3
    dot = dot + h3 * o3
    g = (k0 + word * 8) // GROUP
    return _times_scales(dot, s_e, row, rows_end, g, K, stride_sn, stride_sk, GROUP, PACKED, EVEN_N)


@triton.jit
def _times_scales(
    dot,  # [BLOCK_N, W] float32
    s_e,
    row,  # [BLOCK_N * W] each element's row
    rows_end,
    g,  # [BLOCK_N * W] each element's scale group
    K,
    stride_sn: tl.constexpr,
    stride_sk,
    GROUP: tl.constexpr,
    PACKED: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    """dot times the E8M0 scales of its rows' groups g (as the decode left the values)."""
    s_ok = g * GROUP < K
    if not EVEN_N:
        s_ok = s_ok & (row < rows_end)
    e = tl.load(s_e + row * stride_sn + g * stride_sk, mask=s_ok, other=0)
    return dot * mxfp4_group_scale(tl.reshape(e, dot.shape), PACKED)
