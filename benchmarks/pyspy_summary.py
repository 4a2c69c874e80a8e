"""Summarise a py-spy raw profile (`py-spy record --threads --idle --native -f raw`) by thread.

For each thread: its samples, the share spent waiting for the GIL, waiting for the device, and
idle (blocked on a lock, a pipe or a socket), then its innermost Python frames by share.
`--under NAME` keeps only the samples whose stack holds a frame of that name (e.g.
`Engine._launch`); `--process TEXT` only the processes whose command line holds TEXT.

    python benchmarks/pyspy_summary.py engine.txt --under Engine.step --top 20
"""

from __future__ import annotations

import argparse
import gzip
import re
from collections import Counter, defaultdict
from pathlib import Path

PY_FRAME = re.compile(r"^(?P<func>.+) \((?P<file>[^()]*\.py):(?P<line>\d+)\)$")
# Native frames that say what a thread waits for (CPython 3.11-3.12, the CUDA runtime).
GIL_WAIT = ("take_gil", "PyEval_RestoreThread", "PyEval_AcquireThread", "PyGILState_Ensure")
DEVICE_WAIT = ("cudaStreamSynchronize", "cuStreamSynchronize", "cudaEventSynchronize",
               "cuEventSynchronize", "cudaDeviceSynchronize", "cudaMemcpy ", "cudaMemcpyAsync",
               "_local_scalar_dense", "cuMemcpyDtoH")  # fmt: skip
IDLE = ("pthread_cond_wait", "pthread_cond_timedwait", "sem_wait", "sem_timedwait", "epoll_wait",
        "poll (", "select (", "__poll", "recv", "read (", "clock_nanosleep", "time_sleep",
        "lock_PyThread_acquire_lock", "PyThread_acquire_lock_timed")  # fmt: skip


def parse(path: Path) -> list[tuple[str, str, list[str], int]]:
    """(process, thread, frames root first, samples) per distinct stack."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt") as f:  # type: ignore[operator]
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = stack.split(";")
            procs = [x for x in frames if x.startswith("process ")]
            threads = [x for x in frames if x.startswith("thread (")]
            rest = [x for x in frames if not x.startswith(("process ", "thread ("))]
            rows.append((procs[-1] if procs else "", threads[-1] if threads else "",
                         rest, int(count)))  # fmt: skip
    return rows


def category(frames: list[str]) -> str:
    """What the innermost Python frame's native callees are doing."""
    last_py = max((i for i, f in enumerate(frames) if PY_FRAME.match(f)), default=-1)
    native = frames[last_py + 1 :]
    if any(f.startswith(GIL_WAIT) for f in native):
        return "GIL wait"
    if any(any(d in f for d in DEVICE_WAIT) for f in native):
        return "device wait"
    if native and any(any(i in f for i in IDLE) for f in native[-4:]):
        return "blocked"
    return "running"


def innermost(frames: list[str]) -> str:
    for f in reversed(frames):
        m = PY_FRAME.match(f)
        if m:
            return f"{m['func']} ({Path(m['file']).name}:{m['line']})"
    return frames[-1] if frames else "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("profile", type=Path, help="py-spy raw output (.txt or .txt.gz)")
    ap.add_argument("--under", default=None, help="only stacks holding a frame of this name")
    ap.add_argument("--process", default=None, help="only processes whose command holds this")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--min-samples", type=int, default=20, help="threads with fewer are left out")
    args = ap.parse_args()
    per_thread: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    frames_of: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for proc, thread, frames, n in parse(args.profile):
        if args.process and args.process not in proc:
            continue
        if args.under and not any(f.startswith(args.under + " ") for f in frames):
            continue
        key = (proc.split(":", 1)[0], thread)
        cat = category(frames)
        per_thread[key][cat] += n
        frames_of[key][f"{cat:>11}  {innermost(frames)}"] += n
    for key, cats in sorted(per_thread.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(cats.values())
        if total < args.min_samples:
            continue
        shares = ", ".join(f"{c} {n / total:.0%}" for c, n in cats.most_common())
        print(f"\n{key[0]} {key[1]}: {total} samples ({shares})")
        for name, n in frames_of[key].most_common(args.top):
            print(f"  {n / total:6.1%}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
