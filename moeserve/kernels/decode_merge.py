"""The second kernel of a split-K (flash-decoding) attention decode: J programs per
(sequence, head block) each left a partial result over its context partitions (running max,
sum, unnormalised output); one program per (sequence, head) merges them with log-sum-exp
rescaling. Shared by the paged decode (kernels/paged_attention.py) and the latent one
(kernels/mla_attention.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from moeserve.kernels import pdl
from moeserve.kernels.pdl import wait_prior

# Partial results the merge reads per step.
_MERGE_CHUNK = 32
# "No key yet" running max of the partition kernels and the merge: finite, so exp2(m_old -
# m_new) never gives NaN. Constexprs: jitted code may read no other globals.
NEG_BIG = tl.constexpr(-1.0e30)
LOG2E = 1.4426950408889634  # scores are kept in log2 units (exp2)
LOG2E_C = tl.constexpr(LOG2E)


@triton.jit(
    do_not_specialize=["num_progs", "stride_ab", "stride_ah", "stride_aj", "stride_mb", "stride_mh"]
)
def _decode_merge_kernel(
    out_ptr,
    ctx_ptr,
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    sinks_ptr,  # [H] (HAS_SINKS)
    num_progs,
    stride_ob,
    stride_oh,
    stride_ab,
    stride_ah,
    stride_aj,
    stride_mb,
    stride_mh,
    X: tl.constexpr,
    X_PAD: tl.constexpr,
    PARTITION: tl.constexpr,
    CHUNK: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    wait_prior()
    b = tl.program_id(0)
    h = tl.program_id(1)
    # Program j owns partitions j mod J, so programs j >= the sequence's partition count
    # found nothing: stop there (a short context in a wide table reads few partials).
    used = tl.minimum(tl.cdiv(tl.load(ctx_ptr + b).to(tl.int32), PARTITION), num_progs)
    cols = tl.arange(0, X_PAD)
    col_ok = cols < X
    chunk = tl.arange(0, CHUNK)
    ml_row = b * stride_mb + h * stride_mh
    acc_row = part_acc_ptr + b * stride_ab + h * stride_ah

    m = tl.max(tl.full([CHUNK], NEG_BIG, tl.float32), 0)
    l_sum = tl.sum(tl.zeros([CHUNK], tl.float32), 0)
    acc = tl.zeros([X_PAD], tl.float32)
    for c0 in range(0, used, CHUNK):
        js = c0 + chunk
        m_c = tl.load(part_max_ptr + ml_row + js, mask=js < used, other=NEG_BIG)
        l_c = tl.load(part_sum_ptr + ml_row + js, mask=js < used, other=0.0)
        # Neutral partials (l == 0, e.g. wholly before the window) wrote no output: skip it.
        live = (js < used) & (l_c > 0)
        a_c = tl.load(
            acc_row + js[:, None] * stride_aj + cols[None, :],
            mask=live[:, None] & col_ok[None, :],
            other=0.0,
        )
        m_new = tl.maximum(m, tl.max(m_c, 0))
        alpha = tl.exp2(m - m_new)
        w = tl.where(live, tl.exp2(m_c - m_new), 0.0)
        l_sum = l_sum * alpha + tl.sum(l_c * w, 0)
        acc = acc * alpha + tl.sum(a_c * w[:, None], 0)
        m = m_new

    if HAS_SINKS:  # the sink's term in the denominator (merged max m, log2 units)
        l_sum = l_sum + tl.exp2(tl.load(sinks_ptr + h).to(tl.float32) * LOG2E_C - m)
    o = acc / l_sum
    o_ptr = out_ptr + b * stride_ob + h * stride_oh + cols
    tl.store(o_ptr, o.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def merge_heads(
    out_ptr,
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    sinks_ptr,
    b,
    heads,  # [QH_PAD] the query heads to merge
    row_ok,
    cols,  # [X_PAD]
    col_ok,
    used,  # partials written for this sequence (the rest found nothing)
    stride_ob,
    stride_oh,
    stride_ab,
    stride_ah,
    stride_aj,
    stride_mb,
    stride_mh,
    HAS_SINKS: tl.constexpr,
):
    """The merge of _decode_merge_kernel for several heads at once, in the partition
    kernel's last program: partials one at a time (not in chunks), so the float sums run
    in another order than the merge kernel's. The partials are other programs' writes:
    read from L2."""
    ml = b * stride_mb + heads * stride_mh
    a_rows = part_acc_ptr + b * stride_ab + heads[:, None] * stride_ah + cols[None, :]
    m = tl.full(heads.shape, NEG_BIG, tl.float32)
    l_sum = tl.zeros(heads.shape, tl.float32)
    acc = tl.zeros(a_rows.shape, tl.float32)
    for j in tl.range(0, used, num_stages=2):
        m_c = tl.load(part_max_ptr + ml + j, mask=row_ok, other=NEG_BIG, cache_modifier=".cg")
        l_c = tl.load(part_sum_ptr + ml + j, mask=row_ok, other=0.0, cache_modifier=".cg")
        live = row_ok & (l_c > 0)  # a neutral partial wrote no output
        a_c = tl.load(
            a_rows + j * stride_aj,
            mask=live[:, None] & col_ok[None, :],
            other=0.0,
            cache_modifier=".cg",
        )
        m_new = tl.maximum(m, m_c)
        alpha = tl.exp2(m - m_new)
        w = tl.where(live, tl.exp2(m_c - m_new), 0.0)
        l_sum = l_sum * alpha + l_c * w
        acc = acc * alpha[:, None] + a_c * w[:, None]
        m = m_new
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + heads, mask=row_ok, other=0.0).to(tl.float32) * LOG2E_C
        l_sum = l_sum + tl.exp2(sink - m)
    o = acc / l_sum[:, None]
    o_ptr = out_ptr + b * stride_ob + heads[:, None] * stride_oh + cols[None, :]
    tl.store(o_ptr, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def arrive_and_merge(
    out_ptr, ctx, part_acc_ptr, part_max_ptr, part_sum_ptr, sinks_ptr, count_ptr,
    b, g, heads, row_ok, cols, col_ok, num_progs, stride_ob, stride_oh,
    stride_ab, stride_ah, stride_aj, stride_mb, stride_mh,
    PARTITION: tl.constexpr, HAS_SINKS: tl.constexpr,
):  # fmt: skip
    """Count this program's partial in; the last of the J to arrive merges them all. The
    barrier puts every thread's stores before the count (acquire-release, GPU scope)."""
    tl.debug_barrier()
    counter = count_ptr + b * tl.num_programs(1) + g
    if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == num_progs - 1:
        tl.store(counter, 0)  # zero for the next launch, which waits for this one
        used = tl.minimum(tl.cdiv(ctx, PARTITION), num_progs)
        merge_heads(
            out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, sinks_ptr, b, heads, row_ok,
            cols, col_ok, used, stride_ob, stride_oh, stride_ab, stride_ah, stride_aj,
            stride_mb, stride_mh, HAS_SINKS,
        )  # fmt: skip


class Partials(NamedTuple):
    """A split-K decode's partial results over J context partitions: float32 accumulators
    [B, H, J, width], running max and sum [B, H, J], and their strides (the first three of the
    accumulators', the first two of max and sum); with one partition, the output tensor
    stands for all three (the single-partition kernel never reads them)."""

    acc: torch.Tensor
    max: torch.Tensor
    sum: torch.Tensor
    acc_strides: tuple[int, ...]
    ml_strides: tuple[int, ...]
    num_progs: int


def split_partials(b: int, h: int, num_progs: int, width: int, out: torch.Tensor) -> Partials:
    """The partials of a decode of b sequences and h heads over num_progs partitions.
    Allocated per call: from the graph's private pool when captured."""
    if num_progs == 1:
        return Partials(out, out, out, (0, 0, 0), (0, 0), 1)
    acc = torch.empty((b, h, num_progs, width), dtype=torch.float32, device=out.device)
    mx = torch.empty((b, h, num_progs), dtype=torch.float32, device=out.device)
    return Partials(acc, mx, torch.empty_like(mx), acc.stride()[:3], mx.stride()[:2], num_progs)


def merge_partials(
    out_BHX: torch.Tensor,
    context_lens_B: torch.Tensor,
    parts: Partials,
    x_pad: int,
    partition: int,
    sinks_H: torch.Tensor | None = None,
) -> None:
    """out[b, h] = the softmax-weighted output over every partition's partial (partition
    positions each), with a sink logit per head in the denominator when given."""
    b, h, x = out_BHX.shape
    _decode_merge_kernel[(b, h)](
        out_BHX,
        context_lens_B,
        parts.acc,
        parts.max,
        parts.sum,
        sinks_H if sinks_H is not None else out_BHX,  # an unused pointer without sinks
        parts.num_progs,
        out_BHX.stride(0),
        out_BHX.stride(1),
        *parts.acc_strides,
        *parts.ml_strides,
        X=x,
        X_PAD=x_pad,
        PARTITION=partition,
        CHUNK=_MERGE_CHUNK,
        HAS_SINKS=sinks_H is not None,
        num_warps=2,
        **pdl.LAUNCH,
    )
