"""The OpenAI Responses API's request (POST /v1/responses) and its translation into the chat
path's ChatCompletionRequest: `input` items become chat messages, Responses-shaped function
tools and tool_choice become chat ones, `text.format` becomes response_format.

Parsing is strict as in protocol.py: an unknown field is a 400 naming it. Nothing is stored:
`store` is accepted (true is OpenAI's default, so clients send it) but no response is kept,
and `previous_response_id` (which would need a stored response) is a 400 naming it.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from moeserve.server.errors import bad_request
from moeserve.server.protocol import ChatCompletionRequest, _Request

# Fields that would need something this server lacks: accepted only when they ask for
# nothing (field -> that test); otherwise a 400 naming the field.
_REFUSED = {
    "previous_response_id": lambda v: v is None,
    "conversation": lambda v: v is None,
    "include": lambda v: not v,
    "truncation": lambda v: v in (None, "disabled"),
    "background": lambda v: not v,
    "max_tool_calls": lambda v: v is None,
    "top_logprobs": lambda v: not v,
    "prompt": lambda v: v is None,
}


class ResponsesRequest(_Request):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    # Accepted, not used (they do not change the output).
    metadata: dict[str, str] | None = None
    user: str | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # Refused unless they ask for nothing: see _REFUSED.
    previous_response_id: Any = None
    conversation: Any = None
    include: Any = None
    truncation: Any = None
    background: Any = None
    max_tool_calls: Any = None
    top_logprobs: Any = None
    prompt: Any = None


def chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat path's request for `req` (400s naming the Responses field at fault)."""
    for name, harmless in _REFUSED.items():
        if not harmless(getattr(req, name)):
            why = (
                "this server stores no responses (store is accepted but nothing is kept): "
                "send the whole conversation in input"
                if name in ("previous_response_id", "conversation")
                else "not supported by this server"
            )
            raise bad_request(f"{name}: {why}", param=name)
    if req.stream_options and set(req.stream_options) - {"include_obfuscation"}:
        raise bad_request("stream_options: only include_obfuscation is accepted", "stream_options")
    messages = input_messages(req.input)
    if req.instructions is not None:
        messages.insert(0, {"role": "system", "content": req.instructions})
    fields: dict[str, Any] = {
        "messages": messages,
        "model": req.model,
        "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "stream": req.stream,
        "parallel_tool_calls": req.parallel_tool_calls,
        "user": req.user,
        "metadata": req.metadata,
    }
    if req.tools is not None:
        fields["tools"] = [_tool(t, i) for i, t in enumerate(req.tools)]
    if req.tool_choice is not None:
        fields["tool_choice"] = _tool_choice(req.tool_choice)
    if req.text is not None:
        fmt = _text_format(req.text)
        if fmt is not None:
            fields["response_format"] = fmt
    if req.reasoning is not None:
        effort = _reasoning(req.reasoning)
        if effort is not None:
            fields["reasoning_effort"] = effort
    set_fields = {k: v for k, v in fields.items() if v is not None}
    try:
        return ChatCompletionRequest.model_validate(set_fields)
    except ValidationError as e:  # a message's shape: input items are checked loosely above
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise bad_request(f"input: {where}: {err['msg']}", "input") from None


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or text parts (input_text / output_text) joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of parts", "input")
    out = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(
            part.get("text"), str
        ):
            raise bad_request(
                f"{where}.content.{k}: only input_text and output_text parts (with a string "
                f"text) are supported, got {kind!r}",
                "input",
            )
        out.append(part["text"])
    return "".join(out)


def _string(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise bad_request(f"{where}.{key} is required (a string)", "input")
    return value


_ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
# Each item type's fields, including those the SDK puts on output items a client sends back
# (id, status, phase); another field is a 400 rather than silently dropped, unless null (a
# client may send an SDK item dumped with its unset fields).
_ITEM_FIELDS = {
    "message": {"type", "role", "content", "id", "status", "phase"},
    "function_call": {"type", "call_id", "name", "arguments", "id", "status"},
    "function_call_output": {"type", "call_id", "output", "id", "status"},
    "reasoning": {"type", "id", "summary", "content", "encrypted_content", "status"},
}


def input_messages(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages for `input`: function_call items join the assistant message before them
    (as tool_calls), function_call_output items become tool messages, a reasoning item's text
    becomes the next assistant message's reasoning_content."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not value:
        raise bad_request("input must not be empty", "input")
    out: list[dict[str, Any]] = []
    reasoning: str | None = None
    for i, item in enumerate(value):
        where = f"input.{i}"
        kind = item.get("type", "message")
        allowed = _ITEM_FIELDS.get(kind, set(item))
        unknown = sorted(k for k, v in item.items() if k not in allowed and v is not None)
        if unknown:
            raise bad_request(f"{where}: unknown field {unknown[0]} in a {kind} item", "input")
        if kind == "message":
            role = _ROLES.get(item.get("role"))  # type: ignore[arg-type]
            if role is None:
                raise bad_request(
                    f"{where}.role must be user, system, developer or assistant, got "
                    f"{item.get('role')!r}",
                    "input",
                )
            msg: dict[str, Any] = {"role": role, "content": _text(item.get("content"), where)}
            if role == "assistant" and reasoning is not None:
                msg["reasoning_content"], reasoning = reasoning, None
            out.append(msg)
        elif kind == "function_call":
            call = {
                "id": _string(item, "call_id", where),
                "type": "function",
                "function": {
                    "name": _string(item, "name", where),
                    "arguments": _string(item, "arguments", where),
                },
            }
            last = out[-1] if out else None
            if last is None or last["role"] != "assistant":
                last = {"role": "assistant", "content": None}
                if reasoning is not None:
                    last["reasoning_content"], reasoning = reasoning, None
                out.append(last)
            last.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            output = item.get("output")
            content = output if isinstance(output, str) else _text(output, where)
            call_id = _string(item, "call_id", where)
            out.append({"role": "tool", "tool_call_id": call_id, "content": content})
        elif kind == "reasoning":
            parts = (item.get("content") or []) + (item.get("summary") or [])
            reasoning = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
        else:
            raise bad_request(
                f"{where}.type must be message, function_call, function_call_output or "
                f"reasoning, got {kind!r}",
                "input",
            )
    return out


def _tool(tool: dict[str, Any], i: int) -> dict[str, Any]:
    """A Responses function tool in the chat shape ({"type": "function", "function": ...})."""
    if tool.get("type") != "function":
        raise bad_request(
            f"tools.{i}.type: only function tools are supported, got {tool.get('type')!r}",
            "tools",
        )
    unknown = set(tool) - {"type", "name", "description", "parameters", "strict"}
    if unknown:
        raise bad_request(f"tools.{i}: unknown field {sorted(unknown)[0]}", "tools")
    function = {k: v for k, v in tool.items() if k != "type" and v is not None}
    return {"type": "function", "function": function}


def _tool_choice(value: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(value, str):
        return value  # none / auto / required, checked by the chat path
    if value.get("type") != "function" or not isinstance(value.get("name"), str):
        raise bad_request(
            'tool_choice must be "none", "auto", "required" or {"type": "function", "name": ...}',
            "tool_choice",
        )
    return {"type": "function", "function": {"name": value["name"]}}


def _text_format(text: dict[str, Any]) -> dict[str, Any] | None:
    """text.format as chat's response_format (None: plain text)."""
    unknown = sorted(set(text) - {"format", "verbosity"})  # verbosity: accepted, not used
    if unknown:
        raise bad_request(f"text: unknown field {unknown[0]}", "text")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise bad_request('text.format must be an object with a "type"', "text.format")
    kind = fmt.get("type")
    if kind in ("text", "json_object"):
        if set(fmt) != {"type"}:
            raise bad_request(f"text.format: {kind} takes no other field", "text.format")
        return None if kind == "text" else {"type": "json_object"}
    if kind != "json_schema":
        raise bad_request(
            f"text.format.type must be text, json_object or json_schema, got {kind!r}",
            "text.format",
        )
    spec = {k: v for k, v in fmt.items() if k != "type"}
    return {"type": "json_schema", "json_schema": spec}


def _reasoning(value: dict[str, Any]) -> str | None:
    """reasoning.effort, for chat templates that read reasoning_effort; summary is accepted
    (the reasoning comes back whole, as reasoning text)."""
    if set(value) - {"effort", "summary", "generate_summary"}:
        raise bad_request("reasoning: only effort and summary are accepted", "reasoning")
    effort = value.get("effort")
    if effort is not None and not isinstance(effort, str):
        raise bad_request("reasoning.effort must be a string", "reasoning")
    return effort
