"""Garbage-collector pauses in `moeserve serve` under load, with and without the startup freeze.

Starts the server on a toy model (any machine) with a gc callback in the server process and in
the engine process that records every collection (generation, milliseconds), drives it with
the load tester, stops it, and prints per process and generation: collections, total and
longest pause. `--no-freeze` serves without runtime.freeze_startup_heap, for the comparison.
A full (generation 2) collection stops the process for as long as it takes to walk every
tracked object; in the server that holds every stream's next chunk, in the engine its steps.

    python benchmarks/gc_pauses.py --requests 512
    python benchmarks/gc_pauses.py --requests 512 --no-freeze
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._proc import wait_ready  # noqa: E402
from benchmarks.http_vs_offline import model_dir  # noqa: E402


def record_gc(path: str, process: str) -> None:
    """Append `process gen ms` to `path` for every collection in this process."""
    import gc

    started: list[float] = []

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            ms = 1e3 * (time.perf_counter() - started.pop())
            with open(path, "a") as f:
                f.write(f"{process} {info['generation']} {ms:.3f}\n")

    gc.callbacks.append(callback)


def serve(log: str, freeze: bool, argv: list[str]) -> int:
    """`moeserve serve argv`, recording collections in both processes (and no freeze if
    not `freeze`)."""
    import logging

    import moeserve.server.state as state
    from moeserve.cli import build_parser, engine_config
    from moeserve.server.serve import run

    if not freeze:  # the server's freeze; the engine process's is undone by _engine_setup
        state.freeze_startup_heap = lambda where: 0
    record_gc(log, "server")
    args = build_parser().parse_args(["serve", *argv])
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    setup = functools.partial(_engine_setup, log, freeze)
    return run(args, engine_config(args), engine_setup=setup)


def _engine_setup(log: str, freeze: bool) -> None:
    """In the engine process, before the model loads."""
    import moeserve.engine.worker as worker

    if not freeze:
        worker.freeze_startup_heap = lambda where: 0
    record_gc(log, "engine")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--no-freeze", action="store_true", help="serve without the startup freeze")
    ap.add_argument("--port", type=int, default=8183)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    path = model_dir(1, tiny=True)
    log = Path(tempfile.mkdtemp()) / "gc.txt"
    flags = ["--model", str(path), "--port", str(args.port), "--load-format", "dummy",
             "--dtype", "float32", "--max-model-len", "512", "--kv-cache-memory", "64MiB",
             "--max-num-seqs", str(args.concurrency)]  # fmt: skip
    code = ("import sys; from benchmarks.gc_pauses import serve; "
            f"sys.exit(serve({str(log)!r}, {not args.no_freeze}, {flags!r}))")  # fmt: skip
    server = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{args.port}"
    try:
        wait_ready(url, server, 120)
        log.write_text("")  # startup's collections (and the freeze's own) are not counted
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "moeserve.cli", "bench", "serve", "--base-url", url,
             "--tokenizer", str(path), "--input-len", "32", "--output-len",
             str(args.output_len), "--ignore-eos", "--max-concurrency", str(args.concurrency),
             "--num-requests", str(args.requests), "--no-progress"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        wall = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=60)
    pauses: dict[tuple[str, int], list[float]] = defaultdict(list)
    for line in log.read_text().splitlines():
        process, gen, ms = line.split()
        pauses[(process, int(gen))].append(float(ms))
    mode = "without the freeze" if args.no_freeze else "with the startup freeze"
    print(f"{args.requests} requests at {args.concurrency} streams in {wall:.1f} s, {mode}:")
    record = {}
    for (process, gen), ms in sorted(pauses.items()):
        print(f"  {process:7s} gen {gen}: {len(ms):5d} collections, {sum(ms):8.1f} ms in all, "
              f"longest {max(ms):6.1f} ms")  # fmt: skip
        record[f"{process}/gen{gen}"] = {"count": len(ms), "total_ms": sum(ms), "max_ms": max(ms)}
    if args.json:
        args.json.write_text(json.dumps({"freeze": not args.no_freeze, "wall_s": wall,
                                         "pauses": record}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
