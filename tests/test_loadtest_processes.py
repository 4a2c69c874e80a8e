"""`moeserve bench serve --client-processes N`: one run shared by N spawned client processes.

The split of the run (streams, requests, arrivals) and the client CPU warning are checked as
units; a real server on 127.0.0.1 (the demo model, as in test_loadtest.py) takes runs of a
few dozen short requests from three processes: whole, cut short by a worker that dies, and by
Ctrl-C. A fast scripted server in a thread serves reports larger than a pipe holds, and a
worker that raises.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import multiprocessing
import os
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from moeserve.assets import demo_model_path
from moeserve.bench import processes
from moeserve.bench.loadtest import arrival_times
from moeserve.bench.processes import ProcessRun, run_processes, split
from moeserve.bench.records import ClientProcess, LoadTestConfig, RequestResult, RunData
from moeserve.bench.report import build_report, format_report
from moeserve.bench.workloads import RequestSpec, random_workload
from moeserve.cli import main
from tests.loadtest_workloads import CRASH_EXIT_CODE, fails_in_client_1
from tests.server_fixture import MODEL_NAME, RunningServer, serving
from tests.test_loadtest import DONE, HEAD_200, _chunked, _event, bench

URL = "http://127.0.0.1:1"  # nobody listens: for what must be refused before any request
TOKENS = 8000  # per reply of the fast server: 4 requests make a report of some 600 kB


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    yield from serving(demo_model_path(), max_model_len=None)


def _numbered() -> Iterator[RequestSpec]:
    for i in itertools.count():
        yield RequestSpec("completions", 1 + i % 5, prompt=f"request {i}")


def test_the_split_of_a_run() -> None:
    cfg = LoadTestConfig(
        URL, num_requests=12, max_concurrency=5, request_rate=10.0, client_processes=2, seed=7
    )
    shares = split(cfg)
    assert [s.max_concurrency for s in shares] == [3, 2]  # C // N, the first C % N one more
    # The requests go with the streams: request i to the worker of stream i % C.
    assert [s.num_requests for s in shares] == [7, 5]  # --num-requests is the total
    taken = [list(s.requests(_numbered())) for s in shares]
    assert [[i for i, _ in t] for t in taken] == [[0, 2, 4, 5, 7, 9, 10], [1, 3, 6, 8, 11]]
    # The same specs as the run's one stream.
    assert all(spec.prompt == f"request {i}" for t in taken for i, spec in t)
    # Each process runs its share with its own config; the run's bounds stay the run's.
    worker = shares[1].config(cfg)
    assert (worker.max_concurrency, worker.num_requests, worker.request_rate) == (2, 5, 10.0)
    assert (worker.client_processes, worker.progress, worker.scrape_metrics) == (1, False, False)
    # Arrivals: the run's one schedule, each request at its time in its process.
    schedule = list(itertools.islice(arrival_times(cfg), 12))
    assert len(set(schedule)) == 12 and schedule[0] == 0.0
    for share, t in zip(shares, taken):
        mine = list(itertools.islice(share.arrivals(share.config(cfg)), len(t)))
        assert mine == [schedule[i] for i, _ in t]

    # A closed loop of 256 requests on 64 streams: every process runs four rounds.
    shares = split(LoadTestConfig(URL, num_requests=256, max_concurrency=64, client_processes=3))
    assert [(s.max_concurrency, s.num_requests) for s in shares] == [(22, 88), (21, 84), (21, 84)]
    # Whatever the numbers: every request once, the caps adding up to the run's.
    for total, cap, n in itertools.product((1, 7, 64, 100), (None, 3, 8, 64), (1, 2, 3)):
        if n > total or (cap is not None and n > cap):
            continue
        cfg = LoadTestConfig(URL, num_requests=total, max_concurrency=cap, client_processes=n)
        shares = split(cfg)
        taken = [[i for i, _ in s.requests(_numbered())] for s in shares]
        assert sorted(itertools.chain(*taken)) == list(range(total))
        assert [len(t) for t in taken] == [s.num_requests for s in shares]
        assert cap is None or sum(s.max_concurrency or 0 for s in shares) == cap

    # Without a cap: i % N; with --duration alone, no count either.
    shares = split(LoadTestConfig(URL, duration=5, request_rate=8.0, client_processes=4))
    assert {(s.max_concurrency, s.num_requests) for s in shares} == {(None, None)}
    assert [i for i, _ in itertools.islice(shares[3].requests(_numbered()), 3)] == [3, 7, 11]


def test_more_processes_than_streams_or_requests_are_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rc = main(
        [
            "bench",
            "serve",
            "--base-url",
            URL,
            "--client-processes",
            "4",
            "--max-concurrency",
            "2",
            "--num-requests",
            "24",
            "--no-progress",
        ]
    )
    assert rc == 2
    assert (
        "--client-processes 4 is more than --max-concurrency 2: each client process needs "
        "one stream at least"
    ) in capsys.readouterr().err
    with pytest.raises(ValueError, match="more than --num-requests 3"):
        LoadTestConfig(URL, num_requests=3, client_processes=4)
    for n in (0, 65):
        with pytest.raises(ValueError, match="--client-processes must be in 1..64"):
            LoadTestConfig(URL, num_requests=100, client_processes=n)


def test_a_busy_client_process_is_named_in_a_warning() -> None:
    cfg = LoadTestConfig(URL, num_requests=2, client_processes=2)
    clients = [ClientProcess(0, 1, 2.0, 100), ClientProcess(1, 1, 9.0, 101)]
    rep = build_report(RunData(cfg, "m", "t", "2026-12-03", 10.0, [], clients=clients))
    client = rep["client"]
    assert [(p["pid"], p["cpu_cores"]) for p in client["per_process"]] == [(100, 0.2), (101, 0.9)]
    assert client["warning"].startswith("client process 1 used 0.90 of a core over the run")
    [row] = [r for r in format_report(rep).splitlines() if r.startswith("Client CPU")]
    assert row.split() == ["Client", "CPU,", "busiest", "process", "(cores):", "0.900"]
    clients = [ClientProcess(0, 1, 2.0), ClientProcess(1, 1, 8.0)]
    rep = build_report(RunData(cfg, "m", "t", "2026-12-03", 10.0, [], clients=clients))
    assert rep["client"]["warning"] is None  # 0.8 of a core is still fine


def _peak(results: list[dict[str, Any]]) -> int:
    """The most requests in flight at once, from their send and end times."""
    events = sorted([(r["sent"], 1) for r in results] + [(r["ended"], -1) for r in results])
    return max(itertools.accumulate(step for _, step in events))


def _no_workers_left(pids: list[int]) -> bool:
    return not multiprocessing.active_children() and not any(
        Path(f"/proc/{pid}").exists() for pid in pids
    )


def test_three_client_processes_share_a_run(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = "--num-requests 24 --max-concurrency 6 --input-len uniform:1:4 --output-len "
    flags += "uniform:1:3 --ignore-eos --seed 5"
    rc, rep = bench(server, tmp_path, *flags.split(), "--client-processes", "3")
    assert rc == 0, capsys.readouterr().err
    assert (rep["num_requests"], rep["completed"], rep["failed"]) == (24, 24, 0)
    reqs = rep["requests"]
    assert [r["index"] for r in reqs] == list(range(24))  # none sent twice, none lost
    # What the server counted is what the three clients saw, together.
    assert rep["server"]["generation_tokens"] == rep["total_output_tokens"]
    # One clock: every time is from the shared start, within the run; and each process kept
    # to its share of --max-concurrency (2), so the run to 6.
    assert all(0 <= r["sent"] <= r["ended"] <= rep["duration_s"] for r in reqs)
    assert _peak(reqs) <= 6
    assert all(_peak([r for r in reqs if r["index"] % 3 == w]) <= 2 for w in range(3))
    client = rep["client"]
    assert client["processes"] == rep["config"]["client_processes"] == 3
    per = client["per_process"]
    assert [(p["index"], p["requests"]) for p in per] == [(0, 8), (1, 8), (2, 8)]
    assert all(p["cpu_s"] > 0 and p["cpu_cores"] >= 0 for p in per)
    pids = [p["pid"] for p in per]
    assert len(set(pids)) == 3 and os.getpid() not in pids
    assert _no_workers_left(pids)
    assert "Client processes:" in capsys.readouterr().out

    # The same seed makes the same requests as in one process: request i is the stream's i-th.
    stream = random_workload("uniform:1:4", "uniform:1:3", seed=5)
    assert [(r["input_len"], r["max_tokens"]) for r in reqs] == [
        (s.input_len, s.max_tokens) for s in itertools.islice(stream, 24)
    ]


def _cfg(server: RunningServer, **kw: Any) -> LoadTestConfig:
    return LoadTestConfig(
        server.url,
        model=MODEL_NAME,
        max_concurrency=3,
        client_processes=3,
        ignore_eos=True,
        progress=False,
        scrape_metrics=False,
        **kw,
    )


def _check_cut_short(out: ProcessRun, from_workers: set[int]) -> list[RequestResult]:
    results = out.run.results
    assert {r.index % 3 for r in results} <= from_workers
    assert [r.index for r in results] == sorted({r.index for r in results})
    # Each either completed, or was in flight when the run stopped.
    assert all(r.success or r.error == "cancelled: the run was stopped" for r in results)
    assert _no_workers_left([c.pid for c in out.run.clients if c.pid is not None])
    return results


def test_a_worker_that_dies_ends_the_run(server: RunningServer) -> None:
    # --duration: the requests are made as they are sent, so process 1 dies mid-run, when it
    # makes its third (request 7 of the run's stream).
    cfg = _cfg(server, num_requests=60, duration=120)
    out = run_processes(cfg, functools.partial(fails_in_client_1, 7), "t")
    assert out.exit_status == 1 and out.failure is not None
    assert out.failure.startswith("client process 1 (pid ")
    assert f"exited with code {CRASH_EXIT_CODE} before it reported" in out.failure
    results = _check_cut_short(out, {0, 2})
    assert [c.index for c in out.run.clients] == [0, 2]
    assert len(results) < 40  # processes 0 and 2 were stopped before their 20 each


def test_ctrl_c_ends_the_run_with_what_was_sent(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Bar:  # the parent's progress bar, updated as requests end: Ctrl-C after three
        n = 0

        def update(self, k: int) -> None:
            if self.n < 3 <= self.n + k:  # once: a second Ctrl-C raises KeyboardInterrupt
                os.kill(os.getpid(), signal.SIGINT)
            self.n += k

        def set_postfix(self, **kw: Any) -> None: ...

        def close(self) -> None: ...

    monkeypatch.setattr(processes, "progress_bar", lambda *args: Bar())
    cfg = _cfg(server, num_requests=60)
    handler = signal.getsignal(signal.SIGINT)
    out = run_processes(cfg, functools.partial(fails_in_client_1, -1), "t")  # none dies
    assert out.exit_status == 130 and out.failure is not None
    assert out.failure.startswith("interrupted (Ctrl-C)")
    results = _check_cut_short(out, {0, 1, 2})
    assert 3 <= sum(r.success for r in results) < 60
    assert [c.index for c in out.run.clients] == [0, 1, 2]  # each stopped and reported
    # The parent's own Ctrl-C handling lasts as long as the run.
    assert signal.getsignal(signal.SIGINT) is handler


@pytest.fixture
def fast_server() -> Iterator[str]:
    """A server on 127.0.0.1, in a thread, whose every reply streams TOKENS events at once:
    requests that end in milliseconds, with thousands of timed tokens each."""
    reply = HEAD_200 + _chunked(*[_event("a")] * TOKENS, DONE)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
                writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        server.close()
        loop.close()


def test_reports_larger_than_a_pipe_buffer_arrive_whole(fast_server: str) -> None:
    """Each process's report (its requests' token times, pickled) is larger than what a pipe
    holds: it waits for the parent to read it, the event loop that watched the pipe gone."""
    cfg = LoadTestConfig(
        fast_server,
        model="m",
        num_requests=12,
        max_concurrency=3,
        client_processes=3,
        progress=False,
        scrape_metrics=False,
    )
    out = run_processes(cfg, functools.partial(random_workload, "4", "8", seed=0), "t")
    assert out.failure is None and out.exit_status == 0
    assert [r.index for r in out.run.results] == list(range(12))
    assert all(r.success and len(r.chunk_times) == TOKENS for r in out.run.results)


def test_a_worker_that_raises_ends_the_run_with_its_traceback(fast_server: str) -> None:
    cfg = LoadTestConfig(
        fast_server,
        model="m",
        num_requests=30,
        duration=60,
        max_concurrency=3,
        client_processes=3,
        progress=False,
        scrape_metrics=False,
    )
    out = run_processes(cfg, functools.partial(fails_in_client_1, 7, "raise"), "t")
    assert out.exit_status == 1 and out.failure is not None
    assert out.failure.startswith("client process 1 (pid ") and " failed:\n" in out.failure
    assert "RuntimeError: no request 7 today" in out.failure
    assert {r.index % 3 for r in out.run.results} <= {0, 2}
    assert [c.index for c in out.run.clients] == [0, 2]
