"""One load-test run shared by several client processes (--client-processes N).

One process and one event loop can drive only so many streamed tokens a second; past that the
client, not the server, sets the figure. Here N worker processes each run loadtest.drive with
its own event loop and HTTP client, on a share of the run:
- --max-concurrency C: the streams dealt round-robin, C // N each, one more for the first C % N;
- requests: the run's workload stream (each worker makes it all from the seed and keeps its
  own), request i to the worker of stream i % C (i % N without a cap), so each worker's part
  of the requests is its part of the streams;
- --request-rate R, --burstiness: the run's one arrival schedule, drawn from the seed as in
  one process (every worker draws it all), each request sent at its time by its worker: the
  arrivals are the same for any N. (Independent streams at R / N would add up to Poisson at
  R only at burstiness 1, and a count-bounded run would end with the slowest of N streams.)
- --num-requests: the total; --duration: one deadline for all, from one shared start.
A share bounded by a count alone is made before the start: making prompts is not timed.
Times: every worker measures from one start time t0 on the time.perf_counter clock, which on
Linux is CLOCK_MONOTONIC (as time.monotonic is): one clock for the whole host, so readings
taken in different processes are comparable. Each worker's ready message carries its reading,
and the run stops if that is not between the parent's readings before the spawn and after.
The parent scrapes /metrics once before and once after, gathers the RequestResults and the
workers' own CPU times, and builds the same RunData as a run in one process.
Stopping: Ctrl-C in the parent (the workers ignore SIGINT), or a worker that fails or dies,
stops the others through their pipes: each cancels what is in flight and reports what it has.
Workers are joined with a timeout, then terminated; one whose parent is gone sees its pipe
close and stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import os
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import islice
from multiprocessing.connection import Connection, wait
from typing import Any

from moeserve.bench.loadtest import (
    api_client,
    arrival_times,
    drive,
    open_streams,
    progress_bar,
    run_async,
)
from moeserve.bench.records import ClientProcess, LoadTestConfig, RequestResult, RunData
from moeserve.bench.server_metrics import Snapshot, metrics_url_for, scrape
from moeserve.bench.workloads import RequestSpec

# Makes the run's request stream; picklable (a functools.partial of a workloads function), as
# every worker makes its own.
WorkloadFactory = Callable[[], Iterator[RequestSpec]]

START_MARGIN_S = 0.1  # from sending the start time to it: every worker is waiting by then
READY_TIMEOUT_S = 120.0  # spawn, imports and a count-bounded share's prompts
STOP_GRACE_S = 10.0  # a stopped worker cancels its requests and reports at once
POLL_S = 0.2  # the progress bar's refresh, and how soon a Ctrl-C is seen


@dataclass(frozen=True)
class Share:
    """Worker `index` of `processes`: its part of the run (see the module docstring)."""

    index: int
    processes: int
    cycle: int  # request i is this worker's when (i % cycle) % processes == index
    max_concurrency: int | None
    num_requests: int | None  # None: as many as arrive before --duration

    def config(self, cfg: LoadTestConfig) -> LoadTestConfig:
        """The run's config as this worker runs it: its share, no bar, no scrape."""
        return dataclasses.replace(
            cfg,
            max_concurrency=self.max_concurrency,
            num_requests=self.num_requests,
            client_processes=1,
            progress=False,
            scrape_metrics=False,
        )

    def owns(self, i: int) -> bool:
        return i % self.cycle % self.processes == self.index

    def requests(self, workload: Iterator[RequestSpec]) -> Iterator[tuple[int, RequestSpec]]:
        """Its requests of the run's stream, with their run-wide indices."""
        mine = ((i, spec) for i, spec in enumerate(workload) if self.owns(i))
        return islice(mine, self.num_requests)

    def arrivals(self, cfg: LoadTestConfig) -> Iterator[float]:
        """Its requests' times in the run's arrival schedule (the run's config)."""
        return (t for i, t in enumerate(arrival_times(cfg)) if self.owns(i))


def split(cfg: LoadTestConfig) -> list[Share]:
    """The run's shares among cfg.client_processes workers (LoadTestConfig refuses more
    processes than --max-concurrency or --num-requests)."""
    n, total = cfg.client_processes, cfg.num_requests
    # The C streams are dealt round-robin, and so are the requests over them: worker w runs
    # len(range(w, C, n)) streams and as large a part of the requests. Not i % n: 256
    # requests on 64 streams over 3 workers (22, 21, 21 streams) would go 86/85/85, four
    # rounds of a closed loop in one worker and five in the others, a tail of one request
    # each that a single process does not have.
    cycle = cfg.max_concurrency or n
    shares = []
    for w in range(n):
        streams = len(range(w, cycle, n))
        num = None
        if total is not None:
            num = total // cycle * streams + len(range(w, total % cycle, n))
        conc = None if cfg.max_concurrency is None else streams
        shares.append(Share(w, n, cycle, conc, num))
    return shares


@dataclass
class WorkerReport:
    """What a worker sends back: its requests, when its last one ended or it was stopped
    (perf_counter), and the CPU (user + sys) it used from the start."""

    index: int
    pid: int
    results: list[RequestResult]
    end: float
    cpu_s: float


@dataclass(frozen=True)
class ProcessRun:
    """A run of several client processes: its data and, if it was cut short, why (the
    worker that failed, or Ctrl-C) and the exit status that says so."""

    run: RunData
    failure: str | None = None
    exit_status: int = 0


# ---------------------------------------------------------------------------- in the worker
@dataclass(frozen=True)
class _Job:
    """What a worker is given (pickled to it): its share, its config, the model, the workload."""

    share: Share
    cfg: LoadTestConfig
    model: str
    workload: WorkloadFactory


def _worker_main(job: _Job, conn: Connection, counts: Any) -> None:
    """A worker process's entry: ready -> wait for the start -> drive its share -> report."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops us
    try:
        conn.send(("done", run_async(_work(job, conn, counts))))
    except (BrokenPipeError, EOFError, ConnectionResetError):
        pass  # the parent is gone: nobody to report to
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("failed", traceback.format_exc(limit=-4)))
        raise


async def _work(job: _Job, conn: Connection, counts: Any) -> WorkerReport:
    share, cfg, model = job.share, job.cfg, job.model
    requests: Iterator[tuple[int, RequestSpec]] = share.requests(job.workload())
    if cfg.duration is None:  # a count-bounded share is made before the start: not timed
        requests = iter(list(requests))
    results: list[RequestResult] = []

    def on_end(res: RequestResult) -> None:  # for the parent's progress bar, no syscall
        counts[2 * share.index] += 1
        counts[2 * share.index + 1] += res.error is not None

    loop = asyncio.get_running_loop()
    async with api_client(cfg) as client:
        streams = open_streams(cfg, client)
        try:
            conn.send(("ready", time.perf_counter()))
            t0 = conn.recv()  # blocks, but nothing runs on this loop yet
            if t0 is None:  # stopped before the start
                return WorkerReport(share.index, os.getpid(), [], time.perf_counter(), 0.0)
            cpu0 = time.process_time()
            arrivals = share.arrivals(cfg)
            work = drive(
                streams, cfg, requests, model, results, on_end=on_end, t0=t0, arrivals=arrivals
            )
            task = asyncio.ensure_future(work)

            def stop() -> None:  # a message from the parent, or its end of the pipe closed
                loop.remove_reader(conn.fileno())
                task.cancel()

            loop.add_reader(conn.fileno(), stop)
            try:
                _, end = await task
            except asyncio.CancelledError:  # told to stop: what it sent is reported
                end = time.perf_counter()
            finally:
                loop.remove_reader(conn.fileno())
                # uvloop's add_reader leaves the socket non-blocking: a report larger than its
                # buffer would then fail to send (EAGAIN) instead of waiting for the parent.
                os.set_blocking(conn.fileno(), True)
            cpu = time.process_time() - cpu0
        finally:
            await streams.aclose()
    return WorkerReport(share.index, os.getpid(), results, end, cpu)


# ---------------------------------------------------------------------------- in the parent
@dataclass
class _Worker:
    share: Share
    process: Any  # a multiprocessing spawn Process
    conn: Connection
    spawned_at: float  # perf_counter before it started: its clock reading must be later
    ready: bool = False
    over: bool = False  # reported, failed or gone
    report: WorkerReport | None = None


def run_processes(cfg: LoadTestConfig, workload: WorkloadFactory, name: str) -> ProcessRun:
    """Run the load test on cfg.client_processes worker processes; cfg.model must name the
    model (the parent asks /v1/models once). ValueError for a workload that cannot start."""
    if cfg.model is None:
        raise ValueError("run_processes needs the model's name (cfg.model)")
    next(workload())  # a bad file or task list: the message here, before any process starts
    # spawn, not fork: a forked child would inherit this process's threads' locks (tqdm's
    # monitor, a caller's) and any event loop or httpx state, in whatever state they were.
    ctx = multiprocessing.get_context("spawn")
    counts = ctx.Array("q", 2 * cfg.client_processes, lock=False)  # done, failed per worker
    workers: list[_Worker] = []
    try:
        with _sigint_flag() as interrupted:
            for share in split(cfg):
                parent_end, child_end = ctx.Pipe()
                process = ctx.Process(
                    target=_worker_main,
                    args=(_Job(share, share.config(cfg), cfg.model, workload), child_end, counts),
                    name=f"moeserve-bench-client-{share.index}",
                    daemon=True,  # multiprocessing's exit handler also ends it
                )
                spawned_at = time.perf_counter()
                process.start()
                child_end.close()  # the child's now: a dead child reads as EOF here
                workers.append(_Worker(share, process, parent_end, spawned_at))
            return _Parent(cfg, workers, counts, interrupted).run(name)
    finally:
        _reap(workers)


class _Parent:
    """The parent's side of a run: start the workers together, watch them, gather."""

    def __init__(
        self, cfg: LoadTestConfig, workers: list[_Worker], counts: Any, interrupted: Any
    ) -> None:
        self.cfg, self.workers, self.counts, self.interrupted = cfg, workers, counts, interrupted
        self.failure: str | None = None
        self.exit_status = 0
        self.stop_by: float | None = None  # monotonic: stragglers are terminated after it

    def run(self, name: str) -> ProcessRun:
        ready_by = time.monotonic() + READY_TIMEOUT_S
        while not all(w.ready or w.over for w in self.workers) and self.failure is None:
            self.poll()
            if time.monotonic() > ready_by:
                slow = [w.share.index for w in self.workers if not w.ready]
                self.fail(f"client process(es) {slow} not ready after {READY_TIMEOUT_S:g} s")
        before = self.scrape()
        started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        t0 = time.perf_counter() + START_MARGIN_S
        if self.failure is None:
            for w in self.workers:
                with contextlib.suppress(OSError):  # one just gone: poll() tells
                    w.conn.send(t0)
        bar = progress_bar(self.cfg.num_requests, self.cfg.progress)
        try:
            while not all(w.over for w in self.workers):
                self.poll()
                done, failed = sum(self.counts[0::2]), sum(self.counts[1::2])
                bar.update(done - bar.n)
                bar.set_postfix(failed=failed, refresh=False)
                if self.stop_by is not None and time.monotonic() > self.stop_by:
                    break  # the stragglers are terminated (_reap)
        finally:
            bar.close()
        after = self.scrape()
        reports = sorted((w.report for w in self.workers if w.report), key=lambda r: r.index)
        results = sorted((r for rep in reports for r in rep.results), key=lambda r: r.index)
        end = max((rep.end for rep in reports), default=t0)
        clients = [ClientProcess(r.index, len(r.results), r.cpu_s, r.pid) for r in reports]
        duration = max(0.0, end - t0)
        model = self.cfg.model or ""
        data = RunData(self.cfg, model, name, started_at, duration, results, before, after, clients)
        return ProcessRun(data, self.failure, self.exit_status)

    def scrape(self) -> Snapshot | None:
        cfg = self.cfg

        async def get() -> Snapshot | None:
            async with api_client(cfg) as client:
                return await scrape(client, cfg.metrics_url or metrics_url_for(cfg.base_url))

        return asyncio.run(get()) if cfg.scrape_metrics else None

    def fail(self, message: str, exit_status: int = 1) -> None:
        """End the run: the first reason is the one reported; the workers are told to stop."""
        if self.failure is None:
            self.failure, self.exit_status = message, exit_status
        if self.stop_by is None:
            self.stop_by = time.monotonic() + STOP_GRACE_S
            for w in self.workers:
                if not w.over:
                    with contextlib.suppress(OSError):
                        w.conn.send(None)

    def poll(self) -> None:
        """Take what the workers sent, or note how they ended, waiting POLL_S at most."""
        live = [w for w in self.workers if not w.over]
        ready = wait([w.conn for w in live] + [w.process.sentinel for w in live], POLL_S)
        for w in live:
            if w.conn in ready or w.process.sentinel in ready:
                self.take(w)
        if self.interrupted():
            self.fail(
                "interrupted (Ctrl-C): the report has the requests sent until then; those in "
                "flight count as failed (cancelled)",
                130,
            )

    def take(self, w: _Worker) -> None:
        who = f"client process {w.share.index} (pid {w.process.pid})"
        try:
            if not w.conn.poll():
                if w.process.is_alive():
                    return
                raise EOFError
            kind, payload = w.conn.recv()
        except (EOFError, OSError):
            w.over = True
            w.process.join(1.0)
            self.fail(
                f"{who} exited with code {w.process.exitcode} before it reported: its "
                "requests are not in the report"
            )
            return
        if kind == "ready":
            w.ready = True
            if not w.spawned_at <= payload <= time.perf_counter():
                self.fail(
                    f"{who}: its time.perf_counter clock is not this process's, so times "
                    "cannot be compared across client processes here; use --client-processes 1"
                )
        elif kind == "done":
            w.over, w.report = True, payload
        else:  # "failed": its traceback
            w.over = True
            self.fail(f"{who} failed:\n{payload}")


@contextlib.contextmanager
def _sigint_flag() -> Iterator[Callable[[], bool]]:
    """While the run lasts, a first Ctrl-C sets a flag the parent polls (it then stops the
    workers and reports what they sent); a second one raises KeyboardInterrupt as usual."""
    hits = [0]

    def handler(signum: int, frame: Any) -> None:
        hits[0] += 1
        if hits[0] > 1:
            raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: Ctrl-C is not this run's to take
        yield lambda: False
        return
    try:
        yield lambda: hits[0] > 0
    finally:
        signal.signal(signal.SIGINT, previous)


def _reap(workers: list[_Worker]) -> None:
    """No worker outlives the run: join each for a moment, then terminate, then kill."""
    by = time.monotonic() + 5.0
    for w in workers:
        w.process.join(max(0.0, by - time.monotonic()))
    for w in workers:
        if w.process.is_alive():
            w.process.terminate()
            w.process.join(2.0)
        if w.process.is_alive():
            w.process.kill()
            w.process.join()
        w.conn.close()
