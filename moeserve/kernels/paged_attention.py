"""Paged-attention decode (one new query token per sequence) as Triton kernels, CUDA-graph safe.

Flash-decoding / split-K: the context of each sequence is cut into partitions of
PARTITION_SIZE positions, spread over J programs per (sequence, kv head): program j takes
partitions j, j + J, j + 2J, ... (interleaved, so short and long sequences both spread over
their programs) and leaves one partial result (running max, sum, unnormalised output). A small
second kernel (kernels/decode_merge.py) merges the J partials with log-sum-exp rescaling.
With batch 1 and 8 kv heads a 4k context runs on 8 * 16 = 128 programs instead of 8.

J = min(partitions in the table's width, MAX_PROGRAMS // (B * G)), the partitions finer when
B * G is below the SM count (SMALL_PARTITION, batch-1 decode): the grid depends only on
shapes, never on the context lengths' values, so there is no device-to-host read and a captured
graph stays valid when lengths change. The cap matters because tables are usually padded to the
longest allowed context: without it a batch of 64 with 32k-wide tables would launch 65k
programs, most of them idle. When J == 1 the single program per (sequence, kv head) normalises
and writes the output itself and the merge is skipped (a shape-only decision).

Each program carries all query heads of its kv head (GQA) as the rows of one [QH_PAD, X_PAD]
tile, so K and V are read once per kv head, and walks its partitions TILE positions at a time:
every position looks up its own block id, which handles any block size S (also S < 16, below
tl.dot's minimum) and never touches block-table entries past the sequence's context.
Sinks (gpt-oss): a per-head logit that joins every softmax's denominator and adds nothing to
the output; it is folded in once at the end (exp2(sink - m) added to the sum), after the last
partition or in the merge.

From the qkv projection's split-K partials (RopeFromQKV, ROPE_IN_DECODE) each program builds
its own queries (sum, round, per-head norm, rotation: norm_rope's rotary kernel's work) and the
one holding the newest position first writes that token's key and value into the cache.

The twin readable path is moeserve.model.attention.PagedAttention without decode_kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from moeserve.kernels import arrivals, num_sms, pdl
from moeserve.kernels.decode_merge import (
    LOG2E,
    LOG2E_C,
    NEG_BIG,
    arrive_and_merge,
    merge_partials,
    split_partials,
)
from moeserve.kernels.norm_rope import rotate_halves
from moeserve.kernels.pdl import wait_prior

# Positions per partition. Fixed rather than sized from the table width, so that parallelism
# follows the actual context.
PARTITION_SIZE = 256
# A launch of fewer (sequence, kv head) pairs than SMs (batch-1 decode) cuts the context
# finer: with 256-position partitions a context of a few hundred tokens was one program per
# kv head streaming it alone, a few SMs busy. One 64-position tile a partition spreads it as
# the MLA kernel does (kernels/mla_attention.py); the cap bounds the partials the merge reads.
SMALL_PARTITION = 64
SMALL_MAX_PARTS = 128
# Most programs per launch (about 16 per SM on an H100) before partitions get interleaved.
MAX_PROGRAMS = 2048
# Positions per inner step (one K and one V tile), for head dims up to 128; half that above, to
# bound registers. A multiple of 16 (tl.dot) that divides PARTITION_SIZE.
TILE_N = 128
NUM_WARPS = 4
# 1: in launches of fewer (sequence, kv head) pairs than SMs (batch-1 decode, where it was
# measured), the last of each pair's J programs merges its partials (kernels.arrivals; no
# merge launch); 0: the merge kernel. Qwen3-30B-A3B batch 1 (H100, benchmarks/RESULTS.md):
# 1.009x, but 0.987x under the early PDL trigger, whose launches run ahead of the merge
# kernel anyway. A/B: `gpu_speed.py --set paged_attention.MERGE_IN_LAST=0`.
MERGE_IN_LAST = 0 if pdl.EARLY else 1
# 1: a decode from the qkv projection's partials rotates its queries in the partition
# programs and writes the new keys and values there (RopeFromQKV; no rotary launch). 0 until
# measured on a GPU (`gpu_speed.py --set paged_attention.ROPE_IN_DECODE=1`).
ROPE_IN_DECODE = 0


def rotates(head_dim: int, rotary_dim: int) -> bool:
    """The partition programs can rotate these heads: a full rotary of a power-of-two head."""
    return rotary_dim == head_dim >= 16 and head_dim & (head_dim - 1) == 0


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# Arguments that change from step to step are not specialised on (Triton would compile a
# variant per divisibility-by-16 pattern, in the middle of serving).
@triton.jit(
    do_not_specialize=[
        "num_progs",
        "stride_btb",
        "stride_ab",
        "stride_ah",
        "stride_aj",
        "stride_mb",
        "stride_mh",
    ]
)
def _decode_partition_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bt_ptr,
    ctx_ptr,
    out_ptr,
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    sinks_ptr,  # [H] (HAS_SINKS)
    count_ptr,  # [B * G] int32 arrivals, zero between launches (MERGE)
    scale_log2e,
    window,
    chunk,
    num_progs,  # J: programs per (sequence, kv head)
    stride_qb,
    stride_qh,
    stride_kn,
    stride_ks,
    stride_kg,
    stride_vn,
    stride_vs,
    stride_vg,
    stride_btb,
    stride_btm,
    stride_ob,
    stride_oh,
    stride_ab,
    stride_ah,
    stride_aj,
    stride_mb,
    stride_mh,
    X: tl.constexpr,
    QPG: tl.constexpr,  # query heads per kv head
    S: tl.constexpr,
    QH_PAD: tl.constexpr,
    X_PAD: tl.constexpr,
    PARTITION: tl.constexpr,
    TILE: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_CHUNK: tl.constexpr,
    SINGLE: tl.constexpr,  # J == 1: write the normalised output, no merge
    HAS_SINKS: tl.constexpr,
    MERGE: tl.constexpr,  # the last of the J programs merges the partials (no merge launch)
    # ROPE: q from the qkv projection's float32 split-K partials, rotated here (no rotary
    # launch); the program holding the newest position writes its key and value first.
    qkv_ptr,  # [QKV_SPLIT, B, (H + 2G) * X] float32
    stride_qkv_p,
    stride_qkv_b,
    cos_ptr,  # [P, X] rows read at positions (TABLE), or [B, X] rows
    sin_ptr,
    pos_ptr,  # [B] (TABLE)
    stride_c,
    slot_ptr,  # [B] the new token's cache slot
    q_norm_ptr,  # [X] (QK_NORM)
    k_norm_ptr,
    eps,
    num_heads,
    ROPE: tl.constexpr,
    QKV_SPLIT: tl.constexpr,
    QK_NORM: tl.constexpr,
    TABLE: tl.constexpr,
):
    wait_prior()
    b = tl.program_id(0)
    g = tl.program_id(1)
    j = tl.program_id(2)

    ctx = tl.load(ctx_ptr + b).to(tl.int32)
    lo = 0  # first position the query may see
    if USE_WINDOW:
        lo = tl.maximum(ctx - window, 0)
    if USE_CHUNK:  # the query (position ctx - 1) sees its attention chunk from its start
        lo = tl.maximum(lo, ((ctx - 1) // chunk) * chunk)
    first_part = lo // PARTITION
    last_part = tl.cdiv(ctx, PARTITION)
    # This program's first partition at or after first_part (partitions j mod J are its own).
    behind = tl.maximum(first_part - j, 0)
    p0 = j + ((behind + num_progs - 1) // num_progs) * num_progs

    rows = tl.arange(0, QH_PAD)
    cols = tl.arange(0, X_PAD)
    heads = g * QPG + rows
    row_ok = rows < QPG
    col_ok = cols < X
    ml_off = b * stride_mb + heads * stride_mh + j

    if p0 >= last_part:
        # Nothing of this sequence is ours: a neutral max/sum (the merge skips the output).
        if not SINGLE:
            tl.store(part_max_ptr + ml_off, tl.full([QH_PAD], NEG_BIG, tl.float32), mask=row_ok)
            tl.store(part_sum_ptr + ml_off, tl.zeros([QH_PAD], tl.float32), mask=row_ok)
        if MERGE:
            arrive_and_merge(
                out_ptr, ctx, part_acc_ptr, part_max_ptr, part_sum_ptr, sinks_ptr, count_ptr,
                b, g, heads, row_ok, cols, col_ok, num_progs, stride_ob, stride_oh,
                stride_ab, stride_ah, stride_aj, stride_mb, stride_mh, PARTITION, HAS_SINKS,
            )  # fmt: skip
        return

    q_mask = row_ok[:, None] & col_ok[None, :]
    if ROPE:
        qkv_row = qkv_ptr + b.to(tl.int64) * stride_qkv_b
        c = b.to(tl.int64)
        if TABLE:
            c = tl.load(pos_ptr + b).to(tl.int64)
        cos_row, sin_row = cos_ptr + c * stride_c, sin_ptr + c * stride_c
        if (last_part > 0) & (j == (last_part - 1) % num_progs):  # the newest position's K, V
            one = rows < 1
            kh = num_heads + g + rows * 0
            k = _rope_heads(qkv_row, kh, one, stride_qkv_p, cos_row, sin_row, k_norm_ptr, eps,
                            k_ptr, X, QKV_SPLIT, QK_NORM, True)  # fmt: skip
            v = _rope_heads(qkv_row, kh + tl.num_programs(1), one, stride_qkv_p, cos_row,
                            sin_row, k_norm_ptr, eps, k_ptr, X, QKV_SPLIT, False,
                            False)  # fmt: skip
            slot = tl.load(slot_ptr + b).to(tl.int64)
            kv_row = (slot // S) * stride_kn + (slot % S) * stride_ks + g * stride_kg
            kv_mask = one[:, None] & (cols < X)[None, :]
            tl.store(k_ptr + kv_row + rows[:, None] * 0 + cols[None, :], k, mask=kv_mask)
            v_row = (slot // S) * stride_vn + (slot % S) * stride_vs + g * stride_vg
            tl.store(v_ptr + v_row + rows[:, None] * 0 + cols[None, :], v, mask=kv_mask)
            tl.debug_barrier()  # stored before this program's threads read that position
        q = _rope_heads(qkv_row, heads, row_ok, stride_qkv_p, cos_row, sin_row, q_norm_ptr, eps,
                        k_ptr, X, QKV_SPLIT, QK_NORM, True)  # fmt: skip
    else:
        q = tl.load(
            q_ptr + b * stride_qb + heads[:, None] * stride_qh + cols[None, :],
            mask=q_mask,
            other=0.0,
        )

    m_i = tl.full([QH_PAD], NEG_BIG, tl.float32)  # running max of log2-scaled scores
    l_i = tl.zeros([QH_PAD], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([QH_PAD, X_PAD], tl.float32)

    toks = tl.arange(0, TILE)
    bt_row = bt_ptr + b * stride_btb
    for part in range(p0, last_part, num_progs):
        start = part * PARTITION
        end = tl.minimum(start + PARTITION, ctx)
        # From the tile holding the first visible position: tiles wholly before the window are
        # skipped, and tile starts stay aligned to the partition.
        first = start + ((tl.maximum(start, lo) - start) // TILE) * TILE
        for t in range(first, end, TILE):
            pos = t + toks
            ok = (pos < end) & (pos >= lo)
            # Masked lanes read no table entry: entries past the context may be garbage.
            blk = tl.load(bt_row + (pos // S) * stride_btm, mask=ok, other=0).to(tl.int64)
            slot = pos % S

            k_row = blk * stride_kn + slot * stride_ks + g * stride_kg
            k_t = tl.load(
                k_ptr + k_row[None, :] + cols[:, None],
                mask=col_ok[:, None] & ok[None, :],
                other=0.0,
            )  # [X_PAD, TILE]
            # "ieee" only matters for float32 inputs (no tf32 rounding); bf16/fp16 ignore it.
            s = tl.dot(q, k_t, input_precision="ieee") * scale_log2e
            s = tl.where(ok[None, :], s, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)

            v_row = blk * stride_vn + slot * stride_vs + g * stride_vg
            v = tl.load(
                v_ptr + v_row[:, None] + cols[None, :],
                mask=ok[:, None] & col_ok[None, :],
                other=0.0,
            )  # [TILE, X_PAD]
            # Probabilities go to the cache dtype for the tensor-core product (as flash
            # attention does); accumulation stays float32.
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m_i = m_new

    if SINGLE:
        if HAS_SINKS:  # the sink's term in the denominator (running max m_i, log2 units)
            sink = tl.load(sinks_ptr + heads, mask=row_ok, other=0.0).to(tl.float32) * LOG2E_C
            l_i = l_i + tl.exp2(sink - m_i)
        o = acc / l_i[:, None]
        o_off = b * stride_ob + heads[:, None] * stride_oh + cols[None, :]
        tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        a_off = b * stride_ab + heads[:, None] * stride_ah + j * stride_aj + cols[None, :]
        tl.store(part_acc_ptr + a_off, acc, mask=q_mask)
        tl.store(part_max_ptr + ml_off, m_i, mask=row_ok)
        tl.store(part_sum_ptr + ml_off, l_i, mask=row_ok)  # >= 1: at least one key seen
        if MERGE:
            arrive_and_merge(
                out_ptr, ctx, part_acc_ptr, part_max_ptr, part_sum_ptr, sinks_ptr, count_ptr,
                b, g, heads, row_ok, cols, col_ok, num_progs, stride_ob, stride_oh,
                stride_ab, stride_ah, stride_aj, stride_mb, stride_mh, PARTITION, HAS_SINKS,
            )  # fmt: skip


@triton.jit
def _rope_heads(
    qkv_row, heads, row_ok, stride_p, cos_row, sin_row, norm_ptr, eps, like_ptr,
    X: tl.constexpr, SPLIT: tl.constexpr, NORM: tl.constexpr, ROTATE: tl.constexpr,
):  # fmt: skip
    """Heads `heads` of one token's qkv row [rows, X] in like_ptr's dtype: the SPLIT float32
    partials summed and rounded (as the projection's output), each head RMSNormed (NORM) and
    rotated (ROTATE, rotate-half layout), rounded as norm_rope's rotary kernel rounds."""
    HALF: tl.constexpr = X // 2
    offs = tl.arange(0, HALF)
    ptr = qkv_row + heads[:, None] * X + offs[None, :]
    m = row_ok[:, None]
    a1 = tl.zeros([heads.shape[0], HALF], tl.float32)
    a2 = tl.zeros([heads.shape[0], HALF], tl.float32)
    for s in tl.static_range(SPLIT):
        a1 += tl.load(ptr + s * stride_p, mask=m, other=0.0)
        a2 += tl.load(ptr + s * stride_p + HALF, mask=m, other=0.0)
    dt = like_ptr.dtype.element_ty
    x1, x2 = a1.to(dt), a2.to(dt)
    if NORM:
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        inv = 1.0 / tl.sqrt((tl.sum(f1 * f1, 1) + tl.sum(f2 * f2, 1)) / X + eps)
        w1 = tl.load(norm_ptr + offs).to(tl.float32)[None, :]
        w2 = tl.load(norm_ptr + HALF + offs).to(tl.float32)[None, :]
        x1 = (w1 * (f1 * inv[:, None]).to(dt).to(tl.float32)).to(dt)
        x2 = (w2 * (f2 * inv[:, None]).to(dt).to(tl.float32)).to(dt)
    if ROTATE:  # norm_rope's rotation (its cos/sin rows broadcast over the heads)
        y1, y2 = rotate_halves(x1, x2, cos_row, sin_row, offs[None, :], offs[None, :] < HALF, HALF)
        x1, x2 = y1.to(dt), y2.to(dt)
    # [rows, HALF] twice -> [rows, X], the halves side by side
    return tl.reshape(tl.permute(tl.join(x1, x2), (0, 2, 1)), (heads.shape[0], X))


class RopeFromQKV(NamedTuple):
    """The decode's queries, keys and values as the qkv projection's float32 split-K partials
    [S, B, (H + 2G) * X] (kernels.linear), with what norm_rope.rotary_from_partials takes:
    cos/sin tables read at positions_B (or rows [B, X] with positions_B None), each new
    token's cache slot, and the per-head q/k norms (weights, eps) or None."""

    qkv_STN: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    positions_B: torch.Tensor | None
    slots_B: torch.Tensor
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _partitioning(b: int, g: int, x_pad: int, positions: int) -> tuple[int, int, int]:
    """(positions per partition, per tile, programs J per (sequence, kv head)) of a decode
    launch over block tables `positions` wide: shapes only, so a captured graph stays valid."""
    if b * g < num_sms():
        tile = SMALL_PARTITION if x_pad <= 128 else SMALL_PARTITION // 2
        parts = min(triton.cdiv(positions, SMALL_PARTITION), SMALL_MAX_PARTS)
        return SMALL_PARTITION, tile, max(1, min(parts, MAX_PROGRAMS // (b * g)))
    parts = triton.cdiv(positions, PARTITION_SIZE)
    tile = TILE_N if x_pad <= 128 else TILE_N // 2
    return PARTITION_SIZE, tile, max(1, min(parts, MAX_PROGRAMS // (b * g)))


def paged_decode_attention(
    q_BHX: torch.Tensor,
    k_cache_NSGX: torch.Tensor,
    v_cache_NSGX: torch.Tensor,
    block_tables_BM: torch.Tensor,
    context_lens_B: torch.Tensor,
    scale: float,
    window: int | None = None,
    out_BHX: torch.Tensor | None = None,
    *,
    chunk: int | None = None,
    sinks_H: torch.Tensor | None = None,
    rope: RopeFromQKV | None = None,
) -> torch.Tensor:
    """One new query token per sequence (already written into the cache) attends over its
    sequence's first context_lens_B[b] cached positions (position p lives at block
    block_tables_BM[b, p // S], slot p % S).

    window: only keys with position > context_len - 1 - window (same rule as
    layers.sdpa_decode). chunk: only keys from the query's attention chunk on, position
    (context_len - 1) // chunk * chunk (Llama 4). Returns [B, H, X] in q's dtype (written
    into out_BHX when given).
    GQA: H is a multiple of G; query head h uses kv head h // (H // G).
    sinks_H: a logit per query head in each softmax's denominator (gpt-oss), or None.
    rope: the queries, keys and values as the qkv projection's split-K partials instead: the
    programs rotate their queries themselves and write the new key and value into the cache
    first (norm_rope.rotary_from_partials's work, no launch of its own); q_BHX then only
    gives the shape and dtype (out_BHX will do).
    Only shapes size the launch (no host reads), so the call can be captured in a CUDA graph.
    """
    b, h, x = q_BHX.shape
    _, s, g, xk = k_cache_NSGX.shape
    if v_cache_NSGX.shape != k_cache_NSGX.shape or xk != x:
        raise ValueError(f"cache shapes {k_cache_NSGX.shape} / {v_cache_NSGX.shape} vs q {x=}")
    if h % g:
        raise ValueError(f"{h} query heads are not a multiple of {g} kv heads")
    if q_BHX.dtype not in _DTYPES or {k_cache_NSGX.dtype, v_cache_NSGX.dtype} != {q_BHX.dtype}:
        raise ValueError(f"dtypes {q_BHX.dtype}, {k_cache_NSGX.dtype}, {v_cache_NSGX.dtype}")
    if x > 256 or s & (s - 1) or block_tables_BM.dim() != 2 or block_tables_BM.shape[0] < b:
        raise ValueError(
            f"unsupported head dim {x}, block size {s} or table {block_tables_BM.shape}"
        )
    if context_lens_B.shape[0] < b:
        raise ValueError(f"context_lens_B has {context_lens_B.shape[0]} entries for {b} sequences")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if sinks_H is not None and (sinks_H.shape != (h,) or sinks_H.stride(0) != 1):
        raise ValueError(f"sinks_H must be a contiguous [{h}], got {tuple(sinks_H.shape)}")

    q_BHX = _last_dim_contiguous(q_BHX)
    k_cache_NSGX = _last_dim_contiguous(k_cache_NSGX)
    v_cache_NSGX = _last_dim_contiguous(v_cache_NSGX)
    if out_BHX is None:
        out_BHX = torch.empty_like(q_BHX)
    elif out_BHX.shape != q_BHX.shape or out_BHX.dtype != q_BHX.dtype:
        raise ValueError(f"out_BHX {out_BHX.shape} {out_BHX.dtype} does not match q")
    dst = _last_dim_contiguous(out_BHX)
    if b == 0:
        return out_BHX

    qpg = h // g
    x_pad = max(16, triton.next_power_of_2(x))
    partition, tile, num_progs = _partitioning(b, g, x_pad, block_tables_BM.shape[1] * s)
    single = num_progs == 1  # shape-only: the merge would be an identity
    parts = split_partials(b, h, num_progs, x, dst)
    win = 0 if window is None else int(window)
    counts = None
    if MERGE_IN_LAST and not single and b * g < num_sms():  # measured at batch 1 only
        counts = arrivals.counters(dst.device, b * g)
    if rope is not None:
        if not rotates(x, rope.cos.shape[1]):
            raise ValueError(f"rope in the decode needs a full rotary of a power-of-two head ({x})")
        qkv = rope.qkv_STN
        if qkv.dtype != torch.float32 or qkv.shape[1:] != (b, (h + 2 * g) * x):
            raise ValueError(f"qkv partials {tuple(qkv.shape)} {qkv.dtype} for {b}x{h}+2x{g} heads")
        assert qkv.stride(2) == 1 and rope.cos.stride() == rope.sin.stride()
        assert rope.cos.stride(1) == 1
        q_w, k_w, eps = rope.qk_norm if rope.qk_norm is not None else (dst, dst, 0.0)
        pos = rope.positions_B if rope.positions_B is not None else rope.slots_B
        rope_args = (qkv, qkv.stride(0), qkv.stride(1), rope.cos, rope.sin, pos,
                     rope.cos.stride(0), rope.slots_B, q_w, k_w, float(eps))  # fmt: skip
    else:
        rope_args = (dst, 0, 0, dst, dst, dst, 0, dst, dst, dst, 0.0)
    names = ("qkv_ptr", "stride_qkv_p", "stride_qkv_b", "cos_ptr", "sin_ptr", "pos_ptr",
             "stride_c", "slot_ptr", "q_norm_ptr", "k_norm_ptr", "eps")  # fmt: skip

    _decode_partition_kernel[(b, g, num_progs)](
        q_BHX,
        k_cache_NSGX,
        v_cache_NSGX,
        block_tables_BM,
        context_lens_B,
        dst,
        parts.acc,
        parts.max,
        parts.sum,
        sinks_H if sinks_H is not None else dst,  # an unused pointer without sinks
        counts if counts is not None else dst,
        float(scale) * LOG2E,
        win,
        0 if chunk is None else int(chunk),
        num_progs,
        q_BHX.stride(0),
        q_BHX.stride(1),
        *k_cache_NSGX.stride()[:3],
        *v_cache_NSGX.stride()[:3],
        *block_tables_BM.stride(),
        dst.stride(0),
        dst.stride(1),
        *parts.acc_strides,
        *parts.ml_strides,
        X=x,
        QPG=qpg,
        S=s,
        QH_PAD=max(16, triton.next_power_of_2(qpg)),
        X_PAD=x_pad,
        PARTITION=partition,
        TILE=tile,
        USE_WINDOW=window is not None,
        USE_CHUNK=chunk is not None,
        SINGLE=single,
        HAS_SINKS=sinks_H is not None,
        MERGE=counts is not None,
        **dict(zip(names, rope_args, strict=True)),
        num_heads=h,
        ROPE=rope is not None,
        QKV_SPLIT=rope.qkv_STN.shape[0] if rope is not None else 1,
        QK_NORM=rope is not None and rope.qk_norm is not None,
        TABLE=rope is not None and rope.positions_B is not None,
        num_warps=NUM_WARPS,
        **pdl.LAUNCH,
    )
    if not single and counts is None:
        merge_partials(dst, context_lens_B, parts, x_pad, partition, sinks_H)
    if dst is not out_BHX:
        out_BHX.copy_(dst)
    return out_BHX
