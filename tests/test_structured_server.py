"""Structured outputs over HTTP: OpenAI's response_format and vLLM's guided_* and
structured_outputs fields on both routes (streamed too), the openai client's `parse()`, and a
constraint that does not compile refused with a 400 naming it before the engine sees it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import jsonschema
import openai
import pydantic
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
MESSAGES = [{"role": "user", "content": "Describe a user."}]
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def srv(ckpt: Path) -> Iterator[RunningServer]:
    yield from serving(ckpt, max_model_len=512)


def _json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": {"name": "user", "schema": schema, "strict": True},
    }


def test_chat_response_format_json_schema(srv: RunningServer) -> None:
    body = {"messages": MESSAGES, "max_tokens": 200, "n": 3, "seed": 1}
    r = srv.client().post(CHAT, json={**body, "response_format": _json_schema(SCHEMA)})
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
    # Streamed: the deltas join into a valid document.
    with srv.client().stream(
        "POST",
        CHAT,
        json={**body, "n": 1, "stream": True, "response_format": _json_schema(SCHEMA)},
    ) as resp:
        events = sse_events(resp.iter_lines())
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_and_text(srv: RunningServer) -> None:
    body = {"messages": MESSAGES, "max_tokens": 40, "seed": 3}
    r = srv.client().post(CHAT, json={**body, "response_format": {"type": "json_object"}})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"].startswith("{")
    if choice["finish_reason"] == "stop":  # else cut by max_tokens, which is allowed
        assert isinstance(json.loads(choice["message"]["content"]), dict)
    plain = srv.client().post(CHAT, json={**body, "temperature": 0.0})
    text = srv.client().post(
        CHAT, json={**body, "temperature": 0.0, "response_format": {"type": "text"}}
    )
    assert text.json()["choices"][0] == plain.json()["choices"][0]


CONSTRAINTS: list[tuple[dict[str, Any], str]] = [  # completions fields -> what the text matches
    ({"guided_json": SCHEMA}, "schema"),
    ({"guided_json": json.dumps(SCHEMA)}, "schema"),
    ({"response_format": _json_schema(SCHEMA)}, "schema"),
    ({"guided_regex": "[a-z]{3}-[0-9]{2}"}, "[a-z]{3}-[0-9]{2}"),
    ({"guided_choice": ["red", "green", "blue"]}, "red|green|blue"),
    ({"guided_grammar": 'start: "<" NUM ">"\nNUM: /[0-9]{1,3}/'}, "<[0-9]{1,3}>"),
    ({"guided_grammar": 'root ::= "x" [0-9] [0-9]?'}, "x[0-9]{1,2}"),  # GBNF
    ({"structured_outputs": {"regex": "(ab|cd){2}"}}, "(ab|cd){2}"),
    ({"structured_outputs": {"choice": ["up", "down"]}}, "up|down"),
    ({"structured_outputs": {"json": SCHEMA}}, "schema"),
]


@pytest.mark.parametrize("fields,expect", CONSTRAINTS)
def test_completion_constraints(srv: RunningServer, fields: dict[str, Any], expect: str) -> None:
    body = {"prompt": "Answer:", "max_tokens": 200, "n": 2, "seed": 5, **fields}
    r = srv.client().post(COMP, json=body)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "stop"
        if expect == "schema":
            jsonschema.validate(json.loads(choice["text"]), SCHEMA)
        else:
            assert re.fullmatch(expect, choice["text"]), choice["text"]


REFUSED: list[tuple[str, dict[str, Any], str, str]] = [  # route, fields, param, in message
    (CHAT, {"response_format": _json_schema({"type": "objekt"})}, "response_format", "objekt"),
    (COMP, {"guided_json": {"properties": {"a": {"minimum": "x"}}}}, "guided_json", "minimum"),
    (COMP, {"guided_regex": "[a-"}, "guided_regex", "regex"),
    (COMP, {"guided_grammar": "start: missing_rule"}, "guided_grammar", "missing_rule"),
    (COMP, {"guided_choice": ["a", 1]}, "guided_choice", "list of strings"),
    (CHAT, {"response_format": {"type": "yaml"}}, "response_format", "yaml"),
    (CHAT, {"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    (COMP, {"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "one"),
    (COMP, {"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs", "white"),
    (COMP, {"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "guided_regex"),
]


@pytest.mark.parametrize("route,fields,param,needle", REFUSED)
def test_a_constraint_that_does_not_compile_is_a_400(
    srv: RunningServer, route: str, fields: dict[str, Any], param: str, needle: str
) -> None:
    grammars = srv.engine.grammars
    assert grammars is not None
    compiled = grammars.num_compiled
    base = {"prompt": "x"} if route == COMP else {"messages": MESSAGES}
    err = assert_envelope(srv.client().post(route, json={**base, **fields}), 400, param)
    assert needle in err["message"], err["message"]
    assert grammars.num_compiled == compiled  # never reached the engine
    assert not srv.engine.has_unfinished()


class Color(pydantic.BaseModel):
    name: Literal["red", "green", "blue"]
    hex: str = pydantic.Field(pattern=r"^#[0-9a-f]{6}$")


class Palette(pydantic.BaseModel):
    title: str = pydantic.Field(max_length=10)
    colors: list[Color] = pydantic.Field(min_length=1, max_length=3)


def test_openai_client_parse(srv: RunningServer) -> None:
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    completion = client.chat.completions.parse(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "A palette, please."}],
        response_format=Palette,
        max_tokens=300,
        seed=7,
    )
    message = completion.choices[0].message
    assert isinstance(message.parsed, Palette)
    assert 1 <= len(message.parsed.colors) <= 3


def test_engine_in_its_own_process(ckpt: Path) -> None:
    """The constraint crosses the pipe to an engine process, which builds its own grammars."""
    for running in serving(ckpt, max_model_len=512, process=True):
        body = {"prompt": "Answer:", "max_tokens": 100, "n": 2, "seed": 2}
        r = running.client().post(COMP, json={**body, "guided_json": SCHEMA})
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            jsonschema.validate(json.loads(choice["text"]), SCHEMA)


def test_a_grammar_the_vocabulary_cannot_start_is_a_400() -> None:
    """The demo model's 45 characters hold no brace: a JSON object cannot begin. The engine
    refuses it (a 400, no engine field named), and the server keeps serving."""
    from moeserve.assets import demo_model_path

    for running in serving(demo_model_path(), max_model_len=128):
        client = running.client()
        body = {"messages": [{"role": "user", "content": "47+85"}], "max_tokens": 8}
        r = client.post(CHAT, json={**body, "response_format": {"type": "json_object"}})
        error = assert_envelope(r, 400)
        assert error["type"] == "invalid_request_error" and error["param"] is None
        assert "vocabulary cannot write" in error["message"]
        r = client.post(CHAT, json={**body, "guided_regex": "[0-9]+"})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].isdigit()
