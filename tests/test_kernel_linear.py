"""Split-K linear partials (kernels.linear) against a float64 matmul (interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from moeserve.kernels import linear  # noqa: E402


def _devices() -> list:
    return ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize(("t", "n", "k"), [(1, 8, 64), (3, 40, 100), (16, 33, 48), (2, 70, 17)])
def test_partials_sum_to_the_product(device: str, t: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(t * n + k)
    x = torch.randn(t, k, generator=g)
    w = torch.randn(n, k, generator=g)
    parts = linear.linear_partials(x.to(device), w.to(device))
    split = (
        linear.gemv_partials_config(n, k)["SPLIT_K"] if t == 1 else linear.config(t, n, k)["SPLIT"]
    )
    assert parts.shape == (split, t, n) and parts.dtype == torch.float32
    want = x.double() @ w.double().T
    torch.testing.assert_close(parts.sum(0).double().cpu(), want, rtol=1e-5, atol=1e-4)


# Triton's interpreter mishandles bf16 dots (as tests/test_kernel_fused_moe.py notes): bf16
# runs on the GPU only.
@pytest.mark.parametrize(
    ("device", "dtype"),
    [("cpu", torch.float32), pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu)],
)
def test_strided_rows(device: str, dtype: torch.dtype) -> None:
    """Rows of a wider tensor (a view, as an attention output slice); bf16 inputs accumulate
    in float32 and round once, as F.linear."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(4, 80, generator=g).to(device, dtype)
    x = big[:, 8:72]
    w = torch.randn(24, 64, generator=g).to(device, dtype)
    got = linear.reduce_partials(linear.linear_partials(x, w), dtype)
    want = (x.double() @ w.double().T).to(dtype)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("n", "k", "splits"), [(40, 300, 3), (8, 64, 1), (33, 17, 2)])
def test_one_row_gemv_with_bias(
    monkeypatch: pytest.MonkeyPatch,
    device: str,
    dtype: torch.dtype,
    n: int,
    k: int,
    splits: int,
) -> None:
    """One row takes the GEMV (bf16 too: no dot under the interpreter): float32 products of
    the stored values summed in float32, over `splits` K ranges (a short last one), the bias
    in the first partial only."""
    cfg = dict(BLOCK_N=16, BLOCK_K=16, num_warps=4, SPLIT_K=splits, loop_stages=1)
    monkeypatch.setattr(linear, "gemv_partials_config", lambda *a: cfg)
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(1, k, generator=g).to(device, dtype)
    w = torch.randn(n, k, generator=g).to(device, dtype)
    bias = torch.randn(n, generator=g).to(device, dtype)
    parts = linear.linear_partials(x, w, bias)
    assert parts.shape == (splits, 1, n)
    want = x.double() @ w.double().T + bias.double()
    torch.testing.assert_close(parts.sum(0).double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("device", "dtype"),
    [
        ("cpu", torch.float32),
        ("cpu", torch.bfloat16),
        pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu),
    ],
)
@pytest.mark.parametrize("quant", ["", "fp8"])
@pytest.mark.parametrize("fused", [1, 0])
def test_input_norm_inside_the_gemv_matches_the_norm_kernel(
    monkeypatch: pytest.MonkeyPatch,
    device: str,
    dtype: torch.dtype,
    quant: str,
    fused: int,
) -> None:
    """norm=(weight, eps): one row is RMSNormed inside the GEMV (every program reads the
    whole row for its statistics, a K range that is not a power of two and several splits
    included) exactly as the norm kernel rounds it, then projected; fused 0 takes the norm
    kernel first. More rows take the norm kernel then the dot."""
    from moeserve.kernels.norm_rope import rms_norm
    from moeserve.kernels.quant import dequantize, quantize_fp8_rows

    monkeypatch.setattr(linear, "NORM_IN_GEMV", fused)
    n, k = 40, 300
    g = torch.Generator().manual_seed(k + fused)
    x = (torch.randn(1, k, generator=g) * 3).to(device, dtype)
    norm_w = (torch.rand(k, generator=g) + 0.5).to(device, dtype)
    w = torch.randn(n, k, generator=g)
    scale = None
    if quant:
        w, scale = (a.to(device) for a in quantize_fp8_rows(w * 0.05))
        w_real = dequantize(w, scale, "fp8", dtype)
    else:
        w = w_real = w.to(device, dtype)
    normed = rms_norm(x, norm_w, 1e-6)
    want = linear.linear_partials(normed, w, w_scale=scale).sum(0)
    got = linear.linear_partials(x, w, w_scale=scale, norm=(norm_w, 1e-6)).sum(0)
    # The same normed bf16 row up to the statistics' summation order: equal within float32
    # summation of the products.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # And the product itself (FP8 groups are scaled once a group, not rounded a weight).
    ref = normed.double() @ w_real.double().T
    tol = 2e-2 if quant and dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)
    # Against a norm that was never applied: the test would notice a GEMV that skipped it.
    plain = linear.linear_partials(x, w, w_scale=scale).sum(0)
    assert not torch.allclose(plain, got, rtol=1e-2, atol=1e-2)


def test_one_row_gemv_splits_to_fill_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """gpt-oss-120b's qkv (5120 x 2880) and o_proj (2880 x 4096) at one row: several programs
    an SM, each at least two K tiles; its router one tile each; FP8 tiles hold whole
    128-column groups."""
    import moeserve.kernels as kernels

    monkeypatch.setattr(linear, "interpreting", lambda: False)  # the GPU's tiles
    monkeypatch.setattr(kernels, "num_sms", lambda: 132)  # an H100's
    for n, k in ((5120, 2880), (2880, 4096)):
        cfg = linear.gemv_partials_config(n, k)
        programs = -(-n // cfg["BLOCK_N"]) * cfg["SPLIT_K"]
        assert programs >= 6 * 132, (n, k, cfg)
        assert -(-k // cfg["BLOCK_K"]) // cfg["SPLIT_K"] >= 2, cfg
    router = linear.gemv_partials_config(128, 2880)  # a few rows: single-tile splits
    assert router["SPLIT_K"] == -(-2880 // router["BLOCK_K"])
    fp8 = linear.gemv_partials_config(5120, 2880, "fp8")
    assert fp8["BLOCK_K"] % 128 == 0 and fp8["SPLIT_K"] > 1


def test_config_splits_to_fill_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny weight (a router) splits K finely; a large one keeps splits of >= 8 K blocks."""
    import moeserve.kernels as kernels

    monkeypatch.setattr(linear, "interpreting", lambda: False)  # the GPU's tiles
    monkeypatch.setattr(kernels, "num_sms", lambda: 132)  # an H100's
    router = linear.config(1, 8, 4096)
    assert router["BLOCK_N"] == 16 and router["SPLIT"] == 4096 // router["BLOCK_K"]
    o_proj = linear.config(1, 4096, 4096)
    assert o_proj["SPLIT"] == 4 and 4096 // o_proj["BLOCK_K"] // o_proj["SPLIT"] == 8
    wide = linear.config(16, 65536, 4096)  # 1,024 programs already: no split
    assert wide["SPLIT"] == 1
    assert linear.applicable(torch.empty(16, 4)) and not linear.applicable(torch.empty(17, 4))
    assert not linear.applicable(torch.empty(0, 4))


@pytest.mark.parametrize(
    ("device", "dtype"),
    [
        ("cpu", torch.float32),
        pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu),
        pytest.param("cuda", torch.float32, marks=pytest.mark.gpu),
    ],
)
@pytest.mark.parametrize(("t", "n", "k"), [(1, 40, 300), (5, 96, 256), (40, 33, 136)])
def test_fp8_weight_partials_match_the_dequantized_linear(
    device: str, dtype: torch.dtype, t: int, n: int, k: int
) -> None:
    """FP8 weights with a scale per row and 128 columns (a partial last group too): the
    partials add up to F.linear on the dequantized weight, rounded as the readable path
    rounds it (to the activations' dtype), bias held once; up to FP8_MAX_ROWS rows."""
    from moeserve.kernels.quant import dequantize, quantize_fp8_rows

    g = torch.Generator().manual_seed(t + n + k)
    x = torch.randn(t, k, generator=g).to(device, dtype)
    w, s = (a.to(device) for a in quantize_fp8_rows(torch.randn(n, k, generator=g) * 0.05))
    bias = torch.randn(n, generator=g).to(device, dtype)
    assert linear.applicable(x, scaled=True) and (t <= linear.MAX_ROWS) == linear.applicable(x)
    got = linear.reduce_partials(linear.linear_partials(x, w, bias, w_scale=s), torch.float32)
    w_real = dequantize(w, s, "fp8", dtype)
    want = (x.double() @ w_real.double().T + bias.double()).float()
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("device", _devices())
def test_float32_router_takes_float32_activations(device: str) -> None:
    """A float32 router (DeepSeek, GLM) on bf16 activations: the partials are the float32
    GEMM of the activations converted, as F.linear(x.float(), w) (no tf32, no bf16 round)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 96, generator=g).to(device, torch.bfloat16)
    w = torch.randn(12, 96, generator=g).to(device)
    got = linear.linear_partials(x, w).sum(0)
    want = x.double() @ w.double().T
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize(("split", "t", "n"), [(1, 1, 3000), (3, 2, 70), (5, 1, 1025)])
def test_partials_summed_in_one_kernel(device: str, split: int, t: int, n: int) -> None:
    """The reduce kernel (reduce_partials on the GPU): the splits summed in order in float32
    and rounded once to the output dtype, as the readable sum (bf16 on the GPU only: the
    interpreter's bf16 conversion truncates)."""
    g = torch.Generator().manual_seed(split * n)
    parts = torch.randn(split, t, n, generator=g).to(device)
    for dtype in (torch.float32,) + ((torch.bfloat16,) if device == "cuda" else ()):
        got = linear.sum_partials(parts, dtype)
        assert got.dtype == dtype and got.shape == (t, n)
        torch.testing.assert_close(got.cpu(), parts.sum(0).to(dtype).cpu(), rtol=1e-6, atol=1e-6)
