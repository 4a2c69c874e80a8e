"""What counting tokens per expert costs: decode throughput with the device-side counters on
and off, alternating runs of two engines in one process (the counters are one in-place add per
sparse layer, never read during a step; whether a model counts is chosen when it is built).

    python benchmarks/expert_count_cost.py --synthetic small --rounds 5
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from offline_throughput import SYNTHETIC, synthetic_checkpoint  # noqa: E402

import moeserve.engine.engine as engine_module  # noqa: E402
from moeserve import LLM, SamplingParams  # noqa: E402
from moeserve.model.backend import ModelBackend  # noqa: E402


def build(path: Path, args: argparse.Namespace, count: bool) -> LLM:
    """An engine whose model counts tokens per expert, or not: ModelBackend.count_tokens, which
    the engine has no option for (only this measurement turns it off)."""
    backend = functools.partial(ModelBackend, count_tokens=count)
    with mock.patch.object(engine_module, "ModelBackend", backend):
        return LLM(path, dtype=args.dtype, progress=False, max_num_seqs=args.batch,
                   max_model_len=256, kv_cache_memory=2**30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", choices=sorted(SYNTHETIC), default="small")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path, default=Path("bench_out/expert_count_cost.json"))
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    path = synthetic_checkpoint(args.synthetic, dtype)
    llms = {on: build(path, args, on) for on in (True, False)}
    llm = llms[True]
    moes = [m for _, m in llm.engine.model.moe_layers()]
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, 1000, (args.batch, 32), generator=g).tolist()
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    cuda = llm.engine.model.device.type == "cuda"
    for each in llms.values():
        each.generate(prompts, params)  # warm-up
    rates: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for on in (True, False):
            llm = llms[on]
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params)
            if cuda:
                torch.cuda.synchronize()
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            rates[on].append(tokens / (time.perf_counter() - t0))
    on, off = statistics.median(rates[True]), statistics.median(rates[False])
    # Whole runs vary by more than 1% from one to the next, so also time the counting op
    # itself (one in-place add of E counters per sparse layer per step) against a step.
    m = moes[0]
    counts = torch.ones_like(m.tokens_per_expert_E)
    reps = 2000
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        m.tokens_per_expert_E += counts
    if cuda:
        torch.cuda.synchronize()
    op_s = (time.perf_counter() - t0) / reps
    steps = llms[False].engine.num_steps / (args.rounds + 1)  # steps per generate() call
    step_s = args.batch * args.output_len / off / steps
    op_share = 100 * op_s * len(moes) / step_s
    device = torch.cuda.get_device_name() if cuda else "cpu"
    diff = 100 * (off - on) / off
    spread = 100 * (max(rates[False]) - min(rates[False])) / off
    print(f"{device}, {args.synthetic}, batch {args.batch}: counting on {on:.1f} tok/s, "
          f"off {off:.1f} tok/s (medians of {args.rounds}, difference {diff:+.2f}%, spread "
          f"{spread:.1f}%); the op: {op_s * 1e6:.1f} us x {len(moes)} layers per "
          f"{step_s * 1e3:.2f} ms step = {op_share:.3f}%")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(dict(
        device=device, on=rates[True], off=rates[False], difference_percent=100 * (off - on) / off,
        op_seconds=op_s, step_seconds=step_s, op_share_percent=op_share), indent=2))


if __name__ == "__main__":
    main()
