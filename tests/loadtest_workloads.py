"""Workloads for the client-process tests. Spawned workers import this module to make their
request stream: it imports nothing heavy (no torch, no server)."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator

from moeserve.bench.workloads import RequestSpec, random_workload

CRASH_EXIT_CODE = 3


def fails_in_client_1(at: int, how: str = "exit") -> Iterator[RequestSpec]:
    """Short random prompts; in client process 1, when it makes request `at` of the run's
    stream, the process exits (code 3, how="exit") or the stream raises (how="raise"): a
    worker that fails in the middle of a run."""
    failing = multiprocessing.current_process().name == "moeserve-bench-client-1"
    for i, spec in enumerate(random_workload("4", "8", seed=0)):
        if failing and i == at:
            if how == "exit":
                os._exit(CRASH_EXIT_CODE)
            raise RuntimeError(f"no request {i} today")
        yield spec
