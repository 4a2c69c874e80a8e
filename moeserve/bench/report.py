"""Summarise a load-test run: throughput, latency percentiles, goodput, expert metrics.

Definitions follow `vllm bench serve`: TTFT is send to first content; TPOT is (latency -
TTFT) / (output tokens - 1) per request; ITL is each gap between streamed chunks; E2E is send
to [DONE]. Throughputs divide by the run's duration (first send to last reply). Goodput
counts requests that met every SLO given. Rejected requests are the failed ones the server
refused with 429 (its queue was full); their latency is send to the end of the refusal.
The client section gives each client process's CPU (user + sys) over the run's duration, in
cores, so that a reader can tell whether the client could keep up; in a run of one process
it is the event loop's thread (the process may hold other work, e.g. a test's server).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Any

from moeserve.bench.records import RequestResult, RunData
from moeserve.bench.server_metrics import prefix_cache, server_summary

GOODPUT_KEYS = {"ttft": "ttft", "tpot": "tpot", "e2e": "e2el", "e2el": "e2el"}
_LATENCIES = ("ttft", "tpot", "itl", "e2el")
_BINS_S = (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600)  # timeline bin widths
# A client process busier than this may be what limits the run: a single event loop near a
# full core delays the events it reads, and the latencies it reports grow with it.
BUSY_CLIENT_CORES = 0.8


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """`["ttft:500", "tpot:50", "e2e:10000"]` (milliseconds) -> {"ttft": 500.0, ...}."""
    slos: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        if not sep or key not in GOODPUT_KEYS:
            raise ValueError(f"--goodput {item!r}: expected KEY:MS with KEY in ttft, tpot, e2e")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number") from None
        if not ms > 0:
            raise ValueError(f"--goodput {item!r}: the limit must be > 0 ms")
        slos[GOODPUT_KEYS[key]] = ms
    return slos


def _quantile(sorted_xs: list[float], q: float) -> float:
    # Linear interpolation between order statistics (numpy's default).
    pos = (len(sorted_xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(values_s: list[float]) -> dict[str, float | int | None]:
    """Mean, median, p90 and p99 in milliseconds (None when there is no value)."""
    xs = sorted(v * 1000.0 for v in values_s)
    if not xs:
        return {"count": 0, "mean": None, "median": None, "p90": None, "p99": None}
    return {
        "count": len(xs),
        "mean": sum(xs) / len(xs),
        "median": _quantile(xs, 0.5),
        "p90": _quantile(xs, 0.9),
        "p99": _quantile(xs, 0.99),
    }


def _latencies(r: RequestResult) -> dict[str, list[float]]:
    return {
        "ttft": [r.ttft] if r.ttft is not None else [],
        "tpot": [r.tpot] if r.tpot is not None else [],
        "itl": r.itl,
        "e2el": [r.latency] if r.latency is not None else [],
    }


def _is_good(r: RequestResult, slos_ms: dict[str, float]) -> bool:
    # A one-token reply has no TPOT: it meets a TPOT limit (vLLM counts it as 0).
    values = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.latency}
    return r.success and all(
        values[k] is not None and values[k] * 1000.0 <= limit for k, limit in slos_ms.items()
    )


def timeline(results: list[RequestResult], duration: float) -> dict[str, Any]:
    """Per time bin (100 at most, 0.1 s at least, a round width): output tokens/s, completed
    requests/s and the mean number of requests in flight."""
    bin_s = next((b for b in _BINS_S if duration / b <= 100), math.ceil(duration / 100))
    n = max(1, math.ceil(duration / bin_s))
    # The last bin may be partial: rates divide by the time it really covers.
    widths = [bin_s] * (n - 1) + [max(1e-9, duration - (n - 1) * bin_s)]
    tokens, done, busy = [0.0] * n, [0] * n, [0.0] * n
    for r in results:
        if r.chunk_times:  # a chunk may carry several tokens: spread the count over chunks
            per_chunk = r.output_tokens / len(r.chunk_times)
            for t in r.chunk_times:
                tokens[min(n - 1, int(t / bin_s))] += per_chunk
        end = r.ended if r.ended is not None else duration
        if r.success:
            done[min(n - 1, int(end / bin_s))] += 1
        for b in range(int(r.sent / bin_s), min(n, int(end / bin_s) + 1)):
            lo = b * bin_s
            busy[b] += max(0.0, min(end, lo + widths[b]) - max(r.sent, lo))
    return {
        "bin_s": bin_s,
        "output_tokens_per_s": [x / w for x, w in zip(tokens, widths)],
        "completed_per_s": [x / w for x, w in zip(done, widths)],
        "in_flight": [x / w for x, w in zip(busy, widths)],
    }


def client_summary(run: RunData, duration: float) -> dict[str, Any]:
    """The client processes, each one's requests and CPU, and a warning when one was busy."""
    per = [dict(dataclasses.asdict(c), cpu_cores=c.cpu_s / duration) for c in run.clients]
    busy = [p for p in per if p["cpu_cores"] > BUSY_CLIENT_CORES]
    warning = None
    if busy:
        worst = max(busy, key=lambda p: p["cpu_cores"])
        warning = (
            f"client process {worst['index']} used {worst['cpu_cores']:.2f} of a core over the "
            "run: the client may be what limits it; try more --client-processes"
        )
    return {
        "processes": run.config.client_processes,
        "per_process": per,
        "max_cpu_cores": max((p["cpu_cores"] for p in per), default=None),
        "warning": warning,
    }


def prefix_cache_summary(run: RunData) -> dict[str, Any]:
    """The server's prefix cache hit rate over the run (its /metrics counters), and the mean
    `usage.prompt_tokens_details.cached_tokens` of the requests whose usage had it."""
    out = prefix_cache(run.before, run.after)
    cached = [r.cached_tokens for r in run.results if r.success and r.cached_tokens is not None]
    out["requests_with_cached_tokens"] = len(cached)
    out["mean_cached_tokens"] = sum(cached) / len(cached) if cached else None
    return out


def build_report(
    run: RunData, goodput_slos_ms: dict[str, float] | None = None, detailed: bool = False
) -> dict[str, Any]:
    """The JSON result of a run (see the module docstring for the definitions)."""
    ok = [r for r in run.results if r.success]
    duration = max(run.duration, 1e-9)
    in_tok = sum(r.prompt_tokens or 0 for r in ok)
    out_tok = sum(r.output_tokens for r in ok)
    lat: dict[str, list[float]] = {k: [] for k in _LATENCIES}
    for r in ok:
        for k, v in _latencies(r).items():
            lat[k].extend(v)
    cfg = dataclasses.asdict(run.config)
    cfg.pop("api_key")  # never write the secret into a result file
    rejected = [
        r.error_latency for r in run.results if r.status == 429 and r.error_latency is not None
    ]
    report: dict[str, Any] = {
        "date": run.started_at,
        "model": run.model,
        "workload": run.workload,
        "config": cfg,
        "num_requests": len(run.results),
        "completed": len(ok),
        "failed": len(run.results) - len(ok),
        "rejected": len(rejected),
        "duration_s": run.duration,
        "total_input_tokens": in_tok,
        "total_output_tokens": out_tok,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tok / duration,
        "total_token_throughput": (in_tok + out_tok) / duration,
    }
    for k in _LATENCIES:
        report[f"{k}_ms"] = summarize(lat[k])
    report["rejected_latency_ms"] = summarize(rejected)
    report["goodput"] = None
    if goodput_slos_ms:
        good = sum(_is_good(r, goodput_slos_ms) for r in run.results)
        report["goodput"] = {
            "slos_ms": goodput_slos_ms,
            "good_requests": good,
            "request_goodput": good / duration,
        }
    errors = Counter((r.error or "")[:160] for r in run.results if not r.success)
    report["errors"] = dict(errors.most_common(10))
    checked = [r for r in ok if r.correct is not None]
    report["demo_accuracy"] = None
    if checked:
        correct = sum(bool(r.correct) for r in checked)
        report["demo_accuracy"] = {
            "checked": len(checked),
            "correct": correct,
            "accuracy": correct / len(checked),
        }
    report["prefix_cache"] = prefix_cache_summary(run)
    report["client"] = client_summary(run, duration)
    report["server"] = server_summary(run.before, run.after)
    report["timeline"] = timeline(run.results, run.duration)
    if detailed:
        report["requests"] = [{**dataclasses.asdict(r), "tpot": r.tpot} for r in run.results]
    return report


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_report(rep: dict[str, Any]) -> str:
    """The human-readable table printed at the end of a run."""
    w = 50
    lines = [" Serving Benchmark Result ".center(w, "=")]

    def row(label: str, value: Any, digits: int = 2) -> None:
        lines.append(f"{label:<40}{_fmt(value, digits):>10}")

    row("Successful requests:", rep["completed"])
    row("Failed requests:", rep["failed"])
    row("  of which rejected (HTTP 429):", rep["rejected"])
    row("Benchmark duration (s):", rep["duration_s"])
    row("Total input tokens:", rep["total_input_tokens"])
    row("Total generated tokens:", rep["total_output_tokens"])
    row("Request throughput (req/s):", rep["request_throughput"])
    if rep["goodput"]:
        row("Request goodput (req/s):", rep["goodput"]["request_goodput"])
    row("Output token throughput (tok/s):", rep["output_throughput"])
    row("Total token throughput (tok/s):", rep["total_token_throughput"])
    titles = {
        "ttft": "Time to First Token",
        "tpot": "Time per Output Token (excl. 1st token)",
        "itl": "Inter-token Latency",
        "e2el": "End-to-end Latency",
    }
    sections = [(f"{key}_ms", title, key.upper()) for key, title in titles.items()]
    if rep["rejected"]:  # how long the server takes to say no, under this load
        sections.append(
            ("rejected_latency_ms", "Rejected (HTTP 429): send to refusal", "429 latency")
        )
    for key, title, short in sections:
        lines.append(f" {title} ".center(w, "-"))
        stats = rep[key]
        for stat, label in (("mean", "Mean"), ("median", "Median"), ("p90", "P90"), ("p99", "P99")):
            row(f"{label} {short} (ms):", stats[stat])
    if rep["demo_accuracy"]:
        lines.append(" Demo tasks ".center(w, "-"))
        row("Correct answers:", rep["demo_accuracy"]["correct"])
        row("Accuracy:", rep["demo_accuracy"]["accuracy"], 3)
    lines.append(" Prefix cache ".center(w, "-"))
    row("Prefix cache hit rate (tokens):", rep["prefix_cache"]["hit_rate"], 3)
    row("Mean cached prompt tokens:", rep["prefix_cache"]["mean_cached_tokens"])
    client = rep["client"]
    lines.append(" Client ".center(w, "-"))
    row("Client processes:", client["processes"])
    row("Client CPU, busiest process (cores):", client["max_cpu_cores"], 3)
    server = rep["server"]
    lines.append(" Server (moeserve /metrics) ".center(w, "-"))
    if not server.get("moeserve"):
        lines.append(server.get("note", ""))
    else:
        row("Preemptions:", server.get("preemptions"))
        load = server.get("expert_load")
        if load:
            row("Expert imbalance, mean over layers:", load["imbalance_mean"], 3)
            row("Expert imbalance, worst layer:", load["imbalance_max"], 3)
            row("Routing entropy / log E, mean:", load["entropy_mean"], 3)
        else:
            lines.append("no per-expert series (too many experts, or off)")
        cache = server["expert_cache"]
        if "note" in cache:
            lines.append(f"Expert cache: {cache['note']}")
        else:
            row("Expert cache hit rate:", cache["hit_rate"], 3)
            row("Expert cache misses:", cache["misses"])
            mib = cache["bytes_copied"] / 2**20 if cache["bytes_copied"] is not None else None
            row("Expert bytes copied (MiB):", mib)
            row("Prefetch accuracy:", cache["prefetch_accuracy"], 3)
    if rep["errors"]:
        lines.append(" Errors ".center(w, "-"))
        lines.extend(f"{n:>5} x {msg}" for msg, n in rep["errors"].items())
    lines.append("=" * w)
    return "\n".join(lines)
