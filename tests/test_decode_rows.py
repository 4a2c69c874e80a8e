"""Short chunks as decode rows (engine/batch.py as_decode_rows): a prefix-cache hit's few
remaining prompt tokens, or a chunked prompt's short tail, run one row per token through the
decode path (on CUDA: a captured graph) instead of an eager prefill step.

No CPU has CUDA graphs, so the runner gets a stand-in with the graphs' contract: one-token
rows only, logits for every row, in order, computed by the readable decode path. Every family
must then give the tokens of an engine that runs the same chunks as prefills.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from moeserve import LLM, SamplingParams
from moeserve.engine.batch import DECODE_ROWS_MAX_TOKENS, as_decode_rows
from moeserve.engine.runner import Runner
from moeserve.model.layers import attention_backends
from tests.checkpoints import FAMILIES, make_checkpoint


class DecodeOnlyRows:
    """What the runner asks of DecodeGraphs, on the eager decode path."""

    def __init__(self, runner: Runner, max_size: int) -> None:
        self.runner, self.max_size, self.calls = runner, max_size, []

    def covers(self, work: Sequence) -> bool:
        return len(work) <= self.max_size and all(w.num_tokens == 1 for w in work)

    def run(self, work: Sequence, feed: Sequence[int] | None = None) -> torch.Tensor:
        assert self.covers(work)
        self.calls.append(len(work))
        r = self.runner
        inp = r.prepare(work, feed)
        assert inp.meta.num_decodes == len(work) and inp.order == list(range(len(work)))
        with attention_backends():
            hidden = r.model(inp.input_ids_T, inp.positions_T, inp.meta, r.kv_caches, r.experts)
        return r.model.compute_logits(hidden)


def _engine(ckpt: Path, rows: bool, **kw: object) -> tuple[LLM, DecodeOnlyRows | None]:
    llm = LLM(ckpt, progress=False, block_size=4, max_model_len=96, dtype="float32", **kw)
    fake = None
    if rows:
        runner = llm.engine.executor.runner
        runner.graphs = fake = DecodeOnlyRows(runner, max_size=16)
    return llm, fake


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hits_and_short_chunks_as_decode_rows(tmp_path: Path, family: str) -> None:
    """A hit's remainder (2-6 tokens), a whole short prompt, and prompts chunked into 5-token
    pieces (middle chunks sample nothing): the tokens and log-probs of prefill steps."""
    ckpt = make_checkpoint(tmp_path / family, family)
    rng = random.Random(7)
    base = [rng.randrange(3, 60) for _ in range(22)]
    prompts = [base + [7, 8], base + [9, 4, 11, 12, 13, 14], [5, 6, 7], base[:13] + [5, 6, 7]]
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=2)
    for chunk in (None, 5):
        kw = {"max_num_batched_tokens": chunk, "max_num_seqs": 4} if chunk else {}
        got_llm, fake = _engine(ckpt, True, **kw)
        want_llm, _ = _engine(ckpt, False, **kw)
        for i, p in enumerate(prompts):
            [got] = got_llm.generate([p], params)
            [want] = want_llm.generate([p], params)
            assert got.outputs[0].token_ids == want.outputs[0].token_ids, (family, chunk, i)
            for a, b in zip(got.outputs[0].logprobs, want.outputs[0].logprobs):
                assert abs(a.logprob - b.logprob) < 1e-4, (family, chunk, i)
                assert [t for t, _ in a.top] == [t for t, _ in b.top], (family, chunk, i)
        assert fake is not None and any(n > 1 for n in fake.calls)  # rows, not just decodes


def test_as_decode_rows_limits_and_owners() -> None:
    class W:
        def __init__(self, start: int, n: int, sample: bool) -> None:
            self.seq, self.start, self.num_tokens, self.sample = object(), start, n, sample

    work = [W(9, 1, True), W(4, 3, True), W(0, 2, False)]
    rows, owner = as_decode_rows(work, max_rows=6)
    assert owner == [0, 1, 1, 1, 2, 2]
    assert [r.start for r in rows] == [9, 4, 5, 6, 0, 1]
    assert [r.sample for r in rows] == [True, False, False, True, False, False]
    assert as_decode_rows(work, max_rows=5) is None  # more rows than the largest graph
    assert as_decode_rows([W(0, DECODE_ROWS_MAX_TOKENS + 1, True)], max_rows=1 << 20) is None


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss", "deepseek_v2", "llama4_text"])
def test_gpu_graph_rows_match_eager_prefills(tmp_path: Path, family: str) -> None:
    """On CUDA the rows replay the captured decode graphs (Triton kernels): a hit's
    remainder and short prompts give the tokens of the eager engine's prefill steps."""
    ckpt = make_checkpoint(tmp_path / family, family)
    rng = random.Random(11)
    base = [rng.randrange(3, 60) for _ in range(40)]
    prompts = [base + [7, 8], base + [9, 4, 11, 12, 13], [5, 6, 7], base[:21] + [5, 6]]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    kw = dict(block_size=16, max_model_len=128, dtype="float32", device="cuda", progress=False)
    kw["kv_cache_memory"] = 64 << 20  # two engines share the card
    graphs, eager = LLM(ckpt, **kw), LLM(ckpt, enforce_eager=True, **kw)
    assert graphs.engine.executor.runner.graphs is not None
    for p in prompts:
        [got], [want] = graphs.generate([p], params), eager.generate([p], params)
        assert got.outputs[0].token_ids == want.outputs[0].token_ids, (family, p)
