"""Every family through the user's two doors, against transformers in float32: `moeserve
generate` (greedy ids and top-5 log-probs) and the server's /v1/completions (tokens and
log-probs). test_fidelity.py checks the model itself; this checks what reaches a user."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch

from moeserve.cli import main
from moeserve.tokenizer import Tokenizer
from tests.checkpoints import FAMILIES, load_reference, make_checkpoint
from tests.server_fixture import start_server

TOL = 1e-4
NEW_TOKENS = 8


def _reference(path: Path, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy ids and the log-probs [new, V] behind each."""
    model = load_reference(path)
    with torch.no_grad():
        gen = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    logprobs = torch.log_softmax(torch.stack([x[0].float() for x in gen.logits]), dim=-1)
    return gen.sequences[0, len(prompt) :].tolist(), logprobs


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generate_and_server_match_transformers(
    tmp_path: Path, family: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = make_checkpoint(tmp_path / family, family, tokenizer=True)
    prompt = torch.randint(4, 120, (11,), generator=torch.Generator().manual_seed(3)).tolist()
    ref_ids, ref_lp = _reference(path, prompt)
    ids = ",".join(map(str, prompt))
    argv = ["generate", "--model", str(path), "--prompt-ids", ids, "--device", "cpu"]
    argv += ["--max-tokens", str(NEW_TOKENS), "--temperature", "0", "--ignore-eos", "--json"]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["generated_ids"] == ref_ids
    for step, top in enumerate(record["top_logprobs"]):
        assert len(top) == 5
        for token, lp in top.items():
            assert abs(lp - ref_lp[step, int(token)].item()) <= TOL, (step, token)

    tok = Tokenizer.from_dir(path)
    server = start_server(path, max_model_len=64)
    try:
        body = {"model": "tiny-moe", "prompt": prompt, "max_tokens": NEW_TOKENS}
        body |= {"temperature": 0, "logprobs": 1, "ignore_eos": True}
        with httpx.Client(base_url=server.url, timeout=60) as client:
            resp = client.post("/v1/completions", json=body)
        assert resp.status_code == 200, resp.text
        lp = resp.json()["choices"][0]["logprobs"]
        assert lp["tokens"] == [server.state.token_text(t) for t in ref_ids]
        chosen = [ref_lp[i, t].item() for i, t in enumerate(ref_ids)]
        assert max(abs(a - b) for a, b in zip(lp["token_logprobs"], chosen)) <= TOL
        assert resp.json()["choices"][0]["text"] == tok.decode(ref_ids, skip_special_tokens=True)
    finally:
        server.stop()
