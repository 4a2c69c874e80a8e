"""RMSNorm and rotary kernels against the readable path (interpreter on CPU, CUDA on the GPU)."""

from __future__ import annotations

import pytest
import torch

from moeserve.model.layers import apply_rotary, rms_norm

pytest.importorskip("triton")
from moeserve.kernels.norm_rope import apply_rotary_  # noqa: E402
from moeserve.kernels.norm_rope import rms_norm as fused_rms_norm  # noqa: E402


def _device_cases() -> list:
    return [pytest.param("cpu", torch.float32), pytest.param("cuda", torch.bfloat16,
                                                            marks=pytest.mark.gpu)]  # fmt: skip


@pytest.mark.parametrize(("device", "dtype"), _device_cases())
@pytest.mark.parametrize("d", [24, 64])
def test_rms_norm_matches(device: str, dtype: torch.dtype, d: int) -> None:
    g = torch.Generator().manual_seed(d)
    x = (torch.randn(5, d + 8, generator=g) * 3)[:, :d].to(device, dtype)  # strided rows
    w = torch.randn(d, generator=g).to(device, dtype)
    want = rms_norm(x, w, 1e-6)
    got = fused_rms_norm(x, w, 1e-6)
    # Same rounding points; the float32 reduction order differs, so one bf16 ulp at most.
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize(("device", "dtype"), _device_cases())
@pytest.mark.parametrize(("h", "gk", "x"), [(4, 2, 16), (3, 3, 24)])
def test_rotary_matches(device: str, dtype: torch.dtype, h: int, gk: int, x: int) -> None:
    g = torch.Generator().manual_seed(h * x)
    t = 6
    qkv = torch.randn(t, (h + 2 * gk) * x, generator=g).to(device, dtype)
    q = qkv[:, : h * x].reshape(t, h, x)  # strided views into one buffer, as the model has
    k = qkv[:, h * x : (h + gk) * x].reshape(t, gk, x)
    v_before = qkv[:, (h + gk) * x :].clone()
    ang = torch.randn(t, x // 2, generator=g).repeat(1, 2)
    cos, sin = ang.cos().to(device, dtype), ang.sin().to(device, dtype)
    want_q, want_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    apply_rotary_(q, k, cos, sin)
    # float32: exact. bf16 on the GPU: the compiler may fuse a product into the sum (FMA)
    # where torch rounds it first: one bf16 ulp (2**-7 relative) on some elements, measured.
    tol = dict(rtol=0.0, atol=0.0) if dtype == torch.float32 else dict(rtol=2**-6, atol=2**-5)
    torch.testing.assert_close(q, want_q, **tol)
    torch.testing.assert_close(k, want_k, **tol)
    assert torch.equal(qkv[:, (h + gk) * x :], v_before)  # v untouched
