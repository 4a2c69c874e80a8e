"""POST /v1/messages (Anthropic's Messages API) through the official `anthropic` SDK,
unmodified: plain and streamed messages, tools (the model's output scripted, as in
test_tool_calls.py, and forced calls from a random-weight model), count_tokens, bad inputs
and auth in Anthropic's error envelope, and a client that leaves mid-stream."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moeserve.server.errors import APIError, bad_request
from moeserve.server.messages import anthropic_body
from moeserve.tokenizer import Tokenizer
from tests.checkpoints import make_checkpoint
from tests.harmony_fixture import write_harmony_tokenizer
from tests.scripted_chat import qwen3_like_checkpoint, say
from tests.server_fixture import (
    MODEL_NAME,
    RunningServer,
    build_checkpoint,
    serving,
    start_server,
    wait_for,
)
from tests.test_harmony import ANSWER, HARMONY_OUT, THINKING, _Script

KEY = "s3cret"
CALLS_OUT = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
    '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
)
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS: list[dict[str, Any]] = [
    {"name": "get_weather", "description": "The weather in a city", "input_schema": WEATHER_SCHEMA},
    {
        "name": "get_time",
        "input_schema": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 8}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
]
USER = [{"role": "user", "content": "Weather in Paris, and the time in UTC?"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return qwen3_like_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def srv(ckpt: Path) -> Iterator[RunningServer]:
    yield from serving(ckpt, max_model_len=2048, api_key=KEY)


@pytest.fixture(scope="module")
def script(srv: RunningServer) -> _Script:
    return _Script(srv)


@pytest.fixture(scope="module")
def tok(ckpt: Path) -> Tokenizer:
    return Tokenizer.from_dir(ckpt)


@pytest.fixture(scope="module")
def client(srv: RunningServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=srv.url, api_key=KEY, max_retries=0, timeout=30)


def _prompt(script: _Script, tok: Tokenizer) -> str:
    return tok.decode(script.prompts[-1], skip_special_tokens=False)


def test_create_returns_an_anthropic_message(
    client: anthropic.Anthropic, script: _Script, tok: Tokenizer
) -> None:
    say(script, tok, "It is sunny.")
    msg = client.messages.create(
        model=MODEL_NAME,
        max_tokens=50,
        system=[{"type": "text", "text": "Be brief."}],
        messages=USER,
        # This SDK version has no sampling arguments; the API (and this server) takes them.
        extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 5},
        metadata={"user_id": "u1"},
    )
    assert msg.type == "message" and msg.role == "assistant" and msg.model == MODEL_NAME
    assert msg.id.startswith("msg")
    assert [(b.type, b.text) for b in msg.content] == [("text", "It is sunny.")]
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    prompt = _prompt(script, tok)
    assert "Be brief." in prompt and USER[0]["content"] in prompt
    u = msg.usage
    assert u.input_tokens + (u.cache_read_input_tokens or 0) == len(script.prompts[-1])
    assert u.output_tokens == len(script.tokens)
    # The same prompt again: the prefix cache's hit is reported as cache reads.
    again = client.messages.create(
        model=MODEL_NAME, max_tokens=50, system="Be brief.", messages=USER
    )
    assert again.usage.cache_read_input_tokens and again.usage.cache_read_input_tokens > 0
    assert again.usage.input_tokens + again.usage.cache_read_input_tokens == len(script.prompts[-1])
    cut = client.messages.create(model=MODEL_NAME, max_tokens=2, messages=USER)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 2
    stopped = client.messages.create(
        model=MODEL_NAME, max_tokens=50, messages=USER, stop_sequences=["sunny", "rain"]
    )
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "sunny"
    assert stopped.content[0].text == "It is "


def _raw_events(
    srv: RunningServer, body: dict[str, Any], headers: dict[str, str] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) pairs of a streamed /v1/messages response."""
    headers = {"x-api-key": KEY} if headers is None else headers
    with srv.client().stream("POST", "/v1/messages", json=body, headers=headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    out = []
    for part in text.strip().split("\n\n"):
        name, data = part.split("\n")
        assert name.startswith("event: ") and data.startswith("data: ")
        payload = json.loads(data[len("data: ") :])
        assert payload["type"] == name[len("event: ") :]
        out.append((payload["type"], payload))
    return out


def test_stream_gives_the_event_sequence(
    srv: RunningServer, client: anthropic.Anthropic, script: _Script, tok: Tokenizer
) -> None:
    say(script, tok, "It is sunny in Paris today.")
    with client.messages.stream(model=MODEL_NAME, max_tokens=50, messages=USER) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "It is sunny in Paris today."
    assert [b.text for b in final.content if b.type == "text"] == [text]
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == len(script.tokens)
    u = final.usage  # message_delta's: the final split, the prefix cache's hit included
    assert u.input_tokens + (u.cache_read_input_tokens or 0) == len(script.prompts[-1])
    events = _raw_events(
        srv, {"model": MODEL_NAME, "max_tokens": 50, "messages": USER, "stream": True}
    )
    kinds = [k for k, _ in events]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["id"].startswith("msg")
    assert "".join(e["delta"]["text"] for k, e in events if k == "content_block_delta") == text
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == len(script.tokens)
    start_usage, usage = events[0][1]["message"]["usage"], delta["usage"]
    assert start_usage["input_tokens"] == len(script.prompts[-1])  # before the cache is known
    assert usage["cache_read_input_tokens"] > 0  # the same prompt as the stream above
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] == len(script.prompts[-1])


def test_tool_use_and_tool_result_round_trip(
    srv: RunningServer, client: anthropic.Anthropic, script: _Script, tok: Tokenizer
) -> None:
    say(script, tok, CALLS_OUT)
    msg = client.messages.create(model=MODEL_NAME, max_tokens=200, messages=USER, tools=TOOLS)
    assert msg.stop_reason == "tool_use"
    assert [b.type for b in msg.content] == ["text", "tool_use", "tool_use"]
    assert msg.content[0].text == "Let me check."
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert [(b.name, b.input) for b in uses] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"zone": "UTC"}),
    ]
    assert all(b.id.startswith("toolu_") for b in uses) and uses[0].id != uses[1].id
    assert '"name": "get_weather"' in _prompt(script, tok)  # the tools reached the template
    # Streamed: the SDK assembles the input_json_delta events into the same calls.
    with client.messages.stream(model=MODEL_NAME, max_tokens=200, messages=USER, tools=TOOLS) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [(b.type, getattr(b, "input", None)) for b in final.content] == [
        ("text", None),
        ("tool_use", {"city": "Paris"}),
        ("tool_use", {"zone": "UTC"}),
    ]
    # disable_parallel_tool_use: the first call only.
    one = client.messages.create(
        model=MODEL_NAME,
        max_tokens=200,
        messages=USER,
        tools=TOOLS,
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
    )
    assert [b.name for b in one.content if b.type == "tool_use"] == ["get_weather"]
    # The results go back as tool_result blocks (the SDK's own blocks as the assistant turn).
    say(script, tok, "18 C at noon.")
    history = [
        *USER,
        {"role": "assistant", "content": msg.content},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": uses[0].id, "content": "18 C"},
                {
                    "type": "tool_result",
                    "tool_use_id": uses[1].id,
                    "content": [{"type": "text", "text": "no such zone"}],
                    "is_error": True,
                },
                {"type": "text", "text": "Thanks."},
            ],
        },
    ]
    reply = client.messages.create(model=MODEL_NAME, max_tokens=50, messages=history, tools=TOOLS)
    assert reply.content[0].text == "18 C at noon." and reply.stop_reason == "end_turn"
    prompt = _prompt(script, tok)
    assert '"city": "Paris"' in prompt  # the assistant's call, rendered as the template does
    assert "<tool_response>\n18 C\n</tool_response>" in prompt
    assert "Error: no such zone" in prompt and prompt.index("no such zone") < prompt.index(
        "Thanks."
    )
    # count_tokens counts what /v1/messages renders.
    count = client.messages.count_tokens(model=MODEL_NAME, messages=history, tools=TOOLS)
    assert count.input_tokens == len(script.prompts[-1])
    # tool_choice none: the call markup is text.
    say(script, tok, CALLS_OUT)
    plain = client.messages.create(
        model=MODEL_NAME, max_tokens=200, messages=USER, tools=TOOLS, tool_choice={"type": "none"}
    )
    assert [b.type for b in plain.content] == ["text"] and plain.stop_reason == "end_turn"


@pytest.fixture(scope="module")
def model_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A random-weight model that really runs (its template has no tool-call format: forced
    choices need none)."""
    yield from serving(build_checkpoint(tmp_path_factory), max_model_len=1024)


# One call for `any`: with parallel calls allowed, a random-weight model sampling at
# temperature 1 (this API has no seed) may keep appending calls until max_tokens.
@pytest.mark.parametrize(
    "choice",
    [{"type": "any", "disable_parallel_tool_use": True}, {"type": "tool", "name": "get_weather"}],
)
def test_forced_tool_choice_gives_valid_tool_use(
    model_srv: RunningServer, choice: dict[str, Any]
) -> None:
    client = anthropic.Anthropic(base_url=model_srv.url, api_key="unused", max_retries=0)
    for seed_text in ("Hi", "Weather?"):
        msg = client.messages.create(
            model=MODEL_NAME,
            max_tokens=300,
            messages=[{"role": "user", "content": seed_text}],
            tools=TOOLS,
            tool_choice=choice,  # type: ignore[arg-type]
            extra_body={"temperature": 1.0},
        )
        assert msg.stop_reason == "tool_use", msg
        uses = [b for b in msg.content if b.type == "tool_use"]
        assert uses and all(b.type == "tool_use" for b in msg.content)
        for b in uses:
            schema = WEATHER_SCHEMA if b.name == "get_weather" else TOOLS[1]["input_schema"]
            jsonschema.validate(b.input, schema)
            assert b.name == choice.get("name", b.name)


def test_forced_tool_use_streams_as_input_json(model_srv: RunningServer) -> None:
    client = anthropic.Anthropic(base_url=model_srv.url, api_key="unused", max_retries=0)
    with client.messages.stream(
        model=MODEL_NAME,
        max_tokens=300,
        messages=[{"role": "user", "content": "Hi"}],
        tools=TOOLS,
        tool_choice={"type": "tool", "name": "get_time"},
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["tool_use"] and final.content[0].name == "get_time"
    jsonschema.validate(final.content[0].input, TOOLS[1]["input_schema"])


def test_error_types_follow_the_status() -> None:
    want = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        500: "api_error",
        503: "overloaded_error",
    }
    for status, kind in want.items():
        body = anthropic_body(APIError(status, "why"))
        assert body == {"type": "error", "error": {"type": kind, "message": "why"}}
    # The chat path's name for a field becomes this API's.
    e = bad_request("stop: too many stop strings", param="stop")
    assert anthropic_body(e)["error"]["message"] == "stop_sequences: too many stop strings"
    e = bad_request("not in the vocabulary", param="top_k")
    assert anthropic_body(e)["error"]["message"] == "top_k: not in the vocabulary"


def _post(srv: RunningServer, body: Any, **headers: str) -> httpx.Response:
    return srv.client().post("/v1/messages", json=body, headers={"x-api-key": KEY, **headers})


def _envelope(r: httpx.Response, status: int, kind: str, names: str | None = None) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"type", "error"} and body["type"] == "error", body
    assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == kind, body
    message = body["error"]["message"]
    if names is not None:
        assert names in message, message
    return message


BASE: dict[str, Any] = {"model": MODEL_NAME, "max_tokens": 5, "messages": USER}


@pytest.mark.parametrize(
    "change,field",
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 1.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 2.0}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"stream": "yes"}, "stream"),
        ({"stop_sequences": "END"}, "stop_sequences"),
        ({"system": 5}, "system"),
        ({"messages": "hi"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "'image'"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content.0"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}}],
                    }
                ]
            },
            "messages.0.content.0",
        ),
        ({"tools": [{"name": "f"}]}, "tools.0.input_schema"),
        ({"tools": TOOLS, "tool_choice": {"type": "bogus"}}, "tool_choice.type"),
        ({"tools": TOOLS, "tool_choice": {"type": "tool"}}, "tool_choice"),
        ({"metadata": {"user_id": 3}}, "metadata.user_id"),
        ({"thinking": {"type": "enabled", "budget_tokens": 100}}, "thinking"),
        ({"max_token": 5}, "max_token"),
    ],
)
def test_bad_inputs_are_400s_naming_the_field(
    srv: RunningServer, change: dict[str, Any], field: str
) -> None:
    body = {**BASE, **change}
    body = {k: v for k, v in body.items() if v is not None}
    _envelope(_post(srv, body), 400, "invalid_request_error", field)


def test_errors_through_the_sdk(srv: RunningServer, client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(
            model=MODEL_NAME, max_tokens=5, messages=USER, extra_body={"temperature": 1.5}
        )
    assert e.value.status_code == 400 and "temperature" in str(e.value)
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-nope", max_tokens=5, messages=USER)
    _envelope(_post(srv, {**BASE, "model": "claude-nope"}), 404, "not_found_error", "claude-nope")
    r = srv.client().post("/v1/messages", content=b"{not json", headers={"x-api-key": KEY})
    _envelope(r, 400, "invalid_request_error", "JSON")


def test_auth_by_x_api_key_or_bearer(srv: RunningServer, script: _Script, tok: Tokenizer) -> None:
    say(script, tok, "ok")
    http = srv.client()
    assert http.post("/v1/messages", json=BASE, headers={"x-api-key": KEY}).status_code == 200
    bearer = {"authorization": f"Bearer {KEY}"}
    assert http.post("/v1/messages", json=BASE, headers=bearer).status_code == 200
    for headers in ({}, {"x-api-key": "wrong"}, {"authorization": "Bearer wrong"}):
        r = http.post("/v1/messages", json=BASE, headers=headers)
        _envelope(r, 401, "authentication_error", "API key")
    r = http.post("/v1/messages/count_tokens", json={"model": MODEL_NAME, "messages": USER})
    _envelope(r, 401, "authentication_error")
    bad = anthropic.Anthropic(base_url=srv.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model=MODEL_NAME, max_tokens=5, messages=USER)
    token = anthropic.Anthropic(base_url=srv.url, auth_token=KEY, max_retries=0)  # Bearer
    assert token.messages.create(model=MODEL_NAME, max_tokens=5, messages=USER).content
    # The OpenAI routes keep their own header and envelope.
    r = http.post("/v1/chat/completions", json={"messages": USER}, headers={"x-api-key": KEY})
    assert r.status_code == 401 and "error" in r.json() and "type" not in r.json()


def _metric_sum(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_disconnect_mid_stream_aborts(model_srv: RunningServer) -> None:
    http = model_srv.client()
    before = _metric_sum(http.get("/metrics").text, "moeserve_generation_tokens_total")
    body = {
        "model": MODEL_NAME,
        "max_tokens": 900,
        "messages": [{"role": "user", "content": "Tell a long story"}],
        "stream": True,
    }

    async def main() -> None:
        async with (
            httpx.AsyncClient(base_url=model_srv.url, timeout=30) as client,
            client.stream("POST", "/v1/messages", json=body) as resp,
        ):
            assert resp.status_code == 200
            lines = resp.aiter_lines()
            seen = 0
            while seen < 4:  # message_start, the block's start, two deltas: then leave
                seen += (await anext(lines)).startswith("event: ")

    asyncio.run(main())
    model_srv.wait_idle(timeout=10)
    after = _metric_sum(http.get("/metrics").text, "moeserve_generation_tokens_total")
    assert 0 < after - before < 900  # stopped early, not run to max_tokens


def test_output_config_format_constrains_the_text(model_srv: RunningServer) -> None:
    client = anthropic.Anthropic(base_url=model_srv.url, api_key="unused", max_retries=0)
    msg = client.messages.create(
        model=MODEL_NAME,
        max_tokens=300,
        messages=[{"role": "user", "content": "Weather?"}],
        output_config={"format": {"type": "json_schema", "schema": WEATHER_SCHEMA}},
        extra_body={"temperature": 1.0},
    )
    assert msg.stop_reason == "end_turn" and [b.type for b in msg.content] == ["text"]
    jsonschema.validate(json.loads(msg.content[0].text), WEATHER_SCHEMA)
    r = model_srv.client().post("/v1/messages", json={**BASE, "output_config": {"effort": "high"}})
    _envelope(r, 400, "invalid_request_error", "output_config.effort")


# ------------------------------------------------------------------ a reasoning model
@pytest.fixture(scope="module")
def harmony_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """gpt-oss's harmony format (a reasoning channel), the model's output scripted."""
    path = tmp_path_factory.mktemp("srv") / "harmony"
    make_checkpoint(path, "mixtral", tokenizer=True, vocab_size=400)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).unlink()
    write_harmony_tokenizer(path)
    tok = Tokenizer.from_dir(path)
    ends = [tok.encode(t, add_special_tokens=False)[0] for t in ("<|return|>", "<|call|>")]
    gen = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": ends}))
    yield from serving(path, max_model_len=256)


def test_reasoning_comes_back_as_thinking_blocks(harmony_srv: RunningServer) -> None:
    script = _Script(harmony_srv)
    tok = harmony_srv.state.client.tokenizer  # type: ignore[union-attr]
    script.tokens = tok.encode(HARMONY_OUT, add_special_tokens=False)
    client = anthropic.Anthropic(base_url=harmony_srv.url, api_key="unused", max_retries=0)
    msg = client.messages.create(model=MODEL_NAME, max_tokens=100, messages=USER)
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].thinking == THINKING and msg.content[1].text == ANSWER
    with client.messages.stream(model=MODEL_NAME, max_tokens=100, messages=USER) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == ANSWER
    assert [(b.type, getattr(b, "thinking", None)) for b in final.content] == [
        ("thinking", THINKING),
        ("text", None),
    ]
    events = _raw_events(
        harmony_srv, {"model": MODEL_NAME, "max_tokens": 100, "messages": USER, "stream": True}
    )
    kinds = [(k, e.get("index"), e.get("delta", {}).get("type")) for k, e in events]
    assert kinds[1] == ("content_block_start", 0, None)
    assert ("content_block_delta", 0, "thinking_delta") in kinds
    assert ("content_block_delta", 1, "text_delta") in kinds
    assert kinds.index(("content_block_stop", 0, None)) < kinds.index(
        ("content_block_start", 1, None)
    )
    # The returned blocks, thinking and all, are accepted back in the next turn.
    turn = [
        *USER,
        {"role": "assistant", "content": msg.content},
        {"role": "user", "content": "Sure?"},
    ]
    again = client.messages.create(model=MODEL_NAME, max_tokens=100, messages=turn)
    assert again.content[-1].text == ANSWER
    assert tok.decode(script.prompts[-1], skip_special_tokens=False).endswith(
        f"<|channel|>final<|message|>{ANSWER}<|end|><|start|>user<|message|>Sure?<|end|>"
        "<|start|>assistant"
    )


def test_the_drain_ends_a_stream_with_an_error_event(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    running = start_server(
        build_checkpoint(tmp_path_factory), max_model_len=1024, shutdown_timeout=0.5
    )
    body = {**BASE, "max_tokens": 900, "stream": True}
    events: list[tuple[str, dict[str, Any]]] = []

    def read() -> None:
        events.extend(_raw_events(running, body, headers={}))

    t = threading.Thread(target=read)
    t.start()
    try:
        wait_for(running.engine.has_unfinished, 10, "a running request")
        running.server.loop.call_soon_threadsafe(running.server.begin_shutdown)
        t.join(30)
        running.thread.join(30)
    finally:
        if running.thread.is_alive():
            running.stop()
    assert events[0][0] == "message_start"
    if events[-1][0] != "message_stop":  # it may have finished within the timeout
        kind, payload = events[-1]
        assert kind == "error" and payload["error"]["type"] == "overloaded_error", payload
        assert "shutting down" in payload["error"]["message"]


def test_requests_are_counted_by_route(srv: RunningServer) -> None:
    """moeserve_http_requests_total{route, status}: the three chat-shaped routes apart."""

    def counts() -> dict[tuple[str, str], float]:
        body = srv.client().get("/metrics").text  # /metrics needs no key
        return {
            (s.labels["route"], s.labels["status"]): s.value
            for f in text_string_to_metric_families(body)
            if f.name == "moeserve_http_requests"
            for s in f.samples
        }

    before = counts()
    c = srv.client(headers={"x-api-key": KEY, "Authorization": f"Bearer {KEY}"})
    ok = {"max_tokens": 2, "model": MODEL_NAME}
    r = c.post("/v1/messages", json={**ok, "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200, r.text
    assert c.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 2}).status_code == 200
    assert c.post("/v1/messages", json={"messages": []}).status_code == 400
    after = counts()
    for key, n in (
        (("/v1/messages", "200"), 1),
        (("/v1/responses", "200"), 1),
        (("/v1/messages", "400"), 1),
    ):
        assert after.get(key, 0) - before.get(key, 0) == n, (key, before, after)
