"""Process CPU time for the benchmarks that split a run's CPU between processes."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (Linux /proc), 0 where it is gone or elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """utime + stime of each thread of a live process, by thread id (the main thread's is pid)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def busy_cores(before: dict[int, float], after: dict[int, float], wall: float,
               top: int = 4) -> str:  # fmt: skip
    """'main 0.95, 1234 0.30, ...': the busiest threads' cores over a run of `wall` seconds."""
    main = min(after, default=0)  # the main thread's id is the process id, the lowest
    used = sorted(((t, (c - before.get(t, 0.0)) / wall) for t, c in after.items()),
                  key=lambda tc: -tc[1])[:top]  # fmt: skip
    return ", ".join(f"{'main' if t == main else t} {u:.2f}" for t, u in used)
