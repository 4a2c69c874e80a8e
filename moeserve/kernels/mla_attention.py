"""Multi-head latent attention decode over the paged latent cache, as Triton kernels.

Each cached token is one row of Y = C + R values (the normalised latent, then the rotated rope
key) shared by every head. A decode's query is already in latent space: per head, C absorbed
values then R rope values. Score = q . row (both parts), output = softmax-weighted sum of the
rows' latent parts [C]; the caller maps it through kv_b_proj's value half.

Split-K over the context as in kernels/paged_attention.py: programs per (sequence, block of
HEADS_PER_PROGRAM heads, j), program j taking partitions j, j + J, ...; each reads a latent row
once for all heads of its block (the rows are the keys and the values at once), keeps a running
max and sum, and leaves partial results that paged_attention's merge kernel combines (skipped
when J == 1). Only shapes size the launch (no host reads): a CUDA graph can capture it.
The twin readable path is moeserve.model.mla.LatentAttention without decode_kernel.

Shapes: B sequences, H heads, C latent dims, R rope dims, Y = C + R, N blocks, S slots per block,
M max blocks per sequence, J programs per (sequence, head block).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import pdl
from moeserve.kernels.decode_merge import LOG2E, NEG_BIG, merge_partials, split_partials
from moeserve.kernels.paged_attention import MAX_PROGRAMS
from moeserve.kernels.pdl import wait_prior

# Query heads per program: the rows of one tl.dot tile (its minimum is 16).
HEADS_PER_PROGRAM = 16
# DeepSeek's 512-wide latent: a [16, 512] float32 accumulator and a [32, 512] row tile per
# step; 8 warps keep them in registers (4 suffice for small latents).
NUM_WARPS, NUM_WARPS_WIDE = 4, 8
# Context positions a partition covers, and the most programs one (sequence, head block)
# spreads its partitions over. All heads of a sequence share its latent rows, so a batch-1
# decode is one head block: 256-position partitions left a few-hundred-token context to one
# program walking its 32-row tiles in turn (17 us a layer on an H200 for DeepSeek-V2-Lite).
# Two tiles a partition spread it over several SMs; the cap bounds the partials the merge
# reads ([J, H, C] float32 per sequence).
PARTITION_SIZE = 64
MAX_PARTS = 64
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit(
    do_not_specialize=[
        "num_progs",
        "stride_btb",
        "stride_qrb",
        "stride_ab",
        "stride_ah",
        "stride_aj",
        "stride_mb",
        "stride_mh",
    ]
)
def _mla_partition_kernel(
    q_ptr,
    qr_ptr,  # the rope part of the queries [B, H, R]
    cache_ptr,
    bt_ptr,
    ctx_ptr,
    out_ptr,
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    scale_log2e,
    num_progs,
    stride_qb,
    stride_qh,
    stride_qrb,
    stride_qrh,
    stride_cn,
    stride_cs,
    stride_btb,
    stride_btm,
    stride_ob,
    stride_oh,
    stride_ab,
    stride_ah,
    stride_aj,
    stride_mb,
    stride_mh,
    H: tl.constexpr,
    C: tl.constexpr,
    R: tl.constexpr,
    S: tl.constexpr,
    HB: tl.constexpr,
    C_PAD: tl.constexpr,
    R_PAD: tl.constexpr,
    PARTITION: tl.constexpr,
    TILE: tl.constexpr,
    SINGLE: tl.constexpr,
):
    wait_prior()
    b = tl.program_id(0)
    hb = tl.program_id(1)
    j = tl.program_id(2)

    ctx = tl.load(ctx_ptr + b).to(tl.int32)
    last_part = tl.cdiv(ctx, PARTITION)
    heads = hb * HB + tl.arange(0, HB)
    head_ok = heads < H
    ml_off = b * stride_mb + heads * stride_mh + j
    if j >= last_part:
        if not SINGLE:  # nothing of this sequence is ours: neutral max and sum
            tl.store(part_max_ptr + ml_off, tl.full([HB], NEG_BIG, tl.float32), mask=head_ok)
            tl.store(part_sum_ptr + ml_off, tl.zeros([HB], tl.float32), mask=head_ok)
        return

    cc = tl.arange(0, C_PAD)
    rc = tl.arange(0, R_PAD)
    c_ok = cc < C
    r_ok = rc < R
    q_row = q_ptr + b * stride_qb + heads[:, None] * stride_qh
    q_lat = tl.load(q_row + cc[None, :], mask=head_ok[:, None] & c_ok[None, :], other=0.0)
    qr_row = qr_ptr + b * stride_qrb + heads[:, None] * stride_qrh
    q_rope = tl.load(qr_row + rc[None, :], mask=head_ok[:, None] & r_ok[None, :], other=0.0)

    m_i = tl.full([HB], NEG_BIG, tl.float32)
    l_i = tl.zeros([HB], tl.float32)
    acc = tl.zeros([HB, C_PAD], tl.float32)
    toks = tl.arange(0, TILE)
    bt_row = bt_ptr + b * stride_btb
    for part in range(j, last_part, num_progs):
        start = part * PARTITION
        end = tl.minimum(start + PARTITION, ctx)
        for t in range(start, end, TILE):
            pos = t + toks
            ok = pos < end
            # Masked lanes read no table entry: entries past the context may be garbage.
            blk = tl.load(bt_row + (pos // S) * stride_btm, mask=ok, other=0).to(tl.int64)
            row = cache_ptr + blk * stride_cn + (pos % S) * stride_cs
            lat = tl.load(row[:, None] + cc[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)
            rope = tl.load(
                row[:, None] + C + rc[None, :], mask=ok[:, None] & r_ok[None, :], other=0.0
            )
            s = tl.dot(q_lat, tl.trans(lat), input_precision="ieee")
            s += tl.dot(q_rope, tl.trans(rope), input_precision="ieee")
            s = tl.where(ok[None, :], s * scale_log2e, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            # The same latent rows are the values: no second read.
            acc = acc * alpha[:, None] + tl.dot(p.to(lat.dtype), lat, input_precision="ieee")
            m_i = m_new

    o_mask = head_ok[:, None] & c_ok[None, :]
    if SINGLE:
        o_off = b * stride_ob + heads[:, None] * stride_oh + cc[None, :]
        tl.store(out_ptr + o_off, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        a_off = b * stride_ab + heads[:, None] * stride_ah + j * stride_aj + cc[None, :]
        tl.store(part_acc_ptr + a_off, acc, mask=o_mask)
        tl.store(part_max_ptr + ml_off, m_i, mask=head_ok)
        tl.store(part_sum_ptr + ml_off, l_i, mask=head_ok)


def mla_decode_attention(
    q_BHY: torch.Tensor,
    cache_NS1Y: torch.Tensor,
    block_tables_BM: torch.Tensor,
    context_lens_B: torch.Tensor,
    scale: float,
    latent_dim: int,
    out_BHC: torch.Tensor | None = None,
    q_rope_BHR: torch.Tensor | None = None,
) -> torch.Tensor:
    """One latent-space query per sequence (already written into the cache) over its first
    context_lens_B[b] cached rows (position p at block block_tables_BM[b, p // S], slot p % S):
    the softmax-weighted sum of the rows' first latent_dim values, [B, H, C] in q's dtype.
    q_rope_BHR: the queries' rope part, apart (q_BHY then holds the latent part only)."""
    if q_rope_BHR is None:
        q_rope_BHR = q_BHY[..., latent_dim:]
        q_BHY = q_BHY[..., :latent_dim]
    if q_rope_BHR.shape[:2] != q_BHY.shape[:2] or q_BHY.shape[-1] != latent_dim:
        raise ValueError(f"q {tuple(q_BHY.shape)} and q_rope {tuple(q_rope_BHR.shape)}")
    b, h, c = q_BHY.shape
    r = q_rope_BHR.shape[-1]
    y = c + r
    _, s, g, yc = cache_NS1Y.shape
    if g != 1 or yc != y or not 0 < c < y:
        raise ValueError(f"cache {tuple(cache_NS1Y.shape)} vs q {tuple(q_BHY.shape)}, C={c}")
    if q_BHY.dtype not in _DTYPES or {cache_NS1Y.dtype, q_rope_BHR.dtype} != {q_BHY.dtype}:
        raise ValueError(f"dtypes {q_BHY.dtype}, {q_rope_BHR.dtype}, {cache_NS1Y.dtype}")
    if s & (s - 1) or block_tables_BM.dim() != 2 or block_tables_BM.shape[0] < b:
        raise ValueError(f"unsupported block size {s} or table {tuple(block_tables_BM.shape)}")
    if context_lens_B.shape[0] < b:
        raise ValueError(f"context_lens_B has {context_lens_B.shape[0]} entries for {b} sequences")
    if cache_NS1Y.stride(-1) != 1:
        raise ValueError("the cache's rows must have unit stride")
    q_BHY = q_BHY if q_BHY.stride(-1) == 1 else q_BHY.contiguous()
    q_rope_BHR = q_rope_BHR if q_rope_BHR.stride(-1) == 1 else q_rope_BHR.contiguous()
    if out_BHC is None:
        out_BHC = q_BHY.new_empty(b, h, c)
    elif out_BHC.shape != (b, h, c) or out_BHC.dtype != q_BHY.dtype or out_BHC.stride(-1) != 1:
        raise ValueError(f"out_BHC {tuple(out_BHC.shape)} {out_BHC.dtype} does not fit")
    if b == 0:
        return out_BHC

    head_blocks = triton.cdiv(h, HEADS_PER_PROGRAM)
    num_parts = triton.cdiv(block_tables_BM.shape[1] * s, PARTITION_SIZE)
    num_progs = max(1, min(num_parts, MAX_PARTS, MAX_PROGRAMS // (b * head_blocks)))
    single = num_progs == 1  # shape-only: the merge would be an identity
    c_pad = max(16, triton.next_power_of_2(c))
    parts = split_partials(b, h, num_progs, c, out_BHC)
    _mla_partition_kernel[(b, head_blocks, num_progs)](
        q_BHY,
        q_rope_BHR,
        cache_NS1Y,
        block_tables_BM,
        context_lens_B,
        out_BHC,
        parts.acc,
        parts.max,
        parts.sum,
        float(scale) * LOG2E,
        num_progs,
        q_BHY.stride(0),
        q_BHY.stride(1),
        q_rope_BHR.stride(0),
        q_rope_BHR.stride(1),
        cache_NS1Y.stride(0),
        cache_NS1Y.stride(1),
        *block_tables_BM.stride(),
        out_BHC.stride(0),
        out_BHC.stride(1),
        *parts.acc_strides,
        *parts.ml_strides,
        H=h,
        C=c,
        R=r,
        S=s,
        HB=HEADS_PER_PROGRAM,
        C_PAD=c_pad,
        R_PAD=max(16, triton.next_power_of_2(r)),
        PARTITION=PARTITION_SIZE,
        TILE=64 if c_pad <= 128 else 32,
        SINGLE=single,
        num_warps=NUM_WARPS_WIDE if c_pad >= 256 else NUM_WARPS,
        **pdl.LAUNCH,
    )
    if not single:
        merge_partials(out_BHC, context_lens_B, parts, c_pad, PARTITION_SIZE)
    return out_BHC
