"""Prefix caching through the engine (every family: outputs equal with it on and off),
preemption, aborts, n>1 sharing the prompt, and the server's cached_tokens and counters."""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from moeserve import LLM, SamplingParams
from moeserve.config import EngineConfig
from moeserve.engine.messages import EngineRequest
from moeserve.engine.outputs import StepStats
from moeserve.engine.runner import kv_bytes_per_block
from moeserve.metrics import Metrics
from tests.checkpoints import FAMILIES, make_checkpoint
from tests.server_fixture import (
    GREEDY,
    MODEL_NAME,
    RunningServer,
    build_checkpoint,
    serving,
    sse_events,
)

BS = 4


# ---- outputs --------------------------------------------------------------------------
FAMILY_NAMES = list(FAMILIES)


def _engine(ckpt: Path, caching: bool, **kw: object) -> LLM:
    kw = {"block_size": BS, "max_model_len": 96, "dtype": "float32", **kw}
    return LLM(ckpt, progress=False, enable_prefix_caching=caching, **kw)


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_outputs_identical_with_caching_on_and_off(tmp_path: Path, family: str) -> None:
    """Greedy outputs of prompts sharing a prefix with earlier ones (a hit), of one wholly
    cached, and of one diverging inside a block, are the uncached engine's."""
    ckpt = make_checkpoint(tmp_path / family, family)
    rng = random.Random(3)
    base = [rng.randrange(3, 60) for _ in range(22)]
    prompts = [base + [7, 8], base + [9], base[:20], base[:13] + [5, 6, 7], base + [7, 8]]
    on, off = _engine(ckpt, True), _engine(ckpt, False)
    for i, p in enumerate(prompts):
        [got] = on.generate([p], _greedy(6))
        [want] = off.generate([p], _greedy(6))
        assert got.outputs[0].token_ids == want.outputs[0].token_ids, (family, i)
        assert want.num_cached_tokens == 0
        assert got.num_cached_tokens == [0, 20, 16, 12, 20][i], (family, i)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("pc") / "qwen", "qwen2_moe")


def _pool_settled(llm: LLM) -> None:
    pool = llm.engine.scheduler.block_pool
    assert pool.num_used == 0 and all(pool.ref_count(b) == 0 for b in range(pool.num_blocks))


def _block_bytes(llm: LLM) -> int:
    e = llm.engine
    return kv_bytes_per_block(e.model_config, BS, e.executor.model.dtype, e.executor.kv_groups)


def test_preemption_in_a_tiny_pool_keeps_outputs(qwen: Path) -> None:
    rng = random.Random(5)
    stems = [[rng.randrange(3, 60) for _ in range(30)] for _ in range(2)]
    prompts = [
        rng.choice(stems)[: rng.randrange(6, 30)] + [rng.randrange(3, 60)] for _ in range(12)
    ]
    params = _greedy(12)
    off = _engine(qwen, False)
    want = [o.outputs[0].token_ids for o in off.generate(prompts, params)]
    tight = _engine(qwen, True, max_num_seqs=8, kv_cache_memory=26 * _block_bytes(off))
    assert tight.engine.executor.num_blocks == 26
    got = tight.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in got] == want
    assert tight.engine.scheduler.stats().num_preemptions_total > 0
    assert any(o.num_cached_tokens for o in got)
    _pool_settled(tight)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_aborts_mid_prefill_leave_the_cache_exact(qwen: Path, async_scheduling: bool) -> None:
    """A request aborted with part of its prompt computed leaves those blocks cached; the
    next one sharing them gets the uncached engine's tokens."""
    llm = _engine(
        qwen, True, max_num_batched_tokens=8, max_num_seqs=8, async_scheduling=async_scheduling
    )
    eng = llm.engine
    rng = random.Random(11)
    base = [rng.randrange(3, 60) for _ in range(40)]
    eng.add_request(EngineRequest("a", base, _greedy(4)))
    for _ in range(3):  # 24 of its 40 prompt tokens
        eng.step()
    assert eng.abort_request("a")
    while eng.has_work():
        eng.step()
    _pool_settled(llm)
    assert eng.scheduler.block_pool.num_cached == 6
    [got] = llm.generate([base + [5]], _greedy(8))
    [want] = _engine(qwen, False).generate([base + [5]], _greedy(8))
    assert got.num_cached_tokens == 24 and got.outputs[0].token_ids == want.outputs[0].token_ids
    _pool_settled(llm)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pcn")
    return {f: make_checkpoint(root / f, f) for f in ("qwen2_moe", "gpt_oss", "deepseek_v2")}


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss", "deepseek_v2"])
@pytest.mark.parametrize("caching", [True, False])
def test_n_choices_compute_the_prompt_once(
    ckpts: dict[str, Path], family: str, caching: bool
) -> None:
    """n=3 under a seed: the prompt is computed once (the siblings only its last partial
    block), and each choice is the n=1 output of its seed (seed + i). One KV group, the
    sliding-window pair, and the latent cache."""
    qwen = ckpts[family]
    llm = _engine(qwen, caching)
    prompt = [(7 * i) % 50 + 3 for i in range(23)]  # 5 full blocks + 3 tokens
    eng = llm.engine
    params = SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=42, ignore_eos=True)
    eng.add_request(EngineRequest("n3", prompt, params))
    prefill, outs = 0, {0: [], 1: [], 2: []}
    while eng.has_work():
        step = eng.step()
        prefill += step.stats.num_prefill_tokens if step.stats else 0
        for ro in step.outputs:
            for o in ro.outputs:
                outs[o.index].extend(o.token_ids)
    assert prefill == 23 + 2 * 3
    fresh = _engine(qwen, False)
    for i in range(3):
        single = SamplingParams(max_tokens=8, temperature=1.0, seed=42 + i, ignore_eos=True)
        [want] = fresh.generate([prompt], single)
        assert outs[i] == want.outputs[0].token_ids, i
    _pool_settled(llm)


# ---- HTTP: usage.prompt_tokens_details.cached_tokens and the counters ----------------------
@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    yield from serving(build_checkpoint(tmp_path_factory))


def _counter(text: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", text, flags=re.M)
    assert m is not None, name
    return float(m.group(1))


def test_cached_tokens_in_usage_and_metrics(srv: RunningServer) -> None:
    http = srv.client()
    metrics = http.get("/metrics").text
    queries = _counter(metrics, "moeserve_prefix_cache_queries_total")
    hits = _counter(metrics, "moeserve_prefix_cache_hits_total")
    prompt = [(5 * i) % 90 + 3 for i in range(41)]
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 3, **GREEDY}
    first = http.post("/v1/completions", json=body).json()
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    second = http.post("/v1/completions", json=body).json()
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": 40}
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    # Streamed: the final usage chunk carries it too.
    stream = {"stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json={**body, **stream}) as r:
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]" and events[-2]["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 40
    }
    # Chat: the same conversation twice; the second finds all but its last partial block.
    chat = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "Tell me a long story about caches. " * 4}],
        "max_tokens": 3,
        **GREEDY,
    }
    http.post("/v1/chat/completions", json=chat)
    again = http.post("/v1/chat/completions", json=chat).json()["usage"]
    assert again["prompt_tokens_details"]["cached_tokens"] == (again["prompt_tokens"] - 1) // 4 * 4
    with http.stream("POST", "/v1/chat/completions", json={**chat, **stream}) as r:
        events = sse_events(r.iter_lines())
    assert events[-2]["usage"]["prompt_tokens_details"] == again["prompt_tokens_details"]
    srv.wait_idle()
    metrics = http.get("/metrics").text
    chat_len = again["prompt_tokens"]
    cached = again["prompt_tokens_details"]["cached_tokens"]
    assert (
        _counter(metrics, "moeserve_prefix_cache_queries_total") - queries == 3 * 41 + 3 * chat_len
    )
    assert _counter(metrics, "moeserve_prefix_cache_hits_total") - hits == 2 * 40 + 2 * cached


def test_flag_env_and_llm_option(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from moeserve.cli import build_parser
    from moeserve.cli_options import engine_config

    for var in [v for v in os.environ if v.startswith("MOESERVE_")]:
        monkeypatch.delenv(var)

    def cfg(*argv: str) -> bool:
        args = build_parser().parse_args(["serve", "--model", str(tmp_path), *argv])
        return engine_config(args).cache.enable_prefix_caching

    assert cfg() is True and cfg("--no-enable-prefix-caching") is False
    monkeypatch.setenv("MOESERVE_ENABLE_PREFIX_CACHING", "0")
    assert cfg() is False and cfg("--enable-prefix-caching") is True
    assert EngineConfig.from_options(tmp_path).cache.enable_prefix_caching is True
    off = EngineConfig.from_options(tmp_path, enable_prefix_caching=False)
    assert off.cache.enable_prefix_caching is False


def test_metrics_counters_add_up() -> None:
    m = Metrics(
        model_name="m", num_sparse_layers=1, num_experts=2, expert_counts=None, sparse_layer_ids=[0]
    )
    for queries, hits in ((40, 0), (41, 36)):
        stats = StepStats(
            timestamp=0.0,
            step_seconds=0.01,
            num_running=1,
            num_waiting=0,
            num_seqs=1,
            num_prefill_tokens=queries - hits,
            num_decode_tokens=0,
            num_generated_tokens=1,
            kv_usage=0.1,
            num_preempted=0,
            num_prefix_queries=queries,
            num_prefix_hits=hits,
        )
        m.observe_step(stats)
    body = m.render()[0].decode()
    assert _counter(body, "moeserve_prefix_cache_queries_total") == 81
    assert _counter(body, "moeserve_prefix_cache_hits_total") == 36


def _soak(llm: LLM, seed: int) -> dict[str, list[list[int]]]:
    """Requests from shared stems (some n>1) arriving while others run, a few aborted; the
    finished ones' tokens by request id."""
    eng, rng = llm.engine, random.Random(seed)
    stems = [[rng.randrange(3, 60) for _ in range(40)] for _ in range(3)]
    done: dict[str, list[list[int]]] = {}
    toks: dict[str, dict[int, list[int]]] = {}
    hits = [0]

    def step() -> None:
        out = eng.step()
        hits[0] += out.stats.num_prefix_hits if out.stats else 0
        for ro in out.outputs:
            per = toks.setdefault(ro.request_id, {})
            for o in ro.outputs:
                per.setdefault(o.index, []).extend(o.token_ids)
            if ro.finished:
                done[ro.request_id] = [per[i] for i in sorted(per)]

    for i in range(24):
        prompt = rng.choice(stems)[: rng.randrange(2, 40)] + [rng.randrange(3, 60)]
        n = rng.choice((1, 1, 2, 3))
        eng.add_request(EngineRequest(f"r{i}", prompt, SamplingParams(n=n, **GREEDY_KW)))
        for _ in range(rng.randrange(0, 3)):
            step()
        if i % 7 == 3:
            eng.abort_request(f"r{i - 1}")
    while eng.has_work():
        step()
    _pool_settled(llm)
    assert (hits[0] > 0) == llm.config.cache.enable_prefix_caching
    assert eng.scheduler.stats().num_preemptions_total > 0
    return done


GREEDY_KW = dict(max_tokens=6, temperature=0.0, ignore_eos=True)


def test_soak_async_shared_prefixes_n_and_aborts(qwen: Path) -> None:
    """Async scheduling, a pool that preempts, n>1 and aborts: every request that finished in
    both runs has the same tokens with caching on as off, and the pool ends settled."""
    kw = dict(async_scheduling=True, max_num_seqs=8, max_num_batched_tokens=24, max_model_len=48)
    off = _engine(qwen, False, **kw)
    kw["kv_cache_memory"] = 16 * _block_bytes(off)
    on, off = _soak(_engine(qwen, True, **kw), 1), _soak(_engine(qwen, False, **kw), 1)
    both = set(on) & set(off)
    assert len(both) >= 15
    for rid in sorted(both):
        assert on[rid] == off[rid], rid


def test_prompt_logprobs_requests_compute_the_whole_prompt(qwen: Path) -> None:
    """echo + logprobs (lm-evaluation-harness): a cached prompt is computed again, so every
    prompt position has its log-probs; it fills the cache for plain requests."""
    llm = _engine(qwen, True)
    prompt = [(3 * i) % 50 + 3 for i in range(18)]
    lp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
    [a] = llm.generate([prompt], lp)
    [b] = llm.generate([prompt], lp)
    assert a.num_cached_tokens == b.num_cached_tokens == 0
    assert a.prompt_logprobs is not None and b.prompt_logprobs is not None
    assert len(b.prompt_logprobs) == len(prompt) and b.prompt_logprobs[0] is None
    for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
        assert x is not None and y is not None and x.token_id == y.token_id
        assert x.logprob == pytest.approx(y.logprob, abs=1e-5)
    [c] = llm.generate([prompt + [9]], _greedy(2))
    assert c.num_cached_tokens == 16
    _pool_settled(llm)
