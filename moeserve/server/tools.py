"""Tool calling on /v1/chat/completions: the request's tools checked, the chat template given
them, and the model's output turned into OpenAI tool calls.

`tool_choice` decides how calls come out. `auto`: the model writes calls in its own format
and a parser (moeserve/tool_parsers.py, chosen from the checkpoint or `--tool-call-parser`)
reads them. `none`: tools are rendered into the prompt, the output is all content.
`required` and a named function: the grammar engine forces the output into JSON, as vLLM
does: `[{"name": <one of the tools>, "parameters": <its schema>}, ...]` for `required`
(one item when parallel_tool_calls is false), the named tool's arguments object for a named
choice; that JSON becomes the calls.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from typing import Any

from moeserve.engine.structured import GrammarError, check
from moeserve.sampling_params import StructuredOutput
from moeserve.server.errors import bad_request
from moeserve.server.protocol import ChatCompletionRequest, FunctionCall, ToolCallItem
from moeserve.tokenizer import Tokenizer
from moeserve.tool_parsers import (
    ToolCall,
    ToolParser,
    arguments_text,
    call_from_object,
    detect_parser,
    get_parser,
)

# OpenAI's rule for function names, plus dots (namespaced tool names, as MCP clients send).
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_CHOICES = ("none", "auto", "required")
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ToolRequest:
    """What a chat request asks of tools: the tools for the template and how calls come out."""

    tools: list[dict[str, Any]] | None  # as given, for the chat template (None: no tools)
    choice: str  # none | auto | required | named
    named: str | None = None  # the function a named choice forces
    parallel: bool = True
    # The model's format: reads the calls out of the text (auto) and makes their ids.
    parser: ToolParser = field(default_factory=ToolParser)

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "named")

    @property
    def parses(self) -> bool:
        return self.choice == "auto"

    @property
    def active(self) -> bool:
        """Calls may come out of this request's output."""
        return self.parses or self.forced

    def schema(self) -> dict[str, Any]:
        """The JSON schema the output must match when the choice forces a call."""
        params = {t["function"]["name"]: _parameters(t) for t in self.tools or []}
        if self.choice == "named":
            assert self.named is not None
            return params[self.named]
        items = [
            {
                "type": "object",
                "properties": {"name": {"type": "string", "enum": [name]}, "parameters": schema},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for name, schema in params.items()
        ]
        array: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
        if not self.parallel:
            array["maxItems"] = 1
        return array

    def structured(self) -> StructuredOutput:
        """The grammar a forced choice puts on the output; 400 naming tools when a tool's
        parameters do not compile."""
        so = StructuredOutput(kind="json_schema", spec=json.dumps(self.schema()))
        try:
            check(so)
        except GrammarError as e:
            raise bad_request(f"tools: a tool's parameters schema: {e}", param="tools") from None
        return so

    def forced_calls(self, text: str) -> list[ToolCall] | None:
        """The calls of a forced output (None when it is not valid JSON of the schema's
        shape: an output cut short by max_tokens)."""
        try:
            value = json.loads(text)
        except ValueError:
            return None
        if self.choice == "named":
            args = arguments_text(value)
            if args is None:
                return None
            return [ToolCall(str(self.named), args, self.parser.new_id())]
        if not isinstance(value, list) or not value:
            return None
        calls = [call_from_object(item) for item in value]
        if any(c is None for c in calls):
            return None
        return [c.with_id(self.parser.new_id()) for c in calls if c is not None]


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    schema = tool["function"].get("parameters")
    # A function without parameters (absent, or `{}` as clients often send) takes none: `{}`.
    return schema if schema else _NO_PARAMETERS


def tool_request(
    req: ChatCompletionRequest,
    tokenizer: Tokenizer | None,
    model_type: str | None,
    parser_name: str | None,
) -> ToolRequest:
    """The request's tools and tool_choice, checked (400s naming the field)."""
    tools = _tools(req.tools) if "tools" in req.model_fields_set else None
    choice, named = _choice(req.tool_choice, tools)
    parallel = req.parallel_tool_calls is not False
    if not tools:
        return ToolRequest(None, "none", parallel=parallel)
    name = parser_name or detect_parser(model_type, tokenizer)
    if name is None and choice == "auto":
        raise bad_request(
            "tool_choice auto needs a tool-call parser, and this model's chat template has "
            "no tool-call format this server knows: start the server with --tool-call-parser, "
            'or send tool_choice "required", a named function or "none"',
            param="tool_choice",
        )
    return ToolRequest(tools, choice, named, parallel, get_parser(name))


def _tools(value: Any) -> list[dict[str, Any]] | None:
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise bad_request("tools must be a list of function tools", param="tools")
    seen: set[str] = set()
    for i, tool in enumerate(value):
        where = f"tools.{i}"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise bad_request(
                f"{where}.type: only function tools are supported, got {kind!r}", param="tools"
            )
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise bad_request(f"{where}.function must be an object", param="tools")
        name = fn.get("name")
        if not isinstance(name, str) or _NAME.fullmatch(name) is None:
            raise bad_request(
                f"{where}.function.name must be 1-64 letters, digits, _, . or -, got {name!r}",
                param="tools",
            )
        if name in seen:
            raise bad_request(f"{where}.function.name: {name!r} is given twice", param="tools")
        seen.add(name)
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise bad_request(f"{where}.function.parameters must be an object", param="tools")
        unknown = set(fn) - {"name", "description", "parameters", "strict"}
        if unknown or set(tool) - {"type", "function"}:
            field = sorted(unknown)[0] if unknown else sorted(set(tool) - {"type", "function"})[0]
            raise bad_request(f"{where}: unknown field {field!r}", param="tools")
    return value


def _choice(value: Any, tools: list[dict[str, Any]] | None) -> tuple[str, str | None]:
    if value is None:
        return ("auto" if tools else "none"), None
    if value == "none":
        return "none", None  # without tools too: it asks for nothing
    if not tools:
        raise bad_request("tool_choice is only allowed when tools are given", param="tool_choice")
    if isinstance(value, str):
        if value not in _CHOICES:
            raise bad_request(
                f"tool_choice must be none, auto, required or a function, got {value!r}",
                param="tool_choice",
            )
        return value, None
    fn = value.get("function") if isinstance(value, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or value.get("type") != "function":
        raise bad_request(
            'tool_choice must be none, auto, required or {"type": "function", "function": '
            '{"name": ...}}',
            param="tool_choice",
        )
    if name not in {t["function"]["name"] for t in tools}:
        raise bad_request(f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
    return "named", name


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The messages with each tool call's arguments as an object, the form chat templates
    take (transformers' convention; OpenAI clients send a JSON string); None when nothing
    changed. Tool calls are checked for OpenAI's shape (400 naming the message). In both
    lists an assistant message with tool calls and null content has content "" (as vLLM
    gives it): Qwen3's and DeepSeek-V3's templates concatenate the content unchecked."""
    changed = False
    out = []
    for i, m in enumerate(messages):
        calls = m.get("tool_calls")
        if calls is None:
            out.append(m)
            continue
        if m["role"] != "assistant":
            raise bad_request(f"messages.{i}: only assistant messages have tool_calls", "messages")
        if m.get("content") is None:
            m["content"] = ""
        converted = []
        for j, call in enumerate(calls):
            fn = call.get("function")
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise bad_request(
                    f"messages.{i}.tool_calls.{j}: needs function.name and function.arguments",
                    param="messages",
                )
            args = fn.get("arguments")
            if isinstance(args, str):
                try:
                    decoded = json.loads(args)
                except ValueError:
                    decoded = None
                if isinstance(decoded, dict):
                    call = copy.deepcopy(call)
                    call["function"]["arguments"] = decoded
                    changed = True
            converted.append(call)
        out.append({**m, "tool_calls": converted})
    return out if changed else None


def tool_call_items(calls: list[ToolCall]) -> list[ToolCallItem]:
    return [
        ToolCallItem(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
        for c in calls
    ]


def call_deltas(calls: list[ToolCall], first_index: int) -> list[dict[str, Any]]:
    """The stream deltas of complete calls: per call its head (index, id, type, name, empty
    arguments), then its arguments."""
    out: list[dict[str, Any]] = []
    for k, c in enumerate(calls):
        index = first_index + k
        head = {"name": c.name, "arguments": ""}
        out.append({"index": index, "id": c.id, "type": "function", "function": head})
        out.append({"index": index, "function": {"arguments": c.arguments}})
    return out
