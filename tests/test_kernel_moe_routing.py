"""One-program routing + alignment against the router's torch backend and moe_align()
(interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from moeserve.model.router import RouterSpec
from moeserve.model.router import route as route_with

pytest.importorskip("triton")
from moeserve.kernels import moe_routing  # noqa: E402
from moeserve.kernels.fused_moe import moe_align  # noqa: E402


def route(logits: torch.Tensor, k: int, renorm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch backend of the router, softmax top-k."""
    spec = RouterSpec(num_experts=logits.shape[-1], top_k=k, renormalize=renorm)
    weights, experts, _ = route_with(logits, spec)
    return weights, experts


def _devices() -> list:
    return ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize(
    ("t", "e", "k", "renorm", "block_m"),
    [
        (1, 8, 2, True, 16),
        (5, 6, 3, False, 16),
        (13, 8, 1, True, 32),
        (64, 8, 2, True, 16),
        (1, 128, 8, True, 16),  # Qwen3-30B-A3B's router at decode
        (64, 128, 8, True, 16),
        (7, 60, 4, False, 32),
    ],
)
def test_route_and_align_matches_torch(
    device: str, t: int, e: int, k: int, renorm: bool, block_m: int
) -> None:
    g = torch.Generator().manual_seed(t * e + k)
    logits = (torch.randn(t, e, generator=g) * 3).to(device)
    valid = (torch.rand(t, generator=g) > 0.3).long().to(device)
    valid[0] = 1
    counts = torch.full((e,), 5, dtype=torch.int64, device=device)
    w, x, (ids, blocks, used) = moe_routing.route_and_align(
        logits, k, renorm, block_m, valid, counts
    )
    want_w, want_x = route(logits, k, renorm)
    want_x = torch.where(valid[:, None].bool(), want_x, e)
    assert torch.equal(x, want_x)
    torch.testing.assert_close(w, want_w, rtol=1e-5, atol=1e-6)
    want_ids, want_blocks, want_used = moe_align(want_x, e, block_m)
    assert torch.equal(used, want_used)
    assert torch.equal(blocks, want_blocks)
    assert torch.equal(ids, want_ids)  # flat order within each expert, as the stable sort
    real = want_x[want_x < e]
    assert torch.equal(counts - 5, torch.bincount(real, minlength=e))


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize(("t", "e", "k"), [(1, 128, 8), (1, 8, 2), (3, 60, 4), (16, 32, 4)])
def test_routing_without_alignment(device: str, t: int, e: int, k: int) -> None:
    """block_m 0 (the GEMVs' routing, one warp for a decode token): the same weights,
    experts and counts as with the alignment, and no alignment."""
    g = torch.Generator().manual_seed(t + e)
    logits = (torch.randn(t, e, generator=g) * 3).to(device)
    valid = torch.ones(t, dtype=torch.long, device=device)
    valid[-1] = t == 1
    c0, c1 = (torch.zeros(e, dtype=torch.int64, device=device) for _ in range(2))
    w, x, align = moe_routing.route_and_align(logits, k, True, 0, valid, c0)
    want_w, want_x, _ = moe_routing.route_and_align(logits, k, True, 16, valid, c1)
    assert align is None
    assert torch.equal(x, want_x) and torch.equal(c0, c1)
    assert torch.equal(w, want_w)
    assert int(c0.sum()) == k * int(valid.sum())


def test_applicable_bounds_the_tile() -> None:
    assert moe_routing.applicable(1, 8, 2) and moe_routing.applicable(1024, 8, 2)
    assert not moe_routing.applicable(2048, 8, 2)
    assert not moe_routing.applicable(0, 8, 2)
    assert not moe_routing.applicable(128, 128, 8)


@pytest.mark.parametrize(
    ("device", "dtype"),  # bf16 dots: GPU only (see tests/test_kernel_linear.py)
    [
        ("cpu", torch.float32),
        pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu),
        pytest.param("cuda", torch.float32, marks=pytest.mark.gpu),
    ],
)
def test_router_partials_route_as_the_rounded_logits(device: str, dtype: torch.dtype) -> None:
    """Split-K router partials, added and rounded inside the program, route exactly as the
    logits F.linear returns in the model dtype (the same sum of the same partials)."""
    from moeserve.kernels.linear import linear_partials, reduce_partials

    g = torch.Generator().manual_seed(3)
    t, d, e, k = 5, 1024, 8, 2  # K long enough to split on the GPU's tiles too
    x = torch.randn(t, d, generator=g).to(device, dtype)
    w = torch.randn(e, d, generator=g).to(device, dtype)
    parts = linear_partials(x, w)
    assert parts.dim() == 3 and parts.shape[1:] == (t, e) and parts.shape[0] > 1
    logits = reduce_partials(parts, dtype)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    exact = (x.double() @ w.double().T).float()
    torch.testing.assert_close(logits.float(), exact, rtol=tol, atol=1e-3)
    got = moe_routing.route_and_align(parts, k, True, 16, logits_dtype=dtype)
    want = moe_routing.route_and_align(logits, k, True, 16)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-7)
    for a, b in zip(got[2], want[2]):
        assert torch.equal(a, b)


# The interpreter's bf16 casts truncate (the GPU rounds to nearest): bf16 on the GPU only.
@pytest.mark.parametrize(
    ("device", "dtype"),
    [("cpu", torch.float16), pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu)],
)
def test_partials_round_to_the_logits_dtype(device: str, dtype: torch.dtype) -> None:
    """The program rounds the partials' sum to the model dtype before the softmax, so the
    weights are those of the rounded logits, not of the exact sum."""
    g = torch.Generator().manual_seed(11)
    parts = (torch.randn(4, 6, 8, generator=g) * 2).to(device)
    logits = parts.sum(0).to(dtype)
    w, x, _ = moe_routing.route_and_align(parts, 2, False, 16, logits_dtype=dtype)
    want_w, want_x = route(logits, 2, False)
    assert torch.equal(x, want_x)
    torch.testing.assert_close(w, want_w, rtol=1e-6, atol=1e-7)
    exact_w, _ = route(parts.sum(0), 2, False)
    assert not torch.allclose(w, exact_w, rtol=1e-6, atol=1e-7)  # the rounding is real
