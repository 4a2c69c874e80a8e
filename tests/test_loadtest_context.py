"""The load tester fits its default random workload to the server's context (/v1/models), and
refuses, before sending anything, lengths given on the command line that cannot fit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from moeserve.assets import demo_model_path
from moeserve.bench.loadtest import ServedModel, _served_model
from moeserve.bench.workloads import (
    DEFAULT_INPUT_LEN,
    DEFAULT_OUTPUT_LEN,
    SPECIAL_TOKENS_ROOM,
    RandomLengths,
    fit_random_lengths,
    length_ceiling,
    random_workload,
)
from tests.server_fixture import RunningServer, serving
from tests.test_loadtest import bench

DEMO_CONTEXT = 256  # the packaged demo model's max_position_embeddings


@pytest.fixture(scope="module")
def demo_server() -> Iterator[RunningServer]:
    """The packaged demo model at its own context, as `moeserve serve` runs it by default (it
    ships inside the package: a missing one is a broken install, which fails here)."""
    yield from serving(demo_model_path(), max_model_len=None)


def test_default_workload_fits_the_demo_server(
    demo_server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's command against the default server: its defaults (128 words, about 650
    tokens of the demo's character vocabulary) are fitted, and every request succeeds."""
    assert demo_server.engine.max_model_len == DEMO_CONTEXT
    n = 24
    rc, rep = bench(demo_server, tmp_path, "--num-requests", str(n), "--max-concurrency", "8")
    err = capsys.readouterr().err
    assert rc == 0, rep.get("errors")
    assert (rep["completed"], rep["failed"]) == (n, 0), rep["errors"]
    assert "do not fit the server's context of 256 tokens" in err
    assert "--tokenizer" in err  # says how to get exact lengths
    fit = fit_random_lengths(None, None, DEMO_CONTEXT, exact=False)
    assert rep["workload"] == f"random(in={fit.input_len}, out={fit.output_len})"
    for r in rep["requests"]:
        assert r["prompt_tokens"] + r["max_tokens"] <= DEMO_CONTEXT
        assert r["max_tokens"] == int(fit.output_len)
    # Not fitted down to nothing: the prompts still fill a good part of the context.
    assert rep["total_input_tokens"] / n > DEMO_CONTEXT / 2


def test_lengths_given_that_cannot_fit_are_refused_before_sending(
    demo_server: RunningServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import moeserve.bench.loadtest as loadtest

    def no_run(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the load test started")

    monkeypatch.setattr(loadtest, "run_load", no_run)
    cases = [
        (
            ["--input-len", "200", "--output-len", "100"],
            "--input-len 200 + --output-len 100 = 300 tokens",
        ),
        (
            ["--input-len", "uniform:10:250", "--output-len", "64"],
            "--input-len uniform:10:250 (up to 250) + --output-len 64 = 314 tokens",
        ),
        (["--input-len", "300"], "--input-len 300 leaves no room for the output"),
        (["--output-len", "260"], "--output-len 260 leaves no room for a prompt"),
    ]
    for flags, message in cases:
        rc, rep = bench(demo_server, tmp_path, "--num-requests", "4", *flags)
        err = capsys.readouterr().err
        assert rc == 2 and rep == {}, flags
        assert message in err and "context of 256 tokens" in err, err


def test_fit_without_a_context_or_with_room_changes_nothing() -> None:
    for ctx in (None, 100_000):
        assert fit_random_lengths(None, None, ctx, exact=True) == RandomLengths("128", "64")
        assert fit_random_lengths("uniform:1:9", "7", ctx, exact=False) == RandomLengths(
            "uniform:1:9", "7"
        )
    fit = fit_random_lengths(None, None, 4096, exact=False)
    assert (fit.input_len, fit.output_len, fit.note) == ("128", "64", None)
    # The cut on a prompt's characters is there, but never reached by 128 words.
    assert fit.max_prompt_chars is not None and fit.max_prompt_chars > 128 * 11
    # With a tokenizer the demo's context holds the defaults as they are.
    assert fit_random_lengths(None, None, 256, exact=True) == RandomLengths("128", "64")


@pytest.mark.parametrize("ctx", [16, 64, 256, 700, 1000])
@pytest.mark.parametrize("given", ["none", "input", "output"])
def test_fitted_prompts_fit_whatever_the_tokenizer(ctx: int, given: str) -> None:
    """Whatever is fitted keeps prompt characters (a bound on any tokenizer's tokens) plus
    the special tokens' room plus max_tokens within the context."""
    input_len = "5" if given == "input" else None
    output_len = "8" if given == "output" else None
    fit = fit_random_lengths(input_len, output_len, ctx, exact=False)
    assert length_ceiling(fit.input_len) <= DEFAULT_INPUT_LEN
    assert length_ceiling(fit.output_len) <= DEFAULT_OUTPUT_LEN
    if input_len is not None:  # given: its tokens as they are, the output fitted beside it
        assert fit.max_prompt_chars is None
        assert 5 + SPECIAL_TOKENS_ROOM + int(fit.output_len) <= ctx
        return
    assert fit.max_prompt_chars is not None
    assert fit.max_prompt_chars + SPECIAL_TOKENS_ROOM + length_ceiling(fit.output_len) <= ctx
    for spec in _take(
        random_workload(
            fit.input_len, fit.output_len, seed=ctx, max_prompt_chars=fit.max_prompt_chars
        ),
        50,
    ):
        assert spec.prompt
        assert len(spec.prompt) + SPECIAL_TOKENS_ROOM + spec.max_tokens <= ctx, spec


def test_fit_messages_and_tiny_contexts() -> None:
    fit = fit_random_lengths("200", None, 256, exact=False)
    assert (fit.input_len, fit.output_len) == ("200", "54")
    assert fit.note is not None and "using --output-len 54" in fit.note
    assert "200 random words may take up to" in fit.note  # words are not tokens
    assert fit_random_lengths("200", None, 256, exact=True).note == (
        "the default --output-len 64 does not fit the server's context of 256 tokens "
        "(max_model_len in /v1/models) beside --input-len 200: using --output-len 54"
    )
    fit = fit_random_lengths(None, "100", 256, exact=True)
    assert (fit.input_len, fit.output_len, fit.note) == ("128", "100", None)
    fit = fit_random_lengths(None, None, 100, exact=True)
    assert (fit.input_len, fit.output_len) == ("65", "32")
    assert fit.note is not None and "using --input-len 65 --output-len 32" in fit.note
    for ctx in (1, 2, 3):
        with pytest.raises(ValueError, match=f"context of {ctx} tokens"):
            fit_random_lengths(None, None, ctx, exact=False)
    with pytest.raises(
        ValueError, match="--input-len 4 \\+ --output-len lognormal:9:1 \\(about 9\\) = 13 tokens"
    ):
        fit_random_lengths("4", "lognormal:9:1", 12, exact=True)
    with pytest.raises(ValueError, match="kind must be one of"):
        fit_random_lengths("gamma:1:2", None, None, exact=True)


def test_an_uncut_workload_is_the_same_as_before() -> None:
    """The cut changes no prompt it does not shorten: the same seed, the same requests."""
    plain = _take(random_workload("uniform:5:60", "9", seed=4), 20)
    capped = _take(random_workload("uniform:5:60", "9", seed=4, max_prompt_chars=10**6), 20)
    assert plain == capped
    cut = _take(random_workload("uniform:5:60", "9", seed=4, max_prompt_chars=40), 20)
    assert [s.max_tokens for s in cut] == [s.max_tokens for s in plain]
    assert any(len(s.prompt or "") > 40 for s in plain)
    for a, b in zip(plain, cut):
        assert a.prompt and b.prompt
        if len(a.prompt) <= 40:
            assert b.prompt == a.prompt
        else:
            assert len(b.prompt) <= 40 and a.prompt.startswith(b.prompt)


def test_model_cards() -> None:
    """moeserve's and vLLM's cards have max_model_len; others may not, or list it null."""
    cards = {
        "object": "list",
        "data": [
            {"id": "a", "object": "model", "max_model_len": 4096, "root": "a"},  # vLLM
            {"id": "b", "object": "model", "owned_by": "someone"},
            {"id": "c", "object": "model", "max_model_len": None},  # moeserve while loading
            {"id": "d", "max_model_len": True},
        ],
    }
    assert _served_model(cards, None) == ServedModel("a", 4096)
    assert _served_model(cards, "a") == ServedModel("a", 4096)
    for model in ("b", "c", "d", "not-listed"):
        assert _served_model(cards, model) == ServedModel(model, None)
    with pytest.raises(IndexError):
        _served_model({"data": []}, None)


def _take(it: Iterator[Any], n: int) -> list[Any]:
    return [next(it) for _ in range(n)]


def test_length_ceiling() -> None:
    specs = (
        "7",
        "uniform:3:9.4",
        "uniform:9:3",
        "normal:20:5",
        "lognormal:30:1",
        "exponential:0.2",
    )
    assert [length_ceiling(s) for s in specs] == [7, 9, 9, 20, 30, 1]
