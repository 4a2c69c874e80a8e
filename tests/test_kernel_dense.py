"""The small-batch linear and row argmax kernels against torch (interpreter on CPU, and the
device's compiled kernels in the gpu-marked tests, fresh random data per check)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
from moeserve.kernels.dense import argmax_rows, small_linear  # noqa: E402


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize(("m", "n", "k", "bias"), [(1, 40, 48, False), (3, 33, 72, True),
                                                   (16, 16, 16, True)])  # fmt: skip
def test_small_linear_interpreted(m: int, n: int, k: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(m * n)
    x = torch.randn(m, k, generator=g)  # float32: the interpreter has no bfloat16
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    got = small_linear(x, w, b)
    assert got.shape == (m, n) and got.dtype == torch.float32
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_argmax_rows_interpreted() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 50, generator=g)
    x[1, 7] = x[1, 33] = 99.0  # a tie: the first index wins, as torch's
    x[2] = float("-inf")
    x[3, 49] = 50.0  # the maximum in the last, partial block
    assert argmax_rows(x).tolist() == x.argmax(dim=-1).tolist() == [x[0].argmax().item(), 7, 0, 49]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16])
def test_gpu_small_linear_matches_float64(m: int) -> None:
    for seed in range(3):
        torch.manual_seed(seed)
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(6144, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
        b = torch.randn(6144, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ w.double().T + b.double()
        ours, cublas = _rel_err(small_linear(x, w, b), ref), _rel_err(F.linear(x, w, b), ref)
        assert ours <= 1.5 * cublas + 2**-11, (ours, cublas)


@pytest.mark.gpu
def test_gpu_argmax_rows_matches_torch() -> None:
    for seed in range(3):
        torch.manual_seed(seed)
        x = torch.randn(64, 32000, device="cuda")
        x[5, 100] = x[5, 31000] = 1e4
        assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
