"""Bandwidth of the Triton kernels on a model's layer shapes (Mixtral-8x7B's by default,
--shape for another preset of moeserve/bench/synthetic.py), and a small config sweep.

Each grouped GEMM of the fused MoE is timed alone (CUDA events, many repetitions) on the
experts a random routing of T tokens touches; bandwidth = those experts' weight bytes / time,
compared with the device copy bandwidth (read + write, measured here). The paged decode
kernel is timed on B sequences of a given context (bytes = K/V read). --sweep tries launch
configs around the shipped table for the decode sizes (K splits included). Eager launches of
the whole fused_moe are host-bound at decode sizes; its in-graph cost per step is in the
decode traces of benchmarks/gpu_speed.py --profile.

    python benchmarks/kernel_bench.py --sweep --json out.json
    python benchmarks/kernel_bench.py --shape qwen3-30b-a3b --tokens 1,8,64 --sweep
    python benchmarks/kernel_bench.py --shape deepseek-v2-lite --tokens 64 --sweep --sweep-tokens 64
    python benchmarks/kernel_bench.py --shape gpt-oss-120b --linear   # dense projections, one row

--quant fp8|mxfp4: the experts stored quantized (kernels/quant.py), bytes = packed weights +
scales; fp8 GEMMs at prefill sizes take the FP8 tensor cores (activations quantized outside
the timed span), as fused_moe does.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from triton.runtime.errors import OutOfResources

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeserve.bench.synthetic import SHAPES  # noqa: E402
from moeserve.kernels import fused_moe as fm  # noqa: E402
from moeserve.kernels import moe_gemm as mg  # noqa: E402
from moeserve.kernels import moe_gemv as mv  # noqa: E402
from moeserve.kernels import moe_quant as mq  # noqa: E402
from moeserve.kernels import quant as qt  # noqa: E402
from moeserve.kernels.paged_attention import paged_decode_attention  # noqa: E402
from moeserve.model.families import parse_config  # noqa: E402

E, K_TOP, D, F = 8, 2, 4096, 14336
QUANT = ""  # --quant
# bytes per weight, scales included (kernels/quant.py: fp8 float32 per 128, mxfp4 E8M0 per 32)
BYTES_PER_WEIGHT = {"": 2, "fp8": 1 + 4 / 128, "mxfp4": 0.5 + 1 / 32}


def _experts_weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random [E, n, k] expert weights in bf16, or stored as --quant with their scales."""
    if not QUANT:
        return torch.randn(E, n, k, dtype=torch.bfloat16, device="cuda") * 0.02, None
    quantize = qt.quantize_fp8_rows if QUANT == "fp8" else qt.quantize_mxfp4
    # An expert at a time: the quantizers' float32 temporaries for all of gpt-oss-120b's
    # 128 experts at once do not fit beside them on an 80 GB card.
    parts = [
        quantize(torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02) for _ in range(E)
    ]
    return torch.stack([w for w, _ in parts]), torch.stack([s for _, s in parts])


def _bytes_per_expert(w: torch.Tensor, s: torch.Tensor | None) -> int:
    return qt.quantized_bytes(w, s) // w.shape[0]


def bench(fn: Any, reps: int = 50) -> float:
    """Median seconds of fn() over reps, with an L2-flushing copy between calls."""
    # Large enough that reading it outlasts the host's launch of fn (Triton's launcher takes
    # tens of us): the timed span then holds the kernel alone, not the launch latency. Read,
    # not written: a zero fill left the L2 full of dirty lines whose write-back the timed
    # kernel paid (about 12 us, most of a decode GEMM's time; figures before 2026-12-03
    # evening include it).
    flush = torch.ones(64 * 2**20, dtype=torch.int64, device="cuda")
    fn()
    times = []
    for _ in range(reps):
        flush.sum()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def copy_bw() -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * 2**30 / bench(lambda: dst.copy_(src), 20)


def moe_gemms(t: int, cfgs: list[dict[str, int]] | None) -> list[dict[str, Any]]:
    torch.manual_seed(t)
    x = torch.randn(t, D, dtype=torch.bfloat16, device="cuda")
    (w1, s1), (w2, s2) = _experts_weight(2 * F, D), _experts_weight(D, F)
    experts = torch.stack([torch.randperm(E, device="cuda")[:K_TOP] for _ in range(t)])
    weights = torch.rand(t, K_TOP, device="cuda")
    touched = experts.unique().numel()
    rows = []
    base1 = mg.gemm_config(t, E, K_TOP, 2 * F, D, torch.bfloat16, QUANT)
    base2 = mg.gemm_config(t, E, K_TOP, D, F, torch.bfloat16, QUANT)
    fp8_dot = mq.takes_fp8_dot(QUANT, base1["BLOCK_M"])
    if fp8_dot:
        base1, base2 = mq.fp8_dot_config(base1, D), mq.fp8_dot_config(base2, F)
    for name, w, sc, n, base in (("gate_up", w1, s1, 2 * F, base1), ("down", w2, s2, D, base2)):
        a = (
            x
            if name == "gate_up"
            else torch.randn(t * K_TOP, F, dtype=torch.bfloat16, device="cuda")
        )
        a, a_scale = mq.quantize_fp8_act(a) if fp8_dot else (a, None)
        quant = dict(b_scale=sc, quant=QUANT, a_scale=a_scale)
        ids, blocks, used = fm.moe_align(experts, E, base["BLOCK_M"])
        per_a = K_TOP if name == "gate_up" else 1
        for cfg in [base] + [dict(base, **c2) for c2 in (cfgs or [])]:
            if (
                cfg["BLOCK_M"] != base["BLOCK_M"]
                or (fp8_dot and cfg["BLOCK_K"] > 128)
                or (QUANT == "mxfp4" and cfg["BLOCK_K"] != base["BLOCK_K"])  # one group a tile
            ):
                continue
            split = cfg["SPLIT_K"]
            # Split: float32 partials; their reader (silu_mul, the sum over k) is not timed here.
            c = (
                torch.empty(split, t * K_TOP, n, dtype=torch.float32, device="cuda")
                if split > 1
                else torch.empty(t * K_TOP, n, dtype=torch.bfloat16, device="cuda")
            )
            rw = weights.flatten() if name == "down" and split == 1 else None
            args = (a, w, c, rw, ids, blocks, used, None, per_a, cfg)
            try:
                s = bench(lambda args=args, quant=quant: mg.moe_gemm(*args, **quant))
            except OutOfResources:  # a sweep point over shared memory
                continue
            rows.append(
                {
                    "gemm": name,
                    "tokens": t,
                    "experts": touched,
                    "config": cfg,
                    "us": s * 1e6,
                    "bytes_per_s": touched * _bytes_per_expert(w, sc) / s,
                    "shipped": cfg is base,
                    "quant": QUANT + ("+fp8-dot" if fp8_dot else ""),
                }
            )
    return rows


def _layer(t: int) -> tuple[Any, ...]:
    """Random experts (bf16 or --quant, with their scales), one token batch and its routing
    (distinct experts per token)."""
    torch.manual_seed(t)
    x = torch.randn(t, D, dtype=torch.bfloat16, device="cuda")
    (w1, s1), (w2, s2) = _experts_weight(2 * F, D), _experts_weight(D, F)
    experts = torch.stack([torch.randperm(E, device="cuda")[:K_TOP] for _ in range(t)])
    weights = torch.rand(t, K_TOP, device="cuda")
    return x, w1, w2, experts, weights, s1, s2


def moe_gemvs(t: int, sweep: bool) -> list[dict[str, Any]]:
    """The per-assignment kernels (kernels.moe_gemv) alone, shipped config and a sweep."""
    x, w1, w2, experts, _, s1, s2 = _layer(t)
    touched = experts.unique().numel()
    experts_R = experts.flatten()
    h = torch.randn(t * K_TOP, F, dtype=torch.bfloat16, device="cuda")
    act = _activation()
    bounds = {"gate_up+act": float(x.abs().max()), "down": fm.activation_bound(act)}
    rows = []
    for name, n, k in (("gate_up+act", 2 * F, D), ("down", D, F)):
        down = name == "down"
        bound = bounds[name]
        half = QUANT == "mxfp4" and mv.half_products(bound)
        base = (
            mv.gemv_config(n, k, QUANT, rows=t * K_TOP, half=half)
            if down
            else mv.gemv_config(n // 2, k, QUANT, half=half)
        )
        # around the shipped tiles, with the K tiles in flight (tl.range's num_stages)
        if QUANT == "fp8":
            splits, widths = ((3, 4, 6), (512, 1024)) if down else ((1,), (256, 512))
            grid = itertools.product((16, 32), widths, (4, 8), splits, (1, 2, 4))
        elif QUANT == "mxfp4":  # rows in each thread when BLOCK_K = 256 (a group a thread:
            # 1024) x warps
            rows_n = (4, 8, 16) if down else (2, 4, 8)
            splits = (1, 2, 3) if down else (1,)
            per_warp = 1024 if half else 256
            grid = (
                (n, per_warp * w, w, sk, 1)
                for n, w, sk in itertools.product(rows_n, (1, 2, 4), splits)
            )
        else:
            splits = (1, 2, 4) if down else (1,)
            grid = itertools.product((8, 16, 32), (128, 256), (4, 8), splits, (1, 3))
        cfgs = [base] + [
            dict(BLOCK_N=a, BLOCK_K=b, num_warps=c, SPLIT_K=d, loop_stages=st)
            for a, b, c, d, st in (grid if sweep else ())
            if b >= (qt.group_size(QUANT) if QUANT else 1)
        ]
        for cfg in cfgs:
            if down:
                out = torch.empty(cfg["SPLIT_K"], t * K_TOP, D, dtype=torch.float32, device="cuda")
                fn = lambda cfg=cfg, out=out, bound=bound: mv.gemv_down(  # noqa: E731
                    h, w2, out, experts_R, E, cfg=cfg, w_scale=s2, quant=QUANT, x_bound=bound
                )
            else:
                fn = lambda cfg=cfg, bound=bound: mv.gemv_gate_up_act(  # noqa: E731
                    x, w1, experts_R, K_TOP, E, activation=act, cfg=cfg, w_scale=s1,
                    quant=QUANT, x_bound=bound,
                )  # fmt: skip
            try:
                s = bench(fn)
            except OutOfResources:
                continue
            if cfg is base and QUANT == "mxfp4":  # the portable decode, same tile
                with _unpacked():
                    print(f"  {name} shipped tile, unpacked decode: {bench(fn) * 1e6:6.1f} us")
            rows.append(
                {
                    "gemm": name,
                    "tokens": t,
                    "experts": touched,
                    "config": cfg,
                    "us": s * 1e6,
                    "bytes_per_s": touched
                    * _bytes_per_expert(*((w2, s2) if name == "down" else (w1, s1)))
                    / s,
                    "shipped": cfg is base,
                    "quant": QUANT,
                }
            )
    return rows


def _activation() -> fm.Activation:
    """The experts' activation: gpt-oss's clamped SwiGLU for MXFP4 (the format's checkpoints),
    silu(gate) * up otherwise."""
    return ("clamped_swiglu", 1.702, 7.0) if QUANT == "mxfp4" else fm.SILU


@contextlib.contextmanager
def _unpacked() -> Iterator[None]:
    """The kernels' portable mxfp4 decode (the interpreter's, float32 products) instead of
    the PTX one."""
    saved = mv.packed_decode, mg.packed_decode, mv.half_products
    mv.packed_decode = mg.packed_decode = lambda: False
    mv.half_products = lambda bound: False
    try:
        yield
    finally:
        mv.packed_decode, mg.packed_decode, mv.half_products = saved


def whole_moe(t: int, gemv: bool) -> tuple[float, int]:
    """Seconds of one fused_moe layer replayed from a CUDA graph (no launch overhead), and the
    experts it touched."""
    x, w1, w2, experts, weights, s1, s2 = _layer(t)
    out = torch.empty_like(x)
    q = dict(w_gate_up_scale=s1, w_down_scale=s2, quant=QUANT)
    q.update(activation=_activation(), x_bound=float(x.abs().max()))
    fm.fused_moe(x, w1, w2, weights, experts, out_TD=out, gemv=gemv, **q)  # compile
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fm.fused_moe(x, w1, w2, weights, experts, out_TD=out, gemv=gemv, **q)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fm.fused_moe(x, w1, w2, weights, experts, out_TD=out, gemv=gemv, **q)
    return bench(graph.replay), experts.unique().numel()


def attention(b: int, ctx: int) -> dict[str, Any]:
    h, g, x, s = 32, 8, 128, 16
    blocks_per = -(-ctx // s)
    n = b * blocks_per
    k = torch.randn(n, s, g, x, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    q = torch.randn(b, h, x, dtype=torch.bfloat16, device="cuda")
    tables = torch.randperm(n, device="cuda").view(b, blocks_per)
    lens = torch.full((b,), ctx, dtype=torch.int64, device="cuda")
    out = torch.empty_like(q)
    sec = bench(lambda: paged_decode_attention(q, k, v, tables, lens, x**-0.5, out_BHX=out))
    bytes_ = 2 * b * ctx * g * x * 2
    return {"batch": b, "context": ctx, "us": sec * 1e6, "bytes_per_s": bytes_ / sec}


def linear_report(shape: str, bw: float, sweep: bool = False) -> list[dict[str, Any]]:
    """The shape's dense projections and LM head at one row (batch-1 decode), bf16:
    kernels.linear's GEMV against its tensor-core dot path at the same row (the layer's path
    before 2026-12-06) and cuBLAS (F.linear); sweep: the GEMV's tiles and K splits around the
    shipped ones."""
    from moeserve.kernels import linear

    raw = SHAPES[shape]
    hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
    kv_heads = raw.get("num_key_value_heads", heads)
    if raw.get("kv_lora_rank"):  # MLA with a plain q: q and kv_a stacked, as the layer does
        rope = raw["qk_rope_head_dim"]
        qkv = heads * (raw["qk_nope_head_dim"] + rope) + raw["kv_lora_rank"] + rope
        o_in = heads * raw["v_head_dim"]
    else:
        head_dim = raw.get("head_dim") or hidden // heads
        qkv, o_in = (heads + 2 * kv_heads) * head_dim, heads * head_dim
    experts = raw.get("num_local_experts") or raw.get("n_routed_experts") or raw["num_experts"]
    rows = []
    projections = (("qkv", qkv, hidden), ("o", hidden, o_in), ("router", experts, hidden))
    for name, n, k in projections + (("lm_head", raw["vocab_size"], hidden),):
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        times = {
            "gemv": bench(lambda w=w, x=x: linear.linear_partials(x, w)),
            "dot": bench(lambda w=w, x=x: linear.dot_partials(x, w)),
            "cublas": bench(lambda w=w, x=x: torch.nn.functional.linear(x, w)),
        }
        cfg = linear.gemv_partials_config(n, k)
        print(
            f"{name:6s} {n} x {k} ({n * k * 2 / 1e6:.1f} MB): GEMV {times['gemv'] * 1e6:6.1f} us "
            f"({n * k * 2 / times['gemv'] / bw:.2f} of copy bw, {cfg}), dot "
            f"{times['dot'] * 1e6:6.1f} us ({n * k * 2 / times['dot'] / bw:.2f}), cuBLAS "
            f"{times['cublas'] * 1e6:6.1f} us ({n * k * 2 / times['cublas'] / bw:.2f})"
        )
        row = dict(name=name, n=n, k=k, us={m: t * 1e6 for m, t in times.items()}, sweep=[])
        for c in _linear_sweep(n, k) if sweep else ():
            try:
                t = bench(lambda w=w, x=x, c=c: linear._gemv_partials(x, w, None, None, cfg=c))
            except OutOfResources:
                continue
            row["sweep"].append(dict(config=c, us=t * 1e6))
        if row["sweep"]:
            best = min(row["sweep"], key=lambda r: r["us"])
            print(
                f"       best of {len(row['sweep'])}: {best['us']:6.1f} us "
                f"({n * k * 2 / best['us'] / 1e-6 / bw:.2f}) {best['config']}"
            )
        rows.append(row)
    return rows


def _linear_sweep(n: int, k: int) -> list[dict[str, int]]:
    """One-row GEMV launches around kernels.linear's: rows and columns per program, warps,
    K tiles in flight, and K splits (how many programs, against how many the SMs hold)."""
    cfgs = []
    tiles_warps = ((256, 4), (512, 4), (256, 2))
    for bn, (bk, warps), stages in itertools.product((8, 16, 32), tiles_warps, (2, 3)):
        tiles = -(-k // bk)
        for split in sorted({1, 2, 3, 4, 6, 8} & set(range(1, tiles + 1))):
            cfgs.append(
                dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, SPLIT_K=split, loop_stages=stages)
            )
    return cfgs


def main() -> int:
    global E, K_TOP, D, F, QUANT
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="mixtral-8x7b", choices=sorted(SHAPES))
    ap.add_argument("--tokens", default="1,8,64,256")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument(
        "--sweep-tokens",
        default="1,8",
        help="token counts whose grouped GEMMs --sweep covers (default 1,8)",
    )
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--gemv",
        action="store_true",
        help="only the per-assignment kernels (moe_gemv) at --tokens, and the whole layer "
        "in a CUDA graph with them and with the grouped GEMMs",
    )
    ap.add_argument(
        "--quant",
        default="",
        choices=("", "fp8", "mxfp4"),
        help="experts stored quantized (bytes = packed weights + scales)",
    )
    ap.add_argument(
        "--linear",
        action="store_true",
        help="only the shape's dense projections at one row: GEMV vs tensor-core dot "
        "(--sweep: the GEMV's tiles and K splits too)",
    )
    args = ap.parse_args()
    QUANT = args.quant
    cfg = parse_config(SHAPES[args.shape])
    E, K_TOP, D, F = cfg.num_experts, cfg.top_k, cfg.hidden_size, cfg.moe_intermediate_size
    print(
        f"{args.shape}: {E} experts, top-{K_TOP}, hidden {D}, expert intermediate {F}"
        + (f", weights {QUANT}" if QUANT else "")
    )
    bw = copy_bw()
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s")
    sweep = None
    if args.sweep:
        grid = itertools.product((32, 64, 128), (128, 256), (4,), (1, 2, 4, 8))
        sweep = [
            dict(BLOCK_N=n, BLOCK_K=k, num_stages=st, GROUP_M=1, SPLIT_K=sk)
            for n, k, st, sk in grid
        ]
    result: dict[str, Any] = {"copy_bytes_per_s": bw, "moe": [], "attention": []}
    if args.linear:
        result["linear"] = linear_report(args.shape, bw, args.sweep)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return 0
    if args.gemv:
        return gemv_report(args, bw, result)
    swept = {int(x) for x in args.sweep_tokens.split(",")}
    for t in (int(x) for x in args.tokens.split(",")):
        rows = moe_gemms(t, sweep if t in swept else None)
        result["moe"] += rows
        for gemm in ("gate_up", "down"):
            mine = [r for r in rows if r["gemm"] == gemm]
            ship = next(r for r in mine if r["shipped"])
            best = max(mine, key=lambda r: r["bytes_per_s"])
            print(
                f"T={t:4d} {gemm:7s} experts {ship['experts']}: shipped {ship['us']:7.1f} us "
                f"{ship['bytes_per_s'] / bw:.2f} of copy bw; best {best['us']:7.1f} us "
                f"{best['bytes_per_s'] / bw:.2f} {best['config']}"
            )
    for b, ctx in ((1, 512), (1, 4096), (64, 256), (64, 2048)):
        r = attention(b, ctx)
        result["attention"].append(r)
        print(f"attention b{b} ctx {ctx}: {r['us']:.1f} us, {r['bytes_per_s'] / bw:.2f} of copy bw")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def gemv_report(args: argparse.Namespace, bw: float, result: dict[str, Any]) -> int:
    result["layer"] = []
    for t in (int(x) for x in args.tokens.split(",")):
        rows = moe_gemvs(t, args.sweep and t == 1)
        result["moe"] += rows
        for gemm in ("gate_up+act", "down"):
            mine = [r for r in rows if r["gemm"] == gemm]
            ship = next(r for r in mine if r["shipped"])
            best = max(mine, key=lambda r: r["bytes_per_s"])
            print(
                f"T={t:4d} gemv {gemm:11s} experts {ship['experts']}: shipped {ship['us']:6.1f} "
                f"us {ship['bytes_per_s'] / bw:.2f} of copy bw; best {best['us']:6.1f} us "
                f"{best['bytes_per_s'] / bw:.2f} {best['config']}"
            )
        (gemv, experts), (grouped, _) = whole_moe(t, True), whole_moe(t, False)
        # the touched experts' weights (and scales), read once
        floor = experts * 3 * D * F * BYTES_PER_WEIGHT[QUANT] / bw
        result["layer"].append({"tokens": t, "gemv_s": gemv, "grouped_s": grouped})
        if QUANT == "mxfp4":
            with _unpacked():
                (slow, _), (slow_grouped, _) = whole_moe(t, True), whole_moe(t, False)
            print(
                f"T={t:4d} whole layer, unpacked decode: gemv {slow * 1e6:6.1f} us, "
                f"grouped {slow_grouped * 1e6:6.1f} us"
            )
        print(
            f"T={t:4d} whole layer in a graph: gemv {gemv * 1e6:6.1f} us "
            f"({floor / gemv:.2f} of floor), grouped {grouped * 1e6:6.1f} us "
            f"({floor / grouped:.2f})"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
