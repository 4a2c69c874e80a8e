"""Where an offloaded decode step spends its time: a torch.profiler trace of a few steps.

    python benchmarks/offload_profile.py --layers 4 --slots 4 --batch 1 --trace out/trace.json

Mixtral-8x7B-shaped layers with dummy weights (nothing written to disk). Prints the step wall
times, the host ops that cost the most, and the device's busy time per stream over the profiled
steps, so host overhead, copy time and compute separate; the Chrome trace shows the timeline.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from offload_bench import MIXTRAL_8X7B  # noqa: E402

from moeserve import LLM, SamplingParams  # noqa: E402


def busy_per_stream(trace: Path) -> dict[str, float]:
    """Milliseconds of device activity per stream (kernels and copies, overlaps merged)."""
    events = json.loads(trace.read_text())["traceEvents"]
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for ev in events:
        if ev.get("ph") == "X" and ev.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            key = f"stream {ev['args'].get('stream')} {ev['cat']}"
            spans[key].append((ev["ts"], ev["ts"] + ev["dur"]))
    out = {}
    for key, iv in spans.items():
        iv.sort()
        total, end = 0.0, float("-inf")
        for a, b in iv:
            if b > end:
                total += b - max(a, end)
                end = b
        out[key] = total / 1e3
    return out


def top_kernels(trace: Path, n: int) -> list[tuple[str, float, int]]:
    """The n device kernels with the most total time: (name, ms, launches)."""
    events = json.loads(trace.read_text())["traceEvents"]
    total: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for ev in events:
        if ev.get("ph") == "X" and ev.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            total[ev["name"][:90]] += ev["dur"] / 1e3
            count[ev["name"][:90]] += 1
    return [(k, total[k], count[k]) for k in sorted(total, key=total.get, reverse=True)[:n]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--slots", type=int, default=4, help="0: every expert resident")
    ap.add_argument("--mode", default="fetch")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--async-scheduling", choices=["on", "off"], default="on")
    ap.add_argument("--trace", type=Path, default=Path("bench_out/offload_trace.json"))
    args = ap.parse_args()
    path = Path(tempfile.mkdtemp(prefix="moeserve-profile-"))
    (path / "config.json").write_text(json.dumps(dict(MIXTRAL_8X7B, num_hidden_layers=args.layers)))
    llm = LLM(
        path, dtype="bfloat16", device="cuda", load_format="dummy", progress=False,
        expert_cache_slots=args.slots or None, offload_mode=args.mode, max_model_len=256,
        max_num_seqs=max(args.batch, 1), enforce_eager=args.enforce_eager, kv_cache_memory=1 << 30,
        async_scheduling=args.async_scheduling == "on",
    )  # fmt: skip
    eng = llm.engine
    params = SamplingParams(max_tokens=args.steps * 4 + 4, temperature=0.0, ignore_eos=True)
    for i in range(args.batch):
        eng.add_request(f"p{i}", [10 + i + j for j in range(16)], params)
    for _ in range(args.steps):  # prefill and warm-up decodes
        eng.step()
    torch.cuda.synchronize()
    plain = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        eng.step()
        plain.append((time.perf_counter() - t0) * 1e3)
    walls = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            eng.step()
            walls.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    args.trace.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(args.trace))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(f"step wall ms, not profiled: {' '.join(f'{w:.2f}' for w in plain)}")
    print(f"step wall ms, profiled: {' '.join(f'{w:.2f}' for w in walls)}")
    print(f"profiled {sum(walls):.1f} ms over {args.steps} steps (profiler overhead included)")
    for key, ms in sorted(busy_per_stream(args.trace).items()):
        print(f"  device busy, {key}: {ms:.1f} ms")
    print(f"top device kernels over {args.steps} profiled steps (ms, launches):")
    for name, ms, k in top_kernels(args.trace, 25):
        print(f"  {ms:8.3f} {k:5d}  {name}")
    stats = eng.expert_cache_stats()
    print("cache:", {k: sum(getattr(s, k) for s in stats) for k in ("hits", "misses")})


if __name__ == "__main__":
    main()
