"""The expert cache consulted and refilled by the GPU itself, so a CUDA graph holds it.

Per offloaded MoE layer and call, after routing:
    resolve: which experts the call's rows chose (`needed`), which of them the layer's slots
             lack (`missed`, ranked by expert id); each missed expert is copied from pinned host
             memory into a staging slot of the pool by the kernel itself (reading host memory
             through its device address: 0.93 of the copy engine's rate on an H100, and no host
             call), and the call's map `table` sends every needed expert to its slot;
    adopt:   the layer's least recently used experts that the call did not need give their
             slots to the staging pool, and the staged misses take their place (LRU by a
             per-layer clock), so the next call finds them resident. No bytes move.
Neither reads the device from the host; every grid follows from the shapes alone.

State, owned by engine/device_cache.py: per layer slot_E int32 (the expert's pool slot, -1 in
host memory), stamp_E int32 (its last use), clock_1 int32, counters_3 int64 (hits, misses,
evictions); global staging_M int32 (pool slots no layer owns). A needed expert that misses
while more than M others miss is a caller's error: M >= the most rows a call may route.

Shapes: R routed rows (T*K; ids >= E are padding rows' sentinel), E experts, M staging slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import interpreting, num_sms, pdl
from moeserve.kernels.pdl import wait_prior

MAX_TENSORS = 6  # weights, their scales, biases: what one expert is made of
_CHUNK = 4096  # bytes a program copies at a time


@triton.jit
def _needed_and_missed(experts_ptr, R, slot_ptr, E, BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr):
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    needed = tl.zeros([BLOCK_E], dtype=tl.int32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        ex = tl.load(experts_ptr + offs_r, mask=offs_r < R, other=E).to(tl.int32)
        chose = (ex[:, None] == offs_e[None, :]).to(tl.int32)
        needed = tl.maximum(needed, tl.max(chose, axis=0))
    slot = tl.load(slot_ptr + offs_e, mask=e_ok, other=0)
    missed = (needed > 0) & (slot < 0) & e_ok
    rank = tl.cumsum(missed.to(tl.int32), axis=0) - 1
    return offs_e, e_ok, needed, slot, missed, rank


@triton.jit
def _copy_chunk(src_ptr, dst_ptr, nbytes, expert, slot, c, CHUNK: tl.constexpr):
    offs = c * CHUNK + tl.arange(0, CHUNK)
    ok = offs < nbytes
    v = tl.load(src_ptr + expert.to(tl.int64) * nbytes + offs, mask=ok)
    tl.store(dst_ptr + slot.to(tl.int64) * nbytes + offs, v, mask=ok)


@triton.jit
def _resolve_kernel(
    experts_ptr,  # [R] int64
    slot_ptr,  # [E] int32
    staging_ptr,  # [M] int32
    table_ptr,  # [E] int32 out
    missed_ptr,  # [M] int32 out: missed experts by rank, -1 after
    needed_ptr,  # [E] int32 out
    R,
    E,
    M,
    # Up to MAX_TENSORS (host [E, n] bytes, pool [P, n] bytes, n, chunks of n) quadruples.
    s0, d0, n0, c0, s1, d1, n1, c1, s2, d2, n2, c2,
    s3, d3, n3, c3, s4, d4, n4, c4, s5, d5, n5, c5,
    BLOCK_E: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
):  # fmt: skip
    wait_prior()
    offs_e, e_ok, needed, slot, missed, rank = _needed_and_missed(
        experts_ptr, R, slot_ptr, E, BLOCK_E, BLOCK_R
    )
    missed = missed & (rank < M)  # never past the staging slots (the caller's bound)
    n_miss = tl.sum(missed.to(tl.int32), axis=0)
    staged = tl.load(staging_ptr + rank, mask=missed, other=0)
    # Experts the call does not need map to slot 0: sentinel rows' bias reads stay in bounds.
    table = tl.where(missed, staged, tl.where(slot >= 0, slot, 0))
    pid = tl.program_id(0)
    if pid == 0:
        tl.store(table_ptr + offs_e, table, mask=e_ok)
        tl.store(needed_ptr + offs_e, needed, mask=e_ok)
        tl.store(missed_ptr + rank, offs_e, mask=missed)
        offs_m = tl.arange(0, BLOCK_M)
        after = (offs_m >= n_miss) & (offs_m < M)
        tl.store(missed_ptr + offs_m, tl.full([BLOCK_M], -1, tl.int32), mask=after)
    per_expert = c0 + c1 + c2 + c3 + c4 + c5
    for w in range(pid, n_miss * per_expert, tl.num_programs(0)):
        j = w // per_expert
        c = w % per_expert
        expert = tl.sum(tl.where(missed & (rank == j), offs_e, 0), axis=0)
        dst = tl.load(staging_ptr + j)
        # The chunk's tensor: each one's chunks follow the previous one's (c counts down).
        if c < c0:
            _copy_chunk(s0, d0, n0, expert, dst, c, CHUNK)
        c -= c0
        if (c >= 0) & (c < c1):
            _copy_chunk(s1, d1, n1, expert, dst, c, CHUNK)
        c -= c1
        if (c >= 0) & (c < c2):
            _copy_chunk(s2, d2, n2, expert, dst, c, CHUNK)
        c -= c2
        if (c >= 0) & (c < c3):
            _copy_chunk(s3, d3, n3, expert, dst, c, CHUNK)
        c -= c3
        if (c >= 0) & (c < c4):
            _copy_chunk(s4, d4, n4, expert, dst, c, CHUNK)
        c -= c4
        if (c >= 0) & (c < c5):
            _copy_chunk(s5, d5, n5, expert, dst, c, CHUNK)


@triton.jit
def _adopt_kernel(
    needed_ptr,  # [E] int32
    missed_ptr,  # [M] int32
    slot_ptr,  # [E] int32, updated
    stamp_ptr,  # [E] int32, updated
    clock_ptr,  # [1] int32, updated
    staging_ptr,  # [M] int32, updated
    counters_ptr,  # [3] int64: hits, misses, evictions; updated
    E,
    M,
    BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    wait_prior()
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    needed = (tl.load(needed_ptr + offs_e, mask=e_ok, other=0) > 0) & e_ok
    slot = tl.load(slot_ptr + offs_e, mask=e_ok, other=-1)
    clock = tl.load(clock_ptr) + 1
    stamp = tl.where(needed, clock, tl.load(stamp_ptr + offs_e, mask=e_ok, other=0))
    hits = tl.sum((needed & (slot >= 0)).to(tl.int64), axis=0)
    offs_m = tl.arange(0, BLOCK_M)
    missed = tl.load(missed_ptr + offs_m, mask=offs_m < M, other=-1)
    n_miss = tl.sum((missed >= 0).to(tl.int32), axis=0)
    evictions = n_miss * 0
    for j in range(0, n_miss):
        expert = tl.sum(tl.where(offs_m == j, missed, 0), axis=0)
        candidate = (slot >= 0) & ~needed
        if tl.max(candidate.to(tl.int32), axis=0) > 0:
            # The least recently used candidate; ties to the lowest id (the host LRU's order).
            victim = tl.argmin(tl.where(candidate, stamp, 2147483647), axis=0)
            freed = tl.sum(tl.where(offs_e == victim, slot, 0), axis=0)
            staged = tl.load(staging_ptr + j)
            slot = tl.where(offs_e == victim, -1, tl.where(offs_e == expert, staged, slot))
            tl.store(staging_ptr + j, freed)
            evictions += 1
    tl.store(slot_ptr + offs_e, slot, mask=e_ok)
    tl.store(stamp_ptr + offs_e, stamp, mask=e_ok)
    tl.store(clock_ptr, clock)
    tl.store(counters_ptr, tl.load(counters_ptr) + hits)
    tl.store(counters_ptr + 1, tl.load(counters_ptr + 1) + n_miss.to(tl.int64))
    tl.store(counters_ptr + 2, tl.load(counters_ptr + 2) + evictions.to(tl.int64))


def byte_rows(t: torch.Tensor) -> torch.Tensor:
    """A tensor [N, ...] as [N, bytes of one row] uint8 (for the copy)."""
    assert t.is_contiguous()
    return t.view(torch.uint8).view(t.shape[0], -1)


def resolve(
    experts_R: torch.Tensor,
    slot_E: torch.Tensor,
    staging_M: torch.Tensor,
    copies: list[tuple[torch.Tensor, torch.Tensor]],
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Stage the call's missed experts and return its map `table` int32 [E].

    copies: per expert tensor (host [E, n] uint8, pinned on a GPU; pool [P, n] uint8), as
    byte_rows gives them. out: (table_E, missed_M, needed_E) int32 buffers, rewritten."""
    table_E, missed_M, needed_E = out
    e, m, r = slot_E.numel(), staging_M.numel(), experts_R.numel()
    assert 0 < len(copies) <= MAX_TENSORS and m >= 1
    args: list[object] = []
    for host, pool in copies:
        n = host.shape[1]
        assert pool.shape[1] == n and host.shape[0] == e
        args += [host, pool, n, triton.cdiv(n, _CHUNK)]
    pad = copies[0]
    for _ in range(MAX_TENSORS - len(copies)):  # no chunks: never read
        args += [pad[0], pad[1], 0, 0]
    block_e = triton.next_power_of_2(e)
    # Programs for the largest copy a call can need; those past the work exit at once.
    programs = 1 if interpreting() else 4 * num_sms()
    _resolve_kernel[(programs,)](
        experts_R,
        slot_E,
        staging_M,
        table_E,
        missed_M,
        needed_E,
        r,
        e,
        m,
        *args,
        BLOCK_E=block_e,
        BLOCK_R=max(1, min(triton.next_power_of_2(max(r, 1)), 8192 // block_e)),
        BLOCK_M=triton.next_power_of_2(m),
        CHUNK=_CHUNK,
        num_warps=4,
        **pdl.LAUNCH,
    )
    return table_E


def adopt(
    needed_E: torch.Tensor,
    missed_M: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    staging_M: torch.Tensor,
) -> None:
    """Admit the call's staged misses into the layer's slots (state: slot_E, stamp_E,
    clock_1, counters_3, all updated in place; staging_M too)."""
    slot_E, stamp_E, clock_1, counters_3 = state
    e, m = slot_E.numel(), staging_M.numel()
    _adopt_kernel[(1,)](
        needed_E,
        missed_M,
        slot_E,
        stamp_E,
        clock_1,
        staging_M,
        counters_3,
        e,
        m,
        BLOCK_E=triton.next_power_of_2(e),
        BLOCK_M=triton.next_power_of_2(m),
        num_warps=4,
        **pdl.LAUNCH,
    )
