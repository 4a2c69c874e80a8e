"""RMSNorm and rotary embedding as one Triton kernel each, rounding where the readable path does.

In a CUDA-graph decode step every elementwise torch op is its own kernel of a few microseconds
(RMSNorm is six, rotary ten for q and k): at batch 1 those gaps cost as much as reading the
attention weights. These kernels do each in one pass. Twins: moeserve.model.layers.rms_norm
and apply_rotary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, D, stride_x, stride_o, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    ok = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)
    # The reference rounds the normalised row to the model dtype, then multiplies the weight.
    xn = (x * inv).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (w * xn).to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(x_TD: torch.Tensor, weight_D: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * normalise(x) over the last dim of a 2-D [T, D] tensor (rows may be strided)."""
    t, d = x_TD.shape
    out = torch.empty((t, d), dtype=x_TD.dtype, device=x_TD.device)
    if t and x_TD.stride(1) == 1:
        _rms_norm_kernel[(t,)](
            x_TD, weight_D, out, d, x_TD.stride(0), out.stride(0), eps,
            BLOCK_D=triton.next_power_of_2(d), num_warps=4 if d <= 4096 else 8,
        )  # fmt: skip
        return out
    from moeserve.model.layers import rms_norm as readable

    return readable(x_TD, weight_D, eps)


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, d_ptr, sum_ptr, out_ptr, w_ptr, D, stride_x, stride_d, stride_s, stride_o, eps,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    ok = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + row * stride_d + offs, mask=ok, other=0.0).to(tl.float32)
    # The residual add rounds to the model dtype; the norm reads the rounded sum.
    s = (x + d).to(sum_ptr.dtype.element_ty)
    tl.store(sum_ptr + row * stride_s + offs, s, mask=ok)
    s = s.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(s * s, 0) / D + eps)
    sn = (s * inv).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (w * sn).to(out_ptr.dtype.element_ty), mask=ok)


def add_rms_norm(
    x_TD: torch.Tensor, delta_TD: torch.Tensor, weight_D: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta)) in one pass; the readable twin is the two ops."""
    t, d = x_TD.shape
    if not (t and x_TD.stride(1) == 1 and delta_TD.stride(1) == 1):
        from moeserve.model.layers import rms_norm as readable

        s = x_TD + delta_TD
        return s, readable(s, weight_D, eps)
    s = torch.empty((t, d), dtype=x_TD.dtype, device=x_TD.device)
    out = torch.empty_like(s)
    _add_rms_norm_kernel[(t,)](
        x_TD, delta_TD, s, out, weight_D, d, x_TD.stride(0), delta_TD.stride(0), s.stride(0),
        out.stride(0), eps, BLOCK_D=triton.next_power_of_2(d), num_warps=4 if d <= 4096 else 8,
    )  # fmt: skip
    return s, out


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ct,
    H, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_vt, stride_vh, stride_slot,
    HALF: tl.constexpr, BLOCK: tl.constexpr, WRITE_KV: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    if h < H:
        base = q_ptr + t * stride_qt + h * stride_qh
    else:
        base = k_ptr + t * stride_kt + (h - H) * stride_kh
    offs = tl.arange(0, BLOCK)
    ok = offs < HALF
    x1 = tl.load(base + offs, mask=ok, other=0.0)
    x2 = tl.load(base + HALF + offs, mask=ok, other=0.0)
    c1 = tl.load(cos_ptr + t * stride_ct + offs, mask=ok, other=0.0)
    c2 = tl.load(cos_ptr + t * stride_ct + HALF + offs, mask=ok, other=0.0)
    s1 = tl.load(sin_ptr + t * stride_ct + offs, mask=ok, other=0.0)
    s2 = tl.load(sin_ptr + t * stride_ct + HALF + offs, mask=ok, other=0.0)
    dt = x1.dtype
    # x * cos + rotate_half(x) * sin, each product and the sum rounded to the model dtype (the
    # compiler may still contract a product into the add: bf16 results can differ by an ulp).
    y1 = (x1.to(tl.float32) * c1.to(tl.float32)).to(dt).to(tl.float32) + (
        -x2.to(tl.float32) * s1.to(tl.float32)
    ).to(dt).to(tl.float32)
    y2 = (x2.to(tl.float32) * c2.to(tl.float32)).to(dt).to(tl.float32) + (
        x1.to(tl.float32) * s2.to(tl.float32)
    ).to(dt).to(tl.float32)
    tl.store(base + offs, y1.to(dt), mask=ok)
    tl.store(base + HALF + offs, y2.to(dt), mask=ok)
    if WRITE_KV and h >= H:  # the rotated key and its value into their cache slot
        g = h - H
        dst = tl.load(slot_ptr + t) * stride_slot + g * (2 * HALF)
        tl.store(k_cache_ptr + dst + offs, y1.to(dt), mask=ok)
        tl.store(k_cache_ptr + dst + HALF + offs, y2.to(dt), mask=ok)
        vbase = v_ptr + t * stride_vt + g * stride_vh
        tl.store(v_cache_ptr + dst + offs, tl.load(vbase + offs, mask=ok), mask=ok)
        tl.store(v_cache_ptr + dst + HALF + offs, tl.load(vbase + HALF + offs, mask=ok), mask=ok)


def apply_rotary_(
    q_THX: torch.Tensor,
    k_TGX: torch.Tensor,
    cos_TX: torch.Tensor,
    sin_TX: torch.Tensor,
    kv_write: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Rotate q and k in place (rotate-half layout); one launch for both. kv_write: (v_TGX,
    k_cache_NSGX, v_cache_NSGX, slot_mapping_T): also store the rotated keys and the values
    into their slots of the paged cache (layers.write_kv's job), in the same launch."""
    t, h, x = q_THX.shape
    g = k_TGX.shape[1]
    if not t:
        return
    assert q_THX.stride(2) == 1 and k_TGX.stride(2) == 1 and cos_TX.stride(1) == 1
    assert cos_TX.stride() == sin_TX.stride()
    half = x // 2
    if kv_write is not None:
        v_TGX, k_cache, v_cache, slots_T = kv_write
        assert v_TGX.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
        assert x % 2 == 0
        extra = (v_TGX, k_cache, v_cache, slots_T, v_TGX.stride(0), v_TGX.stride(1), g * x)
    else:
        extra = (k_TGX, k_TGX, k_TGX, k_TGX, 0, 0, 0)  # unused pointers
    _rotary_kernel[(t, h + g)](
        q_THX, k_TGX, cos_TX, sin_TX,
        q_THX.stride(0), q_THX.stride(1), k_TGX.stride(0), k_TGX.stride(1), cos_TX.stride(0),
        h, *extra, HALF=half, BLOCK=triton.next_power_of_2(half),
        WRITE_KV=kv_write is not None, num_warps=1,
    )  # fmt: skip
