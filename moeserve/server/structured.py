"""Structured-output request fields -> one `StructuredOutput`, checked before the engine.

OpenAI's `response_format` ({"type": "text" | "json_object" | "json_schema"}) and vLLM's
`guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` and `structured_outputs`
({"json" | "regex" | "choice" | "grammar" | "json_object": ...}). At most one of them may ask
for a constraint. The grammar is compiled here (llguidance, no tokenizer needed), so a schema,
regex or grammar that does not compile is a 400 naming the field and the problem, and never
reaches the engine.
"""

from __future__ import annotations

import json
from typing import Any

from llguidance.gbnf_to_lark import any_to_lark

from moeserve.engine.structured import check
from moeserve.sampling_params import StructuredOutput
from moeserve.server.errors import APIError, bad_request
from moeserve.server.protocol import SamplingFields

FIELDS = (
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
)
_VLLM_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "lark"}


def structured_output(req: SamplingFields) -> StructuredOutput | None:
    """The constraint `req` asks for (None for none); a 400 naming the field when it is
    malformed, does not compile, or when two fields ask for one."""
    found: list[tuple[str, StructuredOutput]] = []
    for name in FIELDS:
        value = getattr(req, name)
        if name not in req.model_fields_set or value is None:
            continue
        try:
            so = _parse(name, value)
        except ValueError as e:
            raise _error(name, str(e)) from None
        if so is not None:
            found.append((name, so))
    if len(found) > 1:
        names = " and ".join(name for name, _ in found)
        raise bad_request(f"{names} both constrain the output: give one", param=found[1][0])
    if not found:
        return None
    name, so = found[0]
    try:
        check(so)
    except ValueError as e:
        raise _error(name, str(e)) from None
    return so


def _error(name: str, message: str) -> APIError:
    prefix = "" if message.startswith(name) else f"{name}: "
    return bad_request(prefix + message, param=name)


def _parse(name: str, value: Any) -> StructuredOutput | None:
    if name == "response_format":
        return _response_format(value)
    if name == "structured_outputs":
        return _vllm_params(value)
    if name == "guided_json":
        return _schema(value, name)
    if name == "guided_regex":
        return StructuredOutput("regex", _text(value, name))
    if name == "guided_choice":
        return _choice(value, name)
    return StructuredOutput("lark", _grammar(_text(value, name)))  # guided_grammar


def _response_format(value: Any) -> StructuredOutput | None:
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ValueError('response_format must be an object with a "type"')
    kind = value["type"]
    _only(value, {"type", "json_schema"} if kind == "json_schema" else {"type"}, "response_format")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind != "json_schema":
        raise ValueError(
            f"response_format.type must be text, json_object or json_schema, got {kind!r}"
        )
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise ValueError("response_format.json_schema must be an object")
    _only(spec, {"name", "description", "schema", "strict"}, "response_format.json_schema")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("response_format.json_schema.name is required (a string)")
    if "schema" not in spec:  # OpenAI's default: any JSON object
        return StructuredOutput("json_object")
    return _schema(spec["schema"], "response_format.json_schema.schema")


def _vllm_params(value: Any) -> StructuredOutput | None:
    if not isinstance(value, dict):
        raise ValueError("structured_outputs must be an object")
    _only(value, {*_VLLM_KEYS, "json_object"}, "structured_outputs")
    given = [k for k, v in value.items() if v is not None and v is not False]
    if len(given) > 1:
        raise ValueError(f"structured_outputs: give one of {', '.join(given)}")
    if not given:
        return None
    key = given[0]
    field = f"structured_outputs.{key}"
    if key == "json_object":
        if value[key] is not True:
            raise ValueError(f"{field} must be true")
        return StructuredOutput("json_object")
    if key == "json":
        return _schema(value[key], field)
    if key == "choice":
        return _choice(value[key], field)
    text = _text(value[key], field)
    return (
        StructuredOutput("regex", text)
        if key == "regex"
        else StructuredOutput("lark", _grammar(text))
    )


def _schema(value: Any, field: str) -> StructuredOutput:
    """A schema given as an object or as its JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ValueError(f"{field} is not valid JSON: {e}") from None
    if not isinstance(value, (dict, bool)):
        raise ValueError(f"{field} must be a JSON schema (an object)")
    return StructuredOutput("json_schema", json.dumps(value))


def _choice(value: Any, field: str) -> StructuredOutput:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
        raise ValueError(f"{field} must be a non-empty list of strings")
    return StructuredOutput("choice", json.dumps(value))


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{field} must be a non-empty string")
    return value


def _grammar(text: str) -> str:
    """Lark as llguidance reads it; a GBNF grammar (llama.cpp's, `root ::= ...`) is converted."""
    try:
        return any_to_lark(text)
    except Exception as e:  # the converter raises bare Exceptions for syntax it cannot read
        raise ValueError(f"invalid grammar: {e}") from None


def _only(value: dict[str, Any], allowed: set[str], field: str) -> None:
    extra = sorted(set(value) - allowed)
    if extra:
        raise ValueError(f"{field}.{extra[0]} is not a recognised field")
