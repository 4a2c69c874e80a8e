"""Our decoder against transformers on tiny random checkpoints of every family (float32)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from moeserve.engine.runner import Runner
from moeserve.model.loader import load_model
from tests.checkpoints import load_reference, make_checkpoint

TOL = 1e-4
DECODE_STEPS = 16


@dataclass
class _Seq:
    token_ids: list[int]
    block_ids: list[int] = field(default_factory=list)


@dataclass
class _Work:
    seq: _Seq
    start: int
    num_tokens: int
    sample: bool = True


def _run(runner: Runner, seq: _Seq, start: int, n: int, next_block: list[int]) -> torch.Tensor:
    """Log-probs at each of the n new positions, growing the block table as needed."""
    while len(seq.block_ids) * runner.block_size < start + n:
        seq.block_ids.append(next_block[0])
        next_block[0] += 1
    inp = runner.prepare([_Work(seq, start, n)])
    hidden = runner.model(inp.input_ids_T, inp.positions_T, inp.meta, runner.kv_caches)
    return torch.log_softmax(runner.model.compute_logits(hidden), dim=-1)


def ours(path: Path, prompt: list[int], chunk: int, **load_kw) -> tuple[torch.Tensor, ...]:
    _, model = load_model(path, progress=False, **load_kw)
    runner = Runner(model, num_blocks=32, block_size=4)
    # Blocks handed out in a scrambled order: the block table, not adjacency, must matter.
    seq, next_block = _Seq(list(prompt)), [7]
    prompt_lp = torch.cat(
        [
            _run(runner, seq, s, min(chunk, len(prompt) - s), next_block)
            for s in range(0, len(prompt), chunk)
        ]
    )
    decode_lp = []
    last = prompt_lp[-1]
    for _ in range(DECODE_STEPS):
        seq.token_ids.append(int(last.argmax()))
        last = _run(runner, seq, len(seq.token_ids) - 1, 1, next_block)[0]
        decode_lp.append(last)
    return prompt_lp, torch.stack(decode_lp), torch.tensor(seq.token_ids[len(prompt) :])


def reference(path: Path, prompt: list[int], dtype=torch.float32) -> tuple[torch.Tensor, ...]:
    model = load_reference(path, dtype)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        prompt_lp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        gen = model.generate(
            ids,
            max_new_tokens=DECODE_STEPS + 1,
            min_new_tokens=DECODE_STEPS + 1,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    logits = torch.stack([x[0].float() for x in gen.logits])
    # generate's first logits are the prompt's last position; ours start one step later.
    return prompt_lp, torch.log_softmax(logits[1:], -1), gen.sequences[0, len(prompt) :]


CASES = {
    "mixtral": dict(family="mixtral"),
    "mixtral-sharded-hub-config": dict(
        family="mixtral", max_shard_size="20KB", hub_style=True, sliding_window=9
    ),
    "qwen2_moe": dict(family="qwen2_moe"),
    "qwen2_moe-sparse-step": dict(family="qwen2_moe", decoder_sparse_step=2, mlp_only_layers=[]),
    "qwen3_moe": dict(family="qwen3_moe"),
    "qwen3_moe-yarn": dict(
        family="qwen3_moe",
        rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64
        ),
    ),
    "olmoe": dict(family="olmoe", tie_word_embeddings=True, clip_qkv=0.5),
    "glm4_moe": dict(family="glm4_moe"),
    "glm4_moe-no-qk-norm-full-rotary": dict(
        family="glm4_moe", use_qk_norm=False, partial_rotary_factor=1.0, n_group=1, topk_group=1
    ),
    "deepseek_v2": dict(family="deepseek_v2"),
    "deepseek_v2-lora-q-greedy-hub-config": dict(
        family="deepseek_v2", q_lora_rank=12, topk_method="greedy", hub_style=True
    ),
    "deepseek_v3": dict(family="deepseek_v3"),
    "deepseek_v3-plain-q-no-interleave-hub-config": dict(
        family="deepseek_v3", q_lora_rank=None, rope_interleave=False, hub_style=True
    ),
    "llama4_text": dict(family="llama4_text"),
    "llama4_text-top2-no-qk-norm": dict(
        family="llama4_text", num_experts_per_tok=2, use_qk_norm=False, moe_layers=[0, 1, 3]
    ),
    "gpt_oss": dict(family="gpt_oss"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_transformers(tmp_path: Path, case: str) -> None:
    kw = dict(CASES[case])
    path = make_checkpoint(tmp_path / case, kw.pop("family"), **kw)
    prompt = torch.randint(2, 120, (13,), generator=torch.Generator().manual_seed(1)).tolist()
    our_prompt, our_decode, our_tokens = ours(path, prompt, chunk=5)
    ref_prompt, ref_decode, ref_tokens = reference(path, prompt)
    assert (our_prompt - ref_prompt).abs().max().item() <= TOL
    assert our_tokens.tolist() == ref_tokens[:DECODE_STEPS].tolist()
    assert (our_decode - ref_decode).abs().max().item() <= TOL


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_transformers_bf16_cuda(tmp_path: Path, case: str) -> None:
    kw = dict(CASES[case])
    path = make_checkpoint(tmp_path / case, kw.pop("family"), dtype=torch.bfloat16, **kw)
    prompt = torch.randint(2, 120, (13,), generator=torch.Generator().manual_seed(1)).tolist()
    _, model = load_model(path, progress=False, device="cuda")
    runner = Runner(model, num_blocks=32, block_size=4)
    seq, next_block = _Seq(list(prompt)), [3]
    ours_lp = _run(runner, seq, 0, len(prompt), next_block).cpu()
    ref = load_reference(path, torch.bfloat16).cuda()
    with torch.no_grad():
        ref_lp = torch.log_softmax(ref(torch.tensor([prompt], device="cuda")).logits[0].float(), -1)
    # bf16 keeps 8 bits of mantissa: compare probabilities, which bf16 noise moves by ~1e-2.
    diff = (ours_lp.exp() - ref_lp.cpu().exp()).abs().max().item()
    assert diff <= 3e-2
    assert (ours_lp.argmax(-1) == ref_lp.cpu().argmax(-1)).float().mean().item() >= 0.9
