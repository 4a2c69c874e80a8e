"""The staged forward (cut at every layer handed an expert provider, for piecewise CUDA graphs)
computes exactly the plain forward, padding rows included; on the GPU, graphs replay it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeserve import LLM, SamplingParams
from moeserve.model.metadata import AttentionMetadata
from moeserve.model.staged import StagedForward
from tests.checkpoints import make_checkpoint


def _decode_inputs(
    prompts: list[list[int]], pad: int, block_size: int, scratch: int
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """One decode token per prompt (sequence b owns block b) plus `pad` padding rows that
    write and read the scratch block only."""
    n = len(prompts)
    ids = [p[-1] for p in prompts] + [0] * pad
    pos = [len(p) - 1 for p in prompts] + [0] * pad
    slots = [b * block_size + len(p) - 1 for b, p in enumerate(prompts)]
    slots += [scratch * block_size] * pad
    ctx = [len(p) for p in prompts] + [1] * pad
    meta = AttentionMetadata(
        query_lens=[1] * (n + pad),
        context_lens=ctx,
        num_decodes=n + pad,
        block_tables_BM=torch.tensor([[b] for b in range(n)] + [[scratch]] * pad),
        context_lens_B=torch.tensor(ctx),
        slot_mapping_T=torch.tensor(slots),
        valid_T=torch.tensor([1] * n + [0] * pad) if pad else None,
    )
    return torch.tensor(ids), torch.tensor(pos), meta


def _prefill(llm: LLM, prompts: list[list[int]], block_size: int) -> None:
    """K/V of every prompt but its last token, sequence b in block b."""
    model, kv = llm.engine.executor.model, llm.engine.executor.runner.kv_caches
    for b, p in enumerate(prompts):
        n = len(p) - 1
        meta = AttentionMetadata(
            query_lens=[n],
            context_lens=[n],
            num_decodes=0,
            block_tables_BM=torch.tensor([[b]]),
            context_lens_B=torch.tensor([n]),
            slot_mapping_T=torch.tensor([b * block_size + i for i in range(n)]),
        )
        model(torch.tensor(p[:n]), torch.arange(n), meta, kv)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])  # qwen2_moe: shared + dense layer
def test_staged_forward_equals_plain_forward(tmp_path: Path, family: str) -> None:
    ckpt = make_checkpoint(tmp_path / family, family, seed=3)
    llm = LLM(ckpt, progress=False, expert_cache_slots=2, offload_mode="fetch", block_size=16)
    eng = llm.engine
    model, kv = eng.executor.model, eng.executor.runner.kv_caches
    prompts = [[5, 9, 40, 7, 11], [3, 8, 2], [60, 61, 62, 63, 64, 65, 66]]
    _prefill(llm, prompts, 16)
    scratch = eng.executor.num_blocks - 1  # unused by this test's sequences
    ids, pos, meta = _decode_inputs(prompts, 0, 16, scratch)
    experts = eng.executor.runner.experts
    assert sorted(experts) == [i for i, _ in model.moe_layers()]  # the expert store's
    counts0 = model.tokens_per_expert()
    want = model.compute_logits(model(ids, pos, meta, kv, experts))
    plain_counts = model.tokens_per_expert() - counts0

    for pad in (0, 2):  # padding rows: routed nowhere, not counted, real rows unchanged
        ids, pos, meta = _decode_inputs(prompts, pad, 16, scratch)
        staged = StagedForward(model, ids, pos, meta, kv, experts)
        assert staged.num_stages == len(experts) + 1
        before = model.tokens_per_expert()
        got = staged.run()
        if pad:  # GEMMs over more rows may round differently (MKL picks kernels by shape)
            torch.testing.assert_close(got[: len(prompts)], want, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(got, want)
        assert torch.isfinite(got).all()
        assert torch.equal(model.tokens_per_expert() - before, plain_counts)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fetch", "auto"])
def test_gpu_offloaded_graphs_match_eager(tmp_path: Path, mode: str) -> None:
    """Offloaded decode replays per-stage graphs (float32: tokens and logprobs match eager);
    the in-graph cache is off so every batch size takes them."""
    ckpt = make_checkpoint(tmp_path / "m", "mixtral", num_local_experts=8)
    kw = dict(
        progress=False,
        device="cuda",
        kv_cache_memory=2**28,
        expert_cache_slots=3,
        offload_mode=mode,
        max_num_seqs=8,
        expert_cache_graph_batch=0,
    )
    prompts = [[5 + i, 9, 40 + 3 * i, 7, 11][: 2 + i % 4] for i in range(6)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=1)
    eager = LLM(ckpt, enforce_eager=True, **kw)
    assert eager.engine.executor.runner.graphs is None
    ref = eager.generate(prompts, params)
    graphs = LLM(ckpt, **kw)
    runner_graphs = graphs.engine.executor.runner.graphs
    assert runner_graphs is not None and runner_graphs.staged == set(runner_graphs.sizes)
    outs = graphs.generate(prompts, params)
    for a, b in zip(outs, ref):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert abs(x.logprob - y.logprob) < 1e-3
    stats = graphs.engine.expert_cache_stats()
    assert all(s.misses > 0 for s in stats)
    counts = graphs.engine.expert_token_counts()
    tokens = sum(len(p) for p in prompts) + sum(len(o.outputs[0].token_ids) - 1 for o in outs)
    assert int(counts.sum()) == tokens * 2 * len(stats)  # padding rows never counted
