"""`moeserve serve | generate | bench serve`: the command line.

Every serve/generate option can also come from the environment as MOESERVE_<OPTION> (dashes
as underscores, e.g. MOESERVE_MAX_NUM_SEQS=32); a flag on the command line wins. The load
tester's flags live in moeserve/bench/cli.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from moeserve.bench.cli import add_bench_parser

ENV_PREFIX = "MOESERVE_"


class _EnvDefaults(argparse.ArgumentParser):
    """An ArgumentParser whose option defaults come from MOESERVE_* environment variables."""

    def add_option(self, flag: str, *, type: Callable[[str], Any] = str, **kw: Any) -> None:
        env = ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()
        raw = os.environ.get(env)
        if raw is not None:
            if kw.get("action") == "store_true":
                kw["default"] = raw.strip().lower() in ("1", "true", "yes", "on")
            else:
                try:
                    kw["default"] = type(raw)
                except (TypeError, ValueError) as e:
                    self.error(f"environment variable {env}={raw!r}: {e}")
        help_text = kw.pop("help", "")
        kw["help"] = f"{help_text} [env {env}]"
        if kw.get("action") == "store_true":
            self.add_argument(flag, **kw)
        else:
            self.add_argument(flag, type=type, **kw)


def _bytes(text: str) -> int:
    """Parse '512MiB', '2GB', '1e9' or a plain byte count."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
    t = text.strip().lower()
    for suffix, mult in units.items():
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(float(t))


def add_engine_args(p: _EnvDefaults) -> None:
    p.add_option(
        "--model",
        help="model directory (config.json, *.safetensors, tokenizer.json); "
        "default: the demo model that ships with moeserve",
    )
    p.add_option(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weight and activation dtype (auto: the checkpoint's)",
    )
    p.add_option(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)"
    )
    p.add_option("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_option(
        "--kv-cache-memory",
        type=_bytes,
        default=None,
        help="KV cache budget in bytes (e.g. 4GiB); default: from the device",
    )
    p.add_option(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="fraction of GPU memory for weights, activations and KV cache",
    )
    p.add_option("--max-num-seqs", type=int, default=64, help="sequences per step at most")
    p.add_option("--max-num-batched-tokens", type=int, default=2048, help="tokens per step at most")
    p.add_option(
        "--max-model-len",
        type=int,
        default=None,
        help="context length (default: the model's max_position_embeddings)",
    )
    p.add_option(
        "--admission-wait-steps",
        type=int,
        default=8,
        help="while decodes run, new requests wait up to this many steps to start "
        "together (max-num-seqs/8 of them start at once): fewer steps mix a "
        "prompt into the decodes, which cannot replay a CUDA graph; 0: at once",
    )
    p.add_option(
        "--no-chunked-prefill",
        action="store_true",
        default=False,
        help="run each prompt in one step instead of budget-sized chunks",
    )
    p.add_option("--seed", type=int, default=None, help="seed for unseeded sampling")
    p.add_option(
        "--expert-cache-slots",
        type=int,
        default=None,
        help="experts per sparse layer kept on the device (the rest in host memory)",
    )
    p.add_option(
        "--expert-cache-gb",
        type=float,
        default=None,
        help="device memory for the expert cache, all layers together, in GiB",
    )
    p.add_option(
        "--offload-mode",
        default="auto",
        choices=["fetch", "cpu", "auto"],
        help="a missed expert is copied to the device, computed on the CPU, or "
        "whichever a cost model measured at startup says is faster",
    )
    p.add_option(
        "--expert-cache-policy",
        default="lru",
        choices=["lru", "lfu"],
        help="eviction policy of the expert cache (lfu decays with time)",
    )
    p.add_option(
        "--prefetch",
        action="store_true",
        default=False,
        help="predict the next layer's experts from this layer's input and copy them "
        "ahead (pays off when the router's guesses are mostly right)",
    )
    p.add_option(
        "--load-format",
        default="safetensors",
        choices=["safetensors", "dummy"],
        help="dummy: random weights of config.json's shapes (benchmarks)",
    )
    p.add_option(
        "--kernels",
        default="auto",
        choices=["auto", "triton", "torch"],
        help="auto: Triton fused-MoE and paged-attention kernels on CUDA; torch: the "
        "readable path everywhere",
    )
    p.add_option(
        "--enforce-eager",
        action="store_true",
        default=False,
        help="no CUDA graphs for decode steps (they need --kernels triton/auto on CUDA; "
        "with offloaded experts, one graph per stage between their layers)",
    )
    p.add_option(
        "--async-scheduling",
        default="auto",
        choices=["auto", "on", "off"],
        help="queue each step before the last one's tokens reach the host, so "
        "scheduling, detokenizing and stop checks overlap the device "
        "(auto: on for CUDA)",
    )


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_chunked_prefill=not args.no_chunked_prefill,
        admission_wait_steps=args.admission_wait_steps,
        seed=args.seed,
        expert_cache_slots=args.expert_cache_slots,
        expert_cache_gb=args.expert_cache_gb,
        offload_mode=args.offload_mode,
        expert_cache_policy=args.expert_cache_policy,
        prefetch=args.prefetch,
        load_format=args.load_format,
        kernels=args.kernels,
        enforce_eager=args.enforce_eager,
        async_scheduling={"on": True, "off": False}.get(args.async_scheduling),
    )


def _prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--prompt-ids must be comma-separated ints: {e}") from e
    return ids


def _generate(args: argparse.Namespace) -> int:
    from moeserve import LLM, SamplingParams
    from moeserve.assets import model_or_demo

    llm = LLM(model_or_demo(args.model), progress=not args.json, **engine_kwargs(args))
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.sample_seed,
        logprobs=5 if args.json else None,
        ignore_eos=args.ignore_eos,
    )
    prompt = args.prompt if args.prompt is not None else args.prompt_ids
    [out] = llm.generate([prompt], params)
    result = out.outputs[0]
    if not args.json:
        print(result.text)
        return 0
    record = {
        "prompt_ids": out.prompt_token_ids,
        "generated_ids": result.token_ids,
        "text": result.text,
        "finish_reason": result.finish_reason,
        "top_logprobs": [{str(t): lp for t, lp in entry.top} for entry in result.logprobs or []],
    }
    print(json.dumps(record))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from moeserve.server.serve import run

    return run(args, engine_kwargs(args))


def add_serve_args(p: _EnvDefaults) -> None:
    p.add_option(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)"
    )
    p.add_option("--port", type=int, default=8000, help="TCP port")
    p.add_option(
        "--served-model-name",
        default=None,
        help="model name of the API (default: the model directory's name)",
    )
    p.add_option(
        "--api-key",
        default=None,
        help="require `Authorization: Bearer KEY` on /v1/* (prefer the env variable)",
    )
    p.add_option(
        "--max-queued-requests",
        type=int,
        default=256,
        help="prompts admitted but not yet generating before new ones get 429",
    )
    p.add_option(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests may run after SIGTERM",
    )
    p.add_option(
        "--max-body-bytes",
        type=_bytes,
        default=2_000_000,
        help="largest request body in bytes (also 2MB, 1MiB); larger ones get 413",
    )
    p.add_option(
        "--log-prompts",
        action="store_true",
        default=False,
        help="include prompts in the request log (off: they may be private)",
    )
    p.add_option(
        "--no-engine-process",
        action="store_true",
        default=False,
        help="step the engine in a thread of the server's process instead of a "
        "process of its own (which keeps streaming from slowing the engine)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeserve", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--log-level",
        default=os.environ.get("MOESERVE_LOG_LEVEL"),
        help="default: INFO for serve, WARNING otherwise",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_EnvDefaults)
    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    assert isinstance(serve, _EnvDefaults)
    add_engine_args(serve)
    add_serve_args(serve)
    serve.set_defaults(func=_serve, default_log_level="INFO")
    gen = sub.add_parser("generate", help="complete one prompt and print the result")
    assert isinstance(gen, _EnvDefaults)
    add_engine_args(gen)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", type=_prompt_ids, help="prompt token ids, e.g. 1,2,3")
    gen.add_option("--max-tokens", type=int, default=32, help="tokens to generate at most")
    gen.add_option("--temperature", type=float, default=0.0, help="0 for greedy")
    gen.add_option("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    gen.add_option("--sample-seed", type=int, default=None, help="seed of this request")
    gen.add_option("--ignore-eos", action="store_true", default=False, help="do not stop at EOS")
    gen.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object with ids, text and top-5 logprobs per position",
    )
    gen.set_defaults(func=_generate, default_log_level="WARNING")
    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = (args.log_level or args.default_log_level).upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as e:  # bad checkpoint, bad option, bad prompt: a message, not a trace
        print(f"moeserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
