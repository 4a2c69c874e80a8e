"""vLLM's request extras: token ids in the response (`return_token_ids`), log-prob tokens
named by id (`return_tokens_as_token_ids`), the prefix cache's salt (`cache_salt`),
`add_special_tokens`, `priority`, `bad_words` (offline and through the server) and
`request_id`."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.checkpoints import make_checkpoint
from tests.server_fixture import MODEL_NAME, RunningServer, serving, sse_events, start_server

PROMPTS = ["the quick brown fox", "hello world", "a b c d e f g h i j k l m n o p"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("extras") / "mixtral", "mixtral", tokenizer=True)


@pytest.fixture(scope="module")
def srv(ckpt: Path) -> Iterator[RunningServer]:
    yield from serving(ckpt, max_model_len=128)


def test_vllm_token_ids_on_completions(srv: RunningServer) -> None:
    """return_token_ids: the prompt's ids and the generated ids on each choice (streaming: the
    prompt's in a choice's first chunk, each chunk's new ids in it, adding up to the whole);
    return_tokens_as_token_ids: log-probs name tokens "token_id:<id>" (prompt and generated,
    with echo) while text_offset still counts their text. Neither key appears unasked."""
    tok = srv.state.client.tokenizer
    http = srv.client()
    ids = tok.encode(PROMPTS[2])
    body = {"prompt": PROMPTS[2], "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    plain = http.post("/v1/completions", json=body).json()["choices"][0]
    assert "token_ids" not in plain and "prompt_token_ids" not in plain
    out = http.post("/v1/completions", json={**body, "return_token_ids": True}).json()
    choice = out["choices"][0]
    assert choice["prompt_token_ids"] == ids and len(choice["token_ids"]) == 5
    assert out["usage"]["completion_tokens"] == 5
    assert tok.decode(choice["token_ids"], True) == choice["text"] == plain["text"]
    # As ids, with echo: the prompt's and the generated tokens, in order.
    named = http.post(
        "/v1/completions",
        json={**body, "echo": True, "logprobs": 2, "return_tokens_as_token_ids": True},
    ).json()["choices"][0]["logprobs"]
    assert named["tokens"] == [f"token_id:{t}" for t in ids + choice["token_ids"]]
    for top, token in zip(named["top_logprobs"][1:], named["tokens"][1:], strict=True):
        assert token in top and all(k.startswith("token_id:") for k in top)
    # Offsets count text, as without ids: the prompt's tokens', then the echo's length on.
    texts = [srv.state.token_text(t) for t in ids]
    offsets = [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    gen = [len(srv.state.token_text(t)) for t in choice["token_ids"]]
    offsets += [len(PROMPTS[2]) + sum(gen[:i]) for i in range(len(gen))]
    assert named["text_offset"] == offsets
    # Streaming, two samples: each choice's chunks add up to its ids.
    stream = {**body, "stream": True, "n": 2, "return_token_ids": True, "logprobs": 0}
    stream["return_tokens_as_token_ids"] = True
    with http.stream("POST", "/v1/completions", json=stream) as r:
        events = [e for e in sse_events(r.iter_lines()) if e != "[DONE]"]
    got: dict[int, list[int]] = {0: [], 1: []}
    prompts: dict[int, list] = {0: [], 1: []}
    for e in events:
        for c in e["choices"]:
            got[c["index"]] += c["token_ids"]
            prompts[c["index"]].append(c.get("prompt_token_ids"))
            named = [int(t.removeprefix("token_id:")) for t in c["logprobs"]["tokens"]]
            assert named == c["token_ids"]
    assert got == {0: choice["token_ids"], 1: choice["token_ids"]}
    assert all(p[0] == ids and not any(p[1:]) for p in prompts.values())
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x")
    r = client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=5, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )  # fmt: skip
    assert r.choices[0].model_extra["token_ids"] == choice["token_ids"]


def test_vllm_token_ids_on_chat(srv: RunningServer) -> None:
    """return_token_ids on chat: the rendered prompt's ids at the top level (streaming: in the
    first chunk only) and each choice's generated ids; return_tokens_as_token_ids names the
    log-probs' tokens (their bytes null)."""
    tok = srv.state.client.tokenizer
    http = srv.client()
    messages = [{"role": "user", "content": "hello there"}]
    body = {"messages": messages, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    plain = http.post("/v1/chat/completions", json=body).json()
    assert "prompt_token_ids" not in plain and "token_ids" not in plain["choices"][0]
    out = http.post(
        "/v1/chat/completions",
        json={**body, "return_token_ids": True, "logprobs": True, "top_logprobs": 1,
              "return_tokens_as_token_ids": True},
    ).json()  # fmt: skip
    rendered = srv.client().post("/tokenize", json={"messages": messages}).json()["tokens"]
    assert out["prompt_token_ids"] == rendered
    assert len(out["prompt_token_ids"]) == out["usage"]["prompt_tokens"]
    choice = out["choices"][0]
    assert len(choice["token_ids"]) == 4 == out["usage"]["completion_tokens"]
    assert tok.decode(choice["token_ids"], True) == choice["message"]["content"]
    content = choice["logprobs"]["content"]
    assert [e["token"] for e in content] == [f"token_id:{t}" for t in choice["token_ids"]]
    assert all(e["bytes"] is None for e in content)
    with http.stream(
        "POST", "/v1/chat/completions", json={**body, "stream": True, "return_token_ids": True}
    ) as r:
        events = [e for e in sse_events(r.iter_lines()) if e != "[DONE]"]
    assert events[0]["prompt_token_ids"] == rendered
    assert not any("prompt_token_ids" in e for e in events[1:])
    streamed = [t for e in events for c in e["choices"] for t in c.get("token_ids", [])]
    assert streamed == choice["token_ids"]
    assert (
        "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
        == (plain["choices"][0]["message"]["content"])
    )


def test_cache_salt_separates_prefix_cache_hits(srv: RunningServer) -> None:
    """cache_salt: a prompt cached under one salt is found again only under the same salt
    (usage.prompt_tokens_details.cached_tokens), on completions and chat; an empty salt is a
    400 naming it."""
    http = srv.client()
    prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 3)

    def cached(salt: str | None, route: str = "/v1/completions") -> int:
        body: dict = {"max_tokens": 1, "temperature": 0}
        if salt is not None:
            body["cache_salt"] = salt
        if route == "/v1/completions":
            body["prompt"] = prompt
        else:
            body["messages"] = [{"role": "user", "content": prompt}]
        r = http.post(route, json=body)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached("s1") == 0
    assert cached("s2") == 0 and cached(None) == 0
    assert cached("s1") > 0 and cached("s2") > 0 and cached(None) > 0
    chat = "/v1/chat/completions"
    assert cached("s3", chat) == 0 and cached("s3", chat) > 0 and cached("s4", chat) == 0
    r = http.post("/v1/completions", json={"prompt": "hi", "cache_salt": ""})
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"


def test_request_id_names_the_response(srv: RunningServer) -> None:
    """request_id: the response's id is "cmpl-<id>" / "chatcmpl-<id>" (every streamed chunk's
    too), vLLM's; two requests in flight under one request_id both complete, each with its own
    output; an id that is not 1-128 visible ASCII characters is a 400 naming it."""
    http = srv.client()
    body = {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    out = http.post("/v1/completions", json={**body, "request_id": "job-7"}).json()
    assert out["id"] == "cmpl-job-7"
    assert http.post("/v1/completions", json=body).json()["id"] != "cmpl-job-7"
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    r = http.post("/v1/chat/completions", json={**chat, "request_id": "job-8"})
    assert r.json()["id"] == "chatcmpl-job-8"
    with http.stream(
        "POST", "/v1/chat/completions", json={**chat, "request_id": "job-9", "stream": True}
    ) as resp:
        events = sse_events(resp.iter_lines())
    chunks = [e for e in events if e != "[DONE]"]
    assert chunks and all(c["id"] == "chatcmpl-job-9" for c in chunks)
    # The same id twice at once (the second sent while the first streams): the engine's ids
    # stay apart, so both complete.
    long = {**body, "max_tokens": 100, "request_id": "same", "stream": True}
    with http.stream("POST", "/v1/completions", json=long) as resp:
        lines = resp.iter_lines()
        first = next(line for line in lines if line)
        again = http.post("/v1/completions", json={**body, "request_id": "same"})
        rest = sse_events(lines)
    assert again.status_code == 200 and again.json()["id"] == "cmpl-same"
    assert again.json()["choices"][0]["text"] == out["choices"][0]["text"]
    text = "".join(e["choices"][0]["text"] for e in sse_events([first]) + rest if e != "[DONE]")
    assert len(srv.state.client.tokenizer.encode(text)) >= 90  # the long one ran to the end
    for bad in ["", "has space", "x" * 129, "é"]:
        r = http.post("/v1/completions", json={**body, "request_id": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "request_id", bad


def test_add_special_tokens(srv: RunningServer) -> None:
    """add_special_tokens: a completion's text prompt gets the tokenizer's special tokens by
    default and not with false; a chat prompt (its template wrote them) the other way round."""
    tok = srv.state.client.tokenizer
    http = srv.client()
    with_special, bare = tok.encode(PROMPTS[0], True), tok.encode(PROMPTS[0], False)
    assert with_special != bare  # this tokenizer adds some (a BOS)

    def prompt_ids(route: str, **extra: object) -> list[int]:
        body: dict = {"max_tokens": 1, "return_token_ids": True, **extra}
        r = http.post(route, json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        return out.get("prompt_token_ids") or out["choices"][0]["prompt_token_ids"]

    done = "/v1/completions"
    assert prompt_ids(done, prompt=PROMPTS[0]) == with_special
    assert prompt_ids(done, prompt=PROMPTS[0], add_special_tokens=False) == bare
    messages = [{"role": "user", "content": PROMPTS[0]}]
    rendered = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    chat = "/v1/chat/completions"
    assert prompt_ids(chat, messages=messages) == rendered
    text = tok.decode(rendered, False)
    assert prompt_ids(chat, messages=messages, add_special_tokens=True) == tok.encode(text, True)


def test_priority_needs_the_priority_policy(srv: RunningServer, ckpt: Path) -> None:
    """priority: 0 is accepted anywhere; another value is a 400 naming it unless the server
    runs --scheduling-policy priority, where requests of every priority complete (the
    ordering itself: tests/test_scheduler.py)."""
    http = srv.client()
    body = {"prompt": "hello", "max_tokens": 2}
    assert http.post("/v1/completions", json={**body, "priority": 0}).status_code == 200
    r = http.post("/v1/completions", json={**body, "priority": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority"
    assert "--scheduling-policy priority" in r.json()["error"]["message"]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "priority": -1}
    assert http.post("/v1/chat/completions", json=chat).status_code == 400
    prio = start_server(ckpt, engine_kwargs={"scheduling_policy": "priority", "max_num_seqs": 2})
    try:
        http = prio.client()
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            results = list(
                pool.map(
                    lambda p: http.post(
                        "/v1/completions", json={**body, "max_tokens": 4, "priority": p}
                    ),
                    [5, -2, 0, 3, -1, 9],
                )
            )
        assert all(r.status_code == 200 for r in results)
        assert all(r.json()["usage"]["completion_tokens"] == 4 for r in results)
        assert http.post("/v1/chat/completions", json=chat).status_code == 200
    finally:
        prio.stop()


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_bad_words_never_complete(ckpt: Path, async_scheduling: bool) -> None:
    """bad_words: a word of one token and one of two, taken from the greedy output itself,
    never appear in the output once banned (so the output changes), in both scheduling
    modes; the same through the server; a blank word is a 400 naming the field."""
    from moeserve import LLM, SamplingParams

    llm = LLM(
        ckpt, device="cpu", progress=False, max_model_len=64, async_scheduling=async_scheduling
    )
    tok = llm.tokenizer
    params = dict(max_tokens=16, temperature=0, ignore_eos=True)
    base = llm.generate([PROMPTS[0]], SamplingParams(**params))[0].outputs[0].token_ids
    one = next(t for t in base if [t] in tok.bad_word_ids([tok.decode([t], False)]))
    pair = next(
        base[i : i + 2]
        for i in range(len(base) - 1)
        if base[i : i + 2] in tok.bad_word_ids([tok.decode(base[i : i + 2], False)])
    )
    for banned, word in (([one], tok.decode([one], False)), (pair, tok.decode(pair, False))):
        out = llm.generate([PROMPTS[0]], SamplingParams(**params, bad_words=[word]))
        ids = out[0].outputs[0].token_ids
        assert ids != base and not _contains(ids, banned), (word, banned, ids)
        # Up to where the banned tokens first came, the output is unchanged.
        first = next(i for i in range(len(base)) if base[i : i + len(banned)] == banned)
        assert ids[: first + len(banned) - 1] == base[: first + len(banned) - 1]
    # One request with bad words beside plain ones: those keep their outputs.
    both = llm.generate(
        [PROMPTS[0], PROMPTS[0]],
        [SamplingParams(**params, bad_words=[tok.decode(pair, False)]), SamplingParams(**params)],
    )
    assert both[1].outputs[0].token_ids == base and not _contains(
        both[0].outputs[0].token_ids, pair
    )


def test_bad_words_through_the_server(srv: RunningServer) -> None:
    http = srv.client()
    tok = srv.state.client.tokenizer
    body = {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    base = http.post("/v1/completions", json={**body, "return_token_ids": True}).json()
    ids = base["choices"][0]["token_ids"]
    word = tok.decode(ids[:1], False)
    out = http.post(
        "/v1/completions", json={**body, "return_token_ids": True, "bad_words": [word]}
    ).json()
    assert ids[0] not in out["choices"][0]["token_ids"][:1]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "bad_words": [word]}
    assert http.post("/v1/chat/completions", json=chat).status_code == 200
    for bad in ([""], ["  "], "word"):
        r = http.post("/v1/completions", json={**body, "bad_words": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "bad_words", r.text


def test_offline_priorities(ckpt: Path) -> None:
    """LLM.generate(priority=[...]) under scheduling_policy="priority": with one sequence at a
    time the prompts run lowest value first; without the policy a non-zero one is refused."""
    from moeserve import LLM, SamplingParams

    llm = LLM(
        ckpt, device="cpu", progress=False, max_model_len=64, max_num_seqs=1,
        max_num_batched_tokens=64, scheduling_policy="priority",
    )  # fmt: skip
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=2), priority=[2, 0, 1])
    starts = [o.metrics.first_token_time for o in outs]
    assert starts[1] < starts[2] < starts[0]
    with pytest.raises(ValueError, match="priorities"):
        llm.generate(PROMPTS, SamplingParams(max_tokens=2), priority=[1])
    plain = LLM(ckpt, device="cpu", progress=False, max_model_len=64)
    with pytest.raises(ValueError, match="priority"):
        plain.generate(PROMPTS[:1], SamplingParams(max_tokens=2), priority=[3])
