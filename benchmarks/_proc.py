"""Process and thread CPU time, and a server's readiness, for the benchmarks that start
servers and split a run's CPU between processes."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx


def _stat_cpu(stat: Path) -> float | None:
    """utime + stime from a /proc stat file, None where it is gone."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (Linux /proc), 0 where it is gone or elsewhere."""
    return _stat_cpu(Path(f"/proc/{pid}/stat")) or 0.0


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """utime + stime of each thread of a live process, by thread id (the main thread's is pid)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        cpu = _stat_cpu(task / "stat")
        if cpu is not None:
            out[int(task.name)] = cpu
    return out


def busy_cores(pid: int, before: dict[int, float], after: dict[int, float], wall: float,
               top: int = 4) -> str:  # fmt: skip
    """'main 0.95, 1234 0.30, ...': the busiest threads of process `pid` (its main thread's id
    is the pid) and their cores over a run of `wall` seconds."""
    used = sorted(((t, (c - before.get(t, 0.0)) / wall) for t, c in after.items()),
                  key=lambda tc: -tc[1])[:top]  # fmt: skip
    return ", ".join(f"{'main' if t == pid else t} {u:.2f}" for t, u in used)


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
