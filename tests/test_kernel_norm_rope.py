"""RMSNorm and rotary kernels against the readable path (interpreter on CPU, CUDA on the GPU)."""

from __future__ import annotations

import pytest
import torch

from moeserve.model.layers import rms_norm
from moeserve.model.rotary import apply_rotary

pytest.importorskip("triton")
from moeserve.kernels.norm_rope import apply_rotary_  # noqa: E402
from moeserve.kernels.norm_rope import rms_norm as fused_rms_norm  # noqa: E402


def _device_cases() -> list:
    return [
        pytest.param("cpu", torch.float32),
        pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu),
    ]


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
    total, normed, logits = add_rms_norm(x, delta, w, 1e-6)
    assert logits is None
    assert torch.equal(total, x + delta)  # the residual stream itself is exact
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(normed, rms_norm(x + delta, w, 1e-6), rtol=tol, atol=tol)


@pytest.mark.parametrize(
    ("device", "dtype"),
    [
        ("cpu", torch.float32),
        ("cpu", torch.float16),
        pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu),
    ],
)
def test_add_rms_norm_adds_linear_partials(device: str, dtype: torch.dtype) -> None:
    """A projection's float32 split-K partials as the delta: summed and rounded to the model
    dtype first, the result is that of add_rms_norm on the projection's rounded output."""
    from moeserve.kernels.norm_rope import add_rms_norm

    g = torch.Generator().manual_seed(4)
    x = (torch.randn(3, 40, generator=g) * 3).to(device, dtype)
    parts = torch.randn(4, 3, 40, generator=g).to(device)
    w = torch.randn(40, generator=g).to(device, dtype)
    total, normed, _ = add_rms_norm(x, parts, w, 1e-6)
    want_total, want_normed, _ = add_rms_norm(x, parts.sum(0).to(dtype), w, 1e-6)
    assert torch.equal(total, want_total)
    torch.testing.assert_close(normed, want_normed, rtol=1e-6, atol=1e-6)
    from moeserve.model.backend import fused_add_rms_norm

    strided = torch.randn(4, 3, 80, generator=g).to(device)[:, :, ::2]  # the fallback path
    got = fused_add_rms_norm(x, strided, w, 1e-6)
    want = fused_add_rms_norm(x, strided.sum(0).to(dtype), w, 1e-6)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize(
    ("device", "dtype"),
    [
        ("cpu", torch.float32),
        ("cpu", torch.float16),
        pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu),
    ],
)
@pytest.mark.parametrize("router_dtype", ["model", "float32"])
@pytest.mark.parametrize("bias", [False, True])
def test_add_rms_norm_runs_the_router(
    device: str, dtype: torch.dtype, router_dtype: str, bias: bool
) -> None:
    """With a router the norm kernel also returns its logits of the normed rows as one float32
    partial: the residual stream and norm are those of the plain kernel, and the logits are
    the router GEMV's on that norm (F.linear, a float32 router on float32 activations), with
    the bias once. 7 experts over programs of 2 rows: the last program is half masked."""
    from moeserve.kernels.norm_rope import add_rms_norm

    g = torch.Generator().manual_seed(5)
    t, d, e = 3, 40, 7
    x = (torch.randn(t, d, generator=g) * 3).to(device, dtype)
    parts = torch.randn(4, t, d, generator=g).to(device)
    w = torch.randn(d, generator=g).to(device, dtype)
    r_dtype = dtype if router_dtype == "model" else torch.float32
    router = torch.randn(e, d, generator=g).to(device, r_dtype)
    b = torch.randn(e, generator=g).to(device, dtype) if bias else None
    total, normed, logits = add_rms_norm(x, parts, w, 1e-6, (router, b))
    want_total, want_normed, none = add_rms_norm(x, parts, w, 1e-6)
    assert none is None
    assert torch.equal(total, want_total) and torch.equal(normed, want_normed)
    assert logits is not None and logits.shape == (1, t, e) and logits.dtype == torch.float32
    want = normed.float() @ router.float().T + (b.float() if b is not None else 0.0)
    torch.testing.assert_close(logits[0], want, rtol=1e-5, atol=1e-4)


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


@pytest.mark.parametrize(("device", "dtype"), _device_cases())
def test_rotary_reads_table_rows_by_position(device: str, dtype: torch.dtype) -> None:
    """With positions, cos/sin are whole tables and token t reads row positions[t]: the same
    result as gathering the rows first (the gather kernel the decode step no longer runs)."""
    g = torch.Generator().manual_seed(5)
    t, h, gk, x = 4, 3, 1, 16
    q = torch.randn(t, h, x, generator=g).to(device, dtype)
    k = torch.randn(t, gk, x, generator=g).to(device, dtype)
    ang = torch.randn(50, x // 2, generator=g).repeat(1, 2)
    table = torch.cat([ang.cos(), ang.sin()], dim=-1).to(device, dtype)  # as Rotary's [P, 2X]
    cos_p, sin_p = table[:, :x], table[:, x:]
    pos = torch.tensor([7, 0, 49, 7], device=device)
    want_q, want_k = q.clone(), k.clone()
    apply_rotary_(want_q, want_k, cos_p[pos], sin_p[pos])
    apply_rotary_(q, k, cos_p, sin_p, positions_T=pos)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)


@pytest.mark.parametrize(
    ("device", "dtype"),
    [
        ("cpu", torch.float32),
        ("cpu", torch.float16),
        pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu),
    ],
)
@pytest.mark.parametrize("table", [False, True])
def test_rotary_from_qkv_partials(device: str, dtype: torch.dtype, table: bool) -> None:
    """The qkv projection's split-K partials in, rotated queries out and keys/values in the
    cache: exactly what the in-place kernel makes of the projection's rounded output."""
    from moeserve.kernels.norm_rope import rotary_from_partials

    g = torch.Generator().manual_seed(8)
    t, h, gk, x, n, s, split = 3, 4, 2, 16, 4, 4, 3
    parts = torch.randn(split, t, (h + 2 * gk) * x, generator=g).to(device)
    ang = torch.randn(t, x // 2, generator=g).repeat(1, 2)
    cos, sin = ang.cos().to(device, dtype), ang.sin().to(device, dtype)
    slots = torch.tensor([5, 0, 12], device=device)
    qkv = parts.sum(0).to(dtype)
    q = qkv[:, : h * x].reshape(t, h, x)
    k = qkv[:, h * x : (h + gk) * x].reshape(t, gk, x)
    v = qkv[:, (h + gk) * x :].reshape(t, gk, x)
    want_k_cache = torch.zeros(n, s, gk, x, dtype=dtype, device=device)
    want_v_cache = torch.zeros_like(want_k_cache)
    apply_rotary_(q, k, cos, sin, (v, want_k_cache, want_v_cache, slots))
    k_cache, v_cache = torch.zeros_like(want_k_cache), torch.zeros_like(want_v_cache)
    pos = None
    if table:  # the rows live at other positions of a bigger table
        pos = torch.tensor([2, 9, 4], device=device)
        big_cos = torch.zeros(10, x, dtype=dtype, device=device).index_copy_(0, pos, cos)
        big_sin = torch.zeros(10, x, dtype=dtype, device=device).index_copy_(0, pos, sin)
        cos, sin = big_cos, big_sin
    got_q = rotary_from_partials(parts, h, gk, cos, sin, (k_cache, v_cache, slots), dtype, pos)
    assert got_q.dtype == dtype and got_q.shape == (t, h, x)
    # Same inputs, same math; on the GPU two compiles may contract an FMA differently.
    tol = dict(rtol=0.0, atol=0.0) if device == "cpu" else dict(rtol=2**-6, atol=2**-5)
    torch.testing.assert_close(got_q, q, **tol)
    torch.testing.assert_close(k_cache, want_k_cache, **tol)
    assert torch.equal(v_cache, want_v_cache)


@pytest.mark.parametrize(("device", "dtype"), _device_cases())
@pytest.mark.parametrize("from_partials", [False, True], ids=["in-place", "partials"])
@pytest.mark.parametrize("rot", [16, 8], ids=["full", "partial"])
def test_rotary_norms_heads_first(
    device: str, dtype: torch.dtype, from_partials: bool, rot: int
) -> None:
    """qk_norm: each q and k head RMSNormed with its own weight before the rotation (Qwen3's
    q_norm and k_norm; GLM's with partial rotary), in the rotary launch: the readable norm,
    rotary and K/V write; values are not normed."""
    from moeserve.kernels.norm_rope import rotary_from_partials
    from moeserve.model.layers import write_kv

    g = torch.Generator().manual_seed(rot + from_partials)
    t, h, gk, x, split = 3, 4, 2, 16, 2
    parts = (torch.randn(split, t, (h + 2 * gk) * x, generator=g) * 4).to(device)
    qkv = parts.sum(0).to(dtype)
    q = qkv[:, : h * x].reshape(t, h, x)
    k = qkv[:, h * x : (h + gk) * x].reshape(t, gk, x)
    v = qkv[:, (h + gk) * x :].reshape(t, gk, x)
    q_w, k_w = (torch.rand(x, generator=g) + 0.5).to(device, dtype), torch.randn(x, generator=g)
    k_w = k_w.to(device, dtype)
    ang = torch.randn(t, rot // 2, generator=g).repeat(1, 2)
    cos, sin = ang.cos().to(device, dtype), ang.sin().to(device, dtype)
    slots = torch.tensor([5, 0, 12], device=device)
    want_q = apply_rotary(rms_norm(q, q_w, 1e-6), cos, sin)
    want_k = apply_rotary(rms_norm(k, k_w, 1e-6), cos, sin)
    want_k_cache = torch.zeros(4, 4, gk, x, dtype=dtype, device=device)
    want_v_cache = torch.zeros_like(want_k_cache)
    write_kv(want_k_cache, want_v_cache, want_k, v, slots)
    k_cache, v_cache = torch.zeros_like(want_k_cache), torch.zeros_like(want_v_cache)
    norm = (q_w, k_w, 1e-6)
    # The statistics' float32 sums run in another order: an ulp of the model dtype at most.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-6, atol=2**-5)
    if from_partials:
        got_q = rotary_from_partials(
            parts, h, gk, cos, sin, (k_cache, v_cache, slots), dtype, None, norm
        )
    else:
        got_q, got_k = q.clone(), k.clone()
        apply_rotary_(got_q, got_k, cos, sin, (v, k_cache, v_cache, slots), None, norm)
        torch.testing.assert_close(got_k, want_k, **tol)
    torch.testing.assert_close(got_q, want_q, **tol)
    torch.testing.assert_close(k_cache, want_k_cache, **tol)
    assert torch.equal(v_cache, want_v_cache)
    assert not torch.allclose(want_q, apply_rotary(q, cos, sin), rtol=0.1, atol=0.1)  # normed
