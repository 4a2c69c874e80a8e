"""Probe: what programmatic dependent launch (PDL) saves between dependent kernels in a CUDA
graph on this GPU. A chain of GEMVs y_{i+1} = W_i @ y_i (each reads its own weight matrix,
so the weights are independent of the previous kernel and may be loaded before the wait).

    python3 benchmarks/pdl_probe.py
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _gemv(
    w_ptr, x_ptr, y_ptr, N, K, PDL: tl.constexpr, EARLY: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if PDL:
        if EARLY:
            # the first weight tile does not depend on the previous kernel
            w0 = tl.load(w_ptr + rows[:, None] * K + cols[None, :])
            gdc_wait()
            gdc_launch_dependents()
            x0 = tl.load(x_ptr + cols).to(tl.float32)
            acc += w0.to(tl.float32) * x0[None, :]
            start = BLOCK_K
        else:
            gdc_wait()
            gdc_launch_dependents()
            start = 0
    else:
        start = 0
    for k0 in range(start, K, BLOCK_K):
        w = tl.load(w_ptr + rows[:, None] * K + (k0 + cols)[None, :])
        x = tl.load(x_ptr + k0 + cols).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
    tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty))


def run(n_kernels: int, n: int, pdl: bool, early: bool) -> float:
    torch.manual_seed(0)
    ws = [torch.randn(n, n, device="cuda", dtype=torch.bfloat16) * 0.01 for _ in range(n_kernels)]
    xs = [torch.randn(n, device="cuda", dtype=torch.bfloat16) for _ in range(n_kernels + 1)]

    def chain() -> None:
        for i in range(n_kernels):
            _gemv[(n // 16,)](
                ws[i], xs[i], xs[i + 1], n, n, PDL=pdl, EARLY=early, BLOCK_N=16, BLOCK_K=256,
                num_warps=4, launch_pdl=pdl,
            )  # fmt: skip

    chain()
    ref = xs[-1].clone()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        chain()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        chain()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    assert torch.equal(xs[-1], ref), "graph result differs"
    t = triton.testing.do_bench(g.replay, warmup=50, rep=300, return_mode="median") * 1e-3
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1024,2048,4096", help="n of each n x n bf16 weight")
    ap.add_argument("--kernels", type=int, default=40, help="GEMVs in the chain")
    args = ap.parse_args()
    n_k = args.kernels
    for n in (int(v) for v in args.sizes.split(",")):
        bytes_ = 2 * n * n
        base = run(n_k, n, False, False)
        pdl = run(n_k, n, True, False)
        early = run(n_k, n, True, True)
        print(
            f"n={n} ({bytes_ / 1e6:.1f} MB a kernel) x{n_k}: plain {base / n_k * 1e6:.2f} us"
            f" a kernel, pdl {pdl / n_k * 1e6:.2f}, pdl+early weight load "
            f"{early / n_k * 1e6:.2f}; copy-rate floor {bytes_ / 4.29e12 * 1e6:.2f}"
        )


if __name__ == "__main__":
    main()
