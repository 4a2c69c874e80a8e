"""Probe: can a dense projection's weight be pulled into L2 while the latency-bound kernels
before it run, so that the projection reads L2 instead of HBM?

At batch 1 a decoder layer's attention (rotary, partitions, merge) is a chain of small
kernels that leave HBM idle for some 10-15 us, after which the output projection streams
its weight (gpt-oss-120b: 23.6 MB, 12 us). Here a second stream of a CUDA graph prefetches
that weight into L2 (`prefetch.global.L2::evict_last`, or plain loads) when the chain starts;
the projection is kernels.linear's one-row GEMV. Each replay starts from a cold L2.

    python3 benchmarks/l2_prefetch_probe.py [--n 2880 --k 4096] [--chain 6]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeserve.kernels import linear  # noqa: E402
from moeserve.kernels.norm_rope import rms_norm  # noqa: E402


@triton.jit
def _prefetch_kernel(ptr, units, BLOCK: tl.constexpr, ASM: tl.constexpr):
    """ASM: one prefetch per 128-byte line; else one 4-byte load per 32-byte sector (what
    HBM fills L2 by)."""
    # the last program repeats the last unit rather than touch bytes past the tensor
    offs = tl.minimum(tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), units - 1)
    at = ptr + offs.to(tl.int64) * (128 if ASM else 32)
    if ASM:
        got = tl.inline_asm_elementwise(
            "prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;",
            "=r,l",
            [at],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )
    else:
        word = at.to(tl.pointer_type(tl.int32))
        got = tl.load(word, eviction_policy="evict_last")
    # never true (the asm gives zeros; no word of these randn weights is 12345, a bf16 zero
    # and 4.7e-10): keeps the loads alive
    tl.store(at, got.to(tl.uint8), mask=got == 12345)


def prefetch(w: torch.Tensor, asm: bool) -> None:
    units = triton.cdiv(w.numel() * w.element_size(), 128 if asm else 32)
    block = 1024
    _prefetch_kernel[(triton.cdiv(units, block),)](w.view(torch.uint8), units, block, asm)


def timed(graph: torch.cuda.CUDAGraph, reps: int = 50) -> float:
    """Median us of a replay, each after a read of 512 MB (a cold L2)."""
    flush = torch.ones(64 * 2**20, dtype=torch.int64, device="cuda")
    graph.replay()
    times = []
    for _ in range(reps):
        flush.sum()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return sorted(times)[len(times) // 2]


def capture(fn) -> torch.cuda.CUDAGraph:  # noqa: ANN001
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2880)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--chain", type=int, default=6, help="dependent RMSNorm launches before")
    args = ap.parse_args()
    w = torch.randn(args.n, args.k, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(1, args.k, dtype=torch.bfloat16, device="cuda")
    norm_w = torch.ones(args.k, dtype=torch.bfloat16, device="cuda")
    side = torch.cuda.Stream()
    mb = w.numel() * 2 / 1e6

    def chain() -> torch.Tensor:
        h = x
        for _ in range(args.chain):
            h = rms_norm(h, norm_w, 1e-6)
        return h

    def plain() -> None:
        linear.linear_partials(chain(), w)

    def with_prefetch(asm: bool):  # noqa: ANN202
        def run() -> None:
            main_s = torch.cuda.current_stream()
            side.wait_stream(main_s)
            with torch.cuda.stream(side):
                prefetch(w, asm)
            linear.linear_partials(chain(), w)
            main_s.wait_stream(side)

        return run

    def prefetch_alone(asm: bool):  # noqa: ANN202
        return lambda: prefetch(w, asm)

    rows = {
        f"chain of {args.chain} RMSNorms alone": capture(chain),
        f"GEMV {args.n} x {args.k} ({mb:.1f} MB) alone": capture(
            lambda: linear.linear_partials(x, w)
        ),
        "chain, then GEMV": capture(plain),
        "prefetch (asm) alone": capture(prefetch_alone(True)),
        "prefetch (loads) alone": capture(prefetch_alone(False)),
        "chain + GEMV, weight prefetched on a side stream (asm)": capture(with_prefetch(True)),
        "chain + GEMV, weight prefetched on a side stream (loads)": capture(with_prefetch(False)),
        "GEMV right after a prefetch (asm), one stream": capture(
            lambda: (prefetch(w, True), linear.linear_partials(x, w))
        ),
    }
    print(torch.cuda.get_device_name())
    for name, g in rows.items():
        print(f"{timed(g):8.1f} us  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
