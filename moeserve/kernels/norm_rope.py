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
def _rotary_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ct,
    H, HALF: tl.constexpr, BLOCK: tl.constexpr,
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


def apply_rotary_(
    q_THX: torch.Tensor, k_TGX: torch.Tensor, cos_TX: torch.Tensor, sin_TX: torch.Tensor
) -> None:
    """Rotate q and k in place (rotate-half layout); one launch for both."""
    t, h, x = q_THX.shape
    g = k_TGX.shape[1]
    if not t:
        return
    assert q_THX.stride(2) == 1 and k_TGX.stride(2) == 1 and cos_TX.stride(1) == 1
    assert cos_TX.stride() == sin_TX.stride()
    half = x // 2
    _rotary_kernel[(t, h + g)](
        q_THX, k_TGX, cos_TX, sin_TX,
        q_THX.stride(0), q_THX.stride(1), k_TGX.stride(0), k_TGX.stride(1), cos_TX.stride(0),
        h, HALF=half, BLOCK=triton.next_power_of_2(half), num_warps=1,
    )  # fmt: skip
