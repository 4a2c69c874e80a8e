"""Prometheus metrics: StepStats pushed per step (cheap: no torch, no device sync), expert counts
pulled at scrape time (one host copy; per-layer balance over a sliding window). Names follow
vLLM's (`vllm:X` -> `moeserve_X`) so dashboards translate; each HELP names its vLLM twin."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from moeserve.engine.outputs import StepStats
from moeserve.metrics_experts import ExpertCollector

# generate_latest() writes the classic 0.0.4 text format, so say that (prometheus_client
# >= 0.22's CONTENT_TYPE_LATEST names 1.0.0, a version only newer scrapers ask for).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Pre-created label values, so every series exists (at 0) before its first event: rate() and
# absent-series alerts then work from the first scrape.
FINISH_REASONS = ("stop", "length", "abort", "error")
REJECT_REASONS = (
    "invalid_request",
    "queue_full",
    "context_length_exceeded",
    "unauthorized",
    "draining",
    "too_large",
)

# Seconds. From 1 ms (a small model's decode step) to ~10 min (a long queue or generation).
TTFT_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
)
ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
E2E_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    45.0,
    60.0,
    90.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# Seconds per engine step: a 1 ms batch-1 decode to a multi-second long prefill.
STEP_BUCKETS = (
    0.0005,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.004,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
STEP_KINDS = ("decode", "prefill", "mixed")
_HISTOGRAMS = {  # key in Metrics.hist -> (name, buckets)
    "ttft": ("moeserve_time_to_first_token_seconds", TTFT_BUCKETS),
    "queue_time": ("moeserve_request_queue_time_seconds", TTFT_BUCKETS),
    "e2e": ("moeserve_e2e_request_latency_seconds", E2E_BUCKETS),
    "itl": ("moeserve_inter_token_latency_seconds", ITL_BUCKETS),
    "iteration_tokens": ("moeserve_iteration_tokens", ITERATION_TOKEN_BUCKETS),
}


# HELP text of every series; each names its vLLM twin so dashboards translate.
_HELP = {
    "moeserve_model_info": "Served model; always 1 (vLLM puts model_name on every series).",
    "moeserve_model_weight_bytes": "Bytes of the weights as stored: part experts (the routed "
    "experts, format fp8 / mxfp4 when quantized, else the dtype) or dense, on the device or "
    "in host memory (vLLM logs its model weights' memory at startup).",
    "moeserve_num_requests_running": "Sequences running; n>1 counts n (vllm:num_requests_running).",
    "moeserve_num_requests_waiting": "Sequences waiting (vllm:num_requests_waiting).",
    "moeserve_kv_cache_usage_perc": "KV cache blocks in use, 0..1 (vllm:kv_cache_usage_perc).",
    "moeserve_prompt_tokens_total": (
        "Prompt (prefill) tokens computed, counted in the step that computes them; a preempted "
        "sequence's recomputation counts again (vllm:prompt_tokens_total)."
    ),
    "moeserve_generation_tokens_total": "Tokens generated (vllm:generation_tokens_total).",
    "moeserve_prefix_cache_queries_total": (
        "Prompt tokens looked up in the prefix cache, once per sequence at its first start "
        "(vllm:prefix_cache_queries); hit rate = hits / queries."
    ),
    "moeserve_prefix_cache_hits_total": (
        "Prompt tokens found in the prefix cache, not computed (vllm:prefix_cache_hits)."
    ),
    "moeserve_num_preemptions_total": "Sequences preempted (vllm:num_preemptions_total).",
    "moeserve_request_success_total": "Requests finished, by reason (vllm:request_success_total).",
    "moeserve_request_rejected_total": "Requests refused before the engine, by reason (no vLLM).",
    "moeserve_http_requests_total": "Inference requests answered, by route and HTTP status "
    "(499: the client left first).",
    "moeserve_time_to_first_token_seconds": (
        "Arrival to first token (vllm:time_to_first_token_seconds)."
    ),
    "moeserve_inter_token_latency_seconds": (
        "Gap between consecutive tokens of a sequence (vllm:inter_token_latency_seconds)."
    ),
    "moeserve_e2e_request_latency_seconds": "Arrival to finish (vllm:e2e_request_latency_seconds).",
    "moeserve_request_queue_time_seconds": (
        "Arrival to first scheduled (vllm:request_queue_time_seconds)."
    ),
    "moeserve_iteration_tokens": "Tokens per engine step (vllm:iteration_tokens_total).",
    "moeserve_step_duration_seconds": (
        "Wall time of an engine step by kind: decode (every token a decode; CUDA graphs replay "
        "these), prefill (prompt tokens only) or mixed (TGI: tgi_batch_forward_duration)."
    ),
}


def _doc(name: str) -> tuple[str, str]:
    return name, _HELP[name]


class _WithoutCreated(Collector):
    """The registry minus prometheus_client's `*_created` samples: they double the series and
    no dashboard reads them (vLLM turns them off too, but only process-wide)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for fam in self._registry.collect():  # fresh Metric objects each scrape: safe to edit
            fam.samples = [s for s in fam.samples if not s.name.endswith("_created")]
            yield fam


def step_kind(stats: StepStats) -> str:
    """decode, prefill or mixed: what the step's batch held."""
    if not stats.num_prefill_tokens:
        return "decode"
    return "mixed" if stats.num_decode_tokens else "prefill"


class Metrics:
    """All of the server's Prometheus series, in one private registry.

    `observe_step` is the AsyncEngine stats_sink; `request_rejected` is for requests refused
    before the engine saw them; `render` serves GET /metrics. Per-expert series are on when
    expert_metrics is "on", or "auto" and num_sparse_layers * num_experts <= max_expert_series;
    the per-layer series are always on when expert_counts is given.
    """

    def __init__(
        self,
        *,
        model_name: str,
        num_sparse_layers: int,
        num_experts: int,
        expert_counts: Callable[[], torch.Tensor] | None,
        sparse_layer_ids: list[int],
        max_expert_series: int = 4096,
        expert_metrics: str = "auto",
        window_seconds: float = 60.0,
        registry: CollectorRegistry | None = None,
        weight_bytes: dict[tuple[str, str, str], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if expert_metrics not in ("auto", "on", "off"):
            raise ValueError(f"expert_metrics must be auto, on or off, got {expert_metrics!r}")
        if len(sparse_layer_ids) != num_sparse_layers:
            raise ValueError(f"{len(sparse_layer_ids)=} != {num_sparse_layers=}")
        if num_experts < 1 or window_seconds <= 0:
            raise ValueError(f"need > 0: {num_experts=}, {window_seconds=}")
        self.registry = registry if registry is not None else CollectorRegistry()
        self.per_expert = expert_metrics == "on" or (
            expert_metrics == "auto" and num_sparse_layers * num_experts <= max_expert_series
        )
        r = self.registry
        # ---- serving (pushed per step) -----------------------------------------------------
        Gauge(*_doc("moeserve_model_info"), ["model_name"], registry=r).labels(model_name).set(1)
        sizes = Gauge(
            *_doc("moeserve_model_weight_bytes"), ["part", "format", "location"], registry=r
        )
        for (part, fmt, location), n in (weight_bytes or {}).items():
            sizes.labels(part, fmt, location).set(n)
        self.num_running = Gauge(*_doc("moeserve_num_requests_running"), registry=r)
        self.num_waiting = Gauge(*_doc("moeserve_num_requests_waiting"), registry=r)
        self.kv_usage = Gauge(*_doc("moeserve_kv_cache_usage_perc"), registry=r)
        self.prompt_tokens = Counter(*_doc("moeserve_prompt_tokens_total"), registry=r)
        self.generation_tokens = Counter(*_doc("moeserve_generation_tokens_total"), registry=r)
        self.preemptions = Counter(*_doc("moeserve_num_preemptions_total"), registry=r)
        self.prefix_queries = Counter(*_doc("moeserve_prefix_cache_queries_total"), registry=r)
        self.prefix_hits = Counter(*_doc("moeserve_prefix_cache_hits_total"), registry=r)
        self.success = Counter(
            *_doc("moeserve_request_success_total"), ["finished_reason"], registry=r
        )
        self.rejected = Counter(*_doc("moeserve_request_rejected_total"), ["reason"], registry=r)
        self.http_requests = Counter(
            *_doc("moeserve_http_requests_total"), ["route", "status"], registry=r
        )
        for counter, reasons in ((self.success, FINISH_REASONS), (self.rejected, REJECT_REASONS)):
            for reason in reasons:
                counter.labels(reason)
        self.hist = {
            k: Histogram(*_doc(n), buckets=b, registry=r) for k, (n, b) in _HISTOGRAMS.items()
        }
        step_hist = Histogram(
            *_doc("moeserve_step_duration_seconds"), ["kind"], buckets=STEP_BUCKETS, registry=r
        )
        self.step_duration = {kind: step_hist.labels(kind) for kind in STEP_KINDS}
        # ---- experts (pulled at scrape time) -----------------------------------------------
        if expert_counts is not None:
            collector = ExpertCollector(
                expert_counts, sparse_layer_ids, num_experts, self.per_expert, window_seconds, clock
            )
            r.register(collector)

    def observe_step(self, stats: StepStats) -> None:
        """Record one engine step. Plain Python only: it runs on the event loop every step."""
        self.num_running.set(stats.num_running)
        self.num_waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_usage)
        self.prompt_tokens.inc(stats.num_prefill_tokens)
        self.generation_tokens.inc(stats.num_generated_tokens)
        self.preemptions.inc(stats.num_preempted)
        self.prefix_queries.inc(stats.num_prefix_queries)
        self.prefix_hits.inc(stats.num_prefix_hits)
        hist = self.hist
        tokens = stats.num_prefill_tokens + stats.num_decode_tokens
        if tokens:  # else a record of no step (aborts reported while idle)
            hist["iteration_tokens"].observe(tokens)
            self.step_duration[step_kind(stats)].observe(stats.step_seconds)
        for gap in stats.itl:
            hist["itl"].observe(gap)
        # Request latencies arrive with the finished request (StepStats carries no first-token
        # event), so TTFT and queue time are observed at finish rather than when they happen.
        for reason, m in stats.finished:
            self.success.labels(reason).inc()
            for key, value in (("ttft", m.ttft), ("queue_time", m.queue_time), ("e2e", m.e2e)):
                if value is not None:
                    hist[key].observe(value)

    def request_rejected(self, reason: str) -> None:
        """Count a request refused before the engine saw it. `reason` must come from a fixed
        set (REJECT_REASONS or a new constant), never a message: each value is a series."""
        self.rejected.labels(reason).inc()

    def render(self) -> tuple[bytes, str]:
        """(body, content type) for GET /metrics. Calls expert_counts() (a device-to-host copy
        that waits for the running step on CUDA): call it off the event loop, e.g. in
        asyncio.to_thread."""
        return generate_latest(_WithoutCreated(self.registry)), CONTENT_TYPE
