"""The second step of a split-K (flash-decoding) attention decode: J programs per
(sequence, head block) each left a partial result over its context partitions (running max,
sum, unnormalised output); the merge combines them with log-sum-exp rescaling. Shared by the
paged decode (kernels/paged_attention.py) and the latent one (kernels/mla_attention.py): its
own kernel (one program per (sequence, head)), or its two jitted passes called from a kernel
that consumes the merged output (mla_rows' value heads), so the merge is written once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from moeserve.kernels import pdl
from moeserve.kernels.pdl import wait_prior

# Partial results the merge reads per step.
MERGE_CHUNK = 32
# "No key yet" running max of the partition kernels and the merge: finite, so exp2(m_old -
# m_new) never gives NaN. Constexprs: jitted code may read no other globals.
NEG_BIG = tl.constexpr(-1.0e30)
LOG2E = 1.4426950408889634  # scores are kept in log2 units (exp2)
LOG2E_C = tl.constexpr(LOG2E)


@triton.jit
def partials_used(ctx_ptr, b, num_progs, PARTITION: tl.constexpr):
    """Partials of sequence b that may hold keys. Program j owns partitions j mod J, so
    programs j >= the sequence's partition count found nothing (a short context in a wide
    table reads few partials)."""
    return tl.minimum(tl.cdiv(tl.load(ctx_ptr + b).to(tl.int32), PARTITION), num_progs)


@triton.jit
def merged_max_sum(max_row, sum_row, used, CHUNK: tl.constexpr):
    """Pass 1 of a merge over the first `used` partials of one (sequence, head), from their
    running maxima max_row[j] and sums sum_row[j]: the merged max m and the denominator l,
    the sum over j of sum_row[j] * 2^(max_row[j] - m) (log2 units; a sink's term is the
    caller's)."""
    chunk = tl.arange(0, CHUNK)
    m = tl.max(tl.full([CHUNK], NEG_BIG, tl.float32), 0)
    l_sum = tl.sum(tl.zeros([CHUNK], tl.float32), 0)
    for c0 in range(0, used, CHUNK):
        js = c0 + chunk
        m_c = tl.load(max_row + js, mask=js < used, other=NEG_BIG)
        l_c = tl.load(sum_row + js, mask=js < used, other=0.0)
        m_new = tl.maximum(m, tl.max(m_c, 0))
        w = tl.where((js < used) & (l_c > 0), tl.exp2(m_c - m_new), 0.0)
        l_sum = l_sum * tl.exp2(m - m_new) + tl.sum(l_c * w, 0)
        m = m_new
    return m, l_sum


@triton.jit
def merged_columns(
    acc_row, max_row, sum_row, stride_aj, used, m, cols, col_ok, CHUNK: tl.constexpr
):
    """Pass 2: columns `cols` of the sum over the first `used` partials of
    acc_row[j] * 2^(max_row[j] - m), with pass 1's m; divided by its l, the merged output
    there. Neutral partials (sum 0, e.g. wholly before the window) wrote no output: skipped."""
    chunk = tl.arange(0, CHUNK)
    acc = tl.zeros(cols.shape, tl.float32)
    for c0 in range(0, used, CHUNK):
        js = c0 + chunk
        m_c = tl.load(max_row + js, mask=js < used, other=NEG_BIG)
        l_c = tl.load(sum_row + js, mask=js < used, other=0.0)
        live = (js < used) & (l_c > 0)
        a_c = tl.load(
            acc_row + js[:, None] * stride_aj + cols[None, :],
            mask=live[:, None] & col_ok[None, :],
            other=0.0,
        )
        w = tl.where(live, tl.exp2(m_c - m), 0.0)
        acc += tl.sum(a_c * w[:, None], 0)
    return acc


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
    used = partials_used(ctx_ptr, b, num_progs, PARTITION)
    max_row = part_max_ptr + b * stride_mb + h * stride_mh
    sum_row = part_sum_ptr + b * stride_mb + h * stride_mh
    m, l_sum = merged_max_sum(max_row, sum_row, used, CHUNK)
    if HAS_SINKS:  # the sink's term in the denominator (merged max m, log2 units)
        l_sum = l_sum + tl.exp2(tl.load(sinks_ptr + h).to(tl.float32) * LOG2E_C - m)
    cols = tl.arange(0, X_PAD)
    col_ok = cols < X
    acc_row = part_acc_ptr + b * stride_ab + h * stride_ah
    o = merged_columns(acc_row, max_row, sum_row, stride_aj, used, m, cols, col_ok, CHUNK) / l_sum
    o_ptr = out_ptr + b * stride_ob + h * stride_oh + cols
    tl.store(o_ptr, o.to(out_ptr.dtype.element_ty), mask=col_ok)


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
        CHUNK=MERGE_CHUNK,
        HAS_SINKS=sinks_H is not None,
        num_warps=2,
        **pdl.LAUNCH,
    )
