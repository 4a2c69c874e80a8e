"""CPU the server's event loop spends per request and per streamed token (any machine).

`moeserve serve --no-engine-process` on a toy model (the engine steps in a thread of the same
process, so the main thread is the event loop alone), driven by the load tester: first
--requests requests of one output token (the per-request cost: parse, validate, admit,
tokenise, submit, the response's start, one token chunk, usage, [DONE], the access log), then
as many of --tokens tokens (the difference, per extra token, is the cost of one SSE chunk).
Prints the event loop's CPU microseconds per request and per chunk; writes JSON.

    python benchmarks/server_overhead.py --requests 300
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._proc import thread_cpu_seconds, wait_ready  # noqa: E402
from benchmarks.http_vs_offline import PySpy, model_dir  # noqa: E402


def loop_cpu(pid: int) -> float:
    """CPU seconds of the server's main thread (its event loop)."""
    return thread_cpu_seconds(pid).get(pid, 0.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--tokens", type=int, default=33, help="output tokens of the second run")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--port", type=int, default=8179)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--py-spy", type=Path, default=None, metavar="FILE",
                    help="a py-spy raw profile of the server over the one-token run")
    args = ap.parse_args()
    path = model_dir(1, tiny=True)
    url = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen([
        sys.executable, "-m", "moeserve.cli", "serve", "--model", str(path), "--port",
        str(args.port), "--load-format", "dummy", "--dtype", "float32", "--max-model-len", "512",
        "--kv-cache-memory", "64MiB", "--no-engine-process",
    ], stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_ready(url, server, 120)
        out = Path(tempfile.mkdtemp()) / "load.json"

        def load(n: int, tokens: int) -> tuple[float, dict]:
            """Event-loop CPU seconds over n requests of `tokens` tokens, and the report."""
            before = loop_cpu(server.pid)
            subprocess.run(
                [sys.executable, "-m", "moeserve.cli", "bench", "serve", "--base-url", url,
                 "--tokenizer", str(path), "--input-len", "32", "--output-len", str(tokens),
                 "--ignore-eos", "--max-concurrency", str(args.concurrency), "--num-requests",
                 str(n), "--no-progress", "--result-json", str(out)],
                check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            return loop_cpu(server.pid) - before, json.loads(out.read_text())

        load(20, 2)  # warm-up
        spy_dir, spy_name = (args.py_spy.parent, args.py_spy.stem) if args.py_spy else (None, "")
        with PySpy(spy_dir, spy_name, server.pid, rate=1000, native=False):
            one, rep1 = load(args.requests, 1)
        many, rep2 = load(args.requests, args.tokens)
    finally:
        server.terminate()
        server.wait(timeout=60)
    per_request = one / args.requests
    per_chunk = (many - one) / (args.requests * (args.tokens - 1))
    ttft = rep1["ttft_ms"]["mean"]
    print(f"event loop CPU: {1e6 * per_request:.0f} us per request (one token), "
          f"{1e6 * per_chunk:.1f} us per further token chunk; "
          f"TTFT mean {ttft:.1f} ms at concurrency {args.concurrency}")  # fmt: skip
    if args.json:
        record = {"us_per_request": 1e6 * per_request, "us_per_chunk": 1e6 * per_chunk,
                  "args": vars(args) | {"json": None}}  # fmt: skip
        args.json.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
