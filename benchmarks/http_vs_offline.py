"""HTTP serving throughput vs the offline engine, on the same workload and the same GPU.

The Mixtral-8x7B shape cut to --layers layers (dummy bf16 weights) gets the demo model's
character tokenizer (so random prompts have exact lengths). First the offline engine runs the
workload (LLM.generate, all requests at once, --max-num-seqs in flight); then `moeserve serve`
starts in a subprocess and the load tester (`moeserve bench serve`) sends the same prompts with
--concurrency streams, twice (the second run is timed); then the offline engine runs again,
warm, and that run is the figure.
Prints the output-token rates and the ratio; writes JSON.

    python benchmarks/http_vs_offline.py --json out.json
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._proc import (  # noqa: E402
    busy_cores,
    cpu_seconds,
    thread_cpu_seconds,
    wait_ready,
)
from benchmarks.gpu_speed import MIXTRAL  # noqa: E402
from moeserve import LLM, SamplingParams  # noqa: E402
from moeserve.assets import demo_model_path  # noqa: E402
from moeserve.bench.workloads import random_workload  # noqa: E402
from moeserve.metrics import STEP_KINDS, step_kind  # noqa: E402
from moeserve.runtime import freeze_startup_heap  # noqa: E402

KV_BYTES = 8 * 2**30
WHERE = {"process": "its own process", "thread": "a thread of the server"}


# A CPU smoke test of this script (--tiny): the same code path on a toy shape.
TINY = MIXTRAL | dict(vocab_size=1024, hidden_size=128, intermediate_size=256,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip


def model_dir(layers: int, tiny: bool) -> Path:
    from transformers import MixtralConfig

    path = Path(tempfile.mkdtemp(prefix="moeserve-http-"))
    MixtralConfig(num_hidden_layers=layers, **(TINY if tiny else MIXTRAL)).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_model_path() / name, path / name)
    return path


def fake_gpu(step_ms: float) -> None:
    """CPU proxy of a GPU step: every model step also waits step_ms with the GIL released, as
    the host does while CUDA runs; the rest (Python) is the real engine's."""
    import moeserve.engine.runner as runner

    real = runner.Runner.execute

    def execute(self: runner.Runner, work: Any, feed: Any = None) -> Any:
        out = real(self, work, feed)
        time.sleep(step_ms / 1e3)
        return out

    runner.Runner.execute = execute  # type: ignore[method-assign]


def serve_fake_gpu(step_ms: float, argv: list[str]) -> int:
    """`moeserve serve argv` with fake_gpu(step_ms) applied where the engine steps (its own
    process, or this one with --no-engine-process)."""
    from moeserve.cli import build_parser, engine_config
    from moeserve.server.serve import run

    args = build_parser().parse_args(["serve", *argv])
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args, engine_config(args), engine_setup=functools.partial(fake_gpu, step_ms))


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    return out


LATENCIES = {"ttft": "moeserve_time_to_first_token_seconds",
             "queue": "moeserve_request_queue_time_seconds"}


def steps_metric(url: str) -> tuple[float, float, dict[str, list[float]]]:
    """(engine steps, tokens they ran, {kind or latency: [count, seconds]}) from the server's
    iteration-tokens, step-duration and request-latency histograms."""
    text = httpx.get(url + "/metrics", timeout=10).text
    count = total = 0.0
    kinds: dict[str, list[float]] = {k: [0.0, 0.0] for k in (*STEP_KINDS, *LATENCIES)}
    prefixes = {f'moeserve_step_duration_seconds_{part}{{kind="{k}"}}': (k, i)
                for k in STEP_KINDS for i, part in enumerate(("count", "sum"))}  # fmt: skip
    prefixes |= {f"{name}_{part} ": (k, i) for k, name in LATENCIES.items()
                 for i, part in enumerate(("count", "sum"))}  # fmt: skip
    for line in text.splitlines():
        if line.startswith("moeserve_iteration_tokens_count"):
            count = float(line.split()[-1])
        elif line.startswith("moeserve_iteration_tokens_sum"):
            total = float(line.split()[-1])
        for prefix, (k, i) in prefixes.items():
            if line.startswith(prefix):
                kinds[k][i] = float(line.split()[-1])
    return count, total, kinds


def kinds_line(kinds: dict[str, list[float]]) -> str:
    """'decode 500 x 3.10 ms, ...': steps and mean wall time of each kind."""
    return ", ".join(f"{k} {n:.0f} x {1e3 * sec / n:.2f} ms" for k, (n, sec) in kinds.items() if n)


class PySpy:
    """`py-spy record` attached to a process while the block runs (--py-spy): a raw profile
    of every thread, idle ones and native frames included, for benchmarks/pyspy_summary.py."""

    def __init__(self, out: Path | None, name: str, pid: int, rate: int = 250,
                 native: bool = True, blocking: bool = True) -> None:  # fmt: skip
        self.out, self.pid, self.rate = out and out / f"{name}.txt", pid, rate
        self.native, self.blocking = native, blocking
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PySpy:
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            exe = shutil.which("py-spy") or "py-spy"
            cmd = [exe, "record", "--pid", str(self.pid), "--threads", "--idle",
                   "--rate", str(self.rate), "--format", "raw", "--output", str(self.out)]
            cmd += ["--native"] if self.native else []
            cmd += [] if self.blocking else ["--nonblocking"]  # pauses the process per sample
            self.proc = subprocess.Popen(cmd)
            time.sleep(1.0)  # attached before the timed work starts
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            self.proc.wait(timeout=120)


def offline(path: Path, prompts: list[str], out_len: int, max_seqs: int, dtype: str,
            profile: Path | None = None, closed: bool = False) -> float:  # fmt: skip
    """The offline engine's output tok/s on the workload (LLM.generate, every request at once).
    With `closed`, then also as a closed loop in-process (run twice, the second printed): each
    finished request's replacement is added before the next step, as the load tester's streams
    do at best over HTTP; that separates the arrival pattern's cost from the server's."""
    llm = LLM(str(path), dtype=dtype, load_format="dummy", kv_cache_memory=KV_BYTES,
              max_num_seqs=max_seqs, max_model_len=4096, progress=False)  # fmt: skip
    llm.generate(prompts[:max_seqs], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    # As the server's processes do once loaded: without it, full collections (160 ms each for
    # the engine's heap on the CPU machine, benchmarks/gc_pauses.py) stall the offline steps.
    freeze_startup_heap("offline")
    try:
        params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
        return _timed_offline(llm, prompts, params, max_seqs, profile, closed)
    finally:
        gc.unfreeze()  # this engine's objects become collectable again once it is dropped


def _timed_offline(llm: LLM, prompts: list[str], params: SamplingParams, max_seqs: int,
                   profile: Path | None, closed: bool) -> float:  # fmt: skip
    kinds: dict[str, list[float]] = {k: [0.0, 0.0] for k in STEP_KINDS}
    real_step = llm.engine.step

    def step() -> Any:  # the same per-kind step times the server's metrics report
        res = real_step()
        if res.stats is not None:
            kinds[step_kind(res.stats)][0] += 1
            kinds[step_kind(res.stats)][1] += res.stats.step_seconds
        return res

    def report(name: str, tokens: int, dt: float, steps0: int, cpu0: float) -> float:
        steps = llm.engine.num_steps - steps0
        print(f"{name}: {tokens / dt:.0f} output tok/s, {steps} steps, "
              f"{1e3 * dt / steps:.2f} ms per step ({kinds_line(kinds)}), "
              f"CPU {(time.process_time() - cpu0) / dt:.2f} of a core")  # fmt: skip
        return tokens / dt

    llm.engine.step = step  # type: ignore[method-assign]
    with PySpy(profile, "offline", os.getpid()):
        t0, steps0, cpu0 = time.perf_counter(), llm.engine.num_steps, time.process_time()
        outs = llm.generate(prompts, params)
        dt = time.perf_counter() - t0
    rate = report("offline", sum(len(o.outputs[0].token_ids) for o in outs), dt, steps0, cpu0)
    if closed:
        ids = [llm.encode_prompt(p) for p in prompts]
        for run in ("warm-up", "timed"):
            for k in kinds.values():
                k[:] = [0.0, 0.0]
            t0, steps0, cpu0 = time.perf_counter(), llm.engine.num_steps, time.process_time()
            tokens = closed_loop(llm, ids, params, max_seqs, run)
            if run == "timed":
                report("offline closed loop", tokens, time.perf_counter() - t0, steps0, cpu0)
    return rate


def free_device() -> None:
    """Give the last engine's device memory back before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def closed_loop(
    llm: LLM, ids: list[list[int]], params: SamplingParams, streams: int, tag: str
) -> int:
    """`streams` requests in flight on the LLM's engine loop (core and output processor, as a
    server runs them); a finished one's replacement joins before the next step. Returns the
    output tokens."""
    from moeserve.engine.messages import EngineRequest

    todo = iter(enumerate(ids))

    def add() -> None:
        nxt = next(todo, None)
        if nxt is not None:
            llm.loop.admit(EngineRequest(f"closed-{tag}-{nxt[0]}", nxt[1], params))

    for _ in range(streams):
        add()
    tokens, ttft, queued = 0, [], []
    while llm.engine.has_unfinished():
        for delta in llm.loop.step()[0]:
            tokens += sum(len(o.token_ids) for o in delta.outputs)
            if delta.finished:
                add()
                if delta.metrics is not None:
                    ttft.append(delta.metrics.ttft or 0.0)
                    queued.append(delta.metrics.queue_time or 0.0)
    if tag == "timed":
        print(f"offline closed loop: engine-side means: TTFT {1e3 * sum(ttft) / len(ttft):.1f} "
              f"ms, queued {1e3 * sum(queued) / len(queued):.1f} ms")  # fmt: skip
    return tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--port", type=int, default=8177)
    ap.add_argument("--tiny", action="store_true", help="toy shape in float32 (CPU smoke test)")
    ap.add_argument("--fake-gpu-step-ms", type=float, default=0.0,
                    help="CPU proxy: each step also sleeps this long, GIL released (with --tiny)")
    ap.add_argument("--servers", default="process",
                    help="servers to run in turn: process (the default engine process) and "
                         "thread (--no-engine-process), e.g. process,thread,process")
    ap.add_argument("--server-flags", default="",
                    help="more `moeserve serve` flags for every server, e.g. "
                         "'--admission-wait-steps 0'")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--py-spy", type=Path, default=None, metavar="DIR",
                    help="profile the timed runs with py-spy (on PATH): DIR/offline.txt (this "
                         "process, second offline run), DIR/engine-MODE.txt (the server's engine "
                         "process or, for thread, the server), DIR/server.txt (the server beside "
                         "an engine process); see benchmarks/pyspy_summary.py")
    args = ap.parse_args()
    path = model_dir(args.layers, args.tiny)
    dtype = "float32" if args.tiny else "bfloat16"
    work = random_workload(str(args.input_len), str(args.output_len), seed=0, tokenizer=str(path))
    prompts = [next(work).prompt or "" for _ in range(args.num_requests)]
    if args.fake_gpu_step_ms:
        fake_gpu(args.fake_gpu_step_ms)
    off = offline(path, prompts, args.output_len, args.concurrency, dtype)
    free_device()

    env = os.environ | {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    results: list[tuple[str, dict[str, Any]]] = []
    for mode in args.servers.split(","):
        if mode not in WHERE:
            raise SystemExit(f"--servers: {mode!r} is not one of {', '.join(WHERE)}")
        results.append((mode, serve_and_load(args, path, dtype, env, mode == "thread")))
        print(f"HTTP at {args.concurrency} streams, engine in {WHERE[mode]}: "
              f"{results[-1][1]['output_throughput']:.0f} output tok/s")  # fmt: skip
    # The figure: the last server with the engine in its own process (the default).
    # Offline again, and that run is the figure: the first engine of a process ran its timed
    # steps slower in every call (4.6-5.8 ms against 3.7, benchmarks/RESULTS.md; first-use
    # costs such as in-process Triton compiles are the likely cause), while the servers warm
    # up with a load before they are timed.
    off_first = off
    off = offline(path, prompts, args.output_len, args.concurrency, dtype, args.py_spy,
                  closed=True)
    print(f"offline: first run {off_first:.0f}, second run {off:.0f} output tok/s")
    rep = next((r for m, r in reversed(results) if m == "process"), results[-1][1])
    http = rep["output_throughput"]
    ratio = http / off
    print(f"offline: {off:.0f} output tok/s (second run)")
    for mode, r in results:
        print(f"HTTP at {args.concurrency} streams, engine in {WHERE[mode]}: "
              f"{r['output_throughput']:.0f} output tok/s = {r['output_throughput'] / off:.2f} "
              f"of offline (TTFT p90 {(r['ttft_ms']['p90'] or 0):.0f} ms)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({
            "offline_tokens_per_s": off, "offline_first_run_tokens_per_s": off_first,
            "http_tokens_per_s": http, "ratio": ratio,
            "args": vars(args) | {"json": None},
            "loadtest": [dict(r, server=m) for m, r in results],
        }, indent=2))  # fmt: skip
    return 0


def serve_and_load(
    args: argparse.Namespace, path: Path, dtype: str, env: dict[str, str], thread: bool
) -> dict[str, Any]:
    """Start `moeserve serve` in a subprocess, run the load tester against it, stop it."""
    flags = ["--model", str(path), "--load-format", "dummy", "--dtype", dtype,
             "--kv-cache-memory", str(KV_BYTES), "--max-model-len", "4096",
             "--max-num-seqs", str(args.concurrency), "--host", "127.0.0.1",
             "--port", str(args.port), *shlex.split(args.server_flags)]
    flags += ["--no-engine-process"] if thread else []
    if args.fake_gpu_step_ms:
        cmd = [sys.executable, "-c", "import sys; from benchmarks.http_vs_offline import "
               f"serve_fake_gpu; sys.exit(serve_fake_gpu({args.fake_gpu_step_ms}, "
               f"{flags!r}))"]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "moeserve.cli", "serve", *flags]
    server = subprocess.Popen(cmd, env=env)
    try:
        url = f"http://127.0.0.1:{args.port}"
        wait_ready(url, server, 300)
        out = Path(tempfile.mkdtemp()) / "load.json"

        def load(n: int) -> None:
            subprocess.run(
                [sys.executable, "-m", "moeserve.cli", "bench", "serve", "--base-url", url,
                 "--tokenizer", str(path), "--input-len", str(args.input_len), "--output-len",
                 str(args.output_len), "--ignore-eos", "--max-concurrency",
                 str(args.concurrency), "--num-requests", str(n), "--no-progress",
                 "--result-json", str(out)],
                env=env, check=True,
            )  # fmt: skip

        # Warm-up: the whole workload once, as the offline engine's figure is its second run
        # (a first run's prefill and mixed steps ran 1.4-2.5x slower, benchmarks/RESULTS.md).
        load(args.num_requests)
        procs = [server.pid] + children(server.pid)
        engine_pid = next((p for p in procs[1:] if b"spawn_main" in Path(f"/proc/{p}/cmdline")
                           .read_bytes()), server.pid)  # fmt: skip
        cpu0 = [cpu_seconds(p) for p in procs]
        threads0 = thread_cpu_seconds(engine_pid)
        steps0, tokens0, kinds0 = steps_metric(url)
        client0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        where = "thread" if thread else "process"
        with PySpy(args.py_spy, f"engine-{where}", engine_pid), \
             PySpy(None if thread else args.py_spy, "server", server.pid, native=False,
                   blocking=False):
            t0 = time.perf_counter()
            load(args.num_requests)
            wall = time.perf_counter() - t0
        client1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        steps1, tokens1, kinds1 = steps_metric(url)
        kinds = {k: [a - b for a, b in zip(kinds1[k], kinds0[k])] for k in kinds1}
        lat = {k: 1e3 * sec / max(n, 1) for k, (n, sec) in
               ((k, kinds.pop(k)) for k in LATENCIES)}  # fmt: skip
        # Where a server or client core saturates, that process bounds the throughput.
        util = {f"pid {p}" + (" (server)" if p == server.pid else ""): (cpu_seconds(p) - c) / wall
                for p, c in zip(procs, cpu0)}  # fmt: skip
        util["load tester"] = (
            client1.ru_utime + client1.ru_stime - client0.ru_utime - client0.ru_stime
        ) / wall
        steps = steps1 - steps0
        threads = busy_cores(engine_pid, threads0, thread_cpu_seconds(engine_pid), wall)
        print(f"HTTP: {steps:.0f} steps, {1e3 * wall / max(steps, 1):.2f} ms per step "
              f"({kinds_line(kinds)}), "
              f"{(tokens1 - tokens0) / max(steps, 1):.1f} tokens per step; CPU of a core: "
              + ", ".join(f"{k} {v:.2f}" for k, v in util.items())
              + f"; engine threads: {threads}; engine-side means: TTFT {lat['ttft']:.1f} ms, "
              f"queued {lat['queue']:.1f} ms")  # fmt: skip
        return json.loads(out.read_text()) | {"cpu_util": util, "steps": steps,
                                              "step_kinds": kinds}
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    raise SystemExit(main())
