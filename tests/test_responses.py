"""POST /v1/responses through the official openai SDK, unmodified: plain and streamed answers,
tool calls (a scripted model's own format, and tool_choice required forced by the grammar on
a random-weight model), a json_schema text format, reasoning items (gpt-oss's harmony
format), input items with function calls and their outputs, the 400s naming the field, the
API key, and a client leaving mid-stream aborting the request."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from moeserve.assets import DEMO_MODEL_NAME, demo_model_path
from moeserve.demo_tasks import TASKS, held_out
from moeserve.tokenizer import Tokenizer
from tests.scripted_chat import qwen3_like_checkpoint, say
from tests.server_fixture import (
    EngineFault,
    RunningServer,
    assert_envelope,
    build_checkpoint,
    serving,
    start_server,
)
from tests.test_harmony import TOOL_CALL, _Script
from tests.test_server_lifecycle import _metric_sum
from tests.test_tool_calls import CALLS_OUT, SCHEMAS, harmony_srv  # noqa: F401

DEMO = demo_model_path()
TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "strict": True,
    },
    {
        "type": "function",
        "name": "get_time",
        "description": "The time in a zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
]


def _client(srv: RunningServer, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0)


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


def test_plain_response(srv: RunningServer, script: _Script, tok: Tokenizer) -> None:
    say(script, tok, "It is sunny.")
    r = _client(srv).responses.create(
        model="tiny-moe", input="Weather?", instructions="Be brief.", metadata={"k": "v"}
    )
    assert r.id.startswith("resp_") and r.object == "response" and r.status == "completed"
    assert r.output_text == "It is sunny."
    [item] = r.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert r.usage is not None and r.usage.output_tokens == len(script.tokens)
    assert r.usage.input_tokens == len(script.prompts[-1])
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.input_tokens_details.cached_tokens >= 0
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    assert r.metadata == {"k": "v"} and r.instructions == "Be brief."
    prompt = tok.decode(script.prompts[-1], skip_special_tokens=False)
    assert "<|im_start|>system\nBe brief." in prompt and "user\nWeather?" in prompt
    # Cut by max_output_tokens: incomplete, with the reason.
    r = _client(srv).responses.create(input="Weather?", max_output_tokens=2)
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage is not None and r.usage.output_tokens == 2


def test_streamed_response(srv: RunningServer, script: _Script, tok: Tokenizer) -> None:
    say(script, tok, "It is sunny.")
    events = list(_client(srv).responses.create(input="Weather?", stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert "".join(e.delta for e in deltas) == "It is sunny." == events[-4].text
    final = events[-1].response
    assert final.output_text == "It is sunny." and final.status == "completed"
    assert final.usage is not None and final.usage.output_tokens == len(script.tokens)
    assert events[0].response.status == "in_progress" and events[0].response.id == final.id
    # The SDK's own accumulator (responses.stream) builds the same response from the events.
    with _client(srv).responses.stream(model="tiny-moe", input="Weather?") as stream:
        assert stream.get_final_response().output_text == "It is sunny."
    # Cut short: response.incomplete.
    with httpx.stream(
        "POST",
        srv.url + "/v1/responses",
        json={"input": "x", "max_output_tokens": 2, "stream": True},
    ) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-2] == "event: response.incomplete"
    assert json.loads(lines[-1][6:])["response"]["incomplete_details"]["reason"] == (
        "max_output_tokens"
    )


def test_function_calls_and_their_outputs(
    srv: RunningServer, script: _Script, tok: Tokenizer
) -> None:
    say(script, tok, CALLS_OUT)
    client = _client(srv)
    r = client.responses.create(input="Weather in Paris and time in UTC?", tools=TOOLS)
    kinds = [o.type for o in r.output]
    assert kinds == ["message", "function_call", "function_call"]
    assert r.output[0].content[0].text == "Let me check."
    calls = [(o.name, json.loads(o.arguments)) for o in r.output[1:]]
    assert calls == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "UTC"})]
    assert all(o.call_id.startswith("call_") for o in r.output[1:])
    prompt = tok.decode(script.prompts[-1], skip_special_tokens=False)
    assert '"name": "get_time"' in prompt
    # parallel_tool_calls false: the first call only. Streamed: the arguments' events.
    r = client.responses.create(input="x", tools=TOOLS, parallel_tool_calls=False)
    assert [o.type for o in r.output] == ["message", "function_call"]
    events = list(client.responses.create(input="x", tools=TOOLS, stream=True))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [(e.name, json.loads(e.arguments)) for e in done] == calls
    args = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert "".join(e.delta for e in args) == "".join(e.arguments for e in done)
    assert [o.type for o in events[-1].response.output] == kinds
    # The calls and their outputs sent back as input items render as tool turns.
    say(script, tok, "Sunny, and noon.")
    history: list[Any] = [{"role": "user", "content": "Weather in Paris and time in UTC?"}]
    history += [o.model_dump() for o in r.output]  # unset fields as nulls
    history += [
        {"type": "function_call_output", "call_id": o.call_id, "output": "18 C"}
        for o in r.output
        if o.type == "function_call"
    ]
    r = client.responses.create(input=history, tools=TOOLS)
    assert r.output_text == "Sunny, and noon."
    prompt = tok.decode(script.prompts[-1], skip_special_tokens=False)
    assert "<tool_response>\n18 C\n</tool_response>" in prompt
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt


def test_reasoning_comes_back_as_a_reasoning_item(harmony_srv: RunningServer) -> None:  # noqa: F811
    script = _Script(harmony_srv)
    tok = harmony_srv.state.client.tokenizer  # type: ignore[union-attr]
    assert tok is not None
    script.tokens = tok.encode(TOOL_CALL, add_special_tokens=False)
    client = _client(harmony_srv)
    r = client.responses.create(input="Weather?", tools=TOOLS)
    assert [o.type for o in r.output] == ["reasoning", "function_call"]
    assert r.output[0].content is not None
    assert r.output[0].content[0].text == "Need the weather."
    assert (r.output[1].name, json.loads(r.output[1].arguments)) == (
        "get_weather",
        {"city": "Paris"},
    )
    assert r.usage is not None and r.usage.output_tokens_details.reasoning_tokens > 0
    events = list(client.responses.create(input="Weather?", tools=TOOLS, stream=True))
    deltas = [e.delta for e in events if e.type == "response.reasoning_text.delta"]
    assert "".join(deltas) == "Need the weather."
    assert [o.type for o in events[-1].response.output] == ["reasoning", "function_call"]
    with client.responses.stream(model="tiny-moe", input="Weather?", tools=TOOLS) as stream:  # type: ignore[arg-type]
        final = stream.get_final_response()
    assert [o.type for o in final.output] == ["reasoning", "function_call"]
    assert final.output[0].content[0].text == "Need the weather."  # type: ignore[union-attr,index]


# ------------------------------------------------------------------ a model that runs
@pytest.fixture(scope="module")
def model_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    yield from serving(build_checkpoint(tmp_path_factory), max_model_len=512, api_key="sekret")


def test_required_tool_choice_gives_valid_calls(model_srv: RunningServer) -> None:
    client = _client(model_srv, "sekret")
    for seed, choice in enumerate(["required", {"type": "function", "name": "get_time"}]):
        r = client.responses.create(
            input="Weather?",
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice=choice,  # type: ignore[arg-type]
            temperature=1.0,
            max_output_tokens=300,
            extra_body={} if seed else {"parallel_tool_calls": False},
        )
        calls = [o for o in r.output if o.type == "function_call"]
        assert calls and all(o.type == "function_call" for o in r.output), r.output
        for c in calls:
            assert c.name in SCHEMAS
            jsonschema.validate(json.loads(c.arguments), SCHEMAS[c.name])
        assert seed == 0 or [c.name for c in calls] == ["get_time"]


def test_json_schema_text_format(model_srv: RunningServer) -> None:
    # Bounded (a random-weight model would otherwise write digits until max_output_tokens).
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "sure": {"type": "boolean"},
        },
        "required": ["name", "age", "sure"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}
    client = _client(model_srv, "sekret")
    # Greedy: the same output each run (the Responses API has no seed).
    r = client.responses.create(
        input="6 times 7?", text={"format": fmt}, max_output_tokens=400, temperature=0
    )
    assert r.status == "completed", r
    jsonschema.validate(json.loads(r.output_text), schema)
    events = client.responses.create(
        input="6 times 7?", text={"format": fmt}, max_output_tokens=400, temperature=0, stream=True
    )
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == r.output_text
    # json_object: unbounded, so only its start is certain within a few tokens.
    r = client.responses.create(
        input="x", text={"format": {"type": "json_object"}}, max_output_tokens=8, temperature=0
    )
    assert r.output_text.lstrip().startswith("{")


BAD: list[tuple[dict[str, Any], str]] = [
    ({"input": 5}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input"),
    ({"input": [{"type": "image", "url": "x"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input"),
    ({"temperature": "1"}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_output_tokens": "10"}, "max_output_tokens"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"max_output_tokens": 100000}, "max_output_tokens"),
    ({"stream": "yes"}, "stream"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"tools": {"type": "function"}}, "tools"),
    ({"tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"tool_choice": "sometimes", "tools": TOOLS}, "tool_choice"),
    ({"text": {"format": {"type": "xml"}}}, "text.format"),
    (
        {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}},
        "text.format",
    ),
    ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format"),
    ({"text": {"fromat": {"type": "text"}}}, "text"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),  # this template does not read it
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input"),
    ({"input": [{"role": "user", "content": "x", "name": "bob"}]}, "input"),
    ({"metadata": {"k": 1}}, "metadata"),
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"include": ["reasoning.encrypted_content"]}, "include"),
    ({"max_token": 5}, "max_token"),
    ({"model": "other"}, "model"),
]


@pytest.mark.parametrize("body,param", BAD, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD)])
def test_bad_requests_are_400s_naming_the_field(
    model_srv: RunningServer, body: dict[str, Any], param: str
) -> None:
    http = model_srv.client(headers={"Authorization": "Bearer sekret"})
    r = http.post("/v1/responses", json={"input": "hi", **body})
    assert_envelope(r, 404 if param == "model" else 400, param)


def test_store_is_accepted_and_nothing_kept(model_srv: RunningServer) -> None:
    r = _client(model_srv, "sekret").responses.create(input="x", store=True, max_output_tokens=2)
    assert r.store is False and r.previous_response_id is None


def test_the_api_key_is_required(model_srv: RunningServer) -> None:
    with pytest.raises(openai.AuthenticationError):
        _client(model_srv, "wrong").responses.create(input="x", max_output_tokens=2)
    assert_envelope(model_srv.client().post("/v1/responses", json={"input": "x"}), 401)


def test_leaving_mid_stream_aborts(srv: RunningServer, script: _Script, tok: Tokenizer) -> None:
    script.tokens = tok.encode(" the", add_special_tokens=False)  # repeated: never an EOS
    http = srv.client()
    before = _metric_sum(http.get("/metrics").text, "moeserve_generation_tokens_total")

    async def main() -> None:
        body = {"input": "x", "max_output_tokens": 1900, "stream": True}
        async with (
            httpx.AsyncClient(base_url=srv.url, timeout=30) as client,
            client.stream("POST", "/v1/responses", json=body) as r,
        ):
            deltas = 0
            async for line in r.aiter_lines():
                deltas += line == "event: response.output_text.delta"
                if deltas == 3:
                    break

    asyncio.run(main())
    srv.wait_idle(timeout=10)
    after = _metric_sum(http.get("/metrics").text, "moeserve_generation_tokens_total")
    assert 0 < after - before < 1900  # stopped early, not run to max_output_tokens


def test_an_engine_failure_mid_stream_is_an_error_event(ckpt: Path) -> None:
    running = start_server(ckpt, max_model_len=1024)
    try:
        fault = EngineFault(running)
        fault.arm(3)  # the request's third step: its prefill and two decodes run first
        body = {"input": "x", "max_output_tokens": 900, "stream": True}
        with running.client().stream("POST", "/v1/responses", json=body) as r:
            lines = r.iter_lines()
            assert next(lines) == "event: response.created"
            rest = [line for line in lines if line]
        assert rest[-2] == "event: error"
        error = json.loads(rest[-1][6:])
        assert error["type"] == "error" and error["code"] == "engine_dead"
        assert "device lost" in error["message"]
    finally:
        running.stop()


def test_the_demo_model_answers_the_same_through_both_apis() -> None:
    """The shared path: greedy answers through /v1/responses equal /v1/chat/completions',
    and the demo model's answers are right."""
    running = start_server(DEMO, served_model_name=DEMO_MODEL_NAME, engine_kwargs={})
    try:
        client = _client(running)
        for ex in [held_out(per_task=2)[task][0] for task in TASKS]:
            kw: dict[str, Any] = {"model": DEMO_MODEL_NAME, "temperature": 0}
            chat = client.chat.completions.create(
                messages=[{"role": "user", "content": ex.question}], max_tokens=16, **kw
            )
            r = client.responses.create(input=ex.question, max_output_tokens=16, **kw)
            assert r.output_text == chat.choices[0].message.content == ex.answer
            assert r.usage is not None and chat.usage is not None
            assert r.usage.input_tokens == chat.usage.prompt_tokens
    finally:
        running.stop()
