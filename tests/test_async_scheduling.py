"""Async scheduling on CPU: a step queued before the last one's tokens are read gives exactly
the outputs of the synchronous engine (tokens, text, logprobs, finish reasons), wastes no
step on a sequence that reached its length, and loses no KV block to stops, preemptions or
aborts (the abort soak is tests/test_engine.py's, run in both modes). The device-side
token feed of the CUDA graphs is covered by tests/test_fast_path.py."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from moeserve import LLM, SamplingParams
from moeserve.engine.messages import EngineRequest
from moeserve.engine.outputs import RequestOutput
from tests.checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "qwen2", "qwen2_moe", tokenizer=True)


def _summary(outs: list[RequestOutput]) -> list[list[tuple]]:
    return [
        [
            (
                o.token_ids,
                o.text,
                o.finish_reason,
                o.stop_reason,
                [(lp.token_id, round(lp.logprob, 5), [t for t, _ in lp.top]) for lp in o.logprobs]
                if o.logprobs
                else None,
            )
            for o in r.outputs
        ]
        for r in outs
    ]


def _workload(llm: LLM) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(3)
    prompts = [[rng.randrange(4, 300) for _ in range(rng.randrange(2, 30))] for _ in range(14)]
    # A stop token and a stop string that greedy decoding of prompt 0 reaches mid-way.
    [probe] = llm.generate(
        [prompts[0]], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    )
    tok, text = probe.outputs[0].token_ids[5], probe.outputs[0].text
    params = [
        SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=[tok]),
        SamplingParams(max_tokens=16, temperature=0.0, stop=[text[4:6]]),
        SamplingParams(max_tokens=9, temperature=1.0, top_p=0.8, seed=11),
        SamplingParams(max_tokens=7, n=2, temperature=0.9, seed=4),
        SamplingParams(max_tokens=6, temperature=0.0, logprobs=3),
        SamplingParams(max_tokens=8, temperature=0.7, top_k=20, seed=2, logprobs=1),
    ]
    params += [
        SamplingParams(max_tokens=rng.randrange(1, 20), temperature=0.0, ignore_eos=True)
        for _ in range(len(prompts) - len(params))
    ]
    return prompts, params


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"max_num_batched_tokens": 8, "max_num_seqs": 6},  # chunked prefills beside decodes
        {"max_model_len": 64, "kv_cache_memory": "tight"},  # preemptions
    ],
    ids=["roomy", "chunked", "preempting"],
)
def test_async_outputs_equal_sync(ckpt: Path, options: dict) -> None:
    kw = dict(options, progress=False, block_size=4)
    if kw.get("kv_cache_memory") == "tight":
        from moeserve.engine.runner import kv_bytes_per_block

        probe = LLM(ckpt, progress=False, block_size=4)
        e = probe.engine
        kw["kv_cache_memory"] = 17 * kv_bytes_per_block(e.model_config, 4, e.executor.model.dtype)
    sync = LLM(ckpt, async_scheduling=False, **kw)
    prompts, params = _workload(sync)
    want = sync.generate(prompts, params)
    lag = LLM(ckpt, async_scheduling=True, **kw)
    got = lag.generate(prompts, params)
    assert _summary(got) == _summary(want)
    assert {o.outputs[0].finish_reason for o in want} == {"stop", "length"}
    stats = lag.engine.scheduler.stats()
    assert stats.kv_blocks_used == 0 and stats.num_running == stats.num_waiting == 0
    if "max_model_len" in options:
        assert stats.num_preemptions_total > 0


def test_outputs_come_one_step_later_and_no_step_is_wasted(ckpt: Path) -> None:
    llm = LLM(ckpt, progress=False, async_scheduling=True)
    eng = llm.engine
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    eng.add_request(EngineRequest("a", [5, 6, 7], params))
    assert eng.step().outputs == []  # the prefill is queued; its token is not read yet
    tokens, steps = [], 0
    while eng.has_unfinished():
        for out in eng.step().outputs:
            tokens += out.outputs[0].token_ids
        steps += 1
    assert len(tokens) == 4 and steps == 4
    # max_tokens is known up front: the last token's step is the last one run.
    assert eng.num_steps == 4

    # A stop the host sees only after the next step was queued costs that one step, no token.
    [full] = llm.generate(
        [[9, 8, 7]], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    )
    stop = full.outputs[0].token_ids[2]
    first = full.outputs[0].token_ids.index(stop)
    before = eng.num_steps
    [cut] = llm.generate(
        [[9, 8, 7]], SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[stop])
    )
    assert cut.outputs[0].token_ids == full.outputs[0].token_ids[: first + 1]
    assert eng.num_steps - before == first + 2
    assert eng.scheduler.stats().kv_blocks_used == 0


def test_penalties_read_the_tokens_before_sampling(ckpt: Path) -> None:
    params = SamplingParams(
        max_tokens=12,
        temperature=0.0,
        repetition_penalty=1.8,
        frequency_penalty=0.5,
        ignore_eos=True,
    )
    other = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [[5, 5, 6], [7, 8, 9, 10]]
    want = LLM(ckpt, progress=False, async_scheduling=False).generate(prompts, [params, other])
    got = LLM(ckpt, progress=False, async_scheduling=True).generate(prompts, [params, other])
    assert _summary(got) == _summary(want)


def test_cli_flags_reach_the_engine(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moeserve.cli import build_parser, engine_config
    from moeserve.config import ConfigError, EngineConfig

    def config(*argv: str) -> EngineConfig:
        return engine_config(build_parser().parse_args(["serve", "--model", str(ckpt), *argv]))

    assert config().kernels.async_scheduling is None  # auto: on for CUDA
    assert config("--async-scheduling", "on").kernels.async_scheduling is True
    assert config("--async-scheduling", "off").kernels.async_scheduling is False
    assert config().scheduler.admission_wait_steps == 8
    monkeypatch.setenv("MOESERVE_ADMISSION_WAIT_STEPS", "0")
    assert config().scheduler.admission_wait_steps == 0
    llm = LLM(config=config(), progress=False)
    assert llm.engine.scheduler.admission_wait_steps == 0 and not llm.engine.async_scheduling
    with pytest.raises(ConfigError, match="admission_wait_steps.*--admission-wait-steps"):
        LLM(ckpt, progress=False, admission_wait_steps=-1)
    with pytest.raises(ConfigError, match="--admission-wait-steps"):
        config("--admission-wait-steps", "-1")


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_min_tokens_holds_off_eos_stop_tokens_and_stop_strings(
    ckpt: Path, async_scheduling: bool
) -> None:
    """vLLM's min_tokens: with EOS forced by a logit bias the output is EOS alone, and with
    min_tokens=5 five other tokens come first (EOS banned until then, in either scheduling
    mode: the count includes tokens still in flight); a stop token likewise; a stop string
    the first tokens complete is not honoured, one after min_tokens is."""
    llm = LLM(ckpt, progress=False, async_scheduling=async_scheduling)
    eos = min(llm.engine.eos_token_ids)
    forced = SamplingParams(max_tokens=12, temperature=0, logit_bias={eos: 100.0})
    [alone] = llm.generate("Hello", forced)
    assert alone.outputs[0].token_ids == [eos]
    held = SamplingParams(max_tokens=12, temperature=0, logit_bias={eos: 100.0}, min_tokens=5)
    [out] = llm.generate("Hello", held)
    ids = out.outputs[0].token_ids
    assert len(ids) == 6 and ids[-1] == eos and eos not in ids[:-1]
    assert out.outputs[0].finish_reason == "stop"
    stop_tok = ids[0]
    by_token = SamplingParams(
        max_tokens=12, temperature=0, stop_token_ids=[stop_tok], logit_bias={stop_tok: 100.0}
    )
    assert llm.generate("Hello", by_token)[0].outputs[0].token_ids == [stop_tok]
    later = SamplingParams(
        max_tokens=12,
        temperature=0,
        stop_token_ids=[stop_tok],
        logit_bias={stop_tok: 100.0},
        min_tokens=3,
    )
    got = llm.generate("Hello", later)[0].outputs[0].token_ids
    assert len(got) == 4 and got[-1] == stop_tok and stop_tok not in got[:-1]
    # Stop strings: the plain greedy text, cut at a string its first token completes only
    # once min_tokens allows.
    plain = llm.generate("Hello", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    text = plain[0].outputs[0].text
    stop = text[:1]
    assert stop
    for min_tokens, want in ((0, ""), (1, ""), (8, text)):
        cut = SamplingParams(
            max_tokens=8, temperature=0, ignore_eos=True, stop=[stop], min_tokens=min_tokens
        )
        assert llm.generate("Hello", cut)[0].outputs[0].text == want, min_tokens
