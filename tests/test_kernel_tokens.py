"""Greedy sampling's Triton argmax against torch.argmax (interpreter on CPU, CUDA in the
gpu-marked test, fresh random data per check)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from moeserve.kernels.tokens import argmax_rows  # noqa: E402


def test_argmax_rows_interpreted() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 50, generator=g)
    x[1, 7] = x[1, 33] = 99.0  # a tie across chunks: the first index wins, as torch's
    x[2] = float("-inf")
    x[3, 49] = 50.0  # the maximum in the last, partial chunk
    x[4, 2] = x[4, 5] = 70.0  # a tie inside one chunk
    assert argmax_rows(x).tolist() == x.argmax(dim=-1).tolist()
    assert argmax_rows(x)[1:].tolist() == [7, 0, 49, 2]
    assert argmax_rows(x[:, :40]).tolist() == x[:, :40].argmax(dim=-1).tolist()  # strided rows


def test_argmax_rows_writes_out_and_host_interpreted() -> None:
    """The tokens land in the caller's device buffer and in its host buffer, nowhere else."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 50, generator=g)
    out = torch.full((5,), -7, dtype=torch.int64)
    host = torch.full((3,), -7, dtype=torch.int64)
    got = argmax_rows(x, out[:3], host)
    assert got.data_ptr() == out.data_ptr()
    assert out.tolist() == x.argmax(dim=-1).tolist() + [-7, -7]
    assert host.tolist() == x.argmax(dim=-1).tolist()
    with pytest.raises(AssertionError):
        argmax_rows(x, out)  # wrong length


@pytest.mark.gpu
def test_gpu_argmax_rows_writes_page_locked_host_memory() -> None:
    x = torch.randn(4, 32000, device="cuda")
    out = torch.empty(4, dtype=torch.int64, device="cuda")
    host = torch.full((4,), -1, dtype=torch.int64, pin_memory=True)
    argmax_rows(x, out, host)
    torch.cuda.synchronize()
    assert torch.equal(host, x.argmax(dim=-1).cpu()) and torch.equal(out, x.argmax(dim=-1))


@pytest.mark.gpu
def test_gpu_argmax_rows_matches_torch() -> None:
    for seed in range(3):
        torch.manual_seed(seed)
        x = torch.randn(64, 32000, device="cuda")
        x[5, 100] = x[5, 31000] = 1e4
        assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
        assert torch.equal(argmax_rows(x[:1]), x[:1].argmax(dim=-1))


def test_feed_ids_interpreted() -> None:
    from moeserve.kernels.tokens import feed_ids

    ids = torch.tensor([5, 0, 7, 0, 9], dtype=torch.int64)
    feed = torch.tensor([-1, 2, -1, 0, -1], dtype=torch.int64)
    fed = torch.tensor([40, 41, 42], dtype=torch.int64)
    assert feed_ids(ids, feed, fed).tolist() == [5, 42, 7, 40, 9]
    assert feed_ids(ids[:0], feed[:0], fed).numel() == 0
