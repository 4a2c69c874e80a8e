"""RMSNorm and rotary embedding as one Triton kernel each, rounding where the readable path does.

In a CUDA-graph decode step every elementwise torch op is its own kernel of a few microseconds
(RMSNorm is six, rotary ten for q and k): at batch 1 those gaps cost as much as reading the
attention weights. These kernels do each in one pass. Twins: moeserve.model.layers.rms_norm
and moeserve.model.rotary.apply_rotary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import interpreting, pdl
from moeserve.kernels.pdl import wait_prior

# A per-head RMSNorm of q and k before the rotation: (q weight [X], k weight [X], eps).
QKNorm = tuple[torch.Tensor, torch.Tensor, float]
# An MoE router for the residual-add norm to run on its output: (weight [E, D], bias [E] or None).
RouterRows = tuple[torch.Tensor, torch.Tensor | None]


@triton.jit
def inv_rms(x, D, eps):
    """1 / RMS of one float32 row [BLOCK] (entries past D zero), + eps inside the root."""
    return 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)


@triton.jit
def scale_normed(x, inv, w_ptr, offs, ok, dtype: tl.constexpr):
    """weight * x * inv at offs (any shape), in `dtype`: the reference rounds the normalised
    values to the model dtype, then multiplies the weight."""
    xn = (x * inv).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    return (w * xn).to(dtype)


@triton.jit
def rms_row(x, w_ptr, offs, ok, D, eps, out_ptr):
    """weight * normalise(x) of one float32 row, in out_ptr's dtype."""
    return scale_normed(x, inv_rms(x, D, eps), w_ptr, offs, ok, out_ptr.dtype.element_ty)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, D, stride_x, stride_o, eps, BLOCK_D: tl.constexpr):
    wait_prior()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    ok = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, rms_row(x, w_ptr, offs, ok, D, eps, out_ptr), mask=ok)


def rms_norm(x_TD: torch.Tensor, weight_D: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * normalise(x) over the last dim of a 2-D [T, D] tensor of T > 0 rows with unit
    column stride (the rows may be strided)."""
    t, d = x_TD.shape
    assert t and x_TD.stride(1) == 1
    out = torch.empty((t, d), dtype=x_TD.dtype, device=x_TD.device)
    _rms_norm_kernel[(t,)](
        x_TD,
        weight_D,
        out,
        d,
        x_TD.stride(0),
        out.stride(0),
        eps,
        BLOCK_D=triton.next_power_of_2(d),
        num_warps=4 if d <= 4096 else 8,
        **pdl.LAUNCH,
    )
    return out


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,
    d_ptr,
    sum_ptr,
    out_ptr,
    w_ptr,
    w_router_ptr,  # [E, D] (ROUTER_ROWS)
    router_bias_ptr,  # [E] (ROUTER_BIAS)
    logits_ptr,  # [1, T, E] float32 (ROUTER_ROWS)
    D,
    E,
    stride_x,
    stride_d,
    stride_s,
    stride_o,
    stride_wr,
    stride_lt,
    eps,
    stride_dp,
    BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr,
    ROUTER_ROWS: tl.constexpr,
    ROUTER_BIAS: tl.constexpr,
):
    offs = tl.arange(0, BLOCK_D)
    ok = offs < D
    if ROUTER_ROWS > 0:
        # This program's router rows load before the wait (no kernel writes them): their
        # latency overlaps the attention's output projection still running.
        e = tl.program_id(1) * ROUTER_ROWS + tl.arange(0, ROUTER_ROWS)
        e_ok = e < E
        w_r = tl.load(
            w_router_ptr + e[:, None].to(tl.int64) * stride_wr + offs[None, :],
            mask=e_ok[:, None] & ok[None, :],
            other=0.0,
        )
    wait_prior()
    row = tl.program_id(0).to(tl.int64)
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    if SPLIT == 0:
        d = tl.load(d_ptr + row * stride_d + offs, mask=ok, other=0.0).to(tl.float32)
    else:  # float32 partials of the projection (kernels.linear), rounded as F.linear's output
        d = tl.zeros([BLOCK_D], dtype=tl.float32)
        for p in tl.static_range(SPLIT):
            d += tl.load(d_ptr + p * stride_dp + row * stride_d + offs, mask=ok, other=0.0)
        d = d.to(sum_ptr.dtype.element_ty).to(tl.float32)
    # The residual add rounds to the model dtype; the norm reads the rounded sum.
    s = (x + d).to(sum_ptr.dtype.element_ty)
    s = s.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(s * s, 0) / D + eps)
    sn = (s * inv).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    out = (w * sn).to(out_ptr.dtype.element_ty)
    # With router programs every program of the row computes the norm; the first stores it.
    if tl.program_id(1) == 0:
        tl.store(sum_ptr + row * stride_s + offs, s.to(sum_ptr.dtype.element_ty), mask=ok)
        tl.store(out_ptr + row * stride_o + offs, out, mask=ok)
    if ROUTER_ROWS > 0:
        # The router on the normed row as one float32 partial of a split-K GEMV (kernels.linear):
        # the routing program rounds it as F.linear (a float32 router: on float32 activations).
        logits = tl.sum(w_r.to(tl.float32) * out.to(tl.float32)[None, :], axis=1)
        if ROUTER_BIAS:
            logits += tl.load(router_bias_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
        tl.store(logits_ptr + row * stride_lt + e, logits, mask=e_ok)


# Router rows a program of the residual-add norm multiplies: each program also redoes the row's
# norm (a few KB from L2), so a row takes about this many weight values a program (a 2048-wide
# model: four rows, 16 KB of bf16 held in registers across the wait) and ceil(E / rows)
# programs.
_ROUTER_VALUES = 8192


def add_rms_norm(
    x_TD: torch.Tensor,
    delta_TD: torch.Tensor,
    weight_D: torch.Tensor,
    eps: float,
    router: RouterRows | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x + delta, rms_norm(x + delta), router logits) in one pass; the readable twin is the
    two ops (and F.linear of the norm's output by the router).

    delta_TD may be float32 partials [split, T, D] of a linear layer (kernels.linear): they are
    added and rounded to x's dtype first, as the layer's output would have been. T > 0 rows,
    each with unit column stride (the caller takes the readable ops otherwise).
    router: (weight [E, D] in x's dtype or float32, bias [E] or None): also the MoE router's
    logits of the normed rows, as float32 split-K partials [1, T, E] of one split
    (kernels.linear's format, which the routing program reads); else None."""
    t, d = x_TD.shape
    split, stride_p = 0, 0
    if delta_TD.dim() == 3:
        split, stride_p = delta_TD.shape[0], delta_TD.stride(0)
        delta_TD = delta_TD[0]
    assert t and x_TD.stride(1) == 1 and delta_TD.stride(1) == 1
    s = torch.empty((t, d), dtype=x_TD.dtype, device=x_TD.device)
    out = torch.empty_like(s)
    block_d = triton.next_power_of_2(d)
    rows, programs, logits = 0, 1, None
    w_r = b_r = out  # unused pointers without a router
    if router is not None:
        w_r, bias = router
        e = w_r.shape[0]
        assert w_r.shape == (e, d) and w_r.stride(1) == 1
        assert w_r.dtype in (x_TD.dtype, torch.float32)
        rows = min(triton.next_power_of_2(e), max(1, _ROUTER_VALUES // block_d))
        if interpreting():
            rows = min(rows, 2)  # several programs a row, as on the GPU
        programs = triton.cdiv(e, rows)
        logits = torch.empty((1, t, e), dtype=torch.float32, device=x_TD.device)
        b_r = bias if bias is not None else out
    _add_rms_norm_kernel[(t, programs)](
        x_TD,
        delta_TD,
        s,
        out,
        weight_D,
        w_r,
        b_r,
        logits if logits is not None else out,
        d,
        w_r.shape[0] if router is not None else 0,
        x_TD.stride(0),
        delta_TD.stride(0),
        s.stride(0),
        out.stride(0),
        w_r.stride(0),
        logits.stride(1) if logits is not None else 0,
        eps,
        stride_p,
        BLOCK_D=block_d,
        SPLIT=split,
        ROUTER_ROWS=rows,
        ROUTER_BIAS=router is not None and router[1] is not None,
        num_warps=4 if d <= 4096 else 8,
        **pdl.LAUNCH,
    )
    return s, out, logits


@triton.jit
def load_partials(ptr, offs, ok, stride_p, like_ptr, SPLIT: tl.constexpr):
    """Values at ptr + offs: loaded, or with SPLIT > 0 the sum of SPLIT float32 partials
    (stride_p apart) rounded to like_ptr's dtype (what F.linear would have stored)."""
    if SPLIT == 0:
        return tl.load(ptr + offs, mask=ok, other=0.0)
    acc = tl.load(ptr + offs, mask=ok, other=0.0)
    for p in tl.static_range(1, SPLIT):
        acc += tl.load(ptr + p * stride_p + offs, mask=ok, other=0.0)
    return acc.to(like_ptr.dtype.element_ty)


@triton.jit
def rotate_halves(x1, x2, cos_row, sin_row, offs, ok, HALF):
    """x * cos + rotate_half(x) * sin of one head's halves x1, x2 (model dtype) against a cos
    and a sin row: float32 values rounded to x's dtype after each product and the sum (the
    compiler may still contract a product into the add: bf16 results can differ by an ulp)."""
    c1 = tl.load(cos_row + offs, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(cos_row + HALF + offs, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(sin_row + offs, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(sin_row + HALF + offs, mask=ok, other=0.0).to(tl.float32)
    dt = x1.dtype
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    y1 = (a1 * c1).to(dt).to(tl.float32) + (-a2 * s1).to(dt).to(tl.float32)
    y2 = (a2 * c2).to(dt).to(tl.float32) + (a1 * s2).to(dt).to(tl.float32)
    return y1, y2


@triton.jit
def norm_head(x1, x2, x3, w_ptr, offs, ok, offs_t, ok_t, X, eps, HALF, TAIL: tl.constexpr):
    """weight * normalise(head) of one head held as its halves x1, x2 and its unrotated tail
    x3 (model dtype), rounded as rms_row: float32 statistics over all X entries."""
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    ss = tl.sum(a1 * a1, 0) + tl.sum(a2 * a2, 0)
    if TAIL > 0:
        a3 = x3.to(tl.float32)
        ss += tl.sum(a3 * a3, 0)
    inv = 1.0 / tl.sqrt(ss / X + eps)
    dt = x1.dtype
    w1 = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + HALF + offs, mask=ok, other=0.0).to(tl.float32)
    y1 = (w1 * (a1 * inv).to(dt).to(tl.float32)).to(dt)
    y2 = (w2 * (a2 * inv).to(dt).to(tl.float32)).to(dt)
    y3 = x3
    if TAIL > 0:
        w3 = tl.load(w_ptr + offs_t, mask=ok_t, other=0.0).to(tl.float32)
        y3 = (w3 * (a3 * inv).to(dt).to(tl.float32)).to(dt)
    return y1, y2, y3


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    q_out_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_p,
    stride_ot,
    stride_oh,
    stride_ct,
    H,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_slot,
    q_norm_ptr,  # [X] (NORM)
    k_norm_ptr,
    eps,
    HALF: tl.constexpr,
    BLOCK: tl.constexpr,
    WRITE_KV: tl.constexpr,
    TABLE: tl.constexpr,
    SPLIT: tl.constexpr,
    TAIL: tl.constexpr = 0,
    BLOCK_TAIL: tl.constexpr = 1,
    NORM: tl.constexpr = False,  # q and k RMSNormed per head first (Qwen3's q_norm, k_norm)
):
    wait_prior()
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    if h < H:
        base = q_ptr + t * stride_qt + h * stride_qh
    else:
        base = k_ptr + t * stride_kt + (h - H) * stride_kh
    offs = tl.arange(0, BLOCK)
    ok = offs < HALF
    x1 = load_partials(base, offs, ok, stride_p, q_out_ptr, SPLIT)
    x2 = load_partials(base + HALF, offs, ok, stride_p, q_out_ptr, SPLIT)
    offs_t = 2 * HALF + tl.arange(0, BLOCK_TAIL)
    ok_t = offs_t < 2 * HALF + TAIL
    x3 = x1  # the unrotated tail (partial rotary), where there is one
    if TAIL > 0:
        x3 = load_partials(base, offs_t, ok_t, stride_p, q_out_ptr, SPLIT)
    if NORM:
        if h < H:  # noqa: SIM108 (a runtime branch in the kernel, not an expression)
            w_ptr = q_norm_ptr
        else:
            w_ptr = k_norm_ptr
        x1, x2, x3 = norm_head(
            x1, x2, x3, w_ptr, offs, ok, offs_t, ok_t, 2 * HALF + TAIL, eps, HALF, TAIL
        )
    # The cos/sin row: the table's row of this token's position, or the caller's row t.
    c = t
    if TABLE:
        c = tl.load(pos_ptr + t).to(tl.int64)
    y1, y2 = rotate_halves(x1, x2, cos_ptr + c * stride_ct, sin_ptr + c * stride_ct, offs, ok, HALF)
    dt = x1.dtype
    if h < H:  # the rotated query: in place, or out of the partials into q_out
        out = q_out_ptr + t * stride_ot + h * stride_oh
        tl.store(out + offs, y1.to(dt), mask=ok)
        tl.store(out + HALF + offs, y2.to(dt), mask=ok)
    elif SPLIT == 0:  # the key in place (from partials only into the cache: no key tensor)
        tl.store(base + offs, y1.to(dt), mask=ok)
        tl.store(base + HALF + offs, y2.to(dt), mask=ok)
    if WRITE_KV and h >= H:  # the rotated key and its value into their cache slot
        g = h - H
        dst = tl.load(slot_ptr + t) * stride_slot + g * (2 * HALF + TAIL)
        tl.store(k_cache_ptr + dst + offs, y1.to(dt), mask=ok)
        tl.store(k_cache_ptr + dst + HALF + offs, y2.to(dt), mask=ok)
        vbase = v_ptr + t * stride_vt + g * stride_vh
        v1 = load_partials(vbase, offs, ok, stride_p, q_out_ptr, SPLIT)
        v2 = load_partials(vbase + HALF, offs, ok, stride_p, q_out_ptr, SPLIT)
        tl.store(v_cache_ptr + dst + offs, v1, mask=ok)
        tl.store(v_cache_ptr + dst + HALF + offs, v2, mask=ok)
    if TAIL > 0:  # partial rotary: the head's last TAIL entries pass through unrotated
        # In place (SPLIT 0) without a norm the query's and key's tails are already there.
        if h < H and (SPLIT > 0 or NORM):
            tl.store(q_out_ptr + t * stride_ot + h * stride_oh + offs_t, x3, mask=ok_t)
        if h >= H and SPLIT == 0 and NORM:
            tl.store(base + offs_t, x3, mask=ok_t)
        if WRITE_KV and h >= H:
            g = h - H
            dst = tl.load(slot_ptr + t) * stride_slot + g * (2 * HALF + TAIL)
            tl.store(k_cache_ptr + dst + offs_t, x3, mask=ok_t)
            vbase = v_ptr + t * stride_vt + g * stride_vh
            v3 = load_partials(vbase, offs_t, ok_t, stride_p, q_out_ptr, SPLIT)
            tl.store(v_cache_ptr + dst + offs_t, v3, mask=ok_t)


def _rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    q_out: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions_T: torch.Tensor | None,
    kv_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    stride_p: int,
    split: int,
    qk_norm: QKNorm | None = None,
) -> None:
    """One launch over t tokens x (H query + G key heads); q, k, v are [T, heads, X] views.
    cos/sin narrower than X (partial rotary): the first cos.shape[1] of each head rotate, the
    rest pass through."""
    t, h, x = q.shape
    g = k.shape[1]
    if not t:
        return
    rot = cos.shape[1]
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos.stride(1) == 1 and rot % 2 == 0
    assert cos.stride() == sin.stride() and q_out.stride(2) == 1 and rot <= x
    half, tail = rot // 2, x - rot
    if kv_cache is not None:
        assert v is not None and v.stride(2) == 1
        k_cache, v_cache, slots_T = kv_cache
        assert k_cache.is_contiguous() and v_cache.is_contiguous()
        cache = (k_cache, v_cache, slots_T, g * x)
    else:
        v, cache = k, (k, k, k, 0)  # unused pointers
    assert v is not None
    if qk_norm is not None:
        q_w, k_w, eps = qk_norm
        assert q_w.shape == k_w.shape == (x,) and q_w.stride(0) == k_w.stride(0) == 1
    else:
        q_w, k_w, eps = q_out, q_out, 0.0  # unused pointers
    _rotary_kernel[(t, h + g)](
        q,
        k,
        v,
        q_out,
        cos,
        sin,
        positions_T if positions_T is not None else q_out,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        stride_p,
        q_out.stride(0),
        q_out.stride(1),
        cos.stride(0),
        h,
        *cache,
        q_w,
        k_w,
        float(eps),
        HALF=half,
        BLOCK=triton.next_power_of_2(half),
        WRITE_KV=kv_cache is not None,
        TABLE=positions_T is not None,
        SPLIT=split,
        TAIL=tail,
        BLOCK_TAIL=triton.next_power_of_2(max(tail, 1)),
        NORM=qk_norm is not None,
        num_warps=1,
        **pdl.LAUNCH,
    )


def apply_rotary_(
    q_THX: torch.Tensor,
    k_TGX: torch.Tensor,
    cos_TX: torch.Tensor,
    sin_TX: torch.Tensor,
    kv_write: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    positions_T: torch.Tensor | None = None,
    qk_norm: QKNorm | None = None,
) -> None:
    """Rotate q and k in place (rotate-half layout); one launch for both. kv_write: (v_TGX,
    k_cache_NSGX, v_cache_NSGX, slot_mapping_T): also store the rotated keys and the values
    into their slots of the paged cache (layers.write_kv's job), in the same launch.
    positions_T: cos/sin are whole tables [P, X], and token t reads row positions_T[t].
    qk_norm: (q_norm_X, k_norm_X, eps): each q and k head RMSNormed first (layers.rms_norm
    over the head, as Qwen3's q_norm and k_norm), in the same launch."""
    v, cache = (kv_write[0], kv_write[1:]) if kv_write is not None else (None, None)
    _rotary(q_THX, k_TGX, v, q_THX, cos_TX, sin_TX, positions_T, cache, 0, 0, qk_norm)


def rotary_from_partials(
    qkv_STN: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    cos_TX: torch.Tensor,
    sin_TX: torch.Tensor,
    kv_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    dtype: torch.dtype,
    positions_T: torch.Tensor | None = None,
    qk_norm: QKNorm | None = None,
) -> torch.Tensor:
    """The qkv projection's float32 split-K partials (kernels.linear) [split, T, (H+2G)X] to
    the rotated queries [T, H, X] in `dtype`, with the rotated keys and the values stored in
    their cache slots (kv_cache: k_cache, v_cache, slot_mapping_T). Each element is summed and
    rounded to `dtype` first, as the projection's output would have been; qk_norm as
    apply_rotary_'s, on the rounded heads."""
    split, t, n = qkv_STN.shape
    x = n // (num_heads + 2 * num_kv_heads)
    assert qkv_STN.dtype == torch.float32 and qkv_STN.stride(2) == 1
    rows = qkv_STN[0]
    q = rows[:, : num_heads * x].unflatten(1, (num_heads, x))
    k = rows[:, num_heads * x : (num_heads + num_kv_heads) * x].unflatten(1, (num_kv_heads, x))
    v = rows[:, (num_heads + num_kv_heads) * x :].unflatten(1, (num_kv_heads, x))
    q_out = torch.empty(t, num_heads, x, dtype=dtype, device=qkv_STN.device)
    _rotary(
        q, k, v, q_out, cos_TX, sin_TX, positions_T, kv_cache, qkv_STN.stride(0), split, qk_norm
    )
    return q_out
