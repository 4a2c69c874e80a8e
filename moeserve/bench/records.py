"""What a load-test run is made of: its config, each request as the client saw it, the client
processes' CPU, and the run that report.py summarises.

Plain dataclasses without behaviour beyond validation: the run's worker processes
(processes.py) send their RequestResults and ClientProcess records to the parent pickled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moeserve.bench.server_metrics import Snapshot

# Upper bounds on the run's size: a typo must not start a load test that never ends, nor a
# thousand client processes.
MAX_REQUESTS = 1_000_000
MAX_DURATION_S = 24 * 3600.0
MAX_CLIENT_PROCESSES = 64


@dataclass(frozen=True)
class LoadTestConfig:
    """How to reach the server and how to pace the run (see loadtest.py's docstring)."""

    base_url: str
    model: str | None = None
    api_key: str | None = None
    num_requests: int | None = None
    duration: float | None = None
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    request_timeout: float = 300.0
    temperature: float = 0.0
    ignore_eos: bool = False
    seed: int = 0
    progress: bool = True
    scrape_metrics: bool = True
    metrics_url: str | None = None
    http_client: str = "auto"  # "auto": the built-in client for http://, httpx for https://
    client_processes: int = 1  # processes that share the run (processes.py)

    def __post_init__(self) -> None:
        n = self.client_processes
        checks = [
            (
                f"--num-requests must be in 1..{MAX_REQUESTS}",
                self.num_requests is None or 1 <= self.num_requests <= MAX_REQUESTS,
            ),
            (
                f"--duration must be in (0, {MAX_DURATION_S:g}] seconds",
                self.duration is None or 0 < self.duration <= MAX_DURATION_S,
            ),
            ("--request-rate must be > 0", self.request_rate > 0),
            ("--burstiness must be > 0", self.burstiness > 0),
            (
                "--max-concurrency must be >= 1",
                self.max_concurrency is None or self.max_concurrency >= 1,
            ),
            ("--request-timeout must be > 0", self.request_timeout > 0),
            ("--http-client must be auto or httpx", self.http_client in ("auto", "httpx")),
            (
                "give --num-requests or --duration: the run must end by itself",
                self.num_requests is not None or self.duration is not None,
            ),
            # Without a count, an infinite rate and no concurrency cap would start requests
            # as fast as the loop spins until the duration ends.
            (
                "--duration without --num-requests needs a finite --request-rate or "
                "--max-concurrency",
                self.num_requests is not None
                or math.isfinite(self.request_rate)
                or self.max_concurrency is not None,
            ),
            (
                f"--client-processes must be in 1..{MAX_CLIENT_PROCESSES}",
                1 <= n <= MAX_CLIENT_PROCESSES,
            ),
            # Each process drives at least one stream of its own (the cap is split among them).
            (
                f"--client-processes {n} is more than --max-concurrency "
                f"{self.max_concurrency}: each client process needs one stream at least",
                self.max_concurrency is None or n <= self.max_concurrency,
            ),
            (
                f"--client-processes {n} is more than --num-requests {self.num_requests}: "
                "each client process needs one request at least",
                self.num_requests is None or n <= self.num_requests,
            ),
        ]
        for message, ok in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class RequestResult:
    """One request as the client saw it; times in seconds, `sent` from the run's start."""

    index: int
    endpoint: str
    max_tokens: int
    input_len: int | None = None
    sent: float = 0.0
    ended: float | None = None  # when the client was done with it, success or not
    success: bool = False
    error: str | None = None
    status: int | None = None  # the reply's HTTP status, when one came
    error_latency: float | None = None  # send to the end of a non-200 reply (e.g. a 429)
    ttft: float | None = None
    latency: float | None = None
    itl: list[float] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)  # from the run's start
    prompt_tokens: int | None = None
    output_tokens: int = 0
    finish_reason: str | None = None
    correct: bool | None = None  # the demo tasks' answer check
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, if sent

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (vLLM's TPOT)."""
        if self.ttft is None or self.latency is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


@dataclass(frozen=True)
class ClientProcess:
    """One client process of a run: the requests it sent and the CPU (user + sys seconds)
    it used from the run's start to its last reply, as it measured itself."""

    index: int
    requests: int
    cpu_s: float
    pid: int | None = None


@dataclass
class RunData:
    """Everything a report needs: the config, each request, the server's /metrics, and the
    client processes' CPU."""

    config: LoadTestConfig
    model: str
    workload: str
    started_at: str
    duration: float
    results: list[RequestResult]
    before: Snapshot | None = None
    after: Snapshot | None = None
    clients: list[ClientProcess] = field(default_factory=list)
