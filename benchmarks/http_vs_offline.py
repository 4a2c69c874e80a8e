"""HTTP serving throughput vs the offline engine, on the same workload and the same GPU.

The Mixtral-8x7B shape cut to --layers layers (dummy bf16 weights) gets the demo model's
character tokenizer (so random prompts have exact lengths). First the offline engine runs the
workload (every request queued at once, --concurrency in flight); then `moeserve serve` starts
in a subprocess and the load tester (`moeserve bench serve`) sends the same prompts with
--concurrency streams from --client-processes processes, twice (the second run is timed);
then the offline engine runs again, warm, all at once and as an in-process closed loop (each
finished request replaced before the next step, the best a client can do), and that warm run
is the figure. Prints each side's output tokens/s, steps by kind, engine-side TTFT and queue
time, each process's CPU (and on a line of its own each load tester process's), and the
ratio; writes JSON. --py-spy DIR also profiles the timed runs and prints where each thread's
samples went. --tiny: a toy shape in float32 (a CPU smoke test).

    python benchmarks/http_vs_offline.py --json out.json
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moeserve import LLM, SamplingParams  # noqa: E402
from moeserve.bench.synthetic import synthetic_model  # noqa: E402
from moeserve.bench.throughput import drive, free_device, kinds_line, step_kinds  # noqa: E402
from moeserve.bench.workloads import random_workload  # noqa: E402
from moeserve.metrics import STEP_KINDS  # noqa: E402
from moeserve.runtime import freeze_startup_heap  # noqa: E402

KV_BYTES = 8 * 2**30
WHERE = {"process": "its own process", "thread": "a thread of the server"}
LATENCIES = {
    "ttft": "moeserve_time_to_first_token_seconds",
    "queue": "moeserve_request_queue_time_seconds",
}


# ------------------------------------------------------------------------- processes (/proc)
def _stat_cpu(stat: Path) -> float | None:
    """utime + stime from a /proc stat file, None where it is gone."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, 0 where it is gone."""
    return _stat_cpu(Path(f"/proc/{pid}/stat")) or 0.0


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """utime + stime of each thread of a live process, by thread id (the main thread's is pid)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        cpu = _stat_cpu(task / "stat")
        if cpu is not None:
            out[int(task.name)] = cpu
    return out


def busy_cores(pid: int, before: dict[int, float], after: dict[int, float], wall: float) -> str:
    """'main 0.95, 1234 0.30, ...': the four busiest threads of `pid` over `wall` seconds."""
    used = [(t, (c - before.get(t, 0.0)) / wall) for t, c in after.items()]
    used = sorted(used, key=lambda tc: -tc[1])[:4]
    return ", ".join(f"{'main' if t == pid else t} {u:.2f}" for t, u in used)


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


def wait_ready(url: str, server: subprocess.Popen[bytes], timeout: float) -> None:
    """Poll `url`/ready until it answers 200; SystemExit if `server` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise SystemExit(f"server exited with {server.returncode}")
        time.sleep(0.5)
    raise SystemExit(f"the server at {url} was not ready after {timeout:.0f} s")


# ------------------------------------------------------------------------------------ py-spy
class PySpy:
    """`py-spy record` attached to a process while the block runs: a raw profile of every
    thread, idle ones and native frames included (pyspy_summary reads it)."""

    def __init__(
        self, out: Path | None, name: str, pid: int, native: bool = True, blocking: bool = True
    ) -> None:
        self.out, self.pid = out and out / f"{name}.txt", pid
        self.native, self.blocking = native, blocking
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PySpy:
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            cmd = [shutil.which("py-spy") or "py-spy", "record", "--pid", str(self.pid)]
            cmd += ["--threads", "--idle", "--rate", "250", "--format", "raw"]
            cmd += ["--output", str(self.out)] + (["--native"] if self.native else [])
            # A blocking sample pauses the process: the server's event loop would feel it.
            cmd += [] if self.blocking else ["--nonblocking"]
            self.proc = subprocess.Popen(cmd)
            time.sleep(1.0)  # attached before the timed work starts
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            self.proc.wait(timeout=120)


PY_FRAME = re.compile(r"^(?P<func>.+) \((?P<file>[^()]*\.py):(?P<line>\d+)\)$")
# Native frames that say what a thread waits for (CPython 3.11-3.12, the CUDA runtime).
WAITS = {
    "GIL wait": "take_gil|PyEval_RestoreThread|PyEval_AcquireThread|PyGILState_Ensure",
    "device wait": "cudaStreamSynchronize|cuStreamSynchronize|cudaEventSynchronize|"
    "cuEventSynchronize|cudaDeviceSynchronize|cudaMemcpy|_local_scalar_dense|cuMemcpyDtoH",
    "blocked": "pthread_cond_wait|pthread_cond_timedwait|sem_wait|sem_timedwait|epoll_wait|"
    "poll (|select (|__poll|recv|read (|clock_nanosleep|time_sleep|lock_PyThread_acquire_lock|"
    "PyThread_acquire_lock_timed",
}


def _category(frames: list[str]) -> str:
    """What the innermost Python frame's native callees are doing."""
    last_py = max((i for i, f in enumerate(frames) if PY_FRAME.match(f)), default=-1)
    native = frames[last_py + 1 :]
    for name, marks in WAITS.items():
        tail = native if name != "blocked" else native[-4:]
        if any(m in f for f in tail for m in marks.split("|")):
            return name
    return "running"


def _innermost(frames: list[str]) -> str:
    for f in reversed(frames):
        if m := PY_FRAME.match(f):
            return f"{m['func']} ({Path(m['file']).name}:{m['line']})"
    return frames[-1] if frames else "?"


def pyspy_summary(path: Path, top: int = 10, min_samples: int = 20) -> str:
    """Per thread of a raw py-spy profile: its samples, their shares (GIL wait, device wait,
    blocked, running) and its innermost Python frames by share."""
    cats: dict[str, Counter[str]] = defaultdict(Counter)
    frames_of: dict[str, Counter[str]] = defaultdict(Counter)
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = stack.split(";")
            thread = next((x for x in frames if x.startswith("thread (")), "")
            rest = [x for x in frames if not x.startswith(("process ", "thread ("))]
            cat = _category(rest)
            cats[thread][cat] += int(count)
            frames_of[thread][f"{cat:>11}  {_innermost(rest)}"] += int(count)
    lines = [f"{path.name}:"]
    for thread, c in sorted(cats.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(c.values())
        if total >= min_samples:
            shares = ", ".join(f"{k} {n / total:.0%}" for k, n in c.most_common())
            lines.append(f"  {thread}: {total} samples ({shares})")
            lines += [f"    {n / total:6.1%}  {k}" for k, n in frames_of[thread].most_common(top)]
    return "\n".join(lines)


# ------------------------------------------------------------------------------- the offline run
def offline(
    path: Path,
    prompts: list[str],
    out_len: int,
    max_seqs: int,
    dtype: str,
    profile: Path | None = None,
    closed: bool = False,
) -> float:
    """The offline engine's output tok/s on the workload, every request queued at once.
    With `closed`, then also as a closed loop of `max_seqs` streams (run twice, the second
    printed): that separates the arrival pattern's cost from the server's."""
    llm = LLM(
        str(path),
        dtype=dtype,
        load_format="dummy",
        kv_cache_memory=KV_BYTES,
        max_num_seqs=max_seqs,
        max_model_len=4096,
        progress=False,
    )
    ids = [llm.encode_prompt(p) for p in prompts]
    drive(llm, ids[:max_seqs], SamplingParams(max_tokens=4, ignore_eos=True), tag="warm-up")
    # As the server's processes do once loaded: without it, full collections (160 ms each for
    # the engine's heap on a CPU machine) stall the offline steps.
    freeze_startup_heap("offline")
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)

    def timed(name: str, in_flight: int | None) -> float:
        cpu0 = time.process_time()
        run = drive(llm, ids, params, in_flight=in_flight, tag=name)
        rate = run.output_tokens / run.seconds
        print(
            f"{name}: {rate:.0f} output tok/s, {len(run.steps)} steps, "
            f"{1e3 * run.seconds / len(run.steps):.2f} ms per step "
            f"({kinds_line(step_kinds(run.steps))}), "
            f"CPU {(time.process_time() - cpu0) / run.seconds:.2f} of a core"
        )
        if in_flight is not None and run.finished:
            ttft = sum(m.ttft or 0.0 for m in run.finished) / len(run.finished)
            queued = sum(m.queue_time or 0.0 for m in run.finished) / len(run.finished)
            means = f"TTFT {1e3 * ttft:.1f} ms, queued {1e3 * queued:.1f} ms"
            print(f"{name}: engine-side means: {means}")
        return rate

    try:
        with PySpy(profile, "offline", os.getpid()):
            rate = timed("offline", None)
        if closed:
            drive(llm, ids, params, in_flight=max_seqs, tag="closed-warm-up")
            timed("offline closed loop", max_seqs)
        return rate
    finally:
        gc.unfreeze()  # this engine's objects become collectable again once it is dropped


# ---------------------------------------------------------------------------------- the server
def steps_metric(url: str) -> tuple[float, float, dict[str, list[float]]]:
    """(engine steps, tokens they ran, {kind or latency: [count, seconds]}) from the server's
    iteration-tokens, step-duration and request-latency histograms."""
    text = httpx.get(url + "/metrics", timeout=10).text
    count = total = 0.0
    kinds: dict[str, list[float]] = {k: [0.0, 0.0] for k in (*STEP_KINDS, *LATENCIES)}
    parts = ("count", "sum")
    prefixes = {
        f'moeserve_step_duration_seconds_{part}{{kind="{k}"}}': (k, i)
        for k in STEP_KINDS
        for i, part in enumerate(parts)
    }
    prefixes |= {
        f"{name}_{part} ": (k, i) for k, name in LATENCIES.items() for i, part in enumerate(parts)
    }
    for line in text.splitlines():
        if line.startswith("moeserve_iteration_tokens_count"):
            count = float(line.split()[-1])
        elif line.startswith("moeserve_iteration_tokens_sum"):
            total = float(line.split()[-1])
        for prefix, (k, i) in prefixes.items():
            if line.startswith(prefix):
                kinds[k][i] = float(line.split()[-1])
    return count, total, kinds


def serve_and_load(
    args: argparse.Namespace, path: Path, dtype: str, env: dict[str, str], thread: bool
) -> dict[str, Any]:
    """Start `moeserve serve` in a subprocess, run the load tester against it, stop it."""
    flags = ["--model", str(path), "--load-format", "dummy", "--dtype", dtype]
    flags += ["--kv-cache-memory", str(KV_BYTES), "--max-model-len", "4096"]
    flags += ["--max-num-seqs", str(args.concurrency), "--host", "127.0.0.1"]
    flags += ["--port", str(args.port), *shlex.split(args.server_flags)]
    flags += ["--no-engine-process"] if thread else []
    server = subprocess.Popen([sys.executable, "-m", "moeserve.cli", "serve", *flags], env=env)
    try:
        url = f"http://127.0.0.1:{args.port}"
        wait_ready(url, server, 300)
        out = Path(tempfile.mkdtemp()) / "load.json"
        load = [sys.executable, "-m", "moeserve.cli", "bench", "serve", "--base-url", url]
        load += ["--tokenizer", str(path), "--input-len", str(args.input_len)]
        load += ["--output-len", str(args.output_len), "--ignore-eos", "--no-progress"]
        load += ["--max-concurrency", str(args.concurrency), "--result-json", str(out)]
        load += ["--num-requests", str(args.num_requests)]
        load += ["--client-processes", str(args.client_processes)]
        # Warm-up: the whole workload once, as the offline engine's figure is its second run
        # (a first run's prefill and mixed steps ran 1.4-2.5x slower, benchmarks/RESULTS.md).
        subprocess.run(load, env=env, check=True, stdout=subprocess.DEVNULL)
        procs = [server.pid] + children(server.pid)
        engine_pid = next(
            (p for p in procs[1:] if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()),
            server.pid,
        )
        cpu0 = [cpu_seconds(p) for p in procs]
        threads0 = thread_cpu_seconds(engine_pid)
        steps0, tokens0, kinds0 = steps_metric(url)
        client0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        where = "thread" if thread else "process"
        server_spy = None if thread else args.py_spy
        with (
            PySpy(args.py_spy, f"engine-{where}", engine_pid),
            PySpy(server_spy, "server", server.pid, native=False, blocking=False),
        ):
            t0 = time.perf_counter()
            subprocess.run(load, env=env, check=True)
            wall = time.perf_counter() - t0
        client1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        steps1, tokens1, kinds1 = steps_metric(url)
        kinds = {k: [a - b for a, b in zip(kinds1[k], kinds0[k])] for k in kinds1}
        lat = {k: 1e3 * sec / max(n, 1) for k, (n, sec) in ((k, kinds.pop(k)) for k in LATENCIES)}
        # Where a server or client core saturates, that process bounds the throughput.
        util = {
            f"pid {p}" + (" (server)" if p == server.pid else ""): (cpu_seconds(p) - c) / wall
            for p, c in zip(procs, cpu0)
        }
        client = client1.ru_utime + client1.ru_stime - client0.ru_utime - client0.ru_stime
        util["load tester"] = client / wall
        steps = steps1 - steps0
        threads = busy_cores(engine_pid, threads0, thread_cpu_seconds(engine_pid), wall)
        print(
            f"HTTP: {steps:.0f} steps, {1e3 * wall / max(steps, 1):.2f} ms per step "
            f"({kinds_line(kinds)}), {(tokens1 - tokens0) / max(steps, 1):.1f} tokens per "
            "step; CPU of a core: "
            + ", ".join(f"{k} {v:.2f}" for k, v in util.items())
            + f"; engine threads: {threads}; engine-side means: TTFT {lat['ttft']:.1f} ms, "
            f"queued {lat['queue']:.1f} ms"
        )
        report = json.loads(out.read_text())
        print(client_line(report))
        return report | {"cpu_util": util, "steps": steps, "step_kinds": kinds}
    finally:
        server.terminate()
        server.wait(timeout=60)


def client_line(report: dict[str, Any]) -> str:
    """The load tester's processes and each one's CPU over the run, from its report: a
    process near a full core may be what limits the HTTP figure."""
    client = report["client"]
    cores = ", ".join(f"{p['cpu_cores']:.2f}" for p in client["per_process"])
    warn = " (busy: the client may limit the figure)" if client["warning"] else ""
    return f"HTTP client: {client['processes']} process(es), CPU of a core each: {cores}{warn}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--port", type=int, default=8177)
    ap.add_argument(
        "--client-processes",
        type=int,
        default=None,
        metavar="N",
        help="load tester processes (`moeserve bench serve --client-processes`); default 4 "
        "where CUDA is available (so that the client is not what limits a GPU server), "
        "else 1 (on a CPU machine more processes take cores from the server); at most "
        "--concurrency",
    )
    ap.add_argument("--tiny", action="store_true", help="toy shape in float32 (CPU smoke test)")
    ap.add_argument(
        "--servers",
        default="process",
        help="servers to run in turn: process (the default engine process) and "
        "thread (--no-engine-process), e.g. process,thread,process",
    )
    ap.add_argument(
        "--server-flags",
        default="",
        help="more `moeserve serve` flags for every server, e.g. '--admission-wait-steps 0'",
    )
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--py-spy",
        type=Path,
        default=None,
        metavar="DIR",
        help="profile the timed runs with py-spy (on PATH) and print each thread's samples: "
        "DIR/offline.txt (this process, second offline run), DIR/engine-MODE.txt (the "
        "server's engine process or, for thread, the server), DIR/server.txt (the server "
        "beside an engine process)",
    )
    args = ap.parse_args()
    if args.client_processes is None:
        import torch

        args.client_processes = min(4 if torch.cuda.is_available() else 1, args.concurrency)
    for mode in args.servers.split(","):
        if mode not in WHERE:
            raise SystemExit(f"--servers: {mode!r} is not one of {', '.join(WHERE)}")
    shape = "tiny" if args.tiny else "mixtral-8x7b"
    # The context of the GPU shape for both, so that the engine's max_model_len fits.
    path = synthetic_model(
        shape, tokenizer=True, num_hidden_layers=args.layers, max_position_embeddings=32768
    )
    dtype = "float32" if args.tiny else "bfloat16"
    work = random_workload(str(args.input_len), str(args.output_len), seed=0, tokenizer=str(path))
    prompts = [next(work).prompt or "" for _ in range(args.num_requests)]
    off_first = offline(path, prompts, args.output_len, args.concurrency, dtype)
    free_device()

    env = os.environ | {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    results: list[tuple[str, dict[str, Any]]] = []
    for mode in args.servers.split(","):
        results.append((mode, serve_and_load(args, path, dtype, env, mode == "thread")))
        print(
            f"HTTP at {args.concurrency} streams, engine in {WHERE[mode]}: "
            f"{results[-1][1]['output_throughput']:.0f} output tok/s"
        )
    # Offline again, and that run is the figure: the first engine of a process ran its timed
    # steps slower in every call on the GPU (benchmarks/RESULTS.md), while the servers warm
    # up with a load before they are timed.
    off = offline(path, prompts, args.output_len, args.concurrency, dtype, args.py_spy, closed=True)
    print(f"offline: first run {off_first:.0f}, second run {off:.0f} output tok/s")
    # The figure: the last server with the engine in its own process (the default).
    rep = next((r for m, r in reversed(results) if m == "process"), results[-1][1])
    http = rep["output_throughput"]
    for mode, r in results:
        print(
            f"HTTP at {args.concurrency} streams, engine in {WHERE[mode]}: "
            f"{r['output_throughput']:.0f} output tok/s = {r['output_throughput'] / off:.2f} "
            f"of offline (TTFT p90 {(r['ttft_ms']['p90'] or 0):.0f} ms)"
        )
        print(f"  {client_line(r)}")
    if args.py_spy:
        for profile in sorted(args.py_spy.glob("*.txt")):
            print(pyspy_summary(profile))
    if args.json:
        record = {
            "offline_tokens_per_s": off,
            "offline_first_run_tokens_per_s": off_first,
            "http_tokens_per_s": http,
            "ratio": http / off,
            "args": vars(args) | {"json": None, "py_spy": str(args.py_spy)},
            "loadtest": [dict(r, server=m) for m, r in results],
        }
        args.json.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
