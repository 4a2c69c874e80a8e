"""Routing and expert alignment of a decode-sized batch in one Triton program.

The torch route (softmax, top-k, renormalise, padding-row sentinel, per-expert counters) and
moe_align (count, pad, cumsum, sort, rank, scatter, searchsorted) are ~27 small kernels per
MoE layer; inside a CUDA graph each still costs a few microseconds of launch gap, as much as
reading the attention weights at batch 1. One program does it all for batches whose
[tokens, experts] router tile fits in registers; larger batches keep the torch ops.
Twins: the torch backend of moeserve.model.router.route and moeserve.kernels.fused_moe.moe_align.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import pdl
from moeserve.kernels.pdl import wait_prior

# The whole [tokens, experts] tile lives in one program: beyond this the torch path wins.
MAX_TILE = 8192


# How partials are rounded before the softmax: F.linear's output dtype.
_ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def applicable(num_tokens: int, num_experts: int, top_k: int) -> bool:
    pad = triton.next_power_of_2
    return num_tokens > 0 and pad(num_tokens) * pad(max(num_experts, top_k)) <= MAX_TILE


# Arguments that change from step to step are not specialised on (Triton would compile a
# variant per divisibility-by-16 pattern, in the middle of serving).
@triton.jit(do_not_specialize=["T", "P", "Q"])
def _route_align_kernel(
    logits_ptr,
    stride_l,
    stride_ls,
    valid_ptr,
    weights_ptr,
    experts_ptr,
    sorted_ptr,
    block_expert_ptr,
    num_post_pad_ptr,
    counts_ptr,
    T,
    P,
    Q,
    E: tl.constexpr,
    K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    T_PAD: tl.constexpr,
    E_PAD: tl.constexpr,
    K_PAD: tl.constexpr,
    P_PAD: tl.constexpr,
    Q_PAD: tl.constexpr,
    Q_CHUNK: tl.constexpr,
    RENORM: tl.constexpr,
    HAS_VALID: tl.constexpr,
    COUNT: tl.constexpr,
    SPLIT: tl.constexpr,
    ROUND: tl.constexpr,
    bias_ptr=None,
    scale=1.0,
    SIGMOID: tl.constexpr = False,
    BIAS: tl.constexpr = False,
    N_GROUP: tl.constexpr = 0,
    TOPK_GROUP: tl.constexpr = 0,
    GROUP_MAX: tl.constexpr = False,
    G_PAD: tl.constexpr = 1,
    ALIGN: tl.constexpr = True,
):
    wait_prior()
    rows = tl.arange(0, T_PAD)
    cols = tl.arange(0, E_PAD)
    kk = tl.arange(0, K_PAD)
    row_ok = rows < T
    col_ok = cols < E
    tile_ok = row_ok[:, None] & col_ok[None, :]
    tile = logits_ptr + rows[:, None] * stride_l + cols[None, :]
    if SPLIT == 0:
        x = tl.load(tile, mask=tile_ok, other=-float("inf")).to(tl.float32)
    else:  # float32 partials of the router GEMV (kernels.linear): add, round as F.linear
        x = tl.zeros([T_PAD, E_PAD], dtype=tl.float32)
        for s in tl.static_range(SPLIT):
            x += tl.load(tile + s * stride_ls, mask=tile_ok, other=0.0)
        if ROUND == 1:
            x = x.to(tl.bfloat16).to(tl.float32)
        elif ROUND == 2:
            x = x.to(tl.float16).to(tl.float32)
        x = tl.where(tile_ok, x, -float("inf"))
    # Scores in float32, as route() does: softmax over every expert, or sigmoid.
    x = tl.where(row_ok[:, None], x, 0.0)  # padding rows: finite, ignored below
    if SIGMOID:
        p = tl.where(col_ok[None, :], tl.sigmoid(x), 0.0)
    else:
        p = tl.exp(x - tl.max(x, 1)[:, None])
        p = tl.where(col_ok[None, :], p, 0.0)
        p = p / tl.sum(p, 1)[:, None]
    # The selection's scores: + the correction bias, limited to the best groups.
    c = p
    if BIAS:
        c = c + tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
    c = tl.where(col_ok[None, :], c, -float("inf"))
    if N_GROUP > 0:
        c = _in_best_groups(c, cols, E // N_GROUP, N_GROUP, TOPK_GROUP, GROUP_MAX, G_PAD)

    # Top-k by repeated argmax (first index on ties) of the selection scores; the weight is
    # the unbiased score; taken entries drop to -inf and remember their rank k (k_te, else -1).
    w_tk = tl.zeros([T_PAD, K_PAD], dtype=tl.float32)
    e_tk = tl.full([T_PAD, K_PAD], E, dtype=tl.int32)
    k_te = tl.full([T_PAD, E_PAD], -1, dtype=tl.int32)
    total = tl.zeros([T_PAD], dtype=tl.float32)
    for k in tl.static_range(K):
        idx = tl.argmax(c, 1).to(tl.int32)
        taken = cols[None, :] == idx[:, None]
        best = tl.sum(tl.where(taken, p, 0.0), 1)
        w_tk = tl.where(kk[None, :] == k, best[:, None], w_tk)
        e_tk = tl.where(kk[None, :] == k, idx[:, None], e_tk)
        c = tl.where(taken, -float("inf"), c)
        k_te = tl.where(taken, k, k_te)
        total += best
    if RENORM:
        if SIGMOID:
            total += 1e-20  # as route(): a sigmoid router's sum may be tiny
        w_tk = w_tk / total[:, None]
    w_tk = w_tk * scale
    entry_ok = row_ok[:, None] & (kk[None, :] < K)
    valid = row_ok
    if HAS_VALID:
        valid = valid & (tl.load(valid_ptr + rows, mask=row_ok, other=0) != 0)
    e_tk = tl.where(valid[:, None] & entry_ok, e_tk, E)  # E: the sentinel that routes nowhere
    flat = rows[:, None] * K + kk[None, :]
    tl.store(weights_ptr + flat, w_tk, mask=entry_ok)
    tl.store(experts_ptr + flat, e_tk.to(tl.int64), mask=entry_ok)

    # Alignment, vectorised over experts (a loop over them costs a dependent round trip each:
    # 30 us at 128 experts): expert e's assignments fill [start_e, start_e + count_e) in flat
    # order, each group padded to BLOCK_M; the rest of the P slots hold the sentinel T*K. A
    # token picks an expert at most once, so its rank in the group is the number of earlier
    # tokens that picked it.
    taken = ((k_te >= 0) & valid[:, None] & col_ok[None, :]).to(tl.int32)
    count = tl.sum(taken, 0)
    if COUNT:
        before = tl.load(counts_ptr + cols, mask=col_ok, other=0)
        tl.store(counts_ptr + cols, before + count.to(tl.int64), mask=col_ok)
    if not ALIGN:
        return
    padded = (count + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, 0)
    rank = tl.cumsum(taken, 0) - taken
    dest = (end - padded)[None, :] + rank
    pp = tl.arange(0, P_PAD)
    tl.store(sorted_ptr + pp, tl.full([P_PAD], 0, tl.int32) + T * K, mask=pp < P)
    tl.debug_barrier()  # the fill above must land before the scatter below overwrites it
    tl.store(sorted_ptr + dest, rows[:, None] * K + k_te, mask=taken != 0)
    # Block q belongs to the first expert whose group ends past its first slot.
    used = tl.sum(padded, 0)
    for q0 in tl.static_range(0, Q_PAD, Q_CHUNK):
        qq = q0 + tl.arange(0, Q_CHUNK)
        first = qq * BLOCK_M
        owner = tl.sum(((end[None, :] <= first[:, None]) & col_ok[None, :]).to(tl.int32), 1)
        owner = tl.where(first < used, owner, -1)
        tl.store(block_expert_ptr + qq, owner, mask=qq < Q)
    tl.store(num_post_pad_ptr, used)


@triton.jit
def _in_best_groups(
    c,
    cols,
    PER: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    GROUP_MAX: tl.constexpr,
    G_PAD: tl.constexpr,
):
    """c [T, E] with every expert outside each row's TOPK_GROUP best groups (of PER experts,
    scored by their best, or the sum of their two best) at -inf."""
    gg = tl.arange(0, G_PAD)
    group = cols // PER
    gscore = tl.full([c.shape[0], G_PAD], -float("inf"), dtype=tl.float32)
    for g in tl.static_range(N_GROUP):
        cg = tl.where((group == g)[None, :], c, -float("inf"))
        val = tl.max(cg, 1)
        if not GROUP_MAX:
            first = tl.argmax(cg, 1)
            val += tl.max(tl.where(cols[None, :] == first[:, None], -float("inf"), cg), 1)
        gscore = tl.where(gg[None, :] == g, val[:, None], gscore)
    keep = tl.zeros(c.shape, dtype=tl.int32)
    for _ in tl.static_range(TOPK_GROUP):
        gi = tl.argmax(gscore, 1)
        gscore = tl.where(gg[None, :] == gi[:, None], -float("inf"), gscore)
        keep = tl.where(group[None, :] == gi[:, None], 1, keep)
    return tl.where(keep != 0, c, -float("inf"))


def route_and_align(
    router_logits_TE: torch.Tensor,
    top_k: int,
    renormalize: bool,
    block_m: int,
    valid_T: torch.Tensor | None = None,
    counts_E: torch.Tensor | None = None,
    logits_dtype: torch.dtype = torch.float32,
    *,
    sigmoid: bool = False,
    bias_E: torch.Tensor | None = None,
    groups: tuple[int, int, bool] | None = None,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """(weights_TK float32, experts_TK int64, (sorted_ids_P, block_expert_Q, num_post_pad_1)),
    the alignment None when block_m is 0 (the GEMVs of kernels.moe_gemv need none).

    The rules of route(): softmax or `sigmoid` scores, the float32 correction bias_E [E] for
    selection only, `groups` (n_group, topk_group, scored by their max rather than the sum of
    their two best), renormalised weights times `scale`.

    Same contract as route() followed by moe_align(); rows with valid_T == 0 get the sentinel
    expert E. counts_E (int64 [E]), when given, is incremented by the tokens each expert got.
    router_logits_TE may also be float32 partials [split, T, E] (kernels.linear) with
    `logits_dtype` the dtype F.linear would have returned: they are added and rounded to it.
    """
    split = 0
    stride_s = 0
    if router_logits_TE.dim() == 3:
        split, stride_s = router_logits_TE.shape[0], router_logits_TE.stride(0)
        router_logits_TE = router_logits_TE[0]
    t, e = router_logits_TE.shape
    dev = router_logits_TE.device
    assert router_logits_TE.stride(1) == 1 and applicable(t, e, top_k)
    align = block_m > 0
    weights = torch.empty(t, top_k, dtype=torch.float32, device=dev)
    experts = torch.empty(t, top_k, dtype=torch.int64, device=dev)
    p = q = 1
    # Without alignment its outputs are never written: the pointers go unused.
    sorted_ids = block_expert = num_post_pad = experts
    if align:
        p = triton.cdiv(t * top_k + e * (block_m - 1), block_m) * block_m
        q = p // block_m
        sorted_ids = torch.empty(p, dtype=torch.int32, device=dev)
        block_expert = torch.empty(q, dtype=torch.int32, device=dev)
        num_post_pad = torch.empty(1, dtype=torch.int32, device=dev)
    pad = triton.next_power_of_2
    tile = pad(t) * pad(e)
    _route_align_kernel[(1,)](
        router_logits_TE,
        router_logits_TE.stride(0),
        stride_s,
        valid_T if valid_T is not None else num_post_pad,  # unused pointer when absent
        weights,
        experts,
        sorted_ids,
        block_expert,
        num_post_pad,
        counts_E if counts_E is not None else weights,  # unused pointer when absent
        t,
        p,
        q,
        E=e,
        K=top_k,
        BLOCK_M=max(block_m, 1),
        T_PAD=pad(t),
        E_PAD=pad(e),
        K_PAD=pad(top_k),
        P_PAD=pad(p),
        Q_PAD=pad(q),
        Q_CHUNK=min(pad(q), max(1, MAX_TILE // pad(e))),
        RENORM=renormalize,
        HAS_VALID=valid_T is not None,
        COUNT=counts_E is not None,
        SPLIT=split,
        ROUND=_ROUND[logits_dtype] if split else 0,
        bias_ptr=bias_E if bias_E is not None else weights,  # unused pointer when absent
        scale=float(scale),
        SIGMOID=sigmoid,
        BIAS=bias_E is not None,
        N_GROUP=groups[0] if groups else 0,
        TOPK_GROUP=groups[1] if groups else 0,
        GROUP_MAX=groups[2] if groups else False,
        G_PAD=pad(groups[0]) if groups else 1,
        ALIGN=align,
        # The [tokens, experts] tiles live in registers: more warps as they grow, so that a
        # 64 x 128 tile (Qwen3-30B-A3B at batch 64) does not spill. A decode token's routing
        # alone takes one warp: each of the top-k argmaxes is then a warp shuffle, not a
        # round trip through shared memory.
        num_warps=max(4, min(16, tile // 512)) if align or tile > 256 else 1,
        **pdl.LAUNCH,
    )
    return weights, experts, (sorted_ids, block_expert, num_post_pad) if align else None
