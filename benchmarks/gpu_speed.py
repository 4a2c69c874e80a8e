"""GPU speed of the decode and prefill paths, against the physical floors and transformers.

One run on a CUDA machine measures, on --shape (a real checkpoint's config, moeserve/bench/
synthetic.py; Mixtral-8x7B by default, cut to --layers layers: 4 for Mixtral, all for the
others) in bf16 with random weights (moeserve's --load-format dummy, transformers' random init):
- the floors: device copy bandwidth (read + write) and the bf16 matmul rate;
- transformers generate() decode rate at batch 1 and --batch;
- moeserve's decode rate at batch 1 and --batch (steady decode steps, wall clock between
  steps, host work included) in the modes --modes names: graphs (Triton kernels + CUDA graphs
  + async scheduling: the default), graphs-sync (the same, each step's tokens read before the
  next is queued), eager (Triton kernels, no graphs) and torch (the readable path);
- prefill of --prefill-len-token prompts (one per step) as a fraction of the matmul rate.
Prints a table (tokens/s, fraction of floor, ratio to transformers) and writes JSON.
--set MODULE.NAME=INT overrides a kernel module's integer constant for the run (sweeps).
--profile DIR also traces 16 decode-only steps (after the prefills) of the first mode at each
batch with torch.profiler (Chrome traces, a table of the costliest device kernels, and the
device's timeline: the share of the span some kernel ran, the idle gaps between kernels by
length).

    python benchmarks/gpu_speed.py --json out.json
    python benchmarks/gpu_speed.py --shape qwen3-30b-a3b --modes graphs --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeserve import LLM, SamplingParams  # noqa: E402
from moeserve.bench.floors import copy_bandwidth, matmul_rate, model_work  # noqa: E402
from moeserve.bench.synthetic import SHAPES, synthetic_model  # noqa: E402
from moeserve.bench.throughput import drive, free_device, hf_generate  # noqa: E402

MODES: dict[str, dict[str, Any]] = {
    "graphs": {},
    "graphs-sync": {"async_scheduling": False},
    "eager": {"enforce_eager": True},
    "torch": {"kernels": "torch"},
}


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 32000, (n, length), generator=g).tolist()  # every shape's vocab


def hf_decode(path: Path, batch: int, new: int) -> float:
    """generate() decode tokens/s: the difference between `new` and 2 new tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)).eval()
    torch.set_default_dtype(torch.float32)
    ids = prompts(batch, 128, 0)

    def gen(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        hf_generate(model, ids, n)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    gen(2)
    return batch * (new - 2) / (gen(new) - gen(2))


def make_llm(path: Path, max_seqs: int, **kw: Any) -> LLM:
    return LLM(
        str(path),
        dtype="bfloat16",
        load_format="dummy",
        kv_cache_memory=16 * 2**30,
        max_num_seqs=max_seqs,
        max_model_len=8192,
        max_num_batched_tokens=4096,
        progress=False,
        **kw,
    )


def ms_decode(llm: LLM, batch: int, in_len: int, out_len: int) -> dict[str, float]:
    """Steady decode: wall time between consecutive steps in which all `batch` seqs decode."""
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    run = drive(llm, prompts(batch, in_len, batch), params, tag=f"d{batch}")
    tokens, seconds, steps = 0, 0.0, 0
    for last, step in zip(run.steps, run.steps[1:]):
        st = step.stats
        if st is not None and st.num_prefill_tokens == 0 and st.num_seqs == batch:
            tokens += st.num_decode_tokens
            seconds += step.time - last.time
            steps += 1
    return {"tokens_per_s": tokens / seconds, "step_ms": 1e3 * seconds / steps, "steps": steps}


def ms_prefill(llm: LLM, prompt_len: int, n: int) -> dict[str, float]:
    """Seconds per prefill of a `prompt_len` prompt, one per step: the time between
    consecutive steps' results (with async scheduling a step's result comes one step()
    later, so no single call is timed)."""
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    run = drive(llm, prompts(n, prompt_len, 7), params, tag="p")
    done = [s.time for s in run.steps if s.stats and s.stats.num_prefill_tokens == prompt_len]
    times = [b - a for a, b in zip(done, done[1:])]
    times = times[1:] or times  # the first pays one-off allocations
    return {"seconds": sum(times) / len(times), "steps": len(times)}


def profile_decode(llm: LLM, batch: int, in_len: int, out: Path, steps: int = 16) -> None:
    """A torch.profiler trace of `steps` decode steps at `batch` (profiler overhead included):
    recording starts at the first step in which every sequence decodes, so the prefills
    before it stay out of the kernel table."""
    from torch.profiler import ProfilerActivity, profile

    out.mkdir(parents=True, exist_ok=True)
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    seen = {"recording": False, "steps": 0}

    def on_step(run: Any) -> None:
        st = run.steps[-1].stats
        decoding = st is not None and st.num_prefill_tokens == 0 and st.num_seqs == batch
        if seen["recording"]:
            seen["steps"] += 1
            if seen["steps"] >= steps or not decoding:
                prof.stop()
                seen["recording"] = False
        elif decoding and not seen["steps"]:
            prof.start()
            seen["recording"] = True

    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    drive(llm, prompts(batch, in_len, batch), params, tag=f"p{batch}", on_step=on_step)
    if seen["recording"]:
        prof.stop()
    trace = out / f"decode_b{batch}.json"
    prof.export_chrome_trace(str(trace))
    print(f"decode at batch {batch}, {seen['steps']} decode-only steps profiled:")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=20))
    t = device_timeline(json.loads(trace.read_text())["traceEvents"])
    print(
        f"device timeline: {t['kernels']} kernels over {t['span_us'] / 1e3:.2f} ms, busy "
        f"{t['busy_fraction']:.2f}; idle {t['idle_us'] / 1e3:.2f} ms: "
        + ", ".join(f"{n} of {label} us ({us:.0f} us)" for label, n, us in t["gaps"])
    )


# Idle stretches between kernels, by length (µs): launch latency, then host-paced stalls.
GAP_BINS = (
    ("<5", 0.0, 5.0),
    ("5-20", 5.0, 20.0),
    ("20-100", 20.0, 100.0),
    ("100-1000", 100.0, 1000.0),
    (">=1000", 1000.0, float("inf")),
)


def device_timeline(events: list[dict[str, Any]]) -> dict[str, Any]:
    """From a Chrome trace's events: the GPU kernels' span, the share of it that some kernel
    covered, and the idle gaps between them by length. With programmatic dependent launch a
    kernel starts before its predecessor ends and waits inside, so its wait counts as busy:
    profile with MOESERVE_PDL=0 to see the gaps between launches."""
    kernels = sorted(
        (e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "kernel" and "dur" in e
    )
    if not kernels:
        return {"kernels": 0, "span_us": 0.0, "busy_fraction": 0.0, "idle_us": 0.0, "gaps": []}
    end = kernels[0][0]
    counts, totals = [0] * len(GAP_BINS), [0.0] * len(GAP_BINS)
    for start, stop in kernels:
        if start > end:
            gap = start - end
            i = next(i for i, (_, lo, hi) in enumerate(GAP_BINS) if lo <= gap < hi)
            counts[i] += 1
            totals[i] += gap
        end = max(end, stop)
    span, idle = end - kernels[0][0], sum(totals)
    return {
        "kernels": len(kernels),
        "span_us": span,
        "busy_fraction": 1.0 - idle / span if span else 0.0,
        "idle_us": idle,
        "gaps": [(b[0], n, us) for b, n, us in zip(GAP_BINS, counts, totals) if n],
    }


def set_kernel_constants(items: list[str]) -> list[str]:
    """Apply --set MODULE.NAME=INT overrides to moeserve.kernels modules (before any model
    is built: the kernels read these module globals at launch); returns what changed."""
    import importlib

    done = []
    for item in items:
        target, sep, value = item.partition("=")
        module, _, name = target.rpartition(".")
        if not (sep and module and name):
            raise SystemExit(f"--set {item!r}: expected MODULE.NAME=INT")
        try:
            mod = importlib.import_module(f"moeserve.kernels.{module}")
        except ImportError as e:
            raise SystemExit(f"--set {item!r}: no module moeserve.kernels.{module}") from e
        old = getattr(mod, name, None)
        if type(old) is not int:
            raise SystemExit(f"--set {item!r}: {module}.{name} is not an integer constant")
        try:
            setattr(mod, name, int(value))
        except ValueError as e:
            raise SystemExit(f"--set {item!r}: {value!r} is not an integer") from e
        done.append(f"set {module}.{name} = {value} (was {old})")
    return done


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="mixtral-8x7b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="default: 4 for Mixtral, else all")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--prefill-len", type=int, default=4096)
    ap.add_argument("--modes", default="graphs,eager,torch", help=", ".join(MODES))
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument(
        "--quantization",
        default=None,
        choices=["fp8"],
        help="quantize the experts at load (the floor counts their stored bytes)",
    )
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="MODULE.NAME=INT",
        help="override an integer constant of a moeserve.kernels module for this run (a "
        "sweep of tiles or partition sizes), e.g. paged_attention.SMALL_PARTITION=32",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    for line in set_kernel_constants(args.set):
        print(line)
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        raise SystemExit(f"--modes: {', '.join(sorted(unknown))} not among {', '.join(MODES)}")
    layers = args.layers or (4 if args.shape == "mixtral-8x7b" else None)
    path = synthetic_model(args.shape, **({"num_hidden_layers": layers} if layers else {}))
    bw, mm = copy_bandwidth(), matmul_rate()
    free_device()
    device = torch.cuda.get_device_name()
    print(f"device {device}: copy {bw / 1e12:.2f} TB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s")
    result: dict[str, Any] = {
        "device": device,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "floors": {"hbm_bytes_per_s": bw, "matmul_flops_per_s": mm},
        "args": vars(args) | {"json": str(args.json), "profile": str(args.profile)},
    }
    hf: dict[int, float] = {}
    if not args.no_hf:
        for b, new in ((1, 34), (args.batch, 18)):
            hf[b] = hf_decode(path, b, new)
            free_device()  # the model died with hf_decode's frame
            print(f"transformers b{b}: {hf[b]:.1f} tok/s")
    result["transformers"] = hf
    rows = []
    for mode in modes:
        llm = make_llm(path, args.batch, quantization=args.quantization, **MODES[mode])
        work = model_work(llm.engine.model_config, element_size=2)
        for b in (1, args.batch):
            r = ms_decode(llm, b, args.input_len, args.output_len)
            ctx = args.input_len + args.output_len // 2
            floor = b * bw / work.step_bytes(b, context_tokens=ctx * b)
            r |= {
                "mode": mode,
                "batch": b,
                "floor_tokens_per_s": floor,
                "fraction_of_floor": r["tokens_per_s"] / floor,
                "vs_transformers": r["tokens_per_s"] / hf[b] if b in hf else None,
            }
            rows.append(r)
            print(
                f"{mode:11s} b{b:<3d} {r['tokens_per_s']:9.1f} tok/s  {r['step_ms']:7.2f} ms/step"
                f"  {r['fraction_of_floor']:.2f} of floor {floor:.0f}"
                + (f"  {r['vs_transformers']:.1f}x transformers" if b in hf else "")
            )
        if mode == modes[0] and args.prefill_len:
            p = ms_prefill(llm, args.prefill_len, 5)
            t, cfg = args.prefill_len, llm.engine.model_config
            # Causal attention: 4 * heads * head_dim * T^2 / 2 FLOPs per layer.
            attention = cfg.num_layers * 2 * cfg.num_heads * cfg.head_dim * t * t
            flops = work.step_flops(t, sampled=0) + attention
            p |= {
                "tokens": t,
                "flops_per_s": flops / p["seconds"],
                "fraction_of_matmul": flops / p["seconds"] / mm,
                "mode": mode,
            }
            result["prefill"] = p
            print(
                f"prefill {t} tokens: {1e3 * p['seconds']:.1f} ms, "
                f"{p['flops_per_s'] / 1e12:.0f} TFLOP/s = {p['fraction_of_matmul']:.2f} of matmul"
            )
        if mode == modes[0] and args.profile:
            for b in (1, args.batch):
                profile_decode(llm, b, args.input_len, args.profile)
        del llm
        free_device()
    result["decode"] = rows
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
