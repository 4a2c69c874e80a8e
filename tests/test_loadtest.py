"""`moeserve bench serve` against a real server on 127.0.0.1: the report, the bounds, failures.

The server runs the packaged demo model when it is installed (moeserve/assets/demo-moe),
else a tiny random checkpoint; offloading is on, so the report has expert cache numbers.
Every run is a handful of short requests: seconds, not minutes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from moeserve.bench.loadtest import MAX_REQUESTS, LoadTestConfig
from moeserve.bench.report import parse_goodput, summarize
from moeserve.bench.workloads import length_sampler
from moeserve.cli import main
from tests.server_fixture import RunningServer, build_checkpoint, serving

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        from moeserve.assets import demo_model_path

        return demo_model_path()
    except (ImportError, ValueError):  # the demo model is not installed: a tiny one
        return build_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    yield from serving(
        _model_dir(tmp_path_factory), max_model_len=None,  # the model's own context
        engine_kwargs={"expert_cache_slots": 2, "offload_mode": "fetch"},
    )  # fmt: skip


def bench(server: RunningServer, tmp_path: Path, *args: str) -> tuple[int, dict[str, Any]]:
    """Run `moeserve bench serve` in this process; (exit status, JSON result)."""
    out = tmp_path / "result.json"
    rc = main(["bench", "serve", "--base-url", server.url, "--result-json", str(out),
               "--no-progress", "--save-detailed", *args])  # fmt: skip
    return rc, json.loads(out.read_text()) if out.exists() else {}


def test_random_workload_report(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    n = 12
    rc, rep = bench(
        server, tmp_path, "--num-requests", str(n), "--request-rate", "30", "--burstiness",
        "0.5", "--input-len", "uniform:4:12", "--output-len", "uniform:3:8", "--ignore-eos",
        "--goodput", "ttft:600000", "tpot:600000", "e2e:600000", "--plot-dir",
        str(tmp_path / "plots"),
    )  # fmt: skip
    assert rc == 0
    table = capsys.readouterr().out
    for line in ("Successful requests:", "Median TTFT (ms):", "P99 ITL (ms):",
                 "Request goodput (req/s):", "Expert imbalance", "Expert cache hit rate:"):
        assert line in table, line  # fmt: skip
    assert (rep["completed"], rep["failed"], rep["num_requests"]) == (n, 0, n)
    reqs = rep["requests"]
    # --ignore-eos: every request generates exactly its drawn max_tokens.
    assert all(r["output_tokens"] == r["max_tokens"] for r in reqs)
    assert rep["total_output_tokens"] == sum(r["max_tokens"] for r in reqs)
    assert rep["total_input_tokens"] == sum(r["prompt_tokens"] for r in reqs) > 0
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        s = rep[key]
        assert s["count"] > 0 and 0 < s["median"] <= s["p90"] <= s["p99"], (key, s)
    assert rep["ttft_ms"]["mean"] <= rep["e2el_ms"]["mean"]
    # (A token that decodes to no text, e.g. EOS under --ignore-eos, sends no chunk: so not
    # one ITL per token, but some.)
    assert rep["itl_ms"]["count"] > 0
    assert rep["goodput"]["good_requests"] == n  # generous SLOs: all of them
    duration = rep["duration_s"]
    assert math.isclose(rep["request_throughput"], n / duration)
    assert math.isclose(rep["output_throughput"], rep["total_output_tokens"] / duration)
    # What the server counted agrees with what the client saw.
    srv = rep["server"]
    assert srv["moeserve"] and srv["generation_tokens"] == rep["total_output_tokens"]
    if srv["preemptions"] == 0:  # else recomputation counts prompt tokens twice
        assert srv["prompt_tokens"] == rep["total_input_tokens"]
        # Each token is routed to top_k experts in every sparse layer: the prompt, and each
        # generated token but the last (it is sampled, never fed back).
        top_k = server.engine.model_config.top_k
        fed = rep["total_input_tokens"] + rep["total_output_tokens"] - n
        assert [sum(row) for row in srv["expert_load"]["tokens"]] == [top_k * fed] * len(
            srv["expert_load"]["layers"])  # fmt: skip
    load = srv["expert_load"]
    assert all(x >= 1.0 for x in load["imbalance_per_layer"])
    cache = srv["expert_cache"]
    assert cache["hits"] + cache["misses"] > 0 and 0 <= cache["hit_rate"] <= 1
    assert cache["bytes_copied"] > 0  # offload_mode fetch: every miss is a copy
    timeline = rep["timeline"]
    assert sum(x * timeline["bin_s"] for x in timeline["completed_per_s"][:-1]) <= n
    assert "api_key" not in rep["config"]
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["expert_load.png", "latency.png", "throughput.png"]
    for name in pngs:
        assert (tmp_path / "plots" / name).read_bytes()[:8] == PNG_MAGIC


def test_jsonl_workload_chat_and_completions(server: RunningServer, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    lines = [
        {"prompt": "The river runs", "max_tokens": 3},
        {"messages": [{"role": "user", "content": "Say something"}], "max_tokens": 2},
        {"prompt": "Once upon a time"},  # max_tokens from --output-len
    ]
    prompts.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    rc, rep = bench(
        server, tmp_path, "--workload", "jsonl", "--prompts-file", str(prompts),
        "--num-requests", "5", "--max-concurrency", "2", "--output-len", "4", "--ignore-eos",
        "--no-metrics",
    )  # fmt: skip
    assert rc == 0 and rep["completed"] == 5
    reqs = rep["requests"]
    # The file replays from its start; chat lines go to /v1/chat/completions.
    assert [r["endpoint"] for r in reqs] == (["completions", "chat", "completions"] * 2)[:5]
    assert [r["output_tokens"] for r in reqs] == [3, 2, 4, 3, 2]
    # --max-concurrency 2: never more than two requests in flight.
    events = sorted([(r["sent"], 1) for r in reqs] + [(r["ended"], -1) for r in reqs])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    assert peak <= 2
    assert rep["server"] == {"moeserve": False, "note": "no /metrics to scrape"}


def test_demo_workload(server: RunningServer, tmp_path: Path) -> None:
    pytest.importorskip("moeserve.demo_tasks")
    rc, rep = bench(server, tmp_path, "--workload", "demo", "--num-requests", "6",
                    "--demo-tasks", "add,reverse", "--demo-max-tokens", "8")  # fmt: skip
    assert rc == 0 and rep["completed"] == 6 and rep["workload"] == "demo"
    acc = rep["demo_accuracy"]
    assert acc["checked"] == 6 and 0 <= acc["correct"] <= 6
    assert all(r["endpoint"] == "chat" for r in rep["requests"])


def test_duration_bounds_the_run(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t0 = time.monotonic()
    out = tmp_path / "r.json"
    rc = main(["bench", "serve", "--base-url", server.url, "--duration", "1.5",
               "--request-rate", "6", "--output-len", "2", "--input-len", "4",
               "--result-json", str(out), "--save-detailed"])  # fmt: skip
    elapsed = time.monotonic() - t0
    rep = json.loads(out.read_text())
    assert rc == 0 and rep["failed"] == 0
    # Poisson arrivals at 6/s for 1.5 s: ~9; none start after the deadline.
    assert 1 <= rep["num_requests"] <= 30
    assert max(r["sent"] for r in rep["requests"]) <= 1.5
    assert elapsed < 30  # stopped by itself, shortly after the last reply
    assert "requests:" in capsys.readouterr().err  # the progress bar (on by default)


def test_failures_are_counted_not_raised(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, rep = bench(server, tmp_path, "--model", "no-such-model", "--num-requests", "3")
    assert rc == 1  # nothing succeeded
    assert (rep["completed"], rep["failed"]) == (0, 3)
    [(message, count)] = rep["errors"].items()
    assert count == 3 and message.startswith("HTTP 404")
    assert rep["ttft_ms"]["mean"] is None
    assert "no request succeeded" in capsys.readouterr().err


def test_unbounded_or_invalid_runs_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="must end by itself"):
        LoadTestConfig("http://127.0.0.1:1")
    with pytest.raises(ValueError, match="finite --request-rate or --max-concurrency"):
        LoadTestConfig("http://127.0.0.1:1", duration=10)
    with pytest.raises(ValueError, match="--num-requests"):
        LoadTestConfig("http://127.0.0.1:1", num_requests=MAX_REQUESTS + 1)
    with pytest.raises(ValueError, match="--duration"):
        LoadTestConfig("http://127.0.0.1:1", duration=1e9, request_rate=1)
    LoadTestConfig("http://127.0.0.1:1", duration=10, max_concurrency=4)  # closed loop: fine
    assert main(["bench", "serve", "--goodput", "ttft=500"]) == 2
    assert "KEY:MS" in capsys.readouterr().err


def test_length_specs_and_slos() -> None:
    import random

    rng = random.Random(0)
    assert {length_sampler("7", rng)() for _ in range(5)} == {7}
    draws = [length_sampler("uniform:10:20", rng)() for _ in range(200)]
    assert min(draws) >= 10 and max(draws) <= 20
    draws = [length_sampler("lognormal:100:0.5", rng)() for _ in range(2000)]
    assert 80 < sorted(draws)[1000] < 120  # the median
    assert min(length_sampler("normal:2:50", rng)() for _ in range(200)) == 1  # clipped
    for bad in ("0", "x", "uniform:1", "gamma:1:2", "normal:-1:2"):
        with pytest.raises(ValueError):
            length_sampler(bad, rng)
    assert parse_goodput(["ttft:500", "tpot:50", "e2e:10000"]) == {
        "ttft": 500.0, "tpot": 50.0, "e2el": 10000.0}  # fmt: skip
    for bad in (["ttft"], ["itl:5"], ["ttft:0"], ["ttft:abc"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)
    s = summarize([0.001 * x for x in range(1, 101)])  # 1..100 ms
    assert (s["count"], s["mean"], s["median"]) == (100, pytest.approx(50.5), pytest.approx(50.5))
    assert s["p90"] == pytest.approx(90.1) and s["p99"] == pytest.approx(99.01)


def test_random_prompts_from_a_tokenizer_with_special_tokens() -> None:
    """--tokenizer: exact-length prompts that never contain the tokenizer's special tokens."""
    from tokenizers import Tokenizer

    from moeserve.assets import demo_model_path
    from moeserve.bench.workloads import random_workload

    path = demo_model_path()
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    work = random_workload("40", "8", seed=3, tokenizer=str(path))
    for _ in range(5):
        spec = next(work)
        assert spec.prompt is not None and spec.max_tokens == 8
        assert len(tok.encode(spec.prompt, add_special_tokens=False).ids) == 40
        assert not any(s in spec.prompt for s in special)
