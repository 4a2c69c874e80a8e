#!/usr/bin/env python3
"""CPU cost of the load tester's client per SSE event, against a fake server in another process.

The fake server (raw asyncio, no uvicorn) answers POST /v1/completions with moeserve's stream,
byte for byte: a chunk per token from moeserve's own ChunkTemplate, the last one with its
finish_reason, the usage chunk when stream_options.include_usage asks, then [DONE], all in
HTTP/1.1 chunked encoding, one chunk per event as uvicorn writes them. Each server step writes
one token to every open stream (a decode step of a batch); with --rate the steps are paced to
that many events/s in all, else they run as fast as the sockets take them.

The client is `run_load` itself (closed loop, --streams in flight), for each --http-client in
--clients (httpx: the load tester's old path) on each event loop in --loops, timed with
process_time in this process; the server's CPU is its own process's. Reported: events/s
(every SSE event: the tokens, usage and [DONE]), client CPU milliseconds per 1000 events (=
microseconds per event) and the client's and server's core shares.

    python benchmarks/sse_client_bench.py --streams 64 --tokens 256 --requests 640
    python benchmarks/sse_client_bench.py --streams 64 --rate 10000 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._proc import cpu_seconds  # noqa: E402
from moeserve.bench.loadtest import LoadTestConfig, run_load  # noqa: E402
from moeserve.bench.workloads import RequestSpec  # noqa: E402

MODEL = "fake-moe"
HIGH_WATER = 64 * 1024  # a stream's unsent bytes at which the server skips it (backpressure)


# ---- the fake server (its own process: `--serve`) ----


class _Stream:
    """One open SSE response: the events still to write."""

    def __init__(self, conn: _Conn, body: dict[str, Any]) -> None:
        from moeserve.server.protocol import CompletionResponse, UsageInfo
        from moeserve.server.streaming import DONE, ChunkTemplate, sse

        cid, created = f"cmpl-{id(self):x}", int(time.time())
        self.conn, self.left = conn, int(body.get("max_tokens") or 16)
        self.template = ChunkTemplate(
            {"id": cid, "object": "text_completion", "created": created, "model": MODEL}, "text"
        )
        self.token = self.template.render(0, "x", None)
        self.tail = [DONE]
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = UsageInfo(prompt_tokens=4, completion_tokens=self.left,
                              total_tokens=4 + self.left)  # fmt: skip
            self.tail.insert(0, sse(CompletionResponse(
                id=cid, created=created, model=MODEL, choices=[], usage=usage).model_dump()))

    def step(self) -> bool:
        """Write the next token (and after the last one the tail); True when finished."""
        self.left -= 1
        if self.left > 0:
            self.conn.write_chunk(self.token)
            return False
        self.conn.write_chunk(self.template.render(0, "x", "length"))
        for event in self.tail:
            self.conn.write_chunk(event)
        self.conn.transport.write(b"0\r\n\r\n")
        return True


class _Server:
    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.streams: list[_Stream] = []
        self.wake = asyncio.Event()

    async def stepper(self) -> None:
        """Each step writes one event to every stream whose socket takes it."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            if not self.streams:
                self.wake.clear()
                await self.wake.wait()
                next_at = loop.time()
            ready = [s for s in self.streams if not s.conn.paused]
            finished = {id(s) for s in ready if s.step()}
            if finished:
                self.streams = [s for s in self.streams if id(s) not in finished]
            if self.rate > 0:  # a step of len(ready) events, at `rate` events/s in all
                next_at += max(len(ready), 1) / self.rate
                await asyncio.sleep(max(0.0, next_at - loop.time()))
            elif not ready:
                self.wake.clear()
                await self.wake.wait()  # every socket is full: until one drains
            else:
                await asyncio.sleep(0)


class _Conn(asyncio.Protocol):
    """One client connection: HTTP/1.1 requests in, keep-alive."""

    def __init__(self, server: _Server) -> None:
        self.server, self.buf, self.paused = server, b"", False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it
        self.transport.set_write_buffer_limits(high=HIGH_WATER)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.server.wake.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.streams = [s for s in self.server.streams if s.conn is not self]

    def write_chunk(self, data: bytes) -> None:
        self.transport.write(b"%x\r\n%b\r\n" % (len(data), data))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            lines = self.buf[:end].decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = dict((k.strip().lower(), v.strip())
                           for k, v in (x.split(":", 1) for x in lines[1:]))  # fmt: skip
            size = int(headers.get("content-length", 0))
            if len(self.buf) < end + 4 + size:
                return
            body, self.buf = self.buf[end + 4 : end + 4 + size], self.buf[end + 4 + size :]
            self.respond(method, path, body)

    def respond(self, method: str, path: str, body: bytes) -> None:
        if method == "POST" and path == "/v1/completions":
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                b"cache-control: no-cache\r\nx-accel-buffering: no\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
            )
            self.server.streams.append(_Stream(self, json.loads(body)))
            self.server.wake.set()
            return
        if method == "GET" and path == "/v1/models":
            status, payload = "200 OK", {"object": "list", "data": [{"id": MODEL}]}
        else:
            status, payload = "404 Not Found", {"error": {"message": f"no route {path}"}}
        raw = json.dumps(payload).encode()
        self.transport.write(f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
                             f"content-length: {len(raw)}\r\n\r\n".encode() + raw)  # fmt: skip


async def _serve(rate: float) -> None:
    server = _Server(rate)
    srv = await asyncio.get_running_loop().create_server(lambda: _Conn(server), "127.0.0.1", 0)
    print(srv.sockets[0].getsockname()[1], flush=True)  # the parent reads the port
    await server.stepper()


def _run(main: Any, loop: str) -> Any:
    if loop == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


# ---- the client (this process) ----


def _workload(tokens: int) -> Iterator[RequestSpec]:
    while True:
        yield RequestSpec("completions", tokens, prompt="hello")


def measure(
    url: str, server_pid: int, args: argparse.Namespace, loop: str, **cfg: Any
) -> dict[str, Any]:
    """One load test against the fake server; its events/s, this process's CPU and the
    server's (were it saturated, the client's figures would not be its own limit)."""
    config = LoadTestConfig(
        base_url=url, model=MODEL, num_requests=args.requests, duration=args.duration,
        max_concurrency=args.streams, request_timeout=600, progress=False,
        scrape_metrics=False, ignore_eos=True, **cfg,
    )  # fmt: skip
    gc.collect()
    server0, cpu0, t0 = cpu_seconds(server_pid), time.process_time(), time.perf_counter()
    run = _run(run_load(config, _workload(args.tokens), "sse-bench"), loop)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    server_cpu = cpu_seconds(server_pid) - server0
    failed = [r.error for r in run.results if not r.success]
    if failed:
        raise SystemExit(f"{len(failed)} requests failed, e.g. {failed[0]}")
    # Every SSE event: one per token, the usage chunk and [DONE].
    events = sum(len(r.chunk_times) + 2 for r in run.results)
    return {"loop": loop, **cfg, "requests": len(run.results), "events": events,
            "wall_s": round(wall, 3), "events_per_s": round(events / wall),
            "cpu_ms_per_1k_events": round(1e6 * cpu / events, 2),
            "client_cores": round(cpu / wall, 3),
            "server_cores": round(server_cpu / wall, 3)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=64, help="concurrent streams (default 64)")
    p.add_argument("--tokens", type=int, default=256, help="tokens per request (default 256)")
    p.add_argument("--requests", type=int, default=None, help="requests per run")
    p.add_argument("--duration", type=float, default=None, help="or seconds per run")
    p.add_argument("--rate", type=float, default=0.0,
                   help="server events/s in all; 0: as fast as the client reads (default)")
    p.add_argument("--clients", default="httpx,auto",
                   help="--http-client values, comma-separated (default %(default)s)")
    p.add_argument("--loops", default="asyncio,uvloop",
                   help="client event loops, comma-separated (default %(default)s)")
    p.add_argument("--repeat", type=int, default=1, help="runs of each configuration")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        # The server's CPU is not the figure, but it must keep up: uvloop where there is one.
        _run(_serve(args.rate), "uvloop" if importlib.util.find_spec("uvloop") else "asyncio")
        return
    if args.requests is None and args.duration is None:
        args.requests = 4 * args.streams
    server = subprocess.Popen([sys.executable, __file__, "--serve", "--rate", str(args.rate)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert server.stdout is not None
        url = f"http://127.0.0.1:{server.stdout.readline().strip()}"
        rows = []
        warm = argparse.Namespace(**{**vars(args), "requests": args.streams, "duration": None})
        for client in args.clients.split(","):
            for loop in args.loops.split(","):
                measure(url, server.pid, warm, loop, http_client=client)
                for _ in range(args.repeat):
                    rows.append(row := measure(url, server.pid, args, loop, http_client=client))
                    print(json.dumps(row), flush=True)
    finally:
        server.terminate()
        server.wait(10)
    print(f"\n{args.streams} streams x {args.tokens} tokens, server rate "
          f"{args.rate or 'max'} events/s")
    print(f"{'client':<24} {'events/s':>10} {'CPU ms/1k events':>17} {'client cores':>13} "
          f"{'server cores':>13}")  # fmt: skip
    for r in rows:
        name = f"{r['http_client']} on {r['loop']}"
        print(f"{name:<24} {r['events_per_s']:>10} {r['cpu_ms_per_1k_events']:>17} "
              f"{r['client_cores']:>13} {r['server_cores']:>13}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items()
                                                  if k != "json"}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
