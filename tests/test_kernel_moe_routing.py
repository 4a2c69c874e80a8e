"""One-program routing + alignment against route() and moe_align() (interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from moeserve.model.moe import route

pytest.importorskip("triton")
from moeserve.kernels import moe_routing  # noqa: E402
from moeserve.kernels.fused_moe import moe_align  # noqa: E402


def _devices() -> list:
    return ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize(
    ("t", "e", "k", "renorm", "block_m"),
    [(1, 8, 2, True, 16), (5, 6, 3, False, 16), (13, 8, 1, True, 32), (64, 8, 2, True, 16)],
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


def test_applicable_bounds_the_tile() -> None:
    assert moe_routing.applicable(1, 8, 2) and moe_routing.applicable(1024, 8, 2)
    assert not moe_routing.applicable(2048, 8, 2)
    assert not moe_routing.applicable(0, 8, 2)
    assert not moe_routing.applicable(128, 128, 8)


@pytest.mark.parametrize(
    ("device", "dtype"),
    [("cpu", torch.float32), pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu)],
)
@pytest.mark.parametrize(("t", "e", "d"), [(1, 8, 40), (2, 6, 24), (1, 64, 48)])
def test_router_in_the_program_matches_linear_then_route(
    device: str, dtype: torch.dtype, t: int, e: int, d: int
) -> None:
    """Small batches compute the router logits in the same program: as F.linear then the
    routing of those logits (same experts, weights within the logits' rounding)."""
    assert moe_routing.router_fused(t, e)
    for seed in range(3):  # fresh data each check
        g = torch.Generator().manual_seed(seed * 7 + t + e)
        x = torch.randn(t, d, generator=g).to(device, dtype)
        router = torch.randn(e, d, generator=g).to(device, dtype)
        valid = torch.ones(t, dtype=torch.long, device=device)
        got_w, got_x, (ids, blocks, used) = moe_routing.route_and_align(
            None, 2, True, 16, valid, router=(x, router)
        )
        want_w, want_x, (w_ids, w_blocks, w_used) = moe_routing.route_and_align(
            torch.nn.functional.linear(x, router), 2, True, 16, valid
        )
        assert torch.equal(got_x, want_x) and torch.equal(ids, w_ids)
        assert torch.equal(blocks, w_blocks) and torch.equal(used, w_used)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got_w, want_w, rtol=tol, atol=tol)
    assert not moe_routing.router_fused(16, 8)  # larger batches keep cuBLAS
