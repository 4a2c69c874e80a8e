"""The engine and server flags of `moeserve serve | generate`, with their environment twins.

Every option can also come from the environment as MOESERVE_<OPTION> (dashes as
underscores, e.g. MOESERVE_MAX_NUM_SEQS=32); a flag on the command line wins. Each engine
flag sets the engine option of the same name (config.OPTION_NAMES).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from moeserve.assets import model_or_demo
from moeserve.config import OPTION_NAMES, EngineConfig
from moeserve.tool_parsers import PARSERS

ENV_PREFIX = "MOESERVE_"


def _shown(value: object) -> str:
    """An option's value as --help prints it."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


class EnvDefaults(argparse.ArgumentParser):
    """An ArgumentParser whose option defaults come from MOESERVE_* environment variables."""

    def add_option(
        self,
        flag: str,
        *,
        type: Callable[[str], Any] = str,
        default_text: str | None = None,
        secret: bool = False,
        **kw: Any,
    ) -> None:
        """Add `flag`; MOESERVE_<FLAG>, when set, replaces its default. --help ends the text
        with the default in force and its source: `default_text` says what a built-in default
        means (e.g. None), and a `secret` value from the environment is not printed."""
        env = ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()
        is_flag = kw.get("action") in ("store_true", argparse.BooleanOptionalAction)
        builtin = default_text if default_text is not None else _shown(kw.get("default"))
        raw = os.environ.get(env)
        if raw is None:
            note = f"default: {builtin}; env {env}"
        else:
            if is_flag:
                kw["default"] = raw.strip().lower() in ("1", "true", "yes", "on")
            else:
                try:
                    kw["default"] = type(raw)
                except (TypeError, ValueError) as e:
                    self.error(f"environment variable {env}={raw!r}: {e}")
            if secret:
                note = f"default: from {env} (not shown); without it {builtin}"
            else:
                value = _shown(kw["default"]) if is_flag else raw
                note = f"default: {value}, from {env}; without it {builtin}"
        # argparse %-formats help texts, and a value from the environment may hold a '%'.
        kw["help"] = f"{kw.pop('help', '')} ({note.replace('%', '%%')})"
        if is_flag:
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


def add_engine_args(p: EnvDefaults) -> None:
    p.add_option(
        "--model",
        default_text="the demo model that ships with moeserve",
        help="model directory (config.json, *.safetensors, tokenizer.json)",
    )
    p.add_option(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weight and activation dtype (auto: the checkpoint's)",
    )
    p.add_option("--device", default_text="cuda when available", help="cpu, cuda or cuda:N")
    p.add_option("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_option(
        "--kv-cache-memory",
        type=_bytes,
        default_text="from the device",
        help="KV cache budget in bytes (e.g. 4GiB)",
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
        default_text="the model's max_position_embeddings",
        help="context length",
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
        "--scheduling-policy",
        choices=["fcfs", "priority"],
        default="fcfs",
        help="fcfs: first come, first served; priority: a request's `priority` (lower first) "
        "orders admission, and a KV shortage preempts the lowest first",
    )
    p.add_option(
        "--no-chunked-prefill",
        action="store_true",
        default=False,
        help="run each prompt in one step instead of budget-sized chunks",
    )
    p.add_option(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep full KV blocks cached by content so a prompt sharing a prefix with an "
        "earlier one computes only the rest (--no-enable-prefix-caching: off)",
    )
    p.add_option(
        "--seed",
        type=int,
        default_text="a fresh seed each start",
        help="seed of the engine's sampling generator, which every request without a seed of "
        "its own draws from (so its tokens also depend on what else runs with it)",
    )
    p.add_option(
        "--expert-cache-slots",
        type=int,
        default_text="every expert on the device",
        help="experts per sparse layer kept on the device (the rest in host memory)",
    )
    p.add_option(
        "--expert-cache-gb",
        type=float,
        default_text="every expert on the device",
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
        "--expert-cache-kernels",
        default="auto",
        choices=["auto", "eager", "fused"],
        help="how cached experts run: eager (one at a time, torch), fused (the fused MoE "
        "kernels over the cache slots; Triton kernels only), auto: fused with the Triton "
        "kernels, else eager",
    )
    p.add_option(
        "--expert-cache-graph-batch",
        type=int,
        default_text="auto",
        help="decode batches of up to N sequences replay one CUDA graph in which each "
        "offloaded layer finds, copies and admits its missing experts on the GPU (needs decode "
        "CUDA graphs, fused cache kernels, --offload-mode fetch or auto, lru, no --prefetch); "
        "0: one graph per stage between offloaded layers; auto: 4 where that path can run and "
        "an expert is at most 32 MiB, else 0",
    )
    p.add_option(
        "--load-format",
        default="safetensors",
        choices=["safetensors", "dummy"],
        help="dummy: random weights of config.json's shapes (benchmarks)",
    )
    p.add_option(
        "--quantization",
        default=None,
        choices=["fp8"],
        help="fp8: quantize a float checkpoint's routed experts and dense linears at load "
        "(float8 e4m3, one "
        "scale per row and 128 columns): half the memory and PCIe bytes. FP8 and MXFP4 "
        "checkpoints need no flag",
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


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig of the engine flags (and MOESERVE_* variables): each flag sets the
    engine option of the same name (config.OPTION_NAMES); ConfigError names a bad one."""
    options = {name: getattr(args, name) for name in OPTION_NAMES if hasattr(args, name)}
    options["enable_chunked_prefill"] = not args.no_chunked_prefill
    options["async_scheduling"] = {"on": True, "off": False}.get(args.async_scheduling)
    return EngineConfig.from_options(model_or_demo(args.model), **options)


def add_serve_args(p: EnvDefaults) -> None:
    p.add_option(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)"
    )
    p.add_option("--port", type=int, default=8000, help="TCP port")
    p.add_option(
        "--served-model-name",
        default_text="the model directory's name",
        help="model name of the API",
    )
    p.add_option(
        "--api-key",
        default_text="no key needed",
        secret=True,
        help="require `Authorization: Bearer KEY` on /v1/* and /ui/stats (prefer the env variable)",
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
        default_text="2000000 (2MB)",
        help="largest request body in bytes (also 2MB, 1MiB); larger ones get 413",
    )
    p.add_option(
        "--log-prompts",
        action="store_true",
        default=False,
        help="include prompts in the request log (off: they may be private)",
    )
    p.add_option(
        "--watchdog-timeout",
        type=float,
        default=30.0,
        help="seconds without a finished engine step, while requests are open, after which "
        "/health and /ready turn 503 and new requests are refused (0: off)",
    )
    p.add_option(
        "--allowed-hosts",
        default_text="any host",
        help="comma-separated Host header values to answer (api.example.com, *.internal); "
        "others get 400; the probes and /metrics answer any host",
    )
    p.add_option(
        "--tool-call-parser",
        choices=sorted(PARSERS),
        default_text="from the checkpoint's model_type and chat template",
        help="how the model writes tool calls, for tool_choice auto",
    )
    p.add_option(
        "--trust-request-chat-template",
        action="store_true",
        default=False,
        help="render a chat request's own chat_template (sandboxed, with time and size "
        "budgets); off: such a request is a 400, as vLLM's default",
    )
    p.add_option(
        "--no-ui",
        action="store_true",
        default=False,
        help="no web page (chat playground and expert map at / and /ui, its JSON at /ui/stats)",
    )
    p.add_option(
        "--no-engine-process",
        action="store_true",
        default=False,
        help="step the engine in a thread of the server's process instead of a "
        "process of its own (which keeps streaming from slowing the engine)",
    )
