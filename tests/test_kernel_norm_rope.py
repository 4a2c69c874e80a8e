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


@pytest.mark.parametrize(("device", "dtype"), _device_cases())
def test_add_rms_norm_matches_the_two_ops(device: str, dtype: torch.dtype) -> None:
    from moeserve.kernels.norm_rope import add_rms_norm

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(5, 40, generator=g) * 3).to(device, dtype)
    delta = torch.randn(5, 40, generator=g).to(device, dtype)
    w = torch.randn(40, generator=g).to(device, dtype)
    total, normed = add_rms_norm(x, delta, w, 1e-6)
    assert torch.equal(total, x + delta)  # the residual stream itself is exact
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(normed, rms_norm(x + delta, w, 1e-6), rtol=tol, atol=tol)


@pytest.mark.parametrize(("device", "dtype"), _device_cases())
def test_rotary_writes_keys_and_values_into_their_slots(device: str, dtype: torch.dtype) -> None:
    from moeserve.model.layers import write_kv

    g = torch.Generator().manual_seed(9)
    t, h, gk, x, n, s = 5, 4, 2, 16, 6, 4
    qkv = torch.randn(t, (h + 2 * gk) * x, generator=g).to(device, dtype)
    q = qkv[:, : h * x].reshape(t, h, x)
    k = qkv[:, h * x : (h + gk) * x].reshape(t, gk, x)
    v = qkv[:, (h + gk) * x :].reshape(t, gk, x)
    ang = torch.randn(t, x // 2, generator=g).repeat(1, 2)
    cos, sin = ang.cos().to(device, dtype), ang.sin().to(device, dtype)
    slots = torch.tensor([3, 17, 0, 22, 9], device=device)  # scattered over the blocks
    want_k_cache = torch.zeros(n, s, gk, x, dtype=dtype, device=device)
    want_v_cache = torch.zeros_like(want_k_cache)
    q_ref, k_ref = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    write_kv(want_k_cache, want_v_cache, k_ref, v, slots)
    k_cache, v_cache = torch.zeros_like(want_k_cache), torch.zeros_like(want_v_cache)
    apply_rotary_(q, k, cos, sin, (v, k_cache, v_cache, slots))
    tol = dict(rtol=0.0, atol=0.0) if dtype == torch.float32 else dict(rtol=2**-6, atol=2**-5)
    torch.testing.assert_close(q, q_ref, **tol)
    torch.testing.assert_close(k_cache, want_k_cache, **tol)
    assert torch.equal(v_cache, want_v_cache)  # values are copied, not rotated
    untouched = torch.ones(n * s, dtype=torch.bool)
    untouched[slots.cpu()] = False
    assert (k_cache.view(n * s, -1)[untouched.to(device)] == 0).all()
