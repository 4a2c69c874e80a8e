"""What a request may carry: unknown fields and unimplemented options are 400s naming the
field; output-neutral OpenAI fields and the documented extensions are accepted; bodies that
used to crash the parser are 400s; the small HTTP conventions clients rely on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.server_fixture import (
    MODEL_NAME,
    RunningServer,
    assert_envelope,
    build_checkpoint,
    serving,
    sse_events,
)

COMP, CHAT = "/v1/completions", "/v1/chat/completions"
PROMPT: dict[str, Any] = {"prompt": "Hello", "max_tokens": 2}
MESSAGES: dict[str, Any] = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def srv(ckpt: Path) -> Iterator[RunningServer]:
    yield from serving(ckpt)


# (route, extra fields, the param the 400 must name)
REFUSED: list[tuple[str, dict[str, Any], str]] = [
    (COMP, {"max_token": 5}, "max_token"),  # a typo
    (COMP, {"frobnicate": True}, "frobnicate"),
    (CHAT, {"continue_final_message": True}, "continue_final_message"),
    (CHAT, {"tools": [{"type": "retrieval"}], "tool_choice": "required"}, "tools"),
    (CHAT, {"tool_choice": "required"}, "tool_choice"),
    (CHAT, {"response_format": {"type": "json_object", "schema": {}}}, "response_format"),
    (
        CHAT,
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "objekt"}},
            }
        },
        "response_format",
    ),
    (CHAT, {"functions": [{"name": "f"}]}, "functions"),
    (CHAT, {"reasoning_effort": "high"}, "reasoning_effort"),
    (CHAT, {"modalities": ["text", "audio"]}, "modalities"),
    (COMP, {"guided_json": "{not json"}, "guided_json"),
    (COMP, {"guided_choice": []}, "guided_choice"),
    (COMP, {"guided_regex": "a+("}, "guided_regex"),
    (COMP, {"suffix": "tail"}, "suffix"),
    (COMP, {"guided_decoding_backend": "xgrammar"}, "guided_decoding_backend"),
    (COMP, {"tools": []}, "tools"),  # a chat field, not a completions one
    (COMP, {"temperature": 2.5}, "temperature"),
    (CHAT, {"temperature": 2.01}, "temperature"),
    (COMP, {"stream_options": {"include_usage": True, "bogus": 1}}, "stream_options"),
    (CHAT, {"messages": [{"role": "user", "content": "Hi", "extra": 1}]}, "messages"),
]


@pytest.mark.parametrize("route,extra,param", REFUSED)
def test_unknown_and_unimplemented_fields_are_400s_naming_them(
    srv: RunningServer, route: str, extra: dict[str, Any], param: str
) -> None:
    body = {**(PROMPT if route == COMP else MESSAGES), **extra}
    err = assert_envelope(srv.client().post(route, json=body), 400, param)
    assert param in err["message"]


def test_a_typo_gets_a_suggestion(srv: RunningServer) -> None:
    err = assert_envelope(srv.client().post(COMP, json={**PROMPT, "max_token": 5}), 400)
    assert "max_tokens" in err["message"]


# Values that ask for nothing: accepted, with the same output as without them.
ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    # lm-evaluation-harness's generate_until bodies (local-completions, local-chat-completions)
    (COMP, {"model": MODEL_NAME, "stop": ["\n\n"], "seed": 1234}),
    (CHAT, {"model": MODEL_NAME, "stop": ["\n\n"], "seed": 1234}),
    (
        COMP,
        {
            "user": "u",
            "metadata": {"a": "b"},
            "store": False,
            "service_tier": "auto",
            "safety_identifier": "s",
            "prompt_cache_key": "k",
        },
    ),
    (COMP, {"logit_bias": {}, "suffix": "", "guided_json": None}),
    (COMP, {"guided_decoding_backend": "guidance"}),
    (CHAT, {"guided_decoding_backend": "auto"}),
    (CHAT, {"tools": [], "tool_choice": "none", "parallel_tool_calls": False}),
    (CHAT, {"response_format": {"type": "text"}, "modalities": ["text"]}),
    (
        CHAT,
        {
            "top_k": 1,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "ignore_eos": False,
            "stop_token_ids": [],
            "skip_special_tokens": True,
            "include_stop_str_in_output": False,
        },
    ),
    (CHAT, {"temperature": 2.0, "seed": 1}),
]


@pytest.mark.parametrize("route,extra", ACCEPTED)
def test_output_neutral_fields_and_extensions_are_accepted(
    srv: RunningServer, route: str, extra: dict[str, Any]
) -> None:
    base = {**(PROMPT if route == COMP else MESSAGES), "temperature": 0.0}
    http = srv.client()
    plain = http.post(route, json=base)
    r = http.post(route, json={**base, **extra})
    assert r.status_code == 200, r.text
    if "temperature" not in extra:
        key = "text" if route == COMP else "message"
        assert r.json()["choices"][0][key] == plain.json()["choices"][0][key]


def test_logit_bias_forces_and_bans_tokens(srv: RunningServer) -> None:
    """OpenAI's logit_bias through the SDK: +100 on a token makes every generated token that
    one (greedy and sampled, chat and completions); -100 on the greedy choice changes it."""
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    http = srv.client()
    (x,) = http.post("/tokenize", json={"prompt": "x", "add_special_tokens": False}).json()[
        "tokens"
    ]
    for temperature in (0.0, 1.0):
        out = client.completions.create(
            model=MODEL_NAME,
            prompt="Hello",
            max_tokens=4,
            temperature=temperature,
            logit_bias={str(x): 100},
        )
        assert out.choices[0].text == "xxxx"
        chat = client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=3,
            temperature=temperature,
            logit_bias={str(x): 100},
        )
        assert chat.choices[0].message.content == "xxx"
    plain = client.completions.create(
        model=MODEL_NAME, prompt="Hello", max_tokens=1, temperature=0, logprobs=1
    )
    first = plain.choices[0].logprobs.tokens[0]
    (first_id,) = http.post(
        "/tokenize", json={"prompt": first, "add_special_tokens": False}
    ).json()["tokens"]
    banned = client.completions.create(
        model=MODEL_NAME,
        prompt="Hello",
        max_tokens=1,
        temperature=0,
        logit_bias={str(first_id): -100},
    )
    assert banned.choices[0].text not in ("", first)


def test_min_tokens_holds_off_the_end(srv: RunningServer) -> None:
    """vLLM's min_tokens: EOS forced by a logit bias ends a completion at once, unless
    min_tokens asks for more first; more than max_tokens, or than the context leaves, is a
    400 naming it."""
    http = srv.client()
    eos_text = http.get("/tokenizer_info").json()["eos_token"]
    (eos,) = http.post("/tokenize", json={"prompt": eos_text, "add_special_tokens": False}).json()[
        "tokens"
    ]
    forced = {"max_tokens": 8, "temperature": 0, "logit_bias": {str(eos): 100}}
    r = http.post(COMP, json={**PROMPT, **forced}).json()
    assert (r["usage"]["completion_tokens"], r["choices"][0]["finish_reason"]) == (1, "stop")
    for route, base in ((COMP, PROMPT), (CHAT, MESSAGES)):
        r = http.post(route, json={**base, **forced, "min_tokens": 3}).json()
        assert (r["usage"]["completion_tokens"], r["choices"][0]["finish_reason"]) == (4, "stop")
    assert_envelope(http.post(COMP, json={**PROMPT, "min_tokens": 3}), 400, "min_tokens")
    big = {"prompt": "Hello", "min_tokens": 10**6}  # no max_tokens: the rest of the context
    r = http.post(COMP, json=big)
    assert r.status_code == 400 and "min_tokens" in r.json()["error"]["message"]
    r = http.post(COMP, json={"prompt": "Hello", "min_tokens": 2, "logit_bias": {str(eos): 100}})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_allowed_token_ids_limit_the_output(srv: RunningServer) -> None:
    """vLLM's allowed_token_ids: every generated token is one of them (sampled or greedy);
    ids outside the vocabulary, or only endings with min_tokens, are 400s naming it."""
    http = srv.client()
    allowed = http.post("/tokenize", json={"prompt": "ab", "add_special_tokens": False}).json()[
        "tokens"
    ]
    for temperature in (0.0, 1.0):
        body = {**PROMPT, "max_tokens": 6, "temperature": temperature, "ignore_eos": True}
        r = http.post(COMP, json={**body, "allowed_token_ids": allowed, "logprobs": 0}).json()
        tokens = r["choices"][0]["logprobs"]["tokens"]
        assert len(tokens) == 6 and set(tokens) <= {"a", "b"}
    assert_envelope(
        http.post(COMP, json={**PROMPT, "allowed_token_ids": [10**6]}), 400, "allowed_token_ids"
    )
    eos_text = http.get("/tokenizer_info").json()["eos_token"]
    (eos,) = http.post("/tokenize", json={"prompt": eos_text, "add_special_tokens": False}).json()[
        "tokens"
    ]
    r = http.post(COMP, json={**PROMPT, "min_tokens": 2, "allowed_token_ids": [eos]})
    assert_envelope(r, 400, "allowed_token_ids")


def test_truncate_prompt_tokens_keeps_the_last_tokens(srv: RunningServer) -> None:
    """vLLM's truncate_prompt_tokens: the prompt's last k tokens run (echo shows them, usage
    counts them), chat's rendered prompt likewise; a prompt longer than the context then
    fits; -1 keeps what the context holds; 0 is a 400 naming it."""
    http = srv.client()
    text = "abcdefgh " * 20
    ids = http.post("/tokenize", json={"prompt": text}).json()["tokens"]
    body = {"prompt": text, "max_tokens": 2, "temperature": 0, "truncate_prompt_tokens": 5}
    r = http.post(COMP, json={**body, "echo": True}).json()
    assert r["usage"]["prompt_tokens"] == 5
    detok = http.post("/detokenize", json={"tokens": ids[-5:]}).json()["prompt"]
    assert r["choices"][0]["text"].startswith(detok)
    same = http.post(COMP, json={**body, "prompt": ids[-5:], "truncate_prompt_tokens": None})
    assert same.json()["choices"][0]["text"] == r["choices"][0]["text"][len(detok) :]
    chat = {**MESSAGES, "messages": [{"role": "user", "content": text}]}
    r = http.post(CHAT, json={**chat, "truncate_prompt_tokens": 7}).json()
    assert r["usage"]["prompt_tokens"] == 7
    long = {"prompt": "abcdefgh " * 200, "max_tokens": 2}  # past the 128-token context
    assert http.post(COMP, json=long).status_code == 400
    r = http.post(COMP, json={**long, "truncate_prompt_tokens": 50})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 50
    r = http.post(COMP, json={**long, "truncate_prompt_tokens": -1})  # then no room is left
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]
    assert_envelope(
        http.post(COMP, json={**body, "truncate_prompt_tokens": 0}), 400, "truncate_prompt_tokens"
    )


def test_a_returned_assistant_message_can_be_sent_back(srv: RunningServer) -> None:
    """The openai SDK's message objects dumped back into a conversation carry empty
    refusal/annotations/audio/function_call/tool_calls fields."""
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    first = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
    )
    reply = first.choices[0].message.model_dump()
    assert {"refusal", "tool_calls", "function_call", "audio"} <= set(reply)
    second = client.chat.completions.create(
        model=MODEL_NAME,
        max_tokens=3,
        messages=[{"role": "user", "content": "Hi"}, reply, {"role": "user", "content": "Ok"}],
    )
    assert second.choices[0].finish_reason in ("stop", "length")


def test_the_openai_sdk_sees_bad_tools_refused(srv: RunningServer) -> None:
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    tool = {"type": "function", "function": {"name": "no spaces", "parameters": {}}}
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": "Hi"}],
            tools=[tool],
            tool_choice="required",
        )


def _deep(n: int) -> bytes:
    return b'{"prompt": "hi", "x": ' + b"[" * n + b"]" * n + b"}"


# Bodies that used to be 500s: (body, param the 400 must name)
CRASHERS: list[tuple[bytes, str | None]] = [
    (_deep(1500), "x"),
    (b'{"prompt": "hi", "max_tokens": 2, "stop": [' + b"[" * 1500 + b"]" * 1500 + b"]}", "stop"),
    (b'{"prompt": "ab\\ud800cd", "max_tokens": 2}', "prompt"),
    (b'{"prompt": ["ok", "x\\udfffy"], "max_tokens": 2}', "prompt"),
    (b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", "max_tokens"),
    (b'{"prompt": "' + b"1" * 5000 + b'", "n": ' + b"7" * 4400 + b"}", "n"),
]


@pytest.mark.parametrize("body,param", CRASHERS)
def test_bodies_that_crashed_the_parser_are_400s(
    srv: RunningServer, body: bytes, param: str | None
) -> None:
    http = srv.client()
    resp = http.post(COMP, content=body, headers={"content-type": "application/json"})
    err = assert_envelope(resp, 400, param)
    assert err["type"] == "invalid_request_error"
    chat = b'{"messages": [{"role": "user", "content": "a\\ud800"}], "max_tokens": 2}'
    resp = http.post(CHAT, content=chat, headers={"content-type": "application/json"})
    assert "messages.0.content" in assert_envelope(resp, 400, "messages")["message"]
    assert http.post(COMP, json=PROMPT).status_code == 200


def test_a_valid_surrogate_pair_is_text(srv: RunningServer) -> None:
    body = b'{"prompt": "smile \\ud83d\\ude00", "max_tokens": 2}'
    r = srv.client().post(COMP, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


def test_model_retrieve(srv: RunningServer) -> None:
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    card = client.models.retrieve(MODEL_NAME)
    assert card.id == MODEL_NAME and card.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    err = assert_envelope(srv.client().get("/v1/models/gpt-4"), 404, "model")
    assert err["code"] == "model_not_found"


def test_x_request_id(srv: RunningServer) -> None:
    http = srv.client()
    r = http.post(COMP, json=PROMPT)
    assert r.headers["x-request-id"] == r.json()["id"]
    r = http.post(COMP, json=PROMPT, headers={"X-Request-Id": "trace-42"})
    assert r.headers["x-request-id"] == "trace-42"
    with http.stream(
        "POST", CHAT, json={**MESSAGES, "stream": True}, headers={"X-Request-Id": "s-1"}
    ) as s:
        assert s.headers["x-request-id"] == "s-1"
        s.read()
    bad = http.post(COMP, json={"prompt": ""})
    assert bad.status_code == 400 and bad.headers["x-request-id"]
    assert http.get("/health").headers["x-request-id"]


def test_405_names_the_allowed_methods(srv: RunningServer) -> None:
    http = srv.client()
    for path, allow in ((COMP, "POST"), (CHAT, "POST"), ("/v1/models", "GET")):
        resp = http.put(path, json={})
        assert_envelope(resp, 405)
        assert allow in resp.headers["allow"]


def test_a_trailing_slash_is_404_not_a_redirect(srv: RunningServer) -> None:
    http = srv.client(follow_redirects=False)
    resp = http.post(COMP + "/", json=PROMPT, headers={"Host": "evil.example"})
    assert_envelope(resp, 404)
    assert "location" not in resp.headers


def test_allowed_hosts(ckpt: Path) -> None:
    for running in serving(ckpt, allowed_hosts=("api.example.com", "*.internal")):
        http = running.client()
        for host in ("evil.example", "api.example.com.evil", "internal"):
            resp = http.post(COMP, json=PROMPT, headers={"Host": host})
            assert assert_envelope(resp, 400)["code"] == "invalid_host"
        for host in ("api.example.com", "api.example.com:8000", "a.b.internal"):
            assert http.post(COMP, json=PROMPT, headers={"Host": host}).status_code == 200
        # Probes are exempt: kubelets call them by the pod's address.
        assert http.get("/health", headers={"Host": "10.0.0.7:8000"}).status_code == 200


def test_continuous_usage_stats(srv: RunningServer) -> None:
    """guidellm's stream_options: every chunk carries the usage so far."""
    opts = {"include_usage": True, "continuous_usage_stats": True}
    for route, base in ((COMP, PROMPT), (CHAT, MESSAGES)):
        body = {
            **base,
            "max_tokens": 4,
            "ignore_eos": True,
            "temperature": 0.0,
            "stream": True,
            "stream_options": opts,
        }
        with srv.client().stream("POST", route, json=body) as s:
            events = sse_events(s.iter_lines())
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert all("usage" in c for c in chunks), chunks
        completion = [c["usage"]["completion_tokens"] for c in chunks]
        assert completion == sorted(completion) and completion[-1] == 4
        assert all(c["usage"]["prompt_tokens"] > 0 for c in chunks)
        text = "".join(
            c["choices"][0].get("text") or c["choices"][0].get("delta", {}).get("content") or ""
            for c in chunks
            if c["choices"]
        )
        plain = srv.client().post(route, json={**body, "stream": False, "stream_options": None})
        choice = plain.json()["choices"][0]
        assert text == (choice["text"] if route == COMP else choice["message"]["content"])


def test_tool_messages_reach_the_template(srv: RunningServer) -> None:
    """A conversation carrying earlier tool calls and results is handed to the chat template
    (this test model's Mixtral template refuses the tool role itself), not refused as
    unknown fields."""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    resp = srv.client().post(CHAT, json={"messages": messages, "max_tokens": 2})
    err = assert_envelope(resp, 400, "messages")
    assert "Only system, user and assistant roles are supported" in err["message"]


def test_a_huge_prompt_is_refused_before_tokenising(
    srv: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    tok = srv.state.client.tokenizer
    assert tok is not None
    calls: list[int] = []
    real = tok.encode

    def counting(text: str, *args: object, **kw: object) -> list[int]:
        calls.append(len(text))
        return real(text, *args, **kw)

    monkeypatch.setattr(tok, "encode", counting)
    http = srv.client()
    for route, body in (
        (COMP, {"prompt": "word " * 300_000, "max_tokens": 2}),
        (CHAT, {"messages": [{"role": "user", "content": "word " * 300_000}]}),
    ):
        err = assert_envelope(http.post(route, json=body), 400)
        assert err["code"] == "context_length_exceeded" and "128" in err["message"]
    assert all(n < 10_000 for n in calls), calls  # the huge texts were never tokenised
    assert http.post(COMP, json=PROMPT).status_code == 200
