"""Requests the server refuses with 429 (its queue is full): counted as failed, and also as
rejected, with how long the refusals took to arrive, in the table and the JSON."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from moeserve.assets import demo_model_path
from moeserve.bench.loadtest import LoadTestConfig, RequestResult, RunData
from moeserve.bench.report import build_report, format_report
from tests.server_fixture import RunningServer, serving
from tests.test_loadtest import CLIENTS, _scripted, _writes, bench

REFUSAL = (
    b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
    b"retry-after: 1\r\ncontent-length: 42\r\n\r\n"
    b'{"error":{"message":"too many requests"}}\n'
)


@pytest.fixture(scope="module")
def small_queue_server() -> Iterator[RunningServer]:
    """A server that queues one request at most: the rest of a burst is refused with 429."""
    yield from serving(demo_model_path(), max_model_len=None, max_queued_requests=1)


def test_a_flood_reports_its_429s_and_their_latency(
    small_queue_server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    n = 16  # all at once, one queue slot: the server admits one and refuses most others
    rc, rep = bench(
        small_queue_server,
        tmp_path,
        "--num-requests",
        str(n),
        "--input-len",
        "8",
        "--output-len",
        "4",
        "--ignore-eos",
    )
    table = capsys.readouterr().out
    assert rc == 0 and rep["completed"] >= 1
    rejected = rep["rejected"]
    assert 1 <= rejected <= rep["failed"] == n - rep["completed"]
    assert all(msg.startswith("HTTP 429: too many requests are queued") for msg in rep["errors"])
    stats = rep["rejected_latency_ms"]
    assert stats["count"] == rejected
    assert 0 < stats["median"] <= stats["p99"] and stats["mean"] > 0
    for r in rep["requests"]:
        if r["status"] == 429:
            assert not r["success"] and r["error"].startswith("HTTP 429")
            assert r["error_latency"] > 0 and r["latency"] is None
        else:
            assert r["success"] and r["status"] == 200 and r["error_latency"] is None
    assert sum(r["status"] == 429 for r in rep["requests"]) == rejected
    rows = _rows(table)
    assert rows["of which rejected (HTTP 429):"] == str(rejected)
    for label, stat in (("Mean", "mean"), ("Median", "median"), ("P99", "p99")):
        assert rows[f"{label} 429 latency (ms):"] == f"{stats[stat]:.2f}", table


@pytest.mark.parametrize("client", CLIENTS, ids="-".join)
def test_a_429_is_timed_on_both_clients(client: tuple[str, str]) -> None:
    results, _, _ = _scripted(_writes(REFUSAL), client, n=3)
    for res in results:
        assert (res.status, res.error) == (429, "HTTP 429: too many requests")
        assert res.error_latency is not None and res.error_latency > 0
        assert res.ended is not None and res.error_latency <= res.ended - res.sent
        assert not res.success and res.latency is None


def _rows(table: str) -> dict[str, str]:
    """The table's rows: label -> value (format_report's 40 + 10 columns)."""
    return {line[:40].strip(): line[40:].strip() for line in table.splitlines()}


def _result(i: int, status: int | None, seconds: float | None) -> RequestResult:
    res = RequestResult(i, "completions", 4, sent=0.01 * i, ended=0.01 * i + 0.5)
    res.status = status
    if status == 200:
        res.success, res.latency, res.ttft, res.output_tokens = True, 0.4, 0.1, 4
    else:
        res.error, res.error_latency = f"HTTP {status}: no", seconds
    return res


def _run(results: list[RequestResult]) -> RunData:
    cfg = LoadTestConfig("http://127.0.0.1:1", num_requests=len(results))
    return RunData(cfg, "m", "t", "2025-01-01T00:00:00+00:00", 1.0, results)


def test_rejected_in_the_report() -> None:
    results = [
        _result(0, 200, None),
        _result(1, 429, 0.030),
        _result(2, 503, 0.5),
        _result(3, 429, 0.010),
        _result(4, 429, 0.020),
    ]
    rep = build_report(_run(results))
    # 429s are failures, and a 503 is a failure but no rejection.
    assert (rep["completed"], rep["failed"], rep["rejected"]) == (1, 4, 3)
    stats = rep["rejected_latency_ms"]
    assert stats["count"] == 3
    assert (stats["mean"], stats["median"], stats["p99"]) == (
        pytest.approx(20.0),
        pytest.approx(20.0),
        pytest.approx(29.8),
    )
    rows = _rows(format_report(rep))
    assert rows["of which rejected (HTTP 429):"] == "3"
    assert (rows["Median 429 latency (ms):"], rows["P99 429 latency (ms):"]) == ("20.00", "29.80")
    assert "e2el_ms" in rep and rep["e2el_ms"]["count"] == 1  # the refusals are not in E2E

    rep = build_report(_run([_result(0, 200, None), _result(1, 503, 0.5)]))
    assert rep["rejected"] == 0 and rep["rejected_latency_ms"]["count"] == 0
    table = format_report(rep)
    assert _rows(table)["of which rejected (HTTP 429):"] == "0"
    assert "429 latency" not in table  # no section without a refusal
