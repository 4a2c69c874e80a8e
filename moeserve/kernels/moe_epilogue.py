"""Element-wise pieces the fused MoE kernels share: rounding where torch would, the activation.

Kernels here round after each op exactly where the readable torch path (model/moe.py,
model/activation.py) rounds, so the Triton and torch paths agree to the last bit of the
model dtype wherever their sums agree.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rnd(x, like_ptr):
    """x rounded to the tensor's dtype, back in float32 (where a torch op would round)."""
    return x.to(like_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def activate(gate, up, out_ptr, alpha, limit, CLAMPED: tl.constexpr):
    """silu(gate) * up, or gpt-oss's clamped SwiGLU, in out_ptr's dtype; gate and up are
    float32 holding values already rounded to that dtype."""
    if CLAMPED:
        # (up + 1) * gate * sigmoid(alpha * gate), gate clamped above and up on both sides;
        # rounded after each op as the reference's torch ops round.
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        sig = rnd(1.0 / (1.0 + tl.exp(-rnd(gate * alpha, out_ptr))), out_ptr)
        glu = rnd(gate * sig, out_ptr)
        return (rnd(up + 1.0, out_ptr) * glu).to(out_ptr.dtype.element_ty)
    # torch's F.silu(gate) * up rounds twice, after the silu and after the product: so do
    # we, and with torch's formula for silu.
    silu = rnd(gate / (1.0 + tl.exp(-gate)), out_ptr)
    return (silu * up).to(out_ptr.dtype.element_ty)
