"""moeserve.metrics: synthetic StepStats and fake expert counts in, exposition text out."""

from __future__ import annotations

import math
import shutil
import subprocess
import warnings

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from moeserve.engine.outputs import RequestMetrics, StepStats
from moeserve.metrics import CONTENT_TYPE, FINISH_REASONS, REJECT_REASONS, Metrics

E = 4
LAYER_IDS = [1, 3]  # sparse layers 0 and 1 are the model's layers 1 and 3


class FakeCounts:
    """expert_counts(): a cumulative [layers, E] host tensor the test controls."""

    def __init__(self, layers: int = len(LAYER_IDS), experts: int = E) -> None:
        self.counts = torch.zeros(layers, experts, dtype=torch.int64)
        self.calls = 0

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        return self.counts.clone()


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(counts: FakeCounts | None = None, clock: FakeClock | None = None, **kw) -> Metrics:
    args = dict(
        model_name="tiny-moe",
        num_sparse_layers=len(LAYER_IDS),
        num_experts=E,
        expert_counts=counts,
        sparse_layer_ids=LAYER_IDS,
        window_seconds=60.0,
        clock=clock or FakeClock(),
    )
    return Metrics(**{**args, **kw})


def step(**kw) -> StepStats:
    args = dict(
        timestamp=0.0,
        step_seconds=0.01,
        num_running=0,
        num_waiting=0,
        num_seqs=0,
        num_prefill_tokens=0,
        num_decode_tokens=0,
        num_generated_tokens=0,
        kv_usage=0.0,
        num_preempted=0,
    )
    return StepStats(**{**args, **kw})


def finished(ttft: float | None, queue: float | None, e2e: float) -> RequestMetrics:
    """A request that arrived at t=10 with the given latencies."""
    return RequestMetrics(
        arrival_time=10.0,
        first_scheduled_time=None if queue is None else 10.0 + queue,
        first_token_time=None if ttft is None else 10.0 + ttft,
        finish_time=10.0 + e2e,
        num_prompt_tokens=7,
        num_generated_tokens=3,
    )


def scrape(m: Metrics) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """One GET /metrics, parsed: sample name -> {sorted label items: value}."""
    body, ctype = m.render()
    assert ctype == CONTENT_TYPE
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def layer_values(samples: dict, name: str) -> dict[str, float]:
    return {dict(k)["layer"]: v for k, v in samples[name].items()}


# ---- serving -------------------------------------------------------------------------------
def test_serving_counters_gauges_histograms() -> None:
    m = make()
    m.observe_step(
        step(
            num_running=1,
            num_waiting=3,
            num_prefill_tokens=100,
            num_generated_tokens=1,
            kv_usage=0.25,
        )
    )
    m.observe_step(
        step(
            num_running=2,
            num_waiting=1,
            num_prefill_tokens=20,
            num_decode_tokens=1,
            num_generated_tokens=2,
            kv_usage=0.5,
            num_preempted=1,
            itl=[0.004, 0.02],
        )
    )
    m.observe_step(
        step(
            num_running=0,
            num_waiting=0,
            num_decode_tokens=2,
            num_generated_tokens=2,
            kv_usage=0.0,
            itl=[0.006, 0.5],
            finished=[
                ("stop", finished(0.2, 0.05, 1.5)),
                ("length", finished(0.3, 0.1, 2.0)),
                ("error", finished(None, None, 0.7)),
            ],
        )
    )
    s = scrape(m)
    val = lambda name, **labels: s[name][tuple(sorted(labels.items()))]  # noqa: E731
    assert val("moeserve_model_info", model_name="tiny-moe") == 1
    assert val("moeserve_num_requests_running") == 0  # gauges hold the last step's values
    assert val("moeserve_num_requests_waiting") == 0
    assert val("moeserve_kv_cache_usage_perc") == 0.0
    assert val("moeserve_prompt_tokens_total") == 120  # prefill tokens, counted when computed
    assert val("moeserve_generation_tokens_total") == 5
    assert val("moeserve_num_preemptions_total") == 1
    succ = {r: val("moeserve_request_success_total", finished_reason=r) for r in FINISH_REASONS}
    assert succ == {"stop": 1, "length": 1, "abort": 0, "error": 1}
    # The errored request never produced a token nor was scheduled: no TTFT/queue sample.
    assert val("moeserve_time_to_first_token_seconds_count") == 2
    assert val("moeserve_time_to_first_token_seconds_sum") == pytest.approx(0.5)
    assert val("moeserve_time_to_first_token_seconds_bucket", le="0.25") == 1
    assert val("moeserve_request_queue_time_seconds_count") == 2
    assert val("moeserve_request_queue_time_seconds_sum") == pytest.approx(0.15)
    assert val("moeserve_e2e_request_latency_seconds_count") == 3
    assert val("moeserve_e2e_request_latency_seconds_sum") == pytest.approx(4.2)
    assert val("moeserve_e2e_request_latency_seconds_bucket", le="1.0") == 1
    assert val("moeserve_inter_token_latency_seconds_count") == 4
    assert val("moeserve_inter_token_latency_seconds_sum") == pytest.approx(0.53)
    assert val("moeserve_inter_token_latency_seconds_bucket", le="0.005") == 1
    assert val("moeserve_inter_token_latency_seconds_bucket", le="0.0075") == 2
    assert val("moeserve_inter_token_latency_seconds_bucket", le="+Inf") == 4
    assert val("moeserve_iteration_tokens_count") == 3
    assert val("moeserve_iteration_tokens_sum") == 100 + 21 + 2
    assert val("moeserve_iteration_tokens_bucket", le="64.0") == 2
    # Step time by what the batch held: the first step prefill only, then mixed, then decode.
    for kind in ("prefill", "mixed", "decode"):
        assert val("moeserve_step_duration_seconds_count", kind=kind) == 1
        assert val("moeserve_step_duration_seconds_sum", kind=kind) == pytest.approx(0.01)
    # A range of buckets fit for serving: milliseconds for decode gaps, minutes for requests.
    les = [float(dict(k)["le"]) for k in s["moeserve_e2e_request_latency_seconds_bucket"]]
    assert min(les) <= 0.01 and max(x for x in les if x != math.inf) >= 600


def test_rejected_reasons_counted_and_preinitialised() -> None:
    m = make()
    s = scrape(m)["moeserve_request_rejected_total"]
    assert {dict(k)["reason"]: v for k, v in s.items()} == dict.fromkeys(REJECT_REASONS, 0.0)
    for reason in ["queue_full", "queue_full", "unauthorized", "too_large"]:
        m.request_rejected(reason)
    m.request_rejected("some_new_reason")
    got = {dict(k)["reason"]: v for k, v in scrape(m)["moeserve_request_rejected_total"].items()}
    assert got["queue_full"] == 2 and got["unauthorized"] == 1 and got["too_large"] == 1
    assert got["draining"] == 0 and got["some_new_reason"] == 1


def test_registries_are_private_and_expert_counts_read_only_at_scrape() -> None:
    counts = FakeCounts()
    a, b = make(counts), make(None)  # same names, two registries: no duplicate-name error
    a.observe_step(step(num_prefill_tokens=5))
    assert counts.calls == 0  # neither construction nor observe_step touches expert counts
    scrape(a)
    assert counts.calls == 1
    assert "moeserve_prompt_tokens_total" in scrape(b)
    assert not any(n.startswith("moeserve_expert") for n in scrape(b))  # no counts: no series


def test_constructor_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="expert_metrics"):
        make(expert_metrics="maybe")
    with pytest.raises(ValueError, match="sparse_layer_ids"):
        make(sparse_layer_ids=[1])
    with pytest.raises(ValueError, match="expected"):
        scrape(make(FakeCounts(layers=3)))  # expert_counts() disagrees with the config


# ---- experts -------------------------------------------------------------------------------
def test_expert_counters_and_balance_uniform_vs_one_expert() -> None:
    counts = FakeCounts()
    counts.counts[0] = torch.tensor([25, 25, 25, 25])  # layer 1: perfectly balanced
    counts.counts[1] = torch.tensor([0, 0, 100, 0])  # layer 3: every token on expert 2
    s = scrape(make(counts))
    per_expert = {
        (dict(k)["layer"], dict(k)["expert"]): v
        for k, v in s["moeserve_expert_tokens_total"].items()
    }
    assert per_expert[("1", "0")] == 25 and per_expert[("3", "2")] == 100
    assert per_expert[("3", "0")] == 0 and len(per_expert) == len(LAYER_IDS) * E
    assert layer_values(s, "moeserve_expert_tokens_layer_total") == {"1": 100, "3": 100}
    # First scrape, no earlier snapshot: the window is everything since start.
    imb = layer_values(s, "moeserve_expert_load_imbalance")
    ent = layer_values(s, "moeserve_expert_routing_entropy")
    idle = layer_values(s, "moeserve_expert_idle")
    assert imb["1"] == pytest.approx(1.0) and ent["1"] == pytest.approx(1.0) and idle["1"] == 0
    assert imb["3"] == pytest.approx(E) and ent["3"] == pytest.approx(0.0) and idle["3"] == E - 1


def test_balance_of_a_partial_load() -> None:
    counts = FakeCounts()
    counts.counts[0] = torch.tensor([30, 10, 0, 0])
    s = scrape(make(counts))
    p = [0.75, 0.25]
    assert layer_values(s, "moeserve_expert_load_imbalance")["1"] == pytest.approx(30 / 10)
    want = -sum(x * math.log(x) for x in p) / math.log(E)
    assert layer_values(s, "moeserve_expert_routing_entropy")["1"] == pytest.approx(want)
    assert layer_values(s, "moeserve_expert_idle")["1"] == 2


def test_window_excludes_old_snapshots() -> None:
    counts, clock = FakeCounts(), FakeClock()
    m = make(counts, clock)
    counts.counts[:] = 100  # t=0: balanced history
    scrape(m)
    clock.t += 10
    counts.counts[:, 0] += 1000  # t=10: a burst on expert 0
    s = scrape(m)  # window = t0..t10: the burst only
    assert layer_values(s, "moeserve_expert_load_imbalance")["1"] == pytest.approx(E)
    assert layer_values(s, "moeserve_expert_idle")["1"] == E - 1
    clock.t += 55
    counts.counts += 10  # t=65: balanced again; t=0 is now outside the 60 s window
    s = scrape(m)  # baseline is the t=10 snapshot, so the burst has left the window
    assert layer_values(s, "moeserve_expert_load_imbalance")["1"] == pytest.approx(1.0)
    assert layer_values(s, "moeserve_expert_routing_entropy")["1"] == pytest.approx(1.0)
    assert layer_values(s, "moeserve_expert_idle")["3"] == 0
    # Cumulative counters are not windowed: rate() in PromQL does that.
    assert layer_values(s, "moeserve_expert_tokens_layer_total")["1"] == E * 110 + 1000


def test_window_edge_cases() -> None:
    counts, clock = FakeCounts(), FakeClock()
    m = make(counts, clock)
    counts.counts[0] = torch.tensor([5, 0, 0, 0])
    counts.counts[1] = torch.tensor([1, 1, 1, 1])
    first = scrape(m)
    # A second scraper a moment later (HA pair) sees the same window, not an empty one.
    clock.t += 0.01
    again = scrape(m)
    for name in ("moeserve_expert_load_imbalance", "moeserve_expert_idle"):
        assert layer_values(again, name) == layer_values(first, name)
    # Nothing routed in the window: imbalance and entropy are NaN, every expert idle.
    clock.t += 30
    s = scrape(m)
    assert math.isnan(layer_values(s, "moeserve_expert_load_imbalance")["1"])
    assert math.isnan(layer_values(s, "moeserve_expert_routing_entropy")["1"])
    assert layer_values(s, "moeserve_expert_idle")["1"] == E
    # Scrapes sparser than the window: the newest older snapshot is the baseline.
    clock.t += 500
    counts.counts[0] += torch.tensor([0, 3, 3, 0])
    s = scrape(m)
    assert layer_values(s, "moeserve_expert_load_imbalance")["1"] == pytest.approx(2.0)
    assert layer_values(s, "moeserve_expert_idle")["1"] == 2
    # Counts that go back (a reloaded model) restart the window instead of going negative.
    clock.t += 20
    counts.counts[0] = torch.tensor([1, 1, 1, 1])
    s = scrape(m)
    assert layer_values(s, "moeserve_expert_load_imbalance")["1"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("mode", "max_series", "per_expert"),
    [("auto", 4096, True), ("auto", 7, False), ("on", 7, True), ("off", 4096, False)],
)
def test_per_expert_cardinality(mode: str, max_series: int, per_expert: bool) -> None:
    counts = FakeCounts()
    counts.counts[:] = 3
    m = make(counts, expert_metrics=mode, max_expert_series=max_series)  # 2 x 4 = 8 series
    assert m.per_expert is per_expert
    s = scrape(m)
    assert ("moeserve_expert_tokens_total" in s) is per_expert
    for name in (
        "moeserve_expert_tokens_layer_total",
        "moeserve_expert_load_imbalance",
        "moeserve_expert_routing_entropy",
        "moeserve_expert_idle",
    ):
        assert set(layer_values(s, name)) == {"1", "3"}  # per-layer series stay in every mode


def test_deepseek_v3_size_turns_per_expert_series_off() -> None:
    m = make(None, num_sparse_layers=58, num_experts=256, sparse_layer_ids=list(range(3, 61)))
    assert m.per_expert is False


# ---- exposition ----------------------------------------------------------------------------
EXPECTED_TYPES = {
    "moeserve_model_info": "gauge",
    "moeserve_model_weight_bytes": "gauge",
    "moeserve_num_requests_running": "gauge",
    "moeserve_num_requests_waiting": "gauge",
    "moeserve_kv_cache_usage_perc": "gauge",
    "moeserve_prompt_tokens": "counter",
    "moeserve_generation_tokens": "counter",
    "moeserve_num_preemptions": "counter",
    "moeserve_request_success": "counter",
    "moeserve_request_rejected": "counter",
    "moeserve_time_to_first_token_seconds": "histogram",
    "moeserve_inter_token_latency_seconds": "histogram",
    "moeserve_e2e_request_latency_seconds": "histogram",
    "moeserve_request_queue_time_seconds": "histogram",
    "moeserve_iteration_tokens": "histogram",
    "moeserve_step_duration_seconds": "histogram",
    "moeserve_expert_tokens": "counter",
    "moeserve_expert_tokens_layer": "counter",
    "moeserve_expert_load_imbalance": "gauge",
    "moeserve_expert_routing_entropy": "gauge",
    "moeserve_expert_idle": "gauge",
    "moeserve_prefix_cache_queries": "counter",
    "moeserve_prefix_cache_hits": "counter",
    "moeserve_http_requests": "counter",
}


def test_exposition_passes_promtool() -> None:
    counts = FakeCounts()
    counts.counts[0] = torch.tensor([7, 1, 0, 2])  # layer 3 stays idle: NaN gauges included
    m = make(counts)
    m.observe_step(
        step(
            num_running=1,
            num_prefill_tokens=9,
            num_generated_tokens=1,
            itl=[0.01],
            finished=[("stop", finished(0.1, 0.01, 0.4))],
        )
    )
    m.request_rejected("queue_full")
    body, _ = m.render()
    assert b"_created" not in body  # creation-time gauges are dropped: noise for dashboards
    promtool = shutil.which("promtool")
    if promtool is not None:
        res = subprocess.run(
            [promtool, "check", "metrics"], input=body, capture_output=True, timeout=60
        )
        report = (res.stdout + res.stderr).decode()
        assert res.returncode == 0, report
        assert report.strip() == "", f"promtool lint warnings:\n{report}"
        return
    # FALLBACK (promtool not installed; CI installs it from Debian's `prometheus` package):
    # parse with prometheus_client and check names, HELP and TYPE ourselves.
    warnings.warn("promtool not found: checked with prometheus_client's parser", stacklevel=1)
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for name, fam in families.items():
        assert name.startswith("moeserve_"), name
        assert fam.documentation.strip(), f"{name} has no HELP"
        assert fam.type == EXPECTED_TYPES[name], (name, fam.type)
        if fam.type == "counter":
            assert all(s.name == name + "_total" for s in fam.samples)
    assert set(EXPECTED_TYPES) <= set(families)
