"""Probe: an MXFP4 expert GEMV on the tensor cores, against the shipped one (moe_gemv).

The shipped GEMV decodes each E2M1 nibble to float16 (mxfp4.e2m1x4_as_fp16), widens it to
float32 and multiply-adds it with the activation: about 6.5 instructions a weight in its sm_90
loop, which bound it more than memory does. Here the same float16 weights go into fp16 dots
([16, 32] activations, a scale group of K, against [32, BLOCK_N] weights; the activation row
repeated down the 16 rows a dot needs), and only each group's dot is scaled in float32. The
activations go to float16 times a power of two that puts their largest magnitude at or below
2**15 (so the conversion keeps bf16's precision for everything within 2**-29 of the largest),
undone at the end. Same experts, same bytes: gate/up rows of gpt-oss-120b's shape, 4 experts
at one token. Reports each variant's time and its error against the dequantized weights.

    python3 benchmarks/mxfp4_dot_probe.py [--shape gpt-oss-120b]
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from moeserve.bench.synthetic import SHAPES  # noqa: E402
from moeserve.kernels import interpreting  # noqa: E402
from moeserve.kernels import moe_gemv as mv  # noqa: E402
from moeserve.kernels import mxfp4 as mq  # noqa: E402
from moeserve.kernels import quant as qt  # noqa: E402
from moeserve.model.families import parse_config  # noqa: E402


@triton.jit
def _dot_gemv_kernel(
    x_ptr,  # [K] bf16
    w_ptr,  # [E, N, K/2] uint8
    s_ptr,  # [E, N, K/32] uint8 (E8M0)
    experts_ptr,  # [R]
    y_ptr,  # [R, N] float32
    prescale,  # 2**p: the activations' float16 factor
    N,
    K,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,
    PACKED: tl.constexpr,
):
    r = tl.program_id(1)
    e = tl.load(experts_ptr + r).to(tl.int64)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    G: tl.constexpr = BLOCK_K // 32
    acc = tl.zeros((16, BLOCK_N), tl.float32)
    w_e = w_ptr + e * stride_we
    s_e = s_ptr + e * stride_se
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        g = k0 // 32 + tl.arange(0, G)
        g_ok = g * 32 < K
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32) * prescale
        x3 = tl.broadcast_to(tl.reshape(x.to(tl.float16), (G, 1, 32)), (G, 16, 32))
        bk = k0 // 2 + tl.arange(0, G)[:, None] * 16 + tl.arange(0, 16)[None, :]
        byte = tl.load(
            w_e + n[:, None, None] * stride_wn + bk[None, :, :],
            mask=n_ok[:, None, None] & g_ok[None, :, None],
            other=0,
        )
        lo, hi = mq.mxfp4_nibbles(byte, PACKED)  # [BLOCK_N, G, 16]: even k, odd k
        w = tl.reshape(tl.join(lo, hi), (BLOCK_N, G, 32))  # k order
        d = tl.dot(x3, tl.permute(w, (1, 2, 0)), input_precision="ieee")  # [G, 16, BLOCK_N]
        s = tl.load(
            s_e + n[:, None] * stride_sn + g[None, :], mask=n_ok[:, None] & g_ok[None, :], other=0
        )
        f = tl.permute(mq.mxfp4_group_scale(s, PACKED), (1, 0))  # [G, BLOCK_N]
        acc += tl.sum(d * f[:, None, :], axis=0)
    rows = tl.arange(0, 16)
    y = tl.sum(tl.where(rows[:, None] == 0, acc, 0.0), axis=0) / prescale
    tl.store(y_ptr + r * N + n, y, mask=n_ok)


def dot_gemv(
    x_K: torch.Tensor,
    w: torch.Tensor,
    s: torch.Tensor,
    experts_R: torch.Tensor,
    out_RN: torch.Tensor,
    cfg: dict[str, int],
    prescale: float,
) -> None:
    N, K = w.shape[1], w.shape[2] * 2
    _dot_gemv_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), experts_R.numel())](
        x_K, w, s, experts_R, out_RN, prescale, N, K,
        w.stride(0), w.stride(1), s.stride(0), s.stride(1),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], STAGES=cfg["stages"],
        PACKED=mq.packed_decode(), num_warps=cfg["num_warps"],
    )  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="gpt-oss-120b", choices=sorted(SHAPES))
    ap.add_argument("--experts", type=int, default=8, help="stored experts (4 are read)")
    ap.add_argument("--small", action="store_true", help="a tiny shape (the interpreter)")
    args = ap.parse_args()
    cfg = parse_config(SHAPES[args.shape])
    D, F = cfg.hidden_size, cfg.moe_intermediate_size
    if args.small:
        D, F = 64, 48
    device = "cpu" if interpreting() else "cuda"
    torch.manual_seed(0)
    parts = [
        qt.quantize_mxfp4(torch.randn(2 * F, D, device=device, dtype=torch.bfloat16) * 0.02)
        for _ in range(args.experts)
    ]
    w, s = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    experts = torch.tensor([1, 3, 4, 6][: args.experts], device=device)
    x = torch.randn(1, D, device=device, dtype=torch.bfloat16)
    ref = torch.stack(
        [qt.dequantize(w[e], s[e], "mxfp4", torch.float32) @ x[0].float() for e in experts]
    )
    out = torch.empty(experts.numel(), 2 * F, device=device)
    # The largest power of two that keeps max |x| * 2**p at or below 2**15 (float16's top
    # binade). A kernel would find it in its own pass over the row; here it is set once.
    amax = x.abs().max().float().item()
    prescale = 2.0 ** (15 - math.ceil(math.log2(amax))) if amax > 0 else 1.0

    def err(y: torch.Tensor) -> float:
        return ((y.float() - ref).norm() / ref.norm()).item()

    if interpreting():
        dot_gemv(
            x[0], w, s, experts, out, dict(BLOCK_N=16, BLOCK_K=32, stages=1, num_warps=1), prescale
        )
        print(f"interpreted: relative error {err(out):.2e}")
        return 0

    from kernel_bench import bench

    shipped = dict(mv.gemv_config(F, D, "mxfp4"))
    h, _ = mv.gemv_gate_up_act(
        x, w, experts, 4, args.experts, activation=("silu", 1.0, 0.0), cfg=shipped,
        w_scale=s, quant="mxfp4",
    )  # fmt: skip
    mb = experts.numel() * qt.quantized_bytes(w[0], s[0]) / 1e6
    t = bench(
        lambda: mv.gemv_gate_up_act(
            x,
            w,
            experts,
            4,
            args.experts,
            activation=("silu", 1.0, 0.0),
            cfg=shipped,
            w_scale=s,
            quant="mxfp4",
        )  # fmt: skip
    )
    print(f"{args.shape}: 4 experts' gate/up, {mb:.1f} MB")
    print(f"shipped GEMV {shipped}: {t * 1e6:6.1f} us, {mb / t / 1e6:.2f} TB/s")
    rows = []
    for bn, bk, warps, stages in itertools.product((16, 32), (64, 128, 256), (1, 2), (1, 2)):
        c = dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, stages=stages)
        try:
            dot_gemv(x[0], w, s, experts, out, c, prescale)
            t = bench(lambda c=c: dot_gemv(x[0], w, s, experts, out, c, prescale))
        except Exception as e:  # out of resources at a sweep point
            print(f"  {c}: {type(e).__name__}")
            continue
        rows.append((t, c, err(out)))
    for t, c, e in sorted(rows, key=lambda r: r[0])[:8]:
        print(f"fp16 dots {c}: {t * 1e6:6.1f} us, {mb / t / 1e6:.2f} TB/s, error {e:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
