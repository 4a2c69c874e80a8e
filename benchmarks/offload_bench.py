"""Expert offloading on a GPU: tokens/s, fraction of the floor, and transformers+accelerate.

    # Mixtral-8x7B cut to 4 layers, half of each layer's experts in host memory, batch 1:
    python benchmarks/offload_bench.py --synthetic mixtral-4l --slots 4 --batch 1 --peer
    # the full Mixtral-8x7B shape (93 GB bf16, dummy weights) on an 80 GB H100, or a larger
    # GPU made to behave as one:
    python benchmarks/offload_bench.py --dummy mixtral-8x7b --batch 1 64 --emulate-card-mib 81559

Floor per run (from the routing actually seen): every step reads the dense weights and the
cache-resident experts it uses from HBM, and every missed expert once over the host link:
  floor = (steps * dense_bytes + hits * expert_bytes) / HBM_bw + misses * expert_bytes / copy_bw
with both bandwidths measured in this process. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeserve import LLM, SamplingParams  # noqa: E402
from moeserve.bench.floors import (  # noqa: E402
    copy_bandwidth,
    host_to_device_bandwidth,
    model_work,
)
from moeserve.bench.synthetic import SHAPES, synthetic_model  # noqa: E402
from moeserve.bench.throughput import Run, drive, free_device  # noqa: E402

STAT_KEYS = (
    "hits",
    "misses",
    "bytes_copied",
    "copy_wait_seconds",
    "cpu_seconds",
    "cpu_experts",
    "prefetches_issued",
    "prefetches_used",
)


def _snapshot(eng) -> tuple[float, int, dict[str, float]]:
    torch.cuda.synchronize()
    stats = eng.expert_cache_stats()
    return (
        time.perf_counter(),
        eng.num_steps,
        {k: sum(getattr(s, k) for s in stats) for k in STAT_KEYS},
    )


def _phase(eng, a, b, tokens: int, hbm: float, h2d: float) -> dict:
    """Figures between two snapshots: tokens/s, the floor from the routing seen, time split."""
    (t0, steps0, s0), (t1, steps1, s1) = a, b
    d = {k: s1[k] - s0[k] for k in STAT_KEYS}
    dt, steps = t1 - t0, steps1 - steps0
    work = model_work(eng.model_config, element_size=2)
    dense, expert_bytes = work.dense * 2, work.expert_bytes
    # HBM bandwidth as the design notes state it: a device copy's read+write bytes per second.
    floor = (steps * dense + d["hits"] * expert_bytes) / hbm + d["misses"] * expert_bytes / h2d
    if not eng.expert_cache_stats():
        floor = float("nan")  # nothing offloaded: no cache counters to build the floor from
    looked = d["hits"] + d["misses"]
    return dict(
        tokens=tokens,
        seconds=dt,
        tokens_per_s=tokens / dt,
        steps=steps,
        floor_seconds=floor,
        fraction_of_floor=floor / dt,
        hit_rate=d["hits"] / looked if looked else 1.0,
        misses_per_token=d["misses"] / tokens,
        bytes_moved_per_token=d["bytes_copied"] / tokens,
        copy_wait_s=d["copy_wait_seconds"],
        cpu_s=d["cpu_seconds"],
        other_s=dt - d["copy_wait_seconds"] - d["cpu_seconds"],
        cpu_experts=d["cpu_experts"],
        prefetch_issued=d["prefetches_issued"],
        prefetch_used=d["prefetches_used"],
    )


def run(
    llm: LLM, batch: int, in_len: int, out_len: int, hbm: float, h2d: float, host_profile: int = 0
) -> dict:
    """Prefill then decode `batch` requests; whole-run figures plus the decode phase alone
    (from the step after every request has its first token). host_profile: print that many
    of the timed run's costliest Python functions (cProfile, by own time, per step)."""
    eng = llm.engine
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(10, eng.vocab_size - 10, (batch, in_len), generator=g).tolist()
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    # Warm-up at the measured batch: the cache's calls see row counts a 1-row run does not
    # (Triton specialises some kernels on them), and their compiles must not be timed.
    drive(llm, prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    decode_start: list = []  # (snapshot, steps run by then), once

    def on_step(so_far: Run) -> None:
        if not decode_start and all(so_far.outputs):
            decode_start.append((_snapshot(eng), len(so_far.steps)))

    profiler = cProfile.Profile()
    start = _snapshot(eng)
    with profiler if host_profile else contextlib.nullcontext():
        timed = drive(llm, prompts, params, tag=f"bench-{batch}", on_step=on_step)
    end = _snapshot(eng)
    if host_profile:
        print(host_profile_table(profiler, len(timed.steps), host_profile), flush=True)
    (decode0, first_decode_step) = decode_start[0]
    decode_tokens = sum(s.tokens for s in timed.steps[first_decode_step:])
    r = dict(batch=batch, **_phase(eng, start, end, timed.output_tokens, hbm, h2d))
    r["ttft_s"] = decode0[0] - start[0]
    r["decode"] = _phase(eng, decode0, end, decode_tokens, hbm, h2d)
    return r


def host_profile_table(profiler: cProfile.Profile, steps: int, top: int) -> str:
    """The profiled run's `top` functions by own time, in µs per engine step. Time blocked
    in a device->host read (the routing each offloaded layer reads) is the reading
    function's own time, so this splits host work from waiting on the GPU, under cProfile's
    overhead (a few µs a call, so absolute figures run high)."""
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)  # type: ignore[attr-defined]
    total = sum(v[2] for _, v in rows)
    lines = [
        f"host profile: {total / steps * 1e6:.0f} us of Python a step over {steps} steps; "
        f"the top {top} by own time (us a step, calls a step, cumulative us a step):"
    ]
    for (file, line, name), (_, calls, own, cum, _) in rows[:top]:
        where = f"{Path(file).name}:{line}" if line else file
        lines.append(
            f"  {own / steps * 1e6:9.1f} {calls / steps:8.1f} {cum / steps * 1e6:10.1f}  "
            f"{name} ({where})"
        )
    return "\n".join(lines)


def accelerate_peer(path: Path, offload_layers: list[int], out_len: int) -> dict:
    """transformers + accelerate, the experts of `offload_layers` on the CPU, batch 1."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    with torch.device("meta"):  # module names differ across transformers versions: ask
        names = {n for n, _ in AutoModelForCausalLM.from_config(cfg).named_modules()}
    moe = "mlp" if "model.layers.0.mlp.experts" in names else "block_sparse_moe"
    device_map: dict[str, int | str] = {"model.embed_tokens": 0, "model.norm": 0, "lm_head": 0}
    if "model.rotary_emb" in names:
        device_map["model.rotary_emb"] = 0
    for i in range(cfg.num_hidden_layers):
        if i in offload_layers:
            for part in ("self_attn", "input_layernorm", "post_attention_layernorm", f"{moe}.gate"):
                device_map[f"model.layers.{i}.{part}"] = 0
            device_map[f"model.layers.{i}.{moe}.experts"] = "cpu"
        else:
            device_map[f"model.layers.{i}"] = 0
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=device_map)
    ids = torch.randint(10, cfg.vocab_size - 10, (1, 16), device="cuda")
    kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=out_len, min_new_tokens=out_len, **kw)
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    del model
    free_device()
    return dict(batch=1, tokens=out_len, seconds=dt, tokens_per_s=out_len / dt)


def emulate_card(card_bytes: int, utilization: float) -> float:
    """Make this GPU behave as one with `card_bytes` of memory: torch may allocate no more
    than such a card leaves after this process's CUDA context, and the engine's
    gpu_memory_utilization becomes the same share of that card. Returns that utilization."""
    torch.cuda.init()
    torch.empty(1, device="cuda")  # the context exists before it is measured
    free, total = torch.cuda.mem_get_info()
    context = total - free - torch.cuda.memory_reserved()
    if card_bytes > total:
        raise SystemExit(f"cannot emulate {card_bytes / 1e9:.1f} GB on a {total / 1e9:.1f} GB GPU")
    torch.cuda.set_per_process_memory_fraction((card_bytes - context) / total)
    return utilization * card_bytes / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", choices=["mixtral-4l", "small", "tiny"])
    src.add_argument("--dummy", choices=["mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v2-lite"])
    ap.add_argument("--slots", type=int, default=None, help="expert cache slots per layer")
    ap.add_argument("--modes", default="auto,fetch,cpu")
    ap.add_argument(
        "--quantization",
        default="none",
        help="comma-separated expert formats to run in turn: none (bf16), fp8 (quantized at load)",
    )
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--input-len", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--peer", action="store_true", help="also run transformers+accelerate")
    ap.add_argument("--prefetch", action="store_true", help="turn on next-layer prefetch")
    ap.add_argument(
        "--expert-cache-kernels",
        default="auto",
        help="comma-separated: auto, eager and/or fused (the engine option), run in turn",
    )
    ap.add_argument(
        "--expert-cache-graph-batch",
        default="auto",
        help="comma-separated: auto or the largest decode batch whose expert cache runs "
        "inside the CUDA graph (0: never; the engine option), run in turn",
    )
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument(
        "--emulate-card-mib",
        type=int,
        default=None,
        help="behave as a GPU of this much memory (81559: an H100 80GB HBM3, as "
        "nvidia-smi reports it)",
    )
    ap.add_argument(
        "--host-profile",
        type=int,
        default=0,
        metavar="N",
        help="cProfile each timed run; print its N costliest Python functions per step",
    )
    ap.add_argument("--json", type=Path, default=Path("bench_out/offload.json"))
    args = ap.parse_args()
    util = args.gpu_memory_utilization
    card_bytes = args.emulate_card_mib << 20 if args.emulate_card_mib else None
    if card_bytes:
        util = emulate_card(card_bytes, util)
    hbm, h2d = copy_bandwidth(), host_to_device_bandwidth()
    free_device()
    if args.synthetic:  # weights on disk, for the peer
        path = synthetic_model(args.synthetic, weights=True, dtype="bfloat16")
        fmt = "safetensors"
    else:
        path, fmt = synthetic_model(args.dummy), "dummy"
    max_len = args.input_len + args.output_len + 16
    results: list[dict] = []
    runs = [
        (q, m, k, g)
        for q in args.quantization.split(",")
        for m in args.modes.split(",")
        for k in args.expert_cache_kernels.split(",")
        for g in args.expert_cache_graph_batch.split(",")
    ]
    for quant, mode, kernels, graph_batch in runs:
        t0 = time.perf_counter()
        torch.cuda.reset_peak_memory_stats()
        llm = LLM(
            path,
            dtype="bfloat16",
            device="cuda",
            load_format=fmt,
            offload_mode=mode,
            expert_cache_slots=args.slots,
            max_model_len=max_len,
            max_num_seqs=max(args.batch),
            prefetch=args.prefetch,
            progress=False,
            gpu_memory_utilization=util,
            quantization=None if quant == "none" else quant,
            expert_cache_kernels=kernels,
            expert_cache_graph_batch=None if graph_batch == "auto" else int(graph_batch),
        )
        load_s = time.perf_counter() - t0
        store = llm.engine.executor.expert_store
        slots = store.slots if store else "all"
        cost = store.cost if store else None
        if graph_batch != "auto":
            kernels = f"{kernels} g{graph_batch}"
        print(
            f"[{quant} {mode} {kernels}] loaded in {load_s:.0f}s, cache slots per layer: {slots}, "
            f"KV blocks {llm.engine.executor.num_blocks}, cost model: {cost}",
            flush=True,
        )
        for batch in args.batch:
            r = run(llm, batch, args.input_len, args.output_len, hbm, h2d, args.host_profile)
            free, total = torch.cuda.mem_get_info()
            r.update(
                engine="moeserve",
                mode=mode if kernels == "auto" else f"{mode}+{kernels.replace(' ', '+')}",
                quantization=quant,
                slots=slots,
                load_seconds=load_s,
                prefetch=args.prefetch,
                peak_reserved_bytes=torch.cuda.max_memory_reserved(),
                device_used_bytes=total - free,
            )
            results.append(r)
            print(json.dumps(r), flush=True)
        del llm, store
        free_device()
    if args.peer and args.synthetic:
        n_layers = SHAPES[args.synthetic]["num_hidden_layers"]
        peer = accelerate_peer(path, list(range(n_layers // 2, n_layers)), min(args.output_len, 8))
        peer.update(
            engine="transformers+accelerate",
            mode=f"experts of layers {n_layers // 2}..{n_layers - 1} on CPU",
        )
        results.append(peer)
        print(json.dumps(peer), flush=True)
    card = f", behaving as a {args.emulate_card_mib} MiB card" if card_bytes else ""
    print(
        f"\nHBM copy {hbm / 1e12:.2f} TB/s (r+w), pinned host->device {h2d / 1e9:.1f} GB/s, "
        f"{torch.cuda.get_device_name()}{card}"
    )
    print(
        f"{'engine':<24}{'mode':<12}{'batch':>6}{'tok/s':>9}{'floor':>7}{'decode':>9}"
        f"{'floor':>7}{'hit':>6}{'MB/tok':>8}{'wait s':>8}{'cpu s':>7}{'other s':>8}"
        f"{'GiB':>6}"
    )
    base = next((r for r in results if r["engine"] != "moeserve"), None)
    nan = float("nan")
    for r in results:
        ratio = ""
        if base is not None and r is not base and r["batch"] == 1:
            ratio = f"  {r['tokens_per_s'] / base['tokens_per_s']:.1f}x peer"
        d = r.get("decode", {})
        print(
            f"{r['engine'][:23]:<24}{(r.get('quantization', '') + ' ' + r['mode'])[:11]:<12}"
            f"{r['batch']:>6}"
            f"{r['tokens_per_s']:>9.2f}{r.get('fraction_of_floor', nan):>7.2f}"
            f"{d.get('tokens_per_s', nan):>9.2f}{d.get('fraction_of_floor', nan):>7.2f}"
            f"{d.get('hit_rate', nan):>6.2f}{d.get('bytes_moved_per_token', 0) / 1e6:>8.1f}"
            f"{d.get('copy_wait_s', 0):>8.2f}{d.get('cpu_s', 0):>7.2f}{d.get('other_s', 0):>8.2f}"
            f"{r.get('peak_reserved_bytes', 0) / 2**30:>6.1f}{ratio}"
        )
    print(
        "tok/s, floor: the whole run (prefill included); decode, floor and the rest: the "
        "decode phase; GiB: peak reserved by torch"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            dict(
                hbm=hbm,
                h2d=h2d,
                results=results,
                device=torch.cuda.get_device_name(),
                emulated_card_bytes=card_bytes,
                date=time.strftime("%Y-%m-%d"),
            ),
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
