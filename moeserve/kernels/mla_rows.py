"""Multi-head latent attention's decode steps around the attention kernel (mla_attention.py),
as Triton kernels: what goes into the latent cache and the queries, and what comes out.

    write_latent_rows  each token's cache row (normalised latent, rotated rope key)
    decode_inputs      a few decodes' absorbed queries, rope queries and cache rows, from the
                       split-K partials of the stacked q / kv_a projection (plain q)
    value_heads        the latent outputs through kv_b's value half (the readable path's bmm)

Values round where the readable path (model/mla.py) rounds. CUDA-graph safe: no host reads.
Shapes: T tokens, H heads, P nope dims, R rope dims, C kv_lora_rank, W v_head_dim, Y = C + R.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import interpreting, pdl
from moeserve.kernels.norm_rope import load_partials, rms_row, rotate_halves
from moeserve.kernels.pdl import wait_prior


@triton.jit
def _latent_rows_kernel(
    kv_ptr,  # [T, Y]: the raw latent, then the rotated rope key
    w_ptr,  # [C] the latent's RMSNorm weight
    cache_ptr,  # [N * S, Y] rows
    slot_ptr,  # [T]
    eps,
    stride_kv,
    stride_row,
    C: tl.constexpr,
    R: tl.constexpr,
    C_PAD: tl.constexpr,
    R_PAD: tl.constexpr,
):
    wait_prior()
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    cc = tl.arange(0, C_PAD)
    c_ok = cc < C
    x = tl.load(kv_ptr + t * stride_kv + cc, mask=c_ok, other=0.0).to(tl.float32)
    row = cache_ptr + slot * stride_row
    tl.store(row + cc, rms_row(x, w_ptr, cc, c_ok, C, eps, cache_ptr), mask=c_ok)
    rc = tl.arange(0, R_PAD)
    r_ok = rc < R
    rope = tl.load(kv_ptr + t * stride_kv + C + rc, mask=r_ok, other=0.0)
    tl.store(row + C + rc, rope, mask=r_ok)


def write_latent_rows(
    kv_TY: torch.Tensor,
    norm_weight_C: torch.Tensor,
    eps: float,
    cache_NS1Y: torch.Tensor,
    slot_mapping_T: torch.Tensor,
) -> None:
    """Each token's cache row in one launch: its latent kv_TY[t, :C] RMS-normalised with
    norm_weight_C, then its (already rotated) rope key kv_TY[t, C:], stored at row
    slot_mapping_T[t] of the cache (the readable path's norm, concatenation and index copy)."""
    t, y = kv_TY.shape
    c = norm_weight_C.shape[0]
    rows_RY = cache_NS1Y.view(-1, y)
    assert kv_TY.stride(1) == 1 and cache_NS1Y.shape[-1] == y and kv_TY.dtype == cache_NS1Y.dtype
    if t:
        _latent_rows_kernel[(t,)](
            kv_TY,
            norm_weight_C,
            rows_RY,
            slot_mapping_T,
            eps,
            kv_TY.stride(0),
            rows_RY.stride(0),
            C=c,
            R=y - c,
            C_PAD=triton.next_power_of_2(c),
            R_PAD=max(2, triton.next_power_of_2(y - c)),
            num_warps=4,
            **pdl.LAUNCH,
        )


@triton.jit
def _rope_from_partials(
    src,  # the token's R rope values in the partials (split 0)
    dst,  # where the R rotated values go
    t,  # the token
    pos_ptr,
    cos_ptr,
    sin_ptr,
    stride_cos,
    stride_split,
    R: tl.constexpr,
    HALF_PAD: tl.constexpr,
    SPLIT: tl.constexpr,
    TABLE: tl.constexpr,  # cos/sin tables read at pos_ptr[t], else token t's rows
):
    """A rope part summed from its partials, rounded, rotated (rotate-half) and stored."""
    HALF: tl.constexpr = R // 2
    hh = tl.arange(0, HALF_PAD)
    ok = hh < HALF
    pos = t
    if TABLE:
        pos = tl.load(pos_ptr + t).to(tl.int64)
    x1 = load_partials(src, hh, ok, stride_split, dst, SPLIT)
    x2 = load_partials(src + HALF, hh, ok, stride_split, dst, SPLIT)
    cos_row, sin_row = cos_ptr + pos * stride_cos, sin_ptr + pos * stride_cos
    y1, y2 = rotate_halves(x1, x2, cos_row, sin_row, hh, ok, HALF)
    tl.store(dst + hh, y1.to(dst.dtype.element_ty), mask=ok)
    tl.store(dst + HALF + hh, y2.to(dst.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["T"])
def _decode_inputs_kernel(
    qkv_ptr,  # [SPLIT, T, H*(P+R) + C + R] float32 partials of q and kv_a
    wk_ptr,  # [H, P, C] kv_b's key half
    norm_ptr,  # [C] the latent's RMSNorm weight
    cos_ptr,  # [positions, R] tables (rotate-half order)
    sin_ptr,
    pos_ptr,  # [T] (TABLE)
    cache_ptr,  # [N * S, Y] rows
    slot_ptr,  # [T]
    q_lat_ptr,  # [T, H, C]
    q_rope_ptr,  # [T, H, R]
    eps,
    stride_split,
    stride_t,
    stride_wh,
    stride_wp,
    stride_cos,
    stride_row,
    T,
    H,
    P: tl.constexpr,
    R: tl.constexpr,
    C: tl.constexpr,
    P_PAD: tl.constexpr,
    C_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    SPLIT: tl.constexpr,
    TABLE: tl.constexpr,  # cos/sin are tables read at pos_ptr's positions, else rows [T, R]
):
    wait_prior()
    j = tl.program_id(0)
    chunks: tl.constexpr = (C + BLOCK_C - 1) // BLOCK_C
    if j < H * chunks:
        # Head h's absorbed queries, latent columns [cb*BLOCK_C, +BLOCK_C), for every token:
        # the key-half tile is read once (a step of T decodes reads kv_b once, as the bmm).
        h = j // chunks
        cb = j % chunks
        pp = tl.arange(0, P_PAD)
        p_ok = pp < P
        cc = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = cc < C
        w = tl.load(
            wk_ptr + h * stride_wh + pp[:, None] * stride_wp + cc[None, :],
            mask=p_ok[:, None] & c_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        for t in range(T):
            head = qkv_ptr + t * stride_t + h * (P + R)
            q_nope = load_partials(head, pp, p_ok, stride_split, q_lat_ptr, SPLIT).to(tl.float32)
            q_lat = tl.sum(w * q_nope[:, None], axis=0).to(q_lat_ptr.dtype.element_ty)
            tl.store(q_lat_ptr + (t * H + h) * C + cc, q_lat, mask=c_ok)
            if cb == 0:  # and its rope part, rotated
                _rope_from_partials(
                    head + P, q_rope_ptr + (t * H + h) * R, t, pos_ptr, cos_ptr, sin_ptr,
                    stride_cos, stride_split, R, HALF_PAD, SPLIT, TABLE,
                )  # fmt: skip
    else:  # token t's cache row: its normalised latent, then its rotated rope key
        tok = (j - H * chunks).to(tl.int64)
        kv = qkv_ptr + tok * stride_t + H * (P + R)
        # Names apart from the other branch's: Triton needs one type per name across both.
        lc = tl.arange(0, C_PAD)
        l_ok = lc < C
        x = load_partials(kv, lc, l_ok, stride_split, cache_ptr, SPLIT).to(tl.float32)
        dst = cache_ptr + tl.load(slot_ptr + tok).to(tl.int64) * stride_row
        tl.store(dst + lc, rms_row(x, norm_ptr, lc, l_ok, C, eps, cache_ptr), mask=l_ok)
        _rope_from_partials(
            kv + C, dst + C, tok, pos_ptr, cos_ptr, sin_ptr,
            stride_cos, stride_split, R, HALF_PAD, SPLIT, TABLE,
        )  # fmt: skip


# Latent columns of the absorbed query per program: DeepSeek's 16 heads x 512 columns are
# 128 programs reading 16 KB of kv_b each (one program per head would stream 128 KB alone),
# each for every token of the step.
DECODE_INPUTS_BLOCK_C = 64


def decode_inputs(
    qkv_STN: torch.Tensor,
    w_k_HPC: torch.Tensor,
    norm_weight_C: torch.Tensor,
    eps: float,
    cos_PR: torch.Tensor,
    sin_PR: torch.Tensor,
    positions_T: torch.Tensor | None,
    cache_NS1Y: torch.Tensor,
    slot_mapping_T: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode step's MLA inputs from the float32 split-K partials of its stacked q / kv_a
    projection (kernels.linear; no q low-rank), in one launch: the absorbed queries
    q_nope @ kv_b's key half [T, H, C], the rotated rope queries [T, H, R], and each token's
    cache row (normalised latent, rotated rope key) stored at its slot. Each projected value
    is summed and rounded first, as F.linear's output would be. cos/sin: [positions, R]
    tables, row positions_T[t] for token t; or with positions_T None their rows [T, R]."""
    split, t, n = qkv_STN.shape
    h, p, c = w_k_HPC.shape
    y = cache_NS1Y.shape[-1]
    r = y - c
    rows_RY = cache_NS1Y.view(-1, y)
    dtype = cache_NS1Y.dtype
    assert n == h * (p + r) + c + r and cos_PR.shape[1] == r and r % 2 == 0
    assert qkv_STN.dtype == torch.float32 and qkv_STN.stride(2) == 1 and qkv_STN.stride(1) == n
    assert w_k_HPC.stride(2) == 1 and cos_PR.stride() == sin_PR.stride() and cos_PR.stride(1) == 1
    q_lat_THC = torch.empty(t, h, c, dtype=dtype, device=qkv_STN.device)
    q_rope_THR = torch.empty(t, h, r, dtype=dtype, device=qkv_STN.device)
    block_c = min(DECODE_INPUTS_BLOCK_C, triton.next_power_of_2(c))
    if t:
        _decode_inputs_kernel[(h * triton.cdiv(c, block_c) + t,)](
            qkv_STN,
            w_k_HPC,
            norm_weight_C,
            cos_PR,
            sin_PR,
            positions_T if positions_T is not None else slot_mapping_T,  # unused without
            rows_RY,
            slot_mapping_T,
            q_lat_THC,
            q_rope_THR,
            eps,
            qkv_STN.stride(0),
            qkv_STN.stride(1),
            w_k_HPC.stride(0),
            w_k_HPC.stride(1),
            cos_PR.stride(0),
            rows_RY.stride(0),
            t,
            h,
            P=p,
            R=r,
            C=c,
            P_PAD=triton.next_power_of_2(p),
            C_PAD=triton.next_power_of_2(c),
            HALF_PAD=max(2, triton.next_power_of_2(r // 2)),
            BLOCK_C=block_c,
            SPLIT=split,
            TABLE=positions_T is not None,
            num_warps=4,
            **pdl.LAUNCH,
        )
    return q_lat_THC, q_rope_THR


@triton.jit(do_not_specialize=["T"])
def _value_heads_kernel(
    o_ptr,  # [T, H, C] the attention's latent outputs
    wv_ptr,  # [H, W, C] kv_b's value half
    out_ptr,  # [T, H, W]
    T,
    H,
    stride_ot,
    stride_oh,
    stride_wh,
    stride_ww,
    stride_outt,
    stride_outh,
    W,
    C: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    wait_prior()
    h = tl.program_id(0)
    ww = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    w_ok = ww < W
    cc = tl.arange(0, BLOCK_C)
    w_row = wv_ptr + h * stride_wh + ww[:, None] * stride_ww
    for t in range(T):  # the weight tile stays in cache across the step's few tokens
        o_row = o_ptr + t * stride_ot + h * stride_oh
        acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
        for c0 in tl.static_range(0, C, BLOCK_C):
            c_ok = c0 + cc < C
            o = tl.load(o_row + c0 + cc, mask=c_ok, other=0.0).to(tl.float32)
            w = tl.load(w_row + c0 + cc[None, :], mask=w_ok[:, None] & c_ok[None, :], other=0.0)
            acc += w.to(tl.float32) * o[None, :]
        out = tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + t * stride_outt + h * stride_outh + ww, out, mask=w_ok)


def value_heads(o_lat_THC: torch.Tensor, w_v_HWC: torch.Tensor) -> torch.Tensor:
    """Each head's latent output through kv_b's value half, o_lat[t, h] @ w_v[h].T: [T, H, W]
    (the readable path's bmm) for a decode step's few tokens, 16 value rows a program."""
    t, h, c = o_lat_THC.shape
    w = w_v_HWC.shape[1]
    assert w_v_HWC.shape == (h, w, c) and w_v_HWC.stride(2) == 1 and o_lat_THC.stride(2) == 1
    out = torch.empty(t, h, w, dtype=o_lat_THC.dtype, device=o_lat_THC.device)
    block_w = 16
    if t:
        _value_heads_kernel[(h, triton.cdiv(w, block_w))](
            o_lat_THC,
            w_v_HWC,
            out,
            t,
            h,
            o_lat_THC.stride(0),
            o_lat_THC.stride(1),
            w_v_HWC.stride(0),
            w_v_HWC.stride(1),
            out.stride(0),
            out.stride(1),
            w,
            C=c,
            BLOCK_W=block_w,
            BLOCK_C=16 if interpreting() else 128,
            num_warps=4,
            **pdl.LAUNCH,
        )
    return out
