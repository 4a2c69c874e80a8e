"""Tool calling on /v1/chat/completions: tools and tool-call histories rendered as transformers
renders them, the model's calls (its output scripted) returned as message.tool_calls and as
streamed deltas, tool_choice none, the official openai client unmodified, and the 400s."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from transformers import AutoTokenizer

from moeserve.server.chat import _messages, _render
from moeserve.server.protocol import ChatCompletionRequest
from moeserve.server.tools import template_messages, tool_request
from moeserve.tokenizer import Tokenizer
from tests.checkpoints import make_checkpoint
from tests.harmony_fixture import write_harmony_tokenizer
from tests.scripted_chat import qwen3_like_checkpoint, say
from tests.server_fixture import (
    MODEL_NAME,
    RunningServer,
    assert_envelope,
    build_checkpoint,
    serving,
    sse_events,
    start_server,
)
from tests.test_harmony import TOOL_CALL, _Script
from tests.tokenizer_fixture import write_test_tokenizer
from tests.tool_templates import TEMPLATES

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["C", "F"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time in a zone",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string"}},
                "required": ["zone"],
            },
        },
    },
]
USER = [{"role": "user", "content": "Weather in Paris, and the time in UTC?"}]
# What an OpenAI client sends back: null content, arguments as JSON text, 9-character ids
# (Mistral's templates take no others).
HISTORY: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    *USER,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "abcDEF123",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "ghiJKL456",
                "type": "function",
                "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "abcDEF123", "content": "18 C"},
    {"role": "tool", "tool_call_id": "ghiJKL456", "content": "12:00"},
]
CALLS_OUT = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
    '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
)
WANT_CALLS = [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "UTC"})]


def _transformers_messages(history: list[dict[str, Any]], as_objects: bool) -> list[dict]:
    """The history in transformers' convention: arguments as objects (or text, for a
    template that concatenates them), "" for an assistant's null content."""
    out = copy.deepcopy(history)
    for m in out:
        if m.get("tool_calls"):
            m["content"] = m["content"] or ""
            for call in m["tool_calls"]:
                if as_objects:
                    call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    return out


def _ours(tok: Tokenizer, body: dict[str, Any]) -> str:
    req = ChatCompletionRequest.model_validate(body)
    messages = _messages(req.messages)
    tools = tool_request(req, tok, None, None)
    return _render(tok, messages, template_messages(messages), tools.tools, {})


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_tools_and_tool_histories_render_as_transformers_renders_them(
    family: str, tmp_path: Path
) -> None:
    if family == "gpt_oss":
        write_harmony_tokenizer(tmp_path)
    else:
        write_test_tokenizer(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(TEMPLATES[family])
    ours, theirs = Tokenizer.from_dir(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    history = _transformers_messages(HISTORY, as_objects=family != "deepseek_v3")
    want = theirs.apply_chat_template(
        history, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    assert _ours(ours, {"messages": HISTORY, "tools": TOOLS, "tool_choice": "auto"}) == want
    assert "Paris" in want and "12:00" in want
    if family != "deepseek_v3":  # its template leaves the tool list to the system prompt
        assert "get_time" in want.split("Weather in Paris")[0] or family == "mistral"
        assert "The time in a zone" in want
    # tool_choice none: the tools are rendered all the same.
    body = {"messages": HISTORY, "tools": TOOLS, "tool_choice": "none"}
    assert _ours(ours, body) == want
    # No tools: the plain rendering.
    plain = theirs.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    assert _ours(ours, {"messages": USER}) == plain


# ------------------------------------------------------------------ through the server
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return qwen3_like_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def srv(ckpt: Path) -> Iterator[RunningServer]:
    yield from serving(ckpt, max_model_len=2048)


@pytest.fixture(scope="module")
def script(srv: RunningServer) -> _Script:
    return _Script(srv)


@pytest.fixture(scope="module")
def tok(ckpt: Path) -> Tokenizer:
    return Tokenizer.from_dir(ckpt)


def _chat(srv: RunningServer, **body: Any) -> Any:
    return srv.client().post("/v1/chat/completions", json={"messages": USER, **body})


def _calls(items: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in items]


def test_chat_returns_the_models_tool_calls(
    srv: RunningServer, script: _Script, tok: Tokenizer
) -> None:
    say(script, tok, CALLS_OUT)
    body = _chat(srv, tools=TOOLS, n=2).json()
    for choice in body["choices"]:
        message = choice["message"]
        assert message["content"] == "Let me check."
        assert _calls(message["tool_calls"]) == WANT_CALLS
        assert all(
            c["type"] == "function" and c["id"].startswith("call_") for c in message["tool_calls"]
        )
        assert choice["finish_reason"] == "tool_calls"
    ids = [c["id"] for ch in body["choices"] for c in ch["message"]["tool_calls"]]
    assert len(set(ids)) == 4
    prompt = tok.decode(script.prompts[-1], skip_special_tokens=False)
    assert '"name": "get_time"' in prompt and prompt.endswith("<|im_start|>assistant\n")
    # Only calls: content null. Text only: content, no tool_calls, finish_reason stop.
    say(script, tok, CALLS_OUT.removeprefix("Let me check.\n"))
    message = _chat(srv, tools=TOOLS).json()["choices"][0]["message"]
    assert message["content"] is None and _calls(message["tool_calls"]) == WANT_CALLS
    say(script, tok, "It is sunny.")
    choice = _chat(srv, tools=TOOLS).json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "It is sunny."}
    assert choice["finish_reason"] == "stop"
    # tool_choice none: the markup is the model's text, not calls.
    say(script, tok, CALLS_OUT)
    choice = _chat(srv, tools=TOOLS, tool_choice="none").json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": CALLS_OUT}
    assert choice["finish_reason"] == "stop"
    # parallel_tool_calls false: the first call only.
    choice = _chat(srv, tools=TOOLS, parallel_tool_calls=False).json()["choices"][0]
    assert _calls(choice["message"]["tool_calls"]) == WANT_CALLS[:1]
    # A call cut off by max_tokens stays text; finish_reason length.
    choice = _chat(srv, tools=TOOLS, max_tokens=12).json()["choices"][0]
    assert "tool_calls" not in choice["message"] and choice["finish_reason"] == "length"
    assert CALLS_OUT.startswith(choice["message"]["content"])


@pytest.mark.parametrize("logprobs,parallel", [(False, True), (True, True), (False, False)])
def test_streamed_tool_calls_are_openai_deltas(
    srv: RunningServer, script: _Script, tok: Tokenizer, logprobs: bool, parallel: bool
) -> None:
    say(script, tok, CALLS_OUT)
    body = {"messages": USER, "tools": TOOLS, "stream": True, "logprobs": logprobs}
    body["parallel_tool_calls"] = parallel
    with srv.client().stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    deltas = [c["choices"][0]["delta"] for c in events[:-1]]
    assert "".join(d.get("content") or "" for d in deltas) == "Let me check."
    assert all("<tool_call" not in (d.get("content") or "") for d in deltas)
    calls: dict[int, dict[str, Any]] = {}
    for d in deltas:
        for part in d.get("tool_calls", []):
            assert set(part) <= {"index", "id", "type", "function"}
            if part["index"] not in calls:  # the first delta of a call names it
                assert part["type"] == "function" and part["id"].startswith("call_")
                calls[part["index"]] = {"name": part["function"]["name"], "arguments": ""}
            else:
                assert "id" not in part and "name" not in part["function"]
            calls[part["index"]]["arguments"] += part["function"].get("arguments", "")
    want = WANT_CALLS if parallel else WANT_CALLS[:1]
    assert sorted(calls) == list(range(len(want)))
    assert _calls([{"function": calls[i]} for i in sorted(calls)]) == want
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"
    if logprobs:
        n = sum(
            len((c["choices"][0].get("logprobs") or {}).get("content") or []) for c in events[:-1]
        )
        assert n == len(script.tokens)


def test_the_openai_client_sends_tools_and_tool_histories(
    srv: RunningServer, script: _Script, tok: Tokenizer, ckpt: Path
) -> None:
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    say(script, tok, CALLS_OUT)
    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=USER,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="auto",
        parallel_tool_calls=True,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls is not None
    got = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]  # type: ignore[union-attr]
    assert got == WANT_CALLS
    # The returned message goes back as it is, followed by the tools' results.
    results = [
        {"role": "tool", "tool_call_id": c.id, "content": text}
        for c, text in zip(choice.message.tool_calls, ["18 C", "12:00"], strict=True)
    ]
    say(script, tok, "Sunny, 18 C; it is noon.")
    again = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[*USER, choice.message, *results],  # type: ignore[list-item]
        tools=TOOLS,  # type: ignore[arg-type]
    )
    assert again.choices[0].message.content == "Sunny, 18 C; it is noon."
    assert again.choices[0].finish_reason == "stop"
    sent = [*USER, choice.message.model_dump(exclude_none=True), *results]
    want = AutoTokenizer.from_pretrained(ckpt).apply_chat_template(
        _transformers_messages(sent, as_objects=True),
        tools=TOOLS,
        tokenize=False,
        add_generation_prompt=True,
    )
    assert tok.decode(script.prompts[-1], skip_special_tokens=False) == want
    # Streaming through the client: the deltas accumulate into the same calls.
    say(script, tok, CALLS_OUT)
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=USER,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        stream=True,
    )
    args: dict[int, list[str]] = {}
    for chunk in stream:
        for part in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            entry = args.setdefault(part.index, ["", ""])
            entry[0] += (part.function.name or "") if part.function else ""
            entry[1] += (part.function.arguments or "") if part.function else ""
    assert [(n, json.loads(a)) for n, a in args.values()] == WANT_CALLS


@pytest.mark.parametrize(
    "body,param",
    [
        ({"tools": [{"type": "retrieval"}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
        ({"tools": {"type": "function"}}, "tools"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": ["required"]}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": 1}, "tool_choice"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
    ],
)
def test_bad_tool_requests_are_400s_naming_the_field(
    srv: RunningServer, body: dict[str, Any], param: str
) -> None:
    assert_envelope(_chat(srv, **body), 400, param)


def test_chat_template_kwargs_reach_the_template(
    srv: RunningServer, ckpt: Path, tok: Tokenizer
) -> None:
    """vLLM's chat_template_kwargs: Qwen3's enable_thinking=false renders the empty think
    block, as transformers renders it, in the chat route's prompt and in /tokenize's; a key
    no template reads, or one the server sets itself, is a 400 naming the field."""
    hf = AutoTokenizer.from_pretrained(ckpt)
    text = hf.apply_chat_template(
        USER, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert text.endswith("<think>\n\n</think>\n\n")
    want = tok.encode(text, add_special_tokens=False)
    plain = hf.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    assert len(want) > len(tok.encode(plain, add_special_tokens=False))
    c = srv.client()
    body = {"messages": USER, "chat_template_kwargs": {"enable_thinking": False}}
    assert c.post("/tokenize", json=body).json()["tokens"] == want
    r = c.post("/v1/chat/completions", json={**body, "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(want)
    for kwargs in ({"not_in_the_template": 1}, {"messages": []}, {"add_generation_prompt": False}):
        r = c.post("/v1/chat/completions", json={"messages": USER, "chat_template_kwargs": kwargs})
        assert_envelope(r, 400, "chat_template_kwargs")
        assert repr(next(iter(kwargs))) in r.json()["error"]["message"]
        assert_envelope(
            c.post("/tokenize", json={**body, "chat_template_kwargs": kwargs}),
            400,
            "chat_template_kwargs",
        )
    r = c.post("/v1/chat/completions", json={"messages": USER, "chat_template_kwargs": ["x"]})
    assert_envelope(r, 400, "chat_template_kwargs")
    r = c.post(
        "/tokenize", json={"prompt": "hi", "chat_template_kwargs": {"enable_thinking": True}}
    )
    assert_envelope(r, 400, "chat_template_kwargs")


def test_continue_final_message_ends_the_prompt_inside_it(
    srv: RunningServer, ckpt: Path, tok: Tokenizer
) -> None:
    """vLLM's continue_final_message with add_generation_prompt false: the prompt is
    transformers' rendering cut after the last message's text (chat and /tokenize), and the
    reply is the continuation; without add_generation_prompt false it is a 400."""
    chat = [*USER, {"role": "assistant", "content": "The weather in Paris is"}]
    hf = AutoTokenizer.from_pretrained(ckpt)
    text = hf.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=False, continue_final_message=True
    )
    assert text.endswith("The weather in Paris is")
    want = tok.encode(text, add_special_tokens=False)
    c = srv.client()
    body = {"messages": chat, "continue_final_message": True, "add_generation_prompt": False}
    assert c.post("/tokenize", json=body).json()["tokens"] == want
    r = c.post("/v1/chat/completions", json={**body, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(want)
    for extra in ({}, {"add_generation_prompt": True}):
        body = {"messages": chat, "continue_final_message": True, **extra}
        assert_envelope(c.post("/v1/chat/completions", json=body), 400, "continue_final_message")
        assert_envelope(c.post("/tokenize", json=body), 400, "continue_final_message")


def test_request_chat_template_needs_the_flag(
    srv: RunningServer, ckpt: Path, tok: Tokenizer
) -> None:
    """vLLM's chat_template in a request: a 400 naming it unless the server was started with
    --trust-request-chat-template; then the request's template renders (its own variables
    accepted in chat_template_kwargs), in the chat route and /tokenize alike."""
    mine = (
        "{% for m in messages %}<<{{ m.content }}>>{% endfor %}"
        "{% if add_generation_prompt %}{{ greeting | default('A:') }}{% endif %}"
    )
    body = {"messages": [{"role": "user", "content": "Hi"}], "chat_template": mine}
    assert_envelope(srv.client().post("/v1/chat/completions", json=body), 400, "chat_template")
    assert_envelope(srv.client().post("/tokenize", json=body), 400, "chat_template")
    trusted = start_server(ckpt, max_model_len=2048, trust_request_chat_template=True)
    try:
        c = trusted.client()
        kw = {"chat_template_kwargs": {"greeting": "Bot:"}}
        for extra, text in (({}, "<<Hi>>A:"), (kw, "<<Hi>>Bot:")):
            want = tok.encode(text, add_special_tokens=False)
            assert c.post("/tokenize", json={**body, **extra}).json()["tokens"] == want
            r = c.post("/v1/chat/completions", json={**body, **extra, "max_tokens": 1})
            assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(want)
        # enable_thinking is the model's template's variable, not this one's
        bad = {**body, "chat_template_kwargs": {"enable_thinking": False}}
        assert_envelope(c.post("/v1/chat/completions", json=bad), 400, "chat_template_kwargs")
        broken = {**body, "chat_template": "{{ raise_exception('no') }}"}
        assert_envelope(c.post("/v1/chat/completions", json=broken), 400, "messages")
    finally:
        trusted.stop()


def test_histories_with_malformed_tool_calls_are_400s(srv: RunningServer) -> None:
    bad = copy.deepcopy(HISTORY)
    del bad[2]["tool_calls"][0]["function"]
    r = srv.client().post("/v1/chat/completions", json={"messages": bad, "tools": TOOLS})
    assert_envelope(r, 400, "messages")
    bad = copy.deepcopy(HISTORY)
    bad[1]["tool_calls"] = HISTORY[2]["tool_calls"]
    r = srv.client().post("/v1/chat/completions", json={"messages": bad, "tools": TOOLS})
    assert_envelope(r, 400, "messages")


def test_auto_needs_a_parser_unless_one_is_named(tmp_path: Path) -> None:
    write_test_tokenizer(tmp_path)  # a template with no tool-call format
    tok = Tokenizer.from_dir(tmp_path)
    req = ChatCompletionRequest.model_validate({"messages": USER, "tools": TOOLS})
    with pytest.raises(Exception, match="tool-call parser") as err:
        tool_request(req, tok, "mixtral", None)
    assert getattr(err.value, "param", None) == "tool_choice"
    assert tool_request(req, tok, "mixtral", "hermes").parser.name == "hermes"
    assert tool_request(req, tok, "gpt_oss", None).parser.name == "harmony"
    none = ChatCompletionRequest.model_validate(
        {"messages": USER, "tools": TOOLS, "tool_choice": "none"}
    )
    assert tool_request(none, tok, "mixtral", None).choice == "none"


# ------------------------------------------------------------------ gpt-oss (harmony)
@pytest.fixture(scope="module")
def harmony_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    path = tmp_path_factory.mktemp("srv") / "harmony-tools"
    make_checkpoint(path, "mixtral", tokenizer=True, vocab_size=400, max_position_embeddings=2048)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).unlink()
    write_harmony_tokenizer(path)
    (path / "chat_template.jinja").write_text(TEMPLATES["gpt_oss"])
    tok = Tokenizer.from_dir(path)
    ends = [tok.encode(t, add_special_tokens=False)[0] for t in ("<|return|>", "<|call|>")]
    gen = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": ends}))
    yield from serving(path, max_model_len=2048)


def test_harmony_tool_calls_come_back_as_tool_calls(harmony_srv: RunningServer) -> None:
    script = _Script(harmony_srv)
    tok = harmony_srv.state.client.tokenizer  # type: ignore[union-attr]
    assert tok is not None
    script.tokens = tok.encode(TOOL_CALL, add_special_tokens=False)
    body = (
        harmony_srv.client()
        .post("/v1/chat/completions", json={"messages": USER, "tools": TOOLS})
        .json()
    )
    choice = body["choices"][0]
    assert choice["message"]["reasoning_content"] == "Need the weather."
    assert choice["message"]["content"] is None
    assert _calls(choice["message"]["tool_calls"]) == [("get_weather", {"city": "Paris"})]
    assert choice["finish_reason"] == "tool_calls"
    prompt = tok.decode(script.prompts[-1], skip_special_tokens=False)
    assert "type get_weather = (_: {\ncity: string,\nunit?: string,\n}) => any;" in prompt
    # Streamed: the reasoning, then the call; no header leaks into the content.
    with harmony_srv.client().stream(
        "POST", "/v1/chat/completions", json={"messages": USER, "tools": TOOLS, "stream": True}
    ) as r:
        events = sse_events(r.iter_lines())
    deltas = [c["choices"][0]["delta"] for c in events[:-1]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Need the weather."
    assert "".join(d.get("content") or "" for d in deltas) == ""
    parts = [p for d in deltas for p in d.get("tool_calls", [])]
    assert parts[0]["function"]["name"] == "get_weather"
    assert json.loads("".join(p["function"]["arguments"] for p in parts)) == {"city": "Paris"}
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"


# ------------------------------------------------------------------ forced calls (grammar)
STRICT_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
    {"type": "function", "function": {"name": "ping"}},  # no parameters at all
    {"type": "function", "function": {"name": "noop", "parameters": {}}},  # none either
]
SCHEMAS = {
    "get_weather": STRICT_TOOLS[0]["function"]["parameters"],
    "get_time": STRICT_TOOLS[1]["function"]["parameters"],
    "ping": {"type": "object", "additionalProperties": False},
    "noop": {"type": "object", "additionalProperties": False},
}


@pytest.fixture(scope="module")
def model_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A random-weight model that really runs (no script), its chat template without tools
    and so without a tool-call format: forced choices need none."""
    yield from serving(build_checkpoint(tmp_path_factory), max_model_len=512)


def _check_forced(choice: dict[str, Any], named: str | None, parallel: bool) -> None:
    message = choice["message"]
    assert choice["finish_reason"] == "tool_calls", choice
    assert message["content"] is None
    calls = message["tool_calls"]
    assert calls and (parallel or len(calls) == 1)
    for c in calls:
        assert c["type"] == "function" and c["id"].startswith("call_")
        assert c["function"]["name"] == (named or c["function"]["name"])
        jsonschema.validate(json.loads(c["function"]["arguments"]), SCHEMAS[c["function"]["name"]])
    if named:
        assert len(calls) == 1


@pytest.mark.parametrize("named", [None, "get_weather", "noop"])
@pytest.mark.parametrize("parallel", [True, False])
def test_required_and_named_choices_always_give_valid_calls(
    model_srv: RunningServer, named: str | None, parallel: bool
) -> None:
    choice: Any = {"type": "function", "function": {"name": named}} if named else "required"
    for seed in range(3):
        body = {
            "tools": STRICT_TOOLS,
            "tool_choice": choice,
            "parallel_tool_calls": parallel,
            "temperature": 1.0,
            "seed": seed,
            "n": 2,
            "max_tokens": 300,
        }
        r = _chat(model_srv, **body)
        assert r.status_code == 200, r.text
        for c in r.json()["choices"]:
            _check_forced(c, named, parallel)


def test_forced_calls_stream_as_deltas(model_srv: RunningServer) -> None:
    body = {"messages": USER, "tools": STRICT_TOOLS, "tool_choice": "required", "stream": True}
    body |= {"temperature": 1.0, "seed": 7, "max_tokens": 300}
    with model_srv.client().stream("POST", "/v1/chat/completions", json=body) as r:
        events = sse_events(r.iter_lines())
    deltas = [c["choices"][0]["delta"] for c in events[:-1]]
    assert "".join(d.get("content") or "" for d in deltas) == ""
    calls: dict[int, dict[str, Any]] = {}
    for part in (p for d in deltas for p in d.get("tool_calls", [])):
        entry = calls.setdefault(part["index"], {"id": part.get("id"), "function": {}})
        fn = entry["function"]
        fn["name"] = fn.get("name", "") + part["function"].get("name", "")
        fn["arguments"] = fn.get("arguments", "") + part["function"].get("arguments", "")
    finish = events[-2]["choices"][0]["finish_reason"]
    _check_forced(
        {
            "message": {
                "content": None,
                "tool_calls": [{"type": "function", **calls[i]} for i in sorted(calls)],
            },
            "finish_reason": finish,
        },
        None,
        True,
    )


def test_forced_choices_refuse_schemas_that_do_not_compile(model_srv: RunningServer) -> None:
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}
    r = _chat(model_srv, tools=[bad], tool_choice="required")
    assert_envelope(r, 400, "tools")
    # auto on a model without a tool-call format: a 400 saying what to do instead.
    assert_envelope(_chat(model_srv, tools=STRICT_TOOLS), 400, "tool_choice")


def test_the_tool_call_parser_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moeserve.cli import build_parser
    from moeserve.server.serve import server_config

    def parsed(*flags: str) -> str | None:
        args = build_parser().parse_args(["serve", "--model", str(tmp_path), *flags])
        return server_config(args).tool_call_parser

    assert parsed() is None  # from the checkpoint
    assert parsed("--tool-call-parser", "mistral") == "mistral"
    args = build_parser().parse_args(["serve", "--model", str(tmp_path)])
    assert server_config(args).trust_request_chat_template is False
    args = build_parser().parse_args(
        ["serve", "--model", str(tmp_path), "--trust-request-chat-template"]
    )
    assert server_config(args).trust_request_chat_template is True
    monkeypatch.setenv("MOESERVE_TOOL_CALL_PARSER", "hermes")
    assert parsed() == "hermes"
    with pytest.raises(SystemExit) as exc:
        parsed("--tool-call-parser", "pythonic")
    assert exc.value.code == 2


# ------------------------------------------------------------------ Mistral (special tokens)
@pytest.fixture(scope="module")
def mistral_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """[TOOL_CALLS] and [ARGS] as special tokens, as Mistral's tokenizers have them: the
    parser must see them although special tokens are skipped by default."""
    from tests.harmony_fixture import _write

    path = tmp_path_factory.mktemp("srv") / "mistral-tools"
    make_checkpoint(path, "mixtral", tokenizer=True, vocab_size=400, max_position_embeddings=2048)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).unlink()
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": TEMPLATES["mistral"]}
    _write(path, ["[TOOL_CALLS]", "[ARGS]"], True, config)
    yield from serving(path, max_model_len=2048)


def test_mistral_calls_are_read_through_their_special_tokens(mistral_srv: RunningServer) -> None:
    script = _Script(mistral_srv)
    tok = mistral_srv.state.client.tokenizer  # type: ignore[union-attr]
    assert tok is not None and tok.eos_token_id is not None
    out = (
        'Sure. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'
        '[TOOL_CALLS]get_time[ARGS]{"zone": "UTC"}'
    )
    script.tokens = [*tok.encode(out, add_special_tokens=False), tok.eos_token_id]
    assert len(tok.encode("[TOOL_CALLS]", add_special_tokens=False)) == 1
    body = _chat(mistral_srv, tools=TOOLS).json()
    message = body["choices"][0]["message"]
    assert message["content"] == "Sure."
    assert _calls(message["tool_calls"]) == WANT_CALLS
    assert all(len(c["id"]) == 9 and c["id"].isalnum() for c in message["tool_calls"])
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    prompt = tok.decode(script.prompts[-1], skip_special_tokens=False)
    assert prompt.startswith('<s>[AVAILABLE_TOOLS] [{"type": "function"')
    # The calls' ids go back into the history as Mistral's template demands.
    history = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": message["tool_calls"]},
        *(
            {"role": "tool", "tool_call_id": c["id"], "content": "ok"}
            for c in message["tool_calls"]
        ),
    ]
    script.tokens = [*tok.encode("Done.", add_special_tokens=False), tok.eos_token_id]
    r = mistral_srv.client().post(
        "/v1/chat/completions", json={"messages": history, "tools": TOOLS}
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": "Done."}
    # tool_choice none: special tokens skipped as usual, nothing parsed.
    script.tokens = [*tok.encode(out, add_special_tokens=False), tok.eos_token_id]
    message = _chat(mistral_srv, tools=TOOLS, tool_choice="none").json()["choices"][0]["message"]
    assert "tool_calls" not in message and "[TOOL_CALLS]" not in message["content"]
