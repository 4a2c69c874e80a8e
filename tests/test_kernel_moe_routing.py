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
