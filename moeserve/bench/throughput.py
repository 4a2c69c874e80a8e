"""`moeserve bench throughput`: the offline engine's output tokens/s on a batch of prompts.

N prompts of random token ids generate exactly their --output-len tokens each (greedy, EOS
ignored), every request queued at once, on the engine loop `LLM.generate` runs. Reported:
tokens/s, steps (by kind), and as ratios: with --peer to transformers `generate()` on the same
checkpoint (static batches of --max-num-seqs left-padded prompts, its fastest mode; with
--peer-sequential also one prompt at a time), with --floor (CUDA) to the physical floor of
the steps that ran (moeserve/bench/floors.py), both measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from moeserve.engine.outputs import RequestMetrics, StepStats
from moeserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from moeserve import LLM

FIRST_TOKENS = 8  # greedy tokens compared with the peer's, per request


@dataclass
class Step:
    """One engine step of a driven run."""

    time: float  # perf_counter when the step returned
    stats: StepStats | None
    tokens: int  # output tokens it delivered


@dataclass
class Run:
    """A driven run: its wall time, steps, outputs and the finished requests' timestamps."""

    seconds: float
    steps: list[Step]
    outputs: list[list[int]]  # output token ids, in prompt order
    finished: list[RequestMetrics] = field(default_factory=list)

    @property
    def output_tokens(self) -> int:
        return sum(s.tokens for s in self.steps)


def drive(
    llm: LLM,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    *,
    in_flight: int | None = None,
    tag: str = "bench",
    on_step: Callable[[Run], None] | None = None,
) -> Run:
    """Run every prompt to completion on `llm`'s engine loop (core and output processor, as
    LLM.generate and a server run them): all queued at once or, with `in_flight`, that many
    at a time, a finished request's replacement joining before the next step (a closed loop,
    what a load tester's streams do at best). `on_step` sees the run so far after each step."""
    from moeserve.engine.messages import EngineRequest

    per = params if isinstance(params, list) else [params] * len(prompts)
    outputs: list[list[int]] = [[] for _ in prompts]
    todo = iter(range(len(prompts)))
    run = Run(0.0, [], outputs)

    def admit() -> None:
        i = next(todo, None)
        if i is not None:
            llm.loop.admit(EngineRequest(f"{tag}-{i}", prompts[i], per[i]))

    for _ in range(len(prompts) if in_flight is None else in_flight):
        admit()
    t0 = time.perf_counter()
    while llm.engine.has_unfinished():
        deltas, stats = llm.loop.step()
        tokens = 0
        for delta in deltas:
            new = [t for o in delta.outputs for t in o.token_ids]
            outputs[int(delta.request_id.rsplit("-", 1)[1])] += new
            tokens += len(new)
            if delta.finished:
                admit()
                if delta.metrics is not None:
                    run.finished.append(delta.metrics)
        run.steps.append(Step(time.perf_counter(), stats, tokens))
        if on_step is not None:
            on_step(run)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    run.seconds = time.perf_counter() - t0
    return run


def step_kinds(steps: list[Step]) -> dict[str, list[float]]:
    """{decode | prefill | mixed: [steps, seconds]} from the engine's own step times (the
    server's moeserve_step_duration_seconds{kind} measures the same)."""
    from moeserve.metrics import STEP_KINDS, step_kind

    kinds: dict[str, list[float]] = {k: [0.0, 0.0] for k in STEP_KINDS}
    for s in steps:
        if s.stats is not None:
            kinds[step_kind(s.stats)][0] += 1
            kinds[step_kind(s.stats)][1] += s.stats.step_seconds
    return kinds


def kinds_line(kinds: dict[str, list[float]]) -> str:
    """'decode 500 x 3.10 ms, ...': steps and mean time of each kind that ran."""
    return ", ".join(f"{k} {n:.0f} x {1e3 * sec / n:.2f} ms" for k, (n, sec) in kinds.items() if n)


def free_device() -> None:
    """Give an engine's or a peer's device memory back before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------- the peer
def hf_generate(model: Any, prompts: list[list[int]], new_tokens: int) -> torch.Tensor:
    """transformers generate() of exactly `new_tokens` greedy tokens for left-padded
    `prompts`; returns the new tokens [batch, new_tokens]."""
    width = max(map(len, prompts))
    device = next(model.parameters()).device
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[:, width:]


def run_peer(
    path: str, prompts: list[list[int]], out_lens: list[int], batch: int, device: str, dtype: str
) -> dict[str, Any]:
    """transformers in static batches of `batch` prompts: each batch runs until its longest
    output is done, and only the tokens each request asked for count."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    model = model.to(device).eval()
    hf_generate(model, prompts[:1], 4)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    firsts: list[list[int]] = []
    for i in range(0, len(prompts), batch):
        out = hf_generate(model, prompts[i : i + batch], max(out_lens[i : i + batch]))
        firsts += out[:, :FIRST_TOKENS].tolist()
    _sync(device)
    seconds = time.perf_counter() - t0
    del model
    free_device()
    return {"seconds": seconds, "output_tokens": sum(out_lens), "first_tokens": firsts}


def _same_start(ours: list[int], peers: list[int], eos: frozenset[int]) -> bool:
    """Whether the first FIRST_TOKENS greedy tokens agree up to our first EOS: with EOS
    ignored we may sample it, where generate()'s min_new_tokens masks it out."""
    ours = ours[:FIRST_TOKENS]
    n = next((i for i, t in enumerate(ours) if t in eos), len(ours))
    return ours[:n] == peers[:n]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# -------------------------------------------------------------------------------- the floor
def floor_seconds(llm: LLM, run: Run, rates: dict[str, float], misses: int) -> float:
    """The least time the run's steps could take at the measured rates (floors.py): per
    step the larger of its weight bytes over the HBM rate and its FLOPs over the matmul
    rate, plus each expert cache miss over the host link."""
    from moeserve.bench.floors import model_work

    work = model_work(llm.engine.model_config, _element_size(llm))
    total = 0.0
    for s in run.steps:
        if s.stats is None:
            continue
        tokens = s.stats.num_prefill_tokens + s.stats.num_decode_tokens
        total += max(
            work.step_bytes(tokens) / rates["hbm_bytes_per_s"],
            work.step_flops(tokens, s.stats.num_decode_tokens) / rates["matmul_flops_per_s"],
        )
    if misses:
        total += misses * work.expert * work.element_size / rates["h2d_bytes_per_s"]
    return total


def _dtype(llm: LLM) -> str:
    """The dtype the engine runs: the --dtype given, else the checkpoint's."""
    chosen = llm.config.model.dtype
    return llm.engine.model_config.dtype if chosen == "auto" else chosen


def _element_size(llm: LLM) -> int:
    return torch.empty(0, dtype=getattr(torch, _dtype(llm))).element_size()


def _misses(llm: LLM) -> int:
    return sum(s.misses for s in llm.engine.expert_cache_stats())


# ------------------------------------------------------------------------------ the command
def _workload(args: argparse.Namespace, vocab: int) -> tuple[list[list[int]], list[int]]:
    """Prompts of random ids (above the usual special tokens) and their output lengths."""
    from moeserve.bench.workloads import length_sampler

    rng = random.Random(args.workload_seed)
    in_len, out_len = length_sampler(args.input_len, rng), length_sampler(args.output_len, rng)
    low = min(4, vocab - 1)
    n = args.num_prompts
    prompts = [[rng.randrange(low, vocab) for _ in range(in_len())] for _ in range(n)]
    return prompts, [out_len() for _ in range(args.num_prompts)]


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"


def run_throughput(args: argparse.Namespace) -> int:
    """Run the benchmark of the flags: table on stdout, JSON with --result-json."""
    from moeserve import LLM
    from moeserve.bench.floors import copy_bandwidth, host_to_device_bandwidth, matmul_rate
    from moeserve.bench.synthetic import synthetic_model
    from moeserve.cli_options import engine_config

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.floor and not device.startswith("cuda"):
        raise ValueError("--floor prices the run at a GPU's measured rates: it needs CUDA")
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if (args.peer or args.peer_sequential) and importlib.util.find_spec("transformers") is None:
        raise ValueError("--peer and --peer-sequential need transformers: pip install transformers")
    if args.synthetic:
        if args.model:
            raise ValueError("give --model or --synthetic, not both")
        # A peer loads weights from disk; moeserve alone makes up its own (dummy).
        peer = args.peer or args.peer_sequential
        dtype = {} if args.dtype == "auto" else {"dtype": args.dtype}
        args.model = str(synthetic_model(args.synthetic, weights=peer, **dtype))
        args.load_format = "safetensors" if peer else "dummy"
    rates: dict[str, float] = {}
    if args.floor:
        rates = {"hbm_bytes_per_s": copy_bandwidth(), "matmul_flops_per_s": matmul_rate()}
        free_device()
    llm = LLM(config=engine_config(args), progress=False)
    if llm.engine.offloads_experts and args.floor:
        rates["h2d_bytes_per_s"] = host_to_device_bandwidth()
        free_device()
    prompts, out_lens = _workload(args, llm.engine.vocab_size)
    longest = max(len(p) + o for p, o in zip(prompts, out_lens))
    if longest > llm.engine.max_model_len:
        raise ValueError(
            f"a prompt and its output take up to {longest} tokens (--input-len "
            f"{args.input_len}, --output-len {args.output_len}), more than the context of "
            f"{llm.engine.max_model_len} (--max-model-len)"
        )
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in out_lens]
    warm = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    drive(llm, prompts[:2], warm, tag="warm-up")
    misses0 = _misses(llm)
    run = drive(llm, prompts, params)
    kinds = step_kinds(run.steps)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "device": _device_name(device),
        "model": args.synthetic or str(llm.config.model.path),
        "dtype": _dtype(llm),
        "args": {k: str(v) for k, v in vars(args).items() if k != "func"},
        "moeserve": {
            "seconds": run.seconds,
            "output_tokens": run.output_tokens,
            "tokens_per_s": run.output_tokens / run.seconds,
            "steps": len(run.steps),
            "step_kinds": kinds,
        },
        "peers": {},
    }
    if args.floor:
        floor = floor_seconds(llm, run, rates, _misses(llm) - misses0)
        result["floor"] = rates | {"seconds": floor, "fraction": floor / run.seconds}
    path, eos = str(llm.config.model.path), llm.engine.eos_token_ids
    del llm
    free_device()
    for name, batch, wanted in (
        (f"transformers, batches of {args.max_num_seqs}", args.max_num_seqs, args.peer),
        ("transformers, one at a time", 1, args.peer_sequential),
    ):
        if wanted:
            r = run_peer(path, prompts, out_lens, batch, device, result["dtype"])
            firsts = r.pop("first_tokens")
            r |= {"tokens_per_s": r["output_tokens"] / r["seconds"], "batch": batch}
            r["identical_first_tokens"] = sum(
                _same_start(a, b, eos) for a, b in zip(run.outputs, firsts)
            )
            result["peers"][name] = r
    print(format_result(result, args))
    if args.result_json:
        args.result_json.parent.mkdir(parents=True, exist_ok=True)
        args.result_json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"result: {args.result_json}")
    return 0


def format_result(result: dict[str, Any], args: argparse.Namespace) -> str:
    """The table of a run_throughput result: one row per engine, ratios to the first peer."""
    ms = result["moeserve"]
    rows = [("moeserve", ms)] + list(result["peers"].items())
    base = rows[1][1]["tokens_per_s"] if len(rows) > 1 else None
    lines = [
        f"{args.num_prompts} prompts, {args.input_len} tokens in -> {args.output_len} out, "
        f"--max-num-seqs {args.max_num_seqs}; {result['model']} ({result['dtype']}) on "
        f"{result['device']}",
        f"{'engine':<36}{'seconds':>9}{'tokens/s':>11}{'steps':>7}"
        + (f"{'vs peer':>9}" if base else ""),
    ]
    for name, r in rows:
        steps = f"{r['steps']:>7}" if "steps" in r else " " * 7
        ratio = f"{r['tokens_per_s'] / base:>8.2f}x" if base else ""
        lines.append(f"{name:<36}{r['seconds']:>9.2f}{r['tokens_per_s']:>11.1f}{steps}{ratio}")
    lines.append(f"moeserve steps: {kinds_line(ms['step_kinds'])}")
    for name, r in result["peers"].items():
        lines.append(
            f"requests whose first {FIRST_TOKENS} greedy tokens (up to an EOS) equal {name}'s: "
            f"{r['identical_first_tokens']}/{args.num_prompts}"
        )
    if "floor" in result:
        f = result["floor"]
        h2d = f.get("h2d_bytes_per_s")
        link = f", host link {h2d / 1e9:.1f} GB/s" if h2d else ""
        lines.append(
            f"floor {f['seconds']:.3f} s at copy {f['hbm_bytes_per_s'] / 1e12:.2f} TB/s, matmul "
            f"{f['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s{link}: the run reached "
            f"{f['fraction']:.2f} of it"
        )
    return "\n".join(lines)
