"""`moeserve bench serve`'s shared-prefix and multi-turn workloads, and the prefix cache's
hit rate in the report: the workloads as generated, the hit rate from /metrics text, and
small real runs against the packaged demo model."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import pytest

from moeserve.assets import demo_model_path
from moeserve.bench.conversations import (
    SEPARATOR,
    Conversation,
    TurnFailed,
    conversation_factory,
    conversation_workload,
)
from moeserve.bench.loadtest import _Events, run_load
from moeserve.bench.records import LoadTestConfig, RequestResult, RunData
from moeserve.bench.report import build_report, format_report
from moeserve.bench.server_metrics import parse_metrics
from moeserve.cli import main
from moeserve.tokenizer import Tokenizer
from tests.server_fixture import RunningServer, serving


def _specs(n: int, **kw: Any) -> list[Any]:
    kw.setdefault("prefix_len", 6)
    return list(islice(conversation_workload("3", "5", **kw), n))


def test_shared_prefix_requests_cycle_through_the_prefixes() -> None:
    specs = _specs(9, num_prefixes=3, seed=1)
    firsts = [s.conversation.messages(s.turn) for s in specs]
    assert all(len(m) == 1 and m[0]["role"] == "user" for m in firsts)
    texts = [m[0]["content"] for m in firsts]
    prefixes = [t.split(SEPARATOR)[0] for t in texts]
    assert len(set(prefixes)) == 3 and all(len(p.split()) == 6 for p in prefixes)
    assert prefixes[:3] == prefixes[3:6] == prefixes[6:]  # request i: prefix i % 3
    turns = [t.split(SEPARATOR)[1] for t in texts]
    assert len(set(turns)) == 9 and all(len(t.split()) == 3 for t in turns)  # distinct turns
    assert all(s.turn == 0 and s.max_tokens == 5 and s.endpoint == "chat" for s in specs)
    assert [s.conversation.messages(0) for s in _specs(9, num_prefixes=3, seed=1)] == firsts


def test_multi_turn_requests_carry_the_earlier_turns_and_answers() -> None:
    specs = _specs(14, num_conversations=3, num_turns=2, seed=2)
    convs = [s.conversation for s in specs]
    # Round-robin: 3 conversations' first turns, their second turns, then 3 new ones.
    assert [s.turn for s in specs] == [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0]
    assert convs[0] is convs[3] and convs[1] is convs[4] and convs[6] is convs[9]
    assert len({id(c) for c in convs}) == 8  # 3 + 3 + the 2 begun last
    assert len({c.prefix for c in convs}) == 1  # one prefix shared by all conversations
    first = convs[0]
    first.answer(0, "the answer")
    msgs = first.messages(1)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[0]["content"] == first.prefix + SEPARATOR + first.turns[0]
    assert msgs[1]["content"] == "the answer" and msgs[2]["content"] == first.turns[1]


def test_a_turn_waits_for_the_previous_answer_and_fails_with_it() -> None:
    async def go() -> None:
        ok, bad = Conversation("p", ["a", "b"]), Conversation("", ["c", "d"])
        waiting = asyncio.create_task(ok.ready(1))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        ok.answer(0, "x")
        assert (await waiting)[1] == {"role": "assistant", "content": "x"}
        assert await bad.ready(0) == [{"role": "user", "content": "c"}]
        bad.settle(0)  # over without an answer
        with pytest.raises(TurnFailed):
            await bad.ready(1)

    asyncio.run(go())


def _args(**kw: Any) -> argparse.Namespace:
    base = {
        "workload": "multi-turn",
        "input_len": None,
        "output_len": None,
        "prefix_len": 20,
        "num_prefixes": 1,
        "num_conversations": 4,
        "num_turns": 3,
        "seed": 0,
        "tokenizer": None,
        "max_concurrency": None,
        "client_processes": 1,
    }
    return argparse.Namespace(**{**base, **kw})


def test_flags_are_checked_and_long_conversations_noted() -> None:
    with pytest.raises(ValueError, match="num-turns"):
        conversation_factory(_args(num_turns=0), None)
    with pytest.raises(ValueError, match="length 'zero'"):
        conversation_factory(_args(input_len="zero"), None)
    # Each conversation's turns must stay in one client process: N a multiple of the streams.
    with pytest.raises(ValueError, match="multiple of 3"):
        conversation_factory(_args(client_processes=2, max_concurrency=3), None)
    _, name, note = conversation_factory(_args(client_processes=2, max_concurrency=4), 100_000)
    assert name.startswith("multi-turn(") and note is None
    _, _, note = conversation_factory(_args(), 256)
    assert note is not None and "256" in note
    # Exact lengths from a tokenizer.
    make, name, _ = conversation_factory(
        _args(workload="shared-prefix", tokenizer=str(demo_model_path()), input_len="4"), None
    )
    tok = Tokenizer.from_dir(demo_model_path())
    spec = next(make())
    prefix, turn = spec.conversation.messages(0)[0]["content"].split(SEPARATOR)
    assert len(tok.encode(prefix, add_special_tokens=False)) == 20
    assert len(tok.encode(turn, add_special_tokens=False)) == 4
    assert name.startswith("shared-prefix(")


METRICS = """\
# HELP moeserve_model_info The model.
# TYPE moeserve_model_info gauge
moeserve_model_info{{model="m"}} 1.0
# HELP moeserve_prefix_cache_queries_total Prompt tokens looked up.
# TYPE moeserve_prefix_cache_queries_total counter
moeserve_prefix_cache_queries_total {queries}
# HELP moeserve_prefix_cache_hits_total Prompt tokens found cached.
# TYPE moeserve_prefix_cache_hits_total counter
moeserve_prefix_cache_hits_total {hits}
"""


def _run(before: str | None, after: str | None, results: list[RequestResult]) -> dict[str, Any]:
    cfg = LoadTestConfig("http://x", num_requests=1)
    snap = [None if t is None else parse_metrics(t) for t in (before, after)]
    run = RunData(cfg, "m", "w", "now", 1.0, results, snap[0], snap[1])
    return build_report(run)


def _row(rep: dict[str, Any], label: str) -> str:
    """A value of the table (format_report's 40 + 10 columns)."""
    [value] = [r[40:].strip() for r in format_report(rep).splitlines() if r[:40].strip() == label]
    return value


def _ok(cached: int | None) -> RequestResult:
    return RequestResult(0, "chat", 4, success=True, latency=0.1, cached_tokens=cached)


def test_prefix_cache_hit_rate_is_the_runs_delta() -> None:
    before = METRICS.format(queries=1000, hits=100)
    after = METRICS.format(queries=1400, hits=400)
    rep = _run(before, after, [_ok(64), _ok(0), _ok(None)])
    pc = rep["prefix_cache"]
    assert (pc["queries"], pc["hits"]) == (400, 300) and pc["hit_rate"] == 0.75
    assert pc["requests_with_cached_tokens"] == 2 and pc["mean_cached_tokens"] == 32.0
    assert _row(rep, "Prefix cache hit rate (tokens):") == "0.750"
    assert _row(rep, "Mean cached prompt tokens:") == "32.00"
    # No prompt tokens looked up during the run: no rate.
    assert _run(after, after, [])["prefix_cache"]["hit_rate"] is None


def test_prefix_cache_is_na_without_the_counters() -> None:
    plain = '# TYPE moeserve_model_info gauge\nmoeserve_model_info{model="m"} 1.0\n'
    for before, after in ((plain, plain), (None, None)):
        rep = _run(before, after, [_ok(None)])
        pc = rep["prefix_cache"]
        assert pc["hit_rate"] is None and pc["mean_cached_tokens"] is None and pc["note"]
        assert _row(rep, "Prefix cache hit rate (tokens):") == "n/a"
        assert _row(rep, "Mean cached prompt tokens:") == "n/a"


def test_cached_tokens_are_read_from_the_usage_chunk() -> None:
    res = RequestResult(0, "chat", 4)
    events = _Events(conversation_workload_spec(), res, 0.0, 0.0)
    usage = {"prompt_tokens": 90, "completion_tokens": 3, "total_tokens": 93}
    events(json.dumps({"choices": [], "usage": usage}).encode())
    assert res.prompt_tokens == 90 and res.cached_tokens is None
    usage["prompt_tokens_details"] = {"cached_tokens": 64}
    events(json.dumps({"choices": [], "usage": usage}).encode())
    assert res.cached_tokens == 64


def conversation_workload_spec() -> Any:
    return next(conversation_workload("2", "2", prefix_len=2))


# ---- Real runs against the demo model ----


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    yield from serving(demo_model_path(), max_model_len=None)


def test_multi_turn_run_sends_each_answer_back(server: RunningServer) -> None:
    """Every turn's prompt is the template of the conversation so far, answers included:
    the server's prompt_tokens for it equal the tokens of the rendered messages."""
    work = conversation_workload("3", "4", prefix_len=8, num_conversations=2, num_turns=2)
    specs = list(islice(work, 4))
    cfg = LoadTestConfig(server.url, num_requests=4, max_concurrency=2, progress=False)
    run = asyncio.run(run_load(cfg, iter(specs), "multi-turn"))
    assert all(r.success for r in run.results), [r.error for r in run.results]
    tok = Tokenizer.from_dir(demo_model_path())
    by_index = {r.index: r for r in run.results}
    for i, spec in enumerate(specs):
        conv = spec.conversation
        assert conv.answers[spec.turn] is not None
        text = tok.apply_chat_template(conv.messages(spec.turn), add_generation_prompt=True)
        assert by_index[i].prompt_tokens == len(tok.encode(text, add_special_tokens=False))
    # The second turns hold the first turns' answers, which the model did write.
    assert all(s.conversation.answers[0] for s in specs)
    rep = build_report(run)
    pc = rep["prefix_cache"]
    if pc["queries"] is None:  # a server without a prefix cache
        assert pc["hit_rate"] is None and pc["mean_cached_tokens"] is None
    else:  # later turns repeat the earlier ones: some of their tokens are cached
        assert pc["hit_rate"] > 0 and pc["mean_cached_tokens"] > 0


def test_shared_prefix_run_through_the_cli(server: RunningServer, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    rc = main(
        [
            *("bench", "serve", "--base-url", server.url, "--workload", "shared-prefix"),
            *("--prefix-len", "12", "--num-prefixes", "2", "--input-len", "3"),
            *("--output-len", "4", "--num-requests", "6", "--max-concurrency", "2"),
            *("--no-progress", "--result-json", str(out), "--save-detailed"),
        ]
    )
    rep = json.loads(out.read_text())
    assert rc == 0 and rep["completed"] == 6, rep["errors"]
    assert rep["workload"].startswith("shared-prefix(prefix=12, prefixes=2")
    assert "prefix_cache" in rep and set(rep["prefix_cache"]) >= {"hit_rate", "mean_cached_tokens"}
    if rep["prefix_cache"]["queries"] is not None:
        assert rep["prefix_cache"]["hit_rate"] > 0  # 6 requests over 2 prefixes
