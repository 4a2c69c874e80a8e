"""Log-probs over the model's whole vocabulary (every lm_head row), as transformers computes
them, also when the checkpoint pads its embedding past the tokenizer's ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeserve import LLM, SamplingParams
from tests.checkpoints import load_reference, make_checkpoint
from tests.server_fixture import serving
from tests.tokenizer_fixture import build_test_tokenizer

PAD = 4  # lm_head rows past the tokenizer's last id, as hub checkpoints have
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def padded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokens = build_test_tokenizer().get_vocab_size(with_added_tokens=True)
    path = tmp_path_factory.mktemp("padded") / "mixtral"
    return make_checkpoint(path, "mixtral", tokenizer=True, vocab_size=tokens + PAD)


def test_logprobs_match_transformers_over_padded_rows(padded: Path) -> None:
    llm = LLM(padded, progress=False, device="cpu", max_model_len=64, block_size=4)
    assert llm.engine.vocab_size == llm.engine.model_config.vocab_size
    assert llm.engine.vocab_size == llm.tokenizer.vocab_size + PAD
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=5, ignore_eos=True)
    [out] = llm.generate([PROMPT], params)
    got = out.outputs[0]
    ids = out.prompt_token_ids + got.token_ids
    ref = load_reference(padded)
    with torch.no_grad():
        logits = ref(torch.tensor([ids])).logits[0].float()
    ref_lp = torch.log_softmax(logits, dim=-1)  # over every row, the padded ones included
    start = len(out.prompt_token_ids) - 1
    assert got.logprobs is not None
    for i, entry in enumerate(got.logprobs):
        row = ref_lp[start + i]
        assert entry.token_id == int(row.argmax())
        assert abs(entry.logprob - float(row[entry.token_id])) <= 1e-4
        vals, top = row.topk(5)
        assert [t for t, _ in entry.top] == top.tolist()
        for (_, lp), v in zip(entry.top, vals.tolist()):
            assert abs(lp - v) <= 1e-4


@pytest.fixture(scope="module")
def prefers_padding(padded: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The padded checkpoint with its last padding row aimed at the prompt's final hidden
    state, so that the first generated token is that id."""
    import shutil

    from moeserve.tokenizer import Tokenizer

    path = tmp_path_factory.mktemp("pad-argmax") / "mixtral"
    shutil.copytree(padded, path)
    ids = Tokenizer.from_dir(path).encode(PROMPT)
    with torch.no_grad():
        hidden = load_reference(padded).model(torch.tensor([ids])).last_hidden_state[0, -1]
    weights = load_file(path / "model.safetensors")
    head = weights["lm_head.weight"].clone()
    head[-1] = hidden / hidden.norm() * 1e3
    weights["lm_head.weight"] = head
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_a_sampled_padding_id_is_reported_not_a_crash(prefers_padding: Path) -> None:
    llm = LLM(prefers_padding, progress=False, device="cpu", max_model_len=64, block_size=4)
    pad_id = llm.engine.vocab_size - 1
    params = SamplingParams(max_tokens=3, temperature=0.0, logprobs=2, ignore_eos=True)
    [out] = llm.generate([PROMPT], params)
    first = out.outputs[0]
    assert first.token_ids[0] == pad_id
    assert first.logprobs is not None and first.logprobs[0].top[0][0] == pad_id
    for running in serving(prefers_padding, max_model_len=64):
        body = {
            "prompt": PROMPT,
            "max_tokens": 3,
            "temperature": 0,
            "ignore_eos": True,
            "logprobs": 2,
        }
        resp = running.client().post("/v1/completions", json=body)
        assert resp.status_code == 200, resp.text
        logprobs = resp.json()["choices"][0]["logprobs"]
        assert logprobs["tokens"][0] == f"token_id:{pad_id}"
        assert f"token_id:{pad_id}" in logprobs["top_logprobs"][0]
