"""The output processor without torch: text deltas, stop strings that end their sequence in
the core, stop tokens that add no text, and each finished request's record."""

from __future__ import annotations

import subprocess
import sys

from moeserve.engine.messages import EngineRequest
from moeserve.engine.output import OutputProcessor, token_text
from moeserve.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, StepStats
from moeserve.sampling_params import SamplingParams
from moeserve.tokenizer import Tokenizer
from tests.tokenizer_fixture import build_test_tokenizer


class FakeCore:
    """Records finish_seq calls; a request ends when all its sequences did."""

    def __init__(self, n: int) -> None:
        self.finished: list[tuple[str, int, str]] = []
        self.n = n

    def finish_seq(self, request_id: str, index: int, reason: str) -> RequestMetrics | None:
        self.finished.append((request_id, index, reason))
        done = {i for r, i, _ in self.finished if r == request_id}
        return RequestMetrics(arrival_time=0.0) if len(done) == self.n else None


def _stats() -> StepStats:
    return StepStats(0.0, 0.0, 0, 0, 1, 0, 1, 1, 0.0, 0)


def _delta(rid: str, index: int, token: int, **kw: object) -> RequestOutput:
    return RequestOutput(rid, [], [CompletionOutput(index=index, token_ids=[token], **kw)])


def _run(tok: Tokenizer, text: str, params: SamplingParams, n: int = 1):
    core = FakeCore(n)
    proc = OutputProcessor(tok, core)
    prompt = tok.encode("Say:")
    proc.add(EngineRequest("r", prompt, params))
    ids = tok.encode(text, add_special_tokens=False)
    outs, stats = [], []
    for i, t in enumerate(ids):
        last = i == len(ids) - 1
        d = _delta("r", 0, t, finish_reason="length" if last else None)
        if last:
            d.finished, d.metrics = True, RequestMetrics(arrival_time=0.0)
        st = _stats()
        proc.process([d], st)
        outs.append(d)
        stats.append(st)
        if d.finished:
            break
    return core, outs, stats


def test_text_deltas_add_up_to_the_decoded_text() -> None:
    tok = Tokenizer(build_test_tokenizer())
    core, outs, stats = _run(tok, " hello world, hello moe", SamplingParams(max_tokens=64))
    assert "".join(o.outputs[0].text for o in outs) == " hello world, hello moe"
    assert core.finished == []  # the core ended it (length): nothing to ask
    assert [r for s in stats for r, _ in s.finished] == ["length"]


def test_a_stop_string_ends_the_sequence_in_the_core() -> None:
    tok = Tokenizer(build_test_tokenizer())
    params = SamplingParams(max_tokens=64, stop=["world"])
    core, outs, stats = _run(tok, " hello world, hello moe", params)
    assert "".join(o.outputs[0].text for o in outs) == " hello "
    assert core.finished == [("r", 0, "stop")]
    last = outs[-1]
    assert last.finished and last.outputs[0].finish_reason == "stop"
    assert last.outputs[0].stop_reason == "world"
    assert [r for s in stats for r, _ in s.finished] == ["stop"]


def test_a_stop_token_adds_no_text() -> None:
    tok = Tokenizer(build_test_tokenizer())
    proc = OutputProcessor(tok, FakeCore(1))
    proc.add(EngineRequest("r", tok.encode("Say:"), SamplingParams(max_tokens=8)))
    stop = tok.encode(" hello", add_special_tokens=False)[0]  # a token with text, as stop id
    d = _delta("r", 0, stop, finish_reason="stop", stop_reason=stop)
    d.finished, d.metrics = True, RequestMetrics(arrival_time=0.0)
    proc.process([d], _stats())
    assert d.outputs[0].text == ""


def test_without_a_tokenizer_records_still_reach_the_stats() -> None:
    proc = OutputProcessor(None, FakeCore(1))
    proc.add(EngineRequest("r", [1, 2], SamplingParams(max_tokens=1)))
    d = _delta("r", 0, 7, finish_reason="length")
    d.finished, d.metrics = True, RequestMetrics(arrival_time=0.0)
    st = _stats()
    proc.process([d], st)
    assert d.outputs[0].text == "" and [r for r, _ in st.finished] == ["length"]


def test_token_text_names_ids_without_text() -> None:
    tok = Tokenizer(build_test_tokenizer())
    assert token_text(tok, tok.encode("hello", add_special_tokens=False)[0]) != ""
    assert token_text(tok, 10**6) == "token_id:1000000"  # a padded vocabulary row
    assert token_text(None, 3) == "token_id:3"


def test_the_output_side_needs_no_torch() -> None:
    code = (
        "import sys, moeserve.engine.output, moeserve.engine.scheduler, "
        "moeserve.engine.messages; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
