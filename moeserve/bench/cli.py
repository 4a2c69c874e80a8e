"""Flags of `moeserve bench serve` (and of benchmarks/loadtest.py, the same tool as a script),
and the `moeserve bench` subcommands.

The load tester's flags do not read MOESERVE_* variables: in a server's container
MOESERVE_MODEL names the checkpoint directory, which is not the model name the API serves.
`bench throughput` runs an engine and takes the engine's flags, which do.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from moeserve.bench.conversations import add_conversation_args, conversation_factory
from moeserve.bench.synthetic import SHAPES
from moeserve.bench.workloads import DEFAULT_INPUT_LEN, DEFAULT_OUTPUT_LEN, RequestSpec

Workload = Callable[[], Iterator[RequestSpec]]  # makes the request stream
DEFAULT_NUM_REQUESTS = 100  # when neither --num-requests nor --duration is given
THROUGHPUT_DOC = """Offline output tokens/s of the engine: random prompts, all queued at once.

examples:
  moeserve bench throughput --num-prompts 16 --peer
  moeserve bench throughput --synthetic mixtral-4l --dtype bfloat16 --max-num-seqs 16 \\
      --num-prompts 16 --input-len 128 --output-len 128 --peer --floor --result-json out.json
"""


def _rate(text: str) -> float:
    value = float(text)  # "inf" parses too
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0 (or inf)")
    return value


def add_serve_bench_args(p: argparse.ArgumentParser) -> None:
    """Every flag of the load tester."""
    g = p.add_argument_group("target")
    g.add_argument(
        "--base-url",
        default="http://127.0.0.1:8000",
        help="the server, with or without /v1 (default %(default)s)",
    )
    g.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    g.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="bearer token (default: $OPENAI_API_KEY)",
    )
    g.add_argument(
        "--metrics-url", default=None, help="Prometheus endpoint to diff (default: BASE/metrics)"
    )
    g.add_argument("--no-metrics", action="store_true", help="do not scrape /metrics")
    g.add_argument(
        "--http-client",
        choices=["auto", "httpx"],
        default="auto",
        help="auto: stream over a built-in HTTP/1.1 client for http:// (a fraction "
        "of httpx's CPU per streamed token), httpx for https://; httpx: always "
        "httpx (default %(default)s)",
    )
    g = p.add_argument_group("workload")
    g.add_argument(
        "--workload",
        choices=["random", "jsonl", "demo", "shared-prefix", "multi-turn"],
        default="random",
        help="random prompts, a JSONL file (--prompts-file), the demo model's tasks, "
        "--num-prefixes long prompts each shared by many requests, or --num-conversations "
        "conversations of --num-turns turns (default %(default)s)",
    )
    # None when not given: only the defaults are fitted to the server's context.
    g.add_argument(
        "--input-len",
        default=None,
        help="random prompt length in tokens: N, uniform:LO:HI, normal:MEAN:STD, "
        f"lognormal:MEDIAN:SIGMA or exponential:MEAN (default {DEFAULT_INPUT_LEN}, "
        "less if the server's context is shorter)",
    )
    g.add_argument(
        "--output-len",
        default=None,
        help=f"max_tokens, same forms as --input-len (default {DEFAULT_OUTPUT_LEN}, "
        "less if the server's context is shorter)",
    )
    g.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer.json or model dir: exact random prompt lengths (else words)",
    )
    g.add_argument(
        "--prompts-file",
        default=None,
        help="JSONL, one object a line: prompt or messages, optional max_tokens",
    )
    g.add_argument(
        "--demo-tasks", default=None, help="comma-separated demo tasks (default: all of them)"
    )
    g.add_argument("--demo-max-tokens", type=int, default=16, help="max_tokens of demo requests")
    add_conversation_args(g)
    g.add_argument("--temperature", type=float, default=0.0, help="default %(default)s")
    g.add_argument(
        "--ignore-eos",
        action="store_true",
        help="generate exactly max_tokens (vLLM's extension field)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of prompts and arrivals")
    g = p.add_argument_group("load")
    g.add_argument(
        "--num-requests",
        type=int,
        default=None,
        help=f"requests to send (default {DEFAULT_NUM_REQUESTS} without --duration)",
    )
    g.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds during which requests start; the run then finishes them",
    )
    g.add_argument(
        "--request-rate",
        type=_rate,
        default=math.inf,
        help="requests/s, gamma arrivals (Poisson at burstiness 1); inf: all at once",
    )
    g.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of the arrivals: <1 burstier, >1 more regular",
    )
    g.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    g.add_argument(
        "--client-processes",
        type=int,
        default=1,
        metavar="N",
        help="client processes that share the run, each with its own event loop, for token "
        "rates one client core cannot keep up with: --max-concurrency is split among them, "
        "and the requests and --request-rate with it (default %(default)s)",
    )
    g.add_argument(
        "--request-timeout",
        type=float,
        default=300.0,
        help="seconds one request may take before it counts as failed",
    )
    g = p.add_argument_group("output")
    g.add_argument(
        "--goodput",
        nargs="+",
        metavar="KEY:MS",
        default=None,
        help="SLOs for goodput, e.g. ttft:500 tpot:50 e2e:10000",
    )
    g.add_argument("--result-json", type=Path, default=None, help="write the result here")
    g.add_argument(
        "--save-detailed", action="store_true", help="include every request's timings in the JSON"
    )
    g.add_argument(
        "--plot-dir",
        type=Path,
        default=None,
        help="write latency.png, throughput.png, expert_load.png here",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _workload(args: argparse.Namespace, max_model_len: int | None) -> tuple[Workload, str]:
    """The workload of the flags, as a picklable function that makes its request stream
    (each client process makes its own); the random one fitted to a context of
    `max_model_len` tokens (None: not known). ValueError for flags that do not fit."""
    from moeserve.bench import workloads

    if args.workload == "jsonl":
        if not args.prompts_file:
            raise ValueError("--workload jsonl needs --prompts-file PATH")
        output_len = args.output_len or str(DEFAULT_OUTPUT_LEN)
        name = f"jsonl:{args.prompts_file}"
        make = partial(workloads.jsonl_workload, args.prompts_file, output_len, seed=args.seed)
        return make, name
    if args.workload in ("shared-prefix", "multi-turn"):
        make, name, note = conversation_factory(args, max_model_len)
        if note:
            print(f"moeserve bench: {note}", file=sys.stderr)
        return make, name
    if args.workload == "demo":
        tasks = [t.strip() for t in args.demo_tasks.split(",")] if args.demo_tasks else None
        make = partial(workloads.demo_workload, args.demo_max_tokens, seed=args.seed, tasks=tasks)
        return make, "demo"
    fit = workloads.fit_random_lengths(
        args.input_len, args.output_len, max_model_len, exact=args.tokenizer is not None
    )
    if fit.note:
        print(f"moeserve bench: {fit.note}", file=sys.stderr)
    make = partial(
        workloads.random_workload,
        fit.input_len,
        fit.output_len,
        seed=args.seed,
        tokenizer=args.tokenizer,
        max_prompt_chars=fit.max_prompt_chars,
    )
    return make, f"random(in={fit.input_len}, out={fit.output_len})"


def run_serve_bench(args: argparse.Namespace) -> int:
    """Run the load test, print the table, write JSON and plots; 1 if no request succeeded
    or a client process failed, 130 after Ctrl-C with several client processes."""
    from moeserve.bench.loadtest import LoadTestConfig, run_async, run_load, served_model
    from moeserve.bench.report import build_report, format_report, parse_goodput

    slos = parse_goodput(args.goodput)
    num = args.num_requests
    if num is None and args.duration is None:
        num = DEFAULT_NUM_REQUESTS
    cfg = LoadTestConfig(
        base_url=args.base_url,
        model=args.model,
        api_key=args.api_key,
        num_requests=num,
        duration=args.duration,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        request_timeout=args.request_timeout,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        seed=args.seed,
        progress=not args.no_progress,
        scrape_metrics=not args.no_metrics,
        metrics_url=args.metrics_url,
        http_client=args.http_client,
        client_processes=args.client_processes,
    )
    # Before anything is sent: the model's context decides the random workload's lengths.
    served = run_async(served_model(cfg))
    workload, name = _workload(args, served.max_model_len)
    cfg = dataclasses.replace(cfg, model=served.id)
    failure, status = None, 0
    if cfg.client_processes == 1:
        run = run_async(run_load(cfg, workload(), name))
    else:
        from moeserve.bench.processes import run_processes

        outcome = run_processes(cfg, workload, name)
        run, failure, status = outcome.run, outcome.failure, outcome.exit_status
    rep = build_report(run, slos, detailed=args.save_detailed)
    print(format_report(rep))
    if rep["client"]["warning"]:
        print(f"moeserve bench: warning: {rep['client']['warning']}", file=sys.stderr)
    if args.result_json:
        args.result_json.parent.mkdir(parents=True, exist_ok=True)
        args.result_json.write_text(json.dumps(rep, indent=2) + "\n")
        print(f"result: {args.result_json}")
    if args.plot_dir:
        from moeserve.bench.plots import write_plots

        for path in write_plots(rep, run.results, args.plot_dir):
            print(f"plot: {path}")
    if failure is not None:
        print(f"moeserve bench: {failure}", file=sys.stderr)
        return status
    if rep["completed"] == 0:
        print("moeserve bench: no request succeeded", file=sys.stderr)
        return 1
    return 0


def add_throughput_args(p: argparse.ArgumentParser) -> None:
    """The flags of `moeserve bench throughput` beside the engine's own (--model, --dtype,
    --device, --max-num-seqs, ...)."""
    g = p.add_argument_group("workload")
    g.add_argument(
        "--synthetic",
        choices=sorted(SHAPES),
        default=None,
        help="a Mixtral shape with random weights instead of --model (dummy weights, or "
        "saved by transformers with --peer)",
    )
    g.add_argument("--num-prompts", type=int, default=64, help="default %(default)s")
    g.add_argument(
        "--input-len",
        default="64",
        help="prompt tokens: N, uniform:LO:HI, normal:MEAN:STD, lognormal:MEDIAN:SIGMA or "
        "exponential:MEAN (default %(default)s)",
    )
    g.add_argument(
        "--output-len", default="64", help="tokens to generate, same forms (default %(default)s)"
    )
    g.add_argument("--workload-seed", type=int, default=0, help="default %(default)s")
    g = p.add_argument_group("references")
    g.add_argument(
        "--peer",
        action="store_true",
        help="also time transformers generate() in static batches of --max-num-seqs",
    )
    g.add_argument(
        "--peer-sequential", action="store_true", help="also time transformers one prompt a time"
    )
    g.add_argument(
        "--floor",
        action="store_true",
        help="(CUDA) measure the copy, host-link and matmul rates and report the fraction of "
        "the floor the run reached",
    )
    g = p.add_argument_group("output")
    g.add_argument("--result-json", type=Path, default=None, help="write the result here")


def _run_throughput(args: argparse.Namespace) -> int:
    from moeserve.bench.throughput import run_throughput  # torch: only when it runs

    return run_throughput(args)


def add_bench_parser(
    sub: argparse._SubParsersAction, engine_args: Callable[[Any], None] | None = None
) -> None:
    """`moeserve bench serve|throughput ...` under the main CLI's subcommands; `engine_args`
    adds the engine's flags (the main CLI's own, with their MOESERVE_* defaults) to the
    throughput command, which runs an engine."""
    bench = sub.add_parser("bench", help="measure a running server or the offline engine")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    serve = bench_sub.add_parser(
        "serve", help="load-test an OpenAI-compatible endpoint (like `vllm bench serve`)"
    )
    add_serve_bench_args(serve)
    serve.set_defaults(func=run_serve_bench, default_log_level="WARNING")
    throughput = bench_sub.add_parser(
        "throughput",
        help="offline output tokens/s of the engine (like `vllm bench throughput`)",
        description=THROUGHPUT_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if engine_args is not None:
        engine_args(throughput)
    add_throughput_args(throughput)
    throughput.set_defaults(func=_run_throughput, default_log_level="WARNING")


def main(argv: Sequence[str] | None = None) -> int:
    """benchmarks/loadtest.py: the same flags as `moeserve bench serve`."""
    parser = argparse.ArgumentParser(prog="loadtest.py", description=__doc__.splitlines()[0])
    add_serve_bench_args(parser)
    args = parser.parse_args(argv)
    try:
        return run_serve_bench(args)
    except ValueError as e:
        print(f"loadtest: error: {e}", file=sys.stderr)
        return 2
