"""Prefix caching's effect on time to first token: a request behind a long shared system
prompt, first with the prompt uncached (a miss), then a second one sharing it (a hit).

Each round draws a fresh random system prompt of --system-len tokens, so its first request
misses; the second request (same system prompt, another --user-len-token user turn) finds all
of the system prompt's full blocks cached and computes only the rest. TTFT is the engine's
own (arrival to first token, RequestMetrics.ttft), in the offline engine: no HTTP. With
--compare-off the same rounds run with --no-enable-prefix-caching too. Prints a table and
writes JSON (--json).

    python benchmarks/prefix_ttft.py --json out.json                # GPU: 4k system prompt
    python benchmarks/prefix_ttft.py --shape gpt-oss-20b --layers 4 --compare-off
    python benchmarks/prefix_ttft.py --model DEMO --device cpu --system-len 64  # smoke test
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeserve import LLM, SamplingParams  # noqa: E402
from moeserve.bench.synthetic import SHAPES, synthetic_model  # noqa: E402
from moeserve.bench.throughput import free_device  # noqa: E402


def rounds(llm: LLM, n: int, system_len: int, user_len: int, seed: int) -> list[dict]:
    """Per round: TTFT (seconds) of the first and the second request, and the second's
    cached prompt tokens."""
    rng = random.Random(seed)
    vocab = llm.engine.vocab_size
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def tokens(k: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(k)]

    llm.generate([tokens(system_len + user_len)], params)  # warm-up: first-call costs
    out = []
    for _ in range(n):
        system = tokens(system_len)
        [first] = llm.generate([system + tokens(user_len)], params)
        [second] = llm.generate([system + tokens(user_len)], params)
        assert first.metrics is not None and second.metrics is not None
        out.append(
            {
                "first_ttft_s": first.metrics.ttft,
                "second_ttft_s": second.metrics.ttft,
                "first_cached_tokens": first.num_cached_tokens,
                "second_cached_tokens": second.num_cached_tokens,
            }
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="mixtral-4l", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="cut the shape to this many layers")
    ap.add_argument("--model", default=None, help="a checkpoint directory instead of --shape")
    ap.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if any)")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 for --shape, else auto")
    ap.add_argument("--system-len", type=int, default=4096)
    ap.add_argument("--user-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument(
        "--max-num-seqs",
        type=int,
        default=64,
        help="also the largest decode graph, hence the longest remainder a hit replays in one",
    )
    ap.add_argument("--kv-cache-memory", type=int, default=None, help="bytes")
    ap.add_argument("--compare-off", action="store_true", help="also run with caching off")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.model is None:
        need = args.system_len + args.user_len + 16
        over = {"max_position_embeddings": max(SHAPES[args.shape]["max_position_embeddings"], need)}
        if args.layers:
            over["num_hidden_layers"] = args.layers
        path, extra = synthetic_model(args.shape, **over), {"load_format": "dummy"}
        dtype = args.dtype or "bfloat16"
    else:
        path, extra, dtype = Path(args.model), {}, args.dtype
    total = args.system_len + args.user_len
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "args": vars(args) | {"json": str(args.json)},
        "runs": {},
    }
    print(f"{'caching':8s} {'first TTFT ms':>14s} {'second TTFT ms':>15s} {'speedup':>8s} cached")
    for caching in (True, False) if args.compare_off else (True,):
        llm = LLM(
            str(path),
            dtype=dtype,
            device=args.device,
            block_size=args.block_size,
            kv_cache_memory=args.kv_cache_memory,
            max_model_len=total + 1,
            max_num_batched_tokens=max(2048, total + 1),
            max_num_seqs=args.max_num_seqs,
            enable_prefix_caching=caching,
            progress=False,
            **extra,
        )
        if result.get("device") is None:
            result["device"] = str(llm.engine.executor.model.device)
        rows = rounds(llm, args.rounds, args.system_len, args.user_len, seed=1)
        first = statistics.median(r["first_ttft_s"] for r in rows)
        second = statistics.median(r["second_ttft_s"] for r in rows)
        cached = rows[-1]["second_cached_tokens"]
        name = "on" if caching else "off"
        result["runs"][name] = {
            "rounds": rows,
            "first_ttft_median_s": first,
            "second_ttft_median_s": second,
            "speedup": first / second,
        }
        print(
            f"{name:8s} {1e3 * first:14.2f} {1e3 * second:15.2f} {first / second:7.2f}x"
            f" {cached}/{total}"
        )
        del llm
        free_device()  # the next engine sizes its caches from the free memory
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
