"""The async engine: concurrent streams, aborts that free blocks at once, a dead loop fails all."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from moeserve import LLM, SamplingParams
from moeserve.engine.async_engine import AsyncEngine, EngineDeadError
from moeserve.engine.outputs import StepStats
from tests.checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "olmoe", "olmoe", tokenizer=True)


def _engine(ckpt: Path):
    return LLM(ckpt, progress=False, block_size=4, max_model_len=128).engine


async def _collect(aeng: AsyncEngine, prompt, params, rid: str) -> list[int]:
    tokens: list[int] = []
    async for out in aeng.generate(prompt, params, rid):
        for o in out.outputs:
            tokens.extend(o.token_ids)
    return tokens


def test_concurrent_streams_match_offline(ckpt: Path) -> None:
    engine = _engine(ckpt)
    stats: list[StepStats] = []
    aeng = AsyncEngine(engine, stats_sink=stats.append)
    prompts = [[5 + i, 9, 40 + 3 * i, 7] for i in range(8)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)

    async def main() -> list[list[int]]:
        try:
            return await asyncio.gather(
                *(_collect(aeng, p, params, f"r{i}") for i, p in enumerate(prompts))
            )
        finally:
            await aeng.shutdown()

    streamed = asyncio.run(main())
    offline = LLM(ckpt, progress=False).generate(prompts, params)
    assert streamed == [o.outputs[0].token_ids for o in offline]
    assert max(s.num_seqs for s in stats) > 1  # they really shared steps
    assert sum(s.num_generated_tokens for s in stats) == 80


def test_abort_mid_stream_frees_blocks_within_a_step(ckpt: Path) -> None:
    engine = _engine(ckpt)
    aeng = AsyncEngine(engine)
    params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)

    async def main() -> None:
        gens = [aeng.generate([5, 6, 7 + i], params, f"r{i}") for i in range(6)]
        for g in gens:
            await anext(g)
        assert engine.scheduler.stats().kv_blocks_used > 0
        for g in gens:  # the client goes away
            await g.aclose()
        # The step in flight when the client left may finish; the one after it must not
        # run with the aborted requests (they go before the next step starts).
        steps = aeng.steps
        while aeng.steps < steps + 2 and engine.has_unfinished():
            await asyncio.sleep(0.001)
        assert not engine.has_unfinished()
        assert engine.scheduler.stats().kv_blocks_used == 0
        assert aeng.num_open_requests == 0
        await aeng.shutdown()

    asyncio.run(main())


def test_admission_error_raised_to_caller(ckpt: Path) -> None:
    aeng = AsyncEngine(_engine(ckpt))

    async def main() -> None:
        with pytest.raises(ValueError, match="maximum context length is 128"):
            await _collect(aeng, [5] * 100, SamplingParams(max_tokens=50), "big")
        assert await _collect(aeng, [5, 6], SamplingParams(max_tokens=2), "ok")
        await aeng.shutdown()

    asyncio.run(main())


def test_dead_loop_fails_every_open_request(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _engine(ckpt)
    aeng = AsyncEngine(engine)
    calls = {"n": 0}
    real = engine.runner.execute

    def flaky(work, feed=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device lost")
        return real(work, feed)

    monkeypatch.setattr(engine.runner, "execute", flaky)
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)

    async def main() -> None:
        results = await asyncio.wait_for(
            asyncio.gather(
                *(_collect(aeng, [5, 6 + i], params, f"r{i}") for i in range(4)),
                return_exceptions=True,
            ),
            timeout=30,
        )
        assert all(isinstance(r, EngineDeadError) for r in results)
        assert aeng.is_dead and "device lost" in str(aeng.error)
        with pytest.raises(EngineDeadError):
            await _collect(aeng, [5], params, "late")

    asyncio.run(main())


def test_slow_consumer_gets_coalesced_deltas(ckpt: Path) -> None:
    """A stream that falls behind receives what piled up as one delta: same tokens, text and
    logprobs in order, fewer deltas, exactly one finished."""
    engine = _engine(ckpt)
    aeng = AsyncEngine(engine)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=1)

    async def main() -> list:
        deltas = []
        try:
            async for out in aeng.generate([5, 9, 40, 7], params, "slow"):
                deltas.append(out)
                await asyncio.sleep(0.05)  # several engine steps pass meanwhile
        finally:
            await aeng.shutdown()
        return deltas

    deltas = asyncio.run(main())
    [want] = LLM(ckpt, progress=False).generate([[5, 9, 40, 7]], params)
    tokens = [t for d in deltas for o in d.outputs for t in o.token_ids]
    assert tokens == want.outputs[0].token_ids
    assert "".join(o.text for d in deltas for o in d.outputs) == want.outputs[0].text
    lps = [lp.token_id for d in deltas for o in d.outputs for lp in o.logprobs or []]
    assert lps == tokens
    assert len(deltas) < 12 and [d.finished for d in deltas].count(True) == 1
    assert deltas[-1].finished and deltas[-1].outputs[0].finish_reason == "length"
