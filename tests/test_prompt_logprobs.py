"""Prompt log-probs (SamplingParams.prompt_logprobs; /v1/completions echo + logprobs) against
transformers in float32, over chunked prefill, beside other requests, through the server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch

from moeserve import LLM, SamplingParams
from moeserve.engine.outputs import TokenLogprob
from tests.checkpoints import load_reference, make_checkpoint
from tests.server_fixture import MODEL_NAME, RunningServer, serving, sse_events

TOL = 1e-4
PROMPTS = [
    "the quick brown fox jumps over the lazy dog and then the fox runs",
    "hello world",
    "a b c d e f g h i j k l m n o p",
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("plp") / "mixtral", "mixtral", tokenizer=True)


@pytest.fixture(scope="module")
def reference(ckpt: Path) -> torch.nn.Module:
    return load_reference(ckpt)


def _block_bytes(llm: LLM) -> int:
    from moeserve.engine.runner import kv_bytes_per_block

    e = llm.engine
    return kv_bytes_per_block(e.model_config, e.executor.block_size, e.executor.model.dtype)


def ref_logprobs(ref: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """[len(ids), V]: row p is the distribution of token p + 1."""
    with torch.no_grad():
        return torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), dim=-1)


def check(entries: list[TokenLogprob | None] | None, ids: list[int], ref_lp: torch.Tensor, n: int):
    assert entries is not None and len(entries) == len(ids)
    assert entries[0] is None
    for p, e in enumerate(entries[1:], start=1):
        assert e is not None and e.token_id == ids[p]
        row = ref_lp[p - 1]
        assert abs(e.logprob - float(row[ids[p]])) <= TOL
        vals, top = row.topk(n)
        assert [t for t, _ in e.top] == top.tolist()
        for (_, lp), v in zip(e.top, vals.tolist(), strict=True):
            assert abs(lp - v) <= TOL


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_prompt_logprobs_over_chunked_prefill_beside_other_requests(
    ckpt: Path, reference: torch.nn.Module, async_scheduling: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moeserve.engine import prompt_logprobs

    # One row per slice: a chunk's rows span several slices, as a long prompt's do.
    monkeypatch.setattr(prompt_logprobs, "SLICE_ELEMENTS", 1)
    # 8 tokens a step: the long prompts span several chunks, and share steps with the others.
    llm = LLM(
        ckpt,
        progress=False,
        device="cpu",
        max_model_len=64,
        block_size=4,
        max_num_batched_tokens=8,
        max_num_seqs=8,
        async_scheduling=async_scheduling,
    )
    plain = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=2)
    alone = llm.generate(PROMPTS, plain)
    with_plp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=3)
    outs = llm.generate(PROMPTS, [with_plp, plain, with_plp])
    for out in (outs[0], outs[2]):
        ids = out.prompt_token_ids
        assert len(ids) > 8
        check(out.prompt_logprobs, ids, ref_logprobs(reference, ids), 3)
    assert outs[1].prompt_logprobs is None
    assert outs[1].outputs[0].token_ids == alone[1].outputs[0].token_ids
    assert outs[1].outputs[0].logprobs == alone[1].outputs[0].logprobs
    for a, b in zip(alone, outs, strict=True):  # generation does not change either
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_one_token_prompt_and_n_samples(ckpt: Path) -> None:
    llm = LLM(ckpt, progress=False, device="cpu", max_model_len=64, block_size=4)
    params = SamplingParams(max_tokens=2, n=2, temperature=1.0, seed=3, prompt_logprobs=0)
    [one] = llm.generate([[5]], params)
    assert one.prompt_logprobs == [None]
    [two] = llm.generate([[5, 6, 7]], params)
    assert two.prompt_logprobs is not None and len(two.prompt_logprobs) == 3
    assert all(e is not None and e.top == [] for e in two.prompt_logprobs[1:])


def test_preempted_request_emits_its_prompt_entries_once(
    ckpt: Path, reference: torch.nn.Module
) -> None:
    roomy = LLM(ckpt, progress=False, device="cpu", max_model_len=64, block_size=4)
    prompts = [[4 + (7 * i + 3 * j) % 250 for j in range(10 + i)] for i in range(8)]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
    # 20 blocks of 4 tokens: far less than 8 sequences of 30 tokens need at once.
    tight = LLM(
        ckpt,
        progress=False,
        device="cpu",
        max_model_len=64,
        block_size=4,
        kv_cache_memory=20 * _block_bytes(roomy),
    )
    outs = tight.generate(prompts, params)
    assert tight.engine.scheduler.stats().num_preemptions_total > 0
    for out in outs:
        ids = out.prompt_token_ids
        check(out.prompt_logprobs, ids, ref_logprobs(reference, ids), 1)
    alone = roomy.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in alone]


@pytest.fixture(scope="module")
def srv(ckpt: Path) -> Iterator[RunningServer]:
    # Small steps: a prompt's log-probs arrive over several chunks.
    yield from serving(
        ckpt, max_model_len=64, engine_kwargs={"max_num_batched_tokens": 8, "max_num_seqs": 8}
    )


def check_echoed(lp: dict, ids: list[int], ref_lp: torch.Tensor, srv: RunningServer) -> None:
    """A choice's logprobs with the prompt echoed (OpenAI's legacy completion format)."""
    n = len(ids)
    assert lp["tokens"][:n] == [srv.state.token_text(t) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = [float(ref_lp[p - 1, ids[p]]) for p in range(1, n)]
    assert lp["token_logprobs"][1:n] == pytest.approx(want, abs=TOL)
    for p in range(1, n):
        top = lp["top_logprobs"][p]
        best = int(ref_lp[p - 1].argmax())
        assert top[srv.state.token_text(best)] == pytest.approx(float(ref_lp[p - 1, best]), abs=TOL)
        assert top[lp["tokens"][p]] == pytest.approx(lp["token_logprobs"][p])
    assert lp["text_offset"][:n] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(n)]


def test_lm_eval_harness_loglikelihood_request(
    srv: RunningServer, reference: torch.nn.Module
) -> None:
    """The body lm-evaluation-harness's local-completions model sends for log-likelihoods."""
    tok = srv.state.client.tokenizer
    ids = [tok.encode(p) for p in PROMPTS]
    body = {
        "model": MODEL_NAME,
        "prompt": ids,
        "temperature": 0,
        "max_tokens": 0,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }
    resp = srv.client().post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    for c, p in zip(out["choices"], ids, strict=True):
        assert c["finish_reason"] == "length"
        assert c["text"] == tok.decode(p, True)
        assert len(c["logprobs"]["tokens"]) == len(p)  # the prompt's only
        check_echoed(c["logprobs"], p, ref_logprobs(reference, p), srv)
    assert out["usage"]["completion_tokens"] == 0
    assert out["usage"]["prompt_tokens"] == sum(len(p) for p in ids)


def test_openai_client_echo_with_generation(srv: RunningServer, reference: torch.nn.Module) -> None:
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x")
    r = client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[0], echo=True, logprobs=1, max_tokens=0
    )
    ids = srv.state.client.tokenizer.encode(PROMPTS[0])
    [choice] = r.choices
    assert choice.text == PROMPTS[0] and choice.finish_reason == "length"
    check_echoed(choice.logprobs.model_dump(), ids, ref_logprobs(reference, ids), srv)
    bare = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], echo=True, max_tokens=0)
    assert bare.choices[0].text == PROMPTS[0] and bare.choices[0].logprobs is None
    assert bare.usage.completion_tokens == 0
    # With generation: the generated tokens' entries follow the prompt's.
    r = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPTS[1],
        echo=True,
        logprobs=2,
        max_tokens=3,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    ids = srv.state.client.tokenizer.encode(PROMPTS[1])
    lp = r.choices[0].logprobs.model_dump()
    assert len(lp["tokens"]) == len(ids) + 3 and r.usage.completion_tokens == 3
    assert r.usage.prompt_tokens == len(ids)
    check_echoed(lp, ids, ref_logprobs(reference, ids), srv)
    plain = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPTS[1],
        logprobs=2,
        max_tokens=3,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].text == PROMPTS[1] + plain.choices[0].text
    gen = plain.choices[0].logprobs
    assert lp["tokens"][len(ids) :] == gen.tokens
    assert lp["token_logprobs"][len(ids) :] == pytest.approx(gen.token_logprobs, abs=TOL)
    assert lp["top_logprobs"][len(ids) :] == gen.top_logprobs
    echoed = len(PROMPTS[1])
    assert lp["text_offset"][len(ids) :] == [echoed + o for o in gen.text_offset]


def test_streaming_echo_with_no_new_tokens(srv: RunningServer) -> None:
    """echo with max_tokens 0, streamed: the prompt and a "length" finish, as unstreamed; the
    one token run to reach the prompt's end is neither sent nor counted."""
    body = {"prompt": PROMPTS[1], "max_tokens": 0, "echo": True, "stream": True}
    body["stream_options"] = {"include_usage": True}
    with srv.client().stream("POST", "/v1/completions", json=body) as r:
        events = [e for e in sse_events(r.iter_lines()) if e != "[DONE]"]
    choices = [c for e in events for c in e["choices"]]
    assert "".join(c["text"] for c in choices) == PROMPTS[1]
    assert choices[-1]["finish_reason"] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 0


def test_streaming_echo_with_logprobs_is_refused(srv: RunningServer) -> None:
    body = {"prompt": "hi", "echo": True, "logprobs": 1, "max_tokens": 2, "stream": True}
    resp = srv.client().post("/v1/completions", json=body)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "stream"


def test_vllm_prompt_logprobs_on_completions_and_chat(
    srv: RunningServer, reference: torch.nn.Module
) -> None:
    """vLLM's prompt_logprobs field: per prompt token (the first null) the token and the top
    n by id, with log-probs against transformers, ranks (the prompt token's over the whole
    vocabulary) and text; on chat at the top level; with echo + logprobs each gets its own
    top-n; a 400 when streaming or out of range."""
    tok = srv.state.client.tokenizer
    http = srv.client()
    ids = tok.encode(PROMPTS[0])
    ref_lp = ref_logprobs(reference, ids)

    def check_vllm(entries: list, ids: list[int], n: int) -> None:
        assert len(entries) == len(ids) and entries[0] is None
        for p, row in enumerate(entries[1:], start=1):
            dist = ref_lp[p - 1]
            mine = row[str(ids[p])]
            assert abs(mine["logprob"] - float(dist[ids[p]])) <= TOL
            # 1 + the tokens above it (near-ties within TOL of it may fall either way)
            above = [int((dist > dist[ids[p]] + d).sum()) + 1 for d in (TOL, -TOL)]
            assert above[0] <= mine["rank"] <= above[1]
            assert mine["decoded_token"] == srv.state.token_text(ids[p])
            top = dist.topk(n).indices.tolist()
            assert set(row) == {str(t) for t in top} | {str(ids[p])}
            for rank, t in enumerate(top, 1):
                if t != ids[p]:
                    assert row[str(t)]["rank"] == rank

    body = {"prompt": ids, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 3}
    out = http.post("/v1/completions", json=body).json()
    check_vllm(out["choices"][0]["prompt_logprobs"], ids, 3)
    plain = http.post("/v1/completions", json={**body, "prompt_logprobs": None}).json()
    assert plain["choices"][0]["prompt_logprobs"] is None
    assert plain["choices"][0]["text"] == out["choices"][0]["text"]
    both = http.post(
        "/v1/completions", json={**body, "echo": True, "logprobs": 1, "prompt_logprobs": 4}
    ).json()["choices"][0]
    check_vllm(both["prompt_logprobs"], ids, 4)
    assert all(t is None or len(t) <= 2 for t in both["logprobs"]["top_logprobs"][: len(ids)])
    messages = [{"role": "user", "content": "hello"}]
    chat = http.post(
        "/v1/chat/completions", json={"messages": messages, "max_tokens": 1, "prompt_logprobs": 0}
    ).json()
    lps = chat["prompt_logprobs"]
    assert lps[0] is None and len(lps) == chat["usage"]["prompt_tokens"]
    assert all(len(row) == 1 and next(iter(row.values()))["rank"] >= 1 for row in lps[1:])
    for bad, param in (({"stream": True}, "stream"), ({"prompt_logprobs": 21}, "prompt_logprobs")):
        r = http.post("/v1/completions", json={**body, **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == param
