"""The engine end to end on CPU: batch invariance, chunked prefill, preemption, seeds, aborts."""

from __future__ import annotations

import random
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from moeserve import LLM, SamplingParams
from moeserve.config import ConfigError
from moeserve.engine.messages import EngineRequest
from moeserve.engine.runner import KVCacheTooSmall
from moeserve.engine.scheduler import RequestTooLarge
from moeserve.model import layers
from tests.checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "qwen2", "qwen2_moe", tokenizer=True)


def _requests(n: int = 16, seed: int = 0) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(4, 300) for _ in range(rng.randrange(3, 40))] for _ in range(n)]
    params = [
        SamplingParams(max_tokens=rng.randrange(1, 24), temperature=0.0, ignore_eos=True)
        for _ in range(n)
    ]
    return prompts, params


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def _alone(llm: LLM, prompts, params) -> list[list[int]]:
    return [_tokens(llm.generate([p], [sp]))[0] for p, sp in zip(prompts, params)]


def test_batch_invariance_chunked_prefill_and_preemption(ckpt: Path) -> None:
    prompts, params = _requests()
    roomy = LLM(ckpt, progress=False, block_size=4, max_num_seqs=16)
    alone = _alone(roomy, prompts, params)
    assert [len(t) for t in alone] == [p.max_tokens for p in params]
    assert _tokens(roomy.generate(prompts, params)) == alone

    chunked = LLM(ckpt, progress=False, block_size=4, max_num_batched_tokens=8, max_num_seqs=8)
    assert _tokens(chunked.generate(prompts, params)) == alone

    # 40 blocks of 4 tokens: far less than 16 sequences need at once.
    tight = LLM(
        ckpt,
        progress=False,
        block_size=4,
        max_model_len=64,
        kv_cache_memory=40 * _block_bytes(roomy),
    )
    assert tight.engine.executor.num_blocks == 40
    outs = tight.generate(prompts, params)
    assert _tokens(outs) == alone
    assert tight.engine.scheduler.stats().num_preemptions_total > 0
    assert tight.engine.scheduler.stats().kv_blocks_used == 0


def test_eager_steps_run_attention_without_cudnn(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cuDNN's SDPA compiles a plan for each new pair of lengths (tens of ms on a GPU): every
    attention call of an eager step, chunked prefills' lower-right masks included, runs with
    it switched off, and the switch is back as it was after the step."""
    real = F.scaled_dot_product_attention
    seen: list[bool] = []

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(*args, **kwargs)

    # Only the model's calls (torch's CausalBias checks the function it is given is SDPA's).
    fake_f = types.SimpleNamespace(**{k: getattr(F, k) for k in dir(F) if not k.startswith("__")})
    fake_f.scaled_dot_product_attention = spy
    monkeypatch.setattr(layers, "F", fake_f)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    prompts, params = _requests(4)
    llm = LLM(
        ckpt,
        progress=False,
        block_size=4,
        max_num_batched_tokens=8,
        max_num_seqs=4,
        enforce_eager=True,
    )
    llm.generate(prompts, params)
    assert len(seen) > 8 and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


def _block_bytes(llm: LLM) -> int:
    from moeserve.engine.runner import kv_bytes_per_block

    e = llm.engine
    return kv_bytes_per_block(e.model_config, e.executor.block_size, e.executor.model.dtype)


def test_seeded_sampling_reproducible_across_batches(ckpt: Path) -> None:
    llm = LLM(ckpt, progress=False, block_size=4)
    prompts, _ = _requests(6, seed=1)
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    other = SamplingParams(max_tokens=12, temperature=1.0)
    alone = _tokens(llm.generate([prompts[0]], [seeded]))[0]
    batched = llm.generate(prompts, [other] * 2 + [seeded] + [other] * 3)
    assert batched[2].outputs[0].token_ids == alone
    different = _tokens(llm.generate([prompts[0]], [SamplingParams(max_tokens=12, seed=99)]))[0]
    assert different != alone


def test_n_samples_and_logprobs(ckpt: Path) -> None:
    llm = LLM(ckpt, progress=False)
    [out] = llm.generate("hello there", SamplingParams(n=3, max_tokens=6, seed=5, logprobs=3))
    assert len(out.outputs) == 3 and len({tuple(o.token_ids) for o in out.outputs}) > 1
    for o in out.outputs:
        assert len(o.logprobs) == len(o.token_ids) == 6
        for tok, lp in zip(o.token_ids, o.logprobs):
            assert lp.token_id == tok and len(lp.top) == 3 and lp.logprob <= 0
            assert lp.top[0][1] >= lp.top[-1][1]
    assert out.metrics.ttft is not None and out.metrics.e2e >= out.metrics.ttft


def test_stop_strings_and_stop_tokens(ckpt: Path) -> None:
    llm = LLM(ckpt, progress=False)
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    [full] = llm.generate("abc", greedy)
    text = full.outputs[0].text
    assert len(text) > 4
    stop = text[2:4]
    [cut] = llm.generate("abc", SamplingParams(max_tokens=20, temperature=0, stop=[stop]))
    assert cut.outputs[0].text == text[: text.index(stop)]
    assert cut.outputs[0].finish_reason == "stop" and cut.outputs[0].stop_reason == stop
    tok = full.outputs[0].token_ids[3]
    by_tok = SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[tok])
    [by_id] = llm.generate("abc", by_tok)
    ids = by_id.outputs[0].token_ids
    assert ids[-1] == tok and tok not in ids[:-1] and by_id.outputs[0].finish_reason == "stop"
    assert full.outputs[0].finish_reason == "length"


def test_admission_errors(ckpt: Path) -> None:
    llm = LLM(ckpt, progress=False, max_model_len=64)
    with pytest.raises(RequestTooLarge, match="64"):
        llm.generate([[5] * 60], SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[5, 10**6]])
    with pytest.raises(ValueError, match="logit_bias: token 1000000 is outside the vocabulary"):
        llm.generate([[5, 6]], SamplingParams(logit_bias={10**6: 1.0}))
    with pytest.raises(ValueError, match="empty"):
        llm.generate([""])
    assert not llm.engine.has_unfinished()
    with pytest.raises(KVCacheTooSmall, match="--kv-cache-memory"):
        LLM(ckpt, progress=False, max_model_len=64, block_size=4, kv_cache_memory=1000)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_soak_with_aborts_frees_everything(ckpt: Path, async_scheduling: bool) -> None:
    """With async scheduling an abort may hit a request whose step is already queued."""
    llm = LLM(
        ckpt,
        progress=False,
        block_size=4,
        max_model_len=64,
        kv_cache_memory=60 * 4096,
        max_num_seqs=8,
        async_scheduling=async_scheduling,
    )
    eng = llm.engine
    rng = random.Random(7)
    live: list[str] = []
    finished = aborted = 0
    for i in range(300):
        prompt = [rng.randrange(4, 300) for _ in range(rng.randrange(1, 20))]
        params = SamplingParams(max_tokens=rng.randrange(1, 12), temperature=1.0, ignore_eos=True)
        eng.add_request(EngineRequest(f"r{i}", prompt, params))
        live.append(f"r{i}")
        for _ in range(rng.randrange(0, 3)):
            for out in eng.step().outputs:
                assert out.request_id in live  # nothing arrives for an aborted request
                if out.finished:
                    live.remove(out.request_id)
                    finished += 1
        if live and rng.random() < 0.3:
            victim = live.pop(rng.randrange(len(live)))
            assert eng.abort_request(victim)
            aborted += 1
    while eng.has_unfinished():
        for out in eng.step().outputs:
            assert out.request_id in live
            if out.finished:
                live.remove(out.request_id)
                finished += 1
    assert not live and finished + aborted == 300 and aborted > 50
    s = eng.scheduler.stats()
    assert s.kv_blocks_used == 0 and s.num_running == 0 and s.num_waiting == 0


def test_max_model_len_beyond_the_model_is_refused_before_loading(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "m", "mixtral")  # 256 positions
    with pytest.raises(ConfigError, match="max_model_len 300 exceeds .* 256"):
        LLM(ckpt, progress=False, max_model_len=300)
