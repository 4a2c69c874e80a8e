"""Token-level kernels of a decode step: greedy argmax and the async-scheduling token feed.

argmax: torch reduces one 32k-wide row in a single block, as long as a decode step's
attention kernels at batch 1. Here the row is cut into BLOCK-wide chunks, one
program each, and a second launch picks the best chunk: the first index of the maximum, as
torch. feed_ids: the input ids of a step whose tokens the last step sampled on the device, in
one launch (torch's where/gather/clamp/compare were four).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import interpreting, pdl
from moeserve.kernels.pdl import wait_prior


@triton.jit
def _chunk_argmax_kernel(x_ptr, val_ptr, idx_ptr, V, C, stride_x, BLOCK: tl.constexpr):
    wait_prior()
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_x + offs, mask=offs < V, other=float("-inf"))
    x = x.to(tl.float32)
    tl.store(val_ptr + row * C + chunk, tl.max(x, 0))
    tl.store(idx_ptr + row * C + chunk, tl.argmax(x, 0, tie_break_left=True) + chunk * BLOCK)


@triton.jit
def _pick_kernel(
    val_ptr, idx_ptr, out_ptr, host_ptr, C, BLOCK_C: tl.constexpr, TO_HOST: tl.constexpr
):
    wait_prior()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    v = tl.load(val_ptr + row * C + offs, mask=offs < C, other=float("-inf"))
    # Chunks are in row order: the first chunk holding the maximum has its first index.
    best = tl.argmax(v, 0, tie_break_left=True)
    token = tl.load(idx_ptr + row * C + best).to(tl.int64)
    tl.store(out_ptr + row, token)
    if TO_HOST:  # page-locked host memory, written over the bus: no copy to queue after
        tl.store(host_ptr + row, token)


def argmax_rows(
    x_BV: torch.Tensor, out: torch.Tensor | None = None, host_out: torch.Tensor | None = None
) -> torch.Tensor:
    """torch.argmax(x, dim=-1) for a 2-D tensor with unit column stride and no NaN.

    out: int64 [B] to write (a device buffer the next step reads); host_out: page-locked
    int64 [B] host memory the kernel also writes, so the host needs no device-to-host copy
    (it must wait for the kernel, e.g. on an event, before reading)."""
    B, V = x_BV.shape
    assert x_BV.stride(1) == 1
    if out is None:
        out = torch.empty(B, dtype=torch.int64, device=x_BV.device)
    assert out.shape == (B,) and out.dtype == torch.int64
    if host_out is not None:
        assert host_out.shape == (B,) and host_out.dtype == torch.int64
        assert host_out.device.type == "cpu" and (host_out.is_pinned() or interpreting())
    if not B:
        return out
    block = 16 if interpreting() else 1024
    c = triton.cdiv(V, block)
    vals = torch.empty(B, c, dtype=torch.float32, device=x_BV.device)
    idx = torch.empty(B, c, dtype=torch.int32, device=x_BV.device)
    _chunk_argmax_kernel[(B, c)](
        x_BV, vals, idx, V, c, x_BV.stride(0), BLOCK=block, num_warps=4, **pdl.LAUNCH
    )
    _pick_kernel[(B,)](
        vals,
        idx,
        out,
        host_out if host_out is not None else out,
        c,
        BLOCK_C=triton.next_power_of_2(c),
        TO_HOST=host_out is not None,
        num_warps=4,
        **pdl.LAUNCH,
    )
    return out


@triton.jit
def _feed_ids_kernel(ids_ptr, feed_ptr, fed_ptr, out_ptr, n, BLOCK: tl.constexpr):
    wait_prior()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    row = tl.load(feed_ptr + offs, mask=ok, other=-1)
    ids = tl.load(ids_ptr + offs, mask=ok, other=0)
    fed = tl.load(fed_ptr + tl.maximum(row, 0), mask=ok & (row >= 0), other=0)
    tl.store(out_ptr + offs, tl.where(row >= 0, fed, ids), mask=ok)


def feed_ids(ids_T: torch.Tensor, feed_T: torch.Tensor, fed_R: torch.Tensor) -> torch.Tensor:
    """ids where feed < 0, else fed_R[feed]: int64 [T]."""
    n = ids_T.numel()
    out = torch.empty_like(ids_T)
    if n:
        block = 16 if interpreting() else max(16, min(1024, triton.next_power_of_2(n)))
        _feed_ids_kernel[(triton.cdiv(n, block),)](
            ids_T, feed_T, fed_R, out, n, BLOCK=block, **pdl.LAUNCH
        )
    return out
