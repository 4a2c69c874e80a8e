"""Anthropic Messages API request bodies, and their translation into the chat path's request.

Parsed strictly, like the OpenAI routes: a wrong type or an unknown field is a 400 naming it.
`to_chat_request` maps a Messages request onto a ChatCompletionRequest, so /v1/messages runs
the chat path itself (template, sampling, admission, tools, reasoning split) rather than a
copy of it. Fields Anthropic defines that this server does not implement (`thinking`,
`container`, `mcp_servers`, ...) are unknown fields here: a 400 naming them.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from moeserve.server.errors import bad_request
from moeserve.server.protocol import ChatCompletionRequest, ChatMessage


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TextBlock(_Request):
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None  # prefix caching is automatic here
    citations: list[Any] | None = None  # sent back by clients on returned messages


class ToolUseBlock(_Request):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None
    # What the anthropic SDK's returned block carries, when a client sends it back.
    caller: dict[str, Any] | None = None
    toolset_name: str | None = None


class ToolResultBlock(_Request):
    type: Literal["tool_result"]
    tool_use_id: str
    content: list[TextBlock] | str | None = None
    is_error: bool | None = None
    cache_control: dict[str, Any] | None = None


class ThinkingBlock(_Request):
    """The reasoning a reasoning model returned, when a client sends its message back."""

    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


Block = Annotated[
    TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock, Field(discriminator="type")
]


_BLOCK_TYPES = ("text", "tool_use", "tool_result", "thinking")


class Message(_Request):
    role: Literal["user", "assistant"]
    content: list[Block] | str  # list first: its errors (the specific ones) come first

    @field_validator("content", mode="before")
    @classmethod
    def _known_blocks(cls, value: Any) -> Any:
        """Name an unsupported block type (image, document, ...) rather than pydantic's
        union noise."""
        for j, b in enumerate(value if isinstance(value, list) else ()):
            kind = b.get("type") if isinstance(b, dict) else None
            if kind not in _BLOCK_TYPES:
                raise ValueError(
                    f"block {j} has type {kind!r}; this server takes blocks of type "
                    + ", ".join(_BLOCK_TYPES)
                )
        return value


class Tool(_Request):
    name: str
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: dict[str, Any] | None = None


class ToolChoice(_Request):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class JSONFormat(_Request):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Request):
    format: JSONFormat | None = None  # structured output, through the chat path's grammar
    effort: None = None  # no effort levels here: only an absent one is accepted


class Metadata(_Request):
    user_id: str | None = None


class MessagesRequest(_Request):
    model: str
    max_tokens: int
    messages: list[Message]
    system: list[TextBlock] | str | None = None
    stop_sequences: list[str] | None = None
    stream: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    metadata: Metadata | None = None
    service_tier: str | None = None  # one tier here: accepted, not used
    cache_control: dict[str, Any] | None = None  # the prefix cache is automatic here
    output_config: OutputConfig | None = None


class CountTokensRequest(_Request):
    """POST /v1/messages/count_tokens: what shapes the prompt, nothing about sampling."""

    model: str
    messages: list[Message]
    system: list[TextBlock] | str | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None


def _unit(name: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise bad_request(f"{name}: must be in [0, 1] (Anthropic's range), got {value}", name)


def _check_ranges(req: MessagesRequest) -> None:
    """Anthropic's ranges, which are narrower than OpenAI's (temperature is 0..1)."""
    if req.max_tokens < 1:
        raise bad_request(f"max_tokens: must be at least 1, got {req.max_tokens}", "max_tokens")
    _unit("temperature", req.temperature)
    _unit("top_p", req.top_p)
    if req.top_k is not None and req.top_k < 1:
        raise bad_request(f"top_k: must be at least 1, got {req.top_k}", "top_k")


def _text(blocks: str | list[TextBlock] | None) -> str:
    if blocks is None or isinstance(blocks, str):
        return blocks or ""
    return "".join(b.text for b in blocks)


def chat_messages(req: MessagesRequest | CountTokensRequest) -> list[ChatMessage]:
    """`system` and `messages` as chat messages: tool_use blocks as the assistant's
    tool_calls, tool_result blocks as tool messages (in their order in the turn)."""
    if not req.messages:
        raise bad_request("messages: must not be empty", "messages")
    out: list[ChatMessage] = []
    if req.system:
        out.append(ChatMessage(role="system", content=_text(req.system)))
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str):
            out.append(ChatMessage(role=m.role, content=m.content))
        elif m.role == "assistant":
            out.append(_assistant(i, m.content))
        else:
            out.extend(_user(i, m.content))
    return out


def _assistant(i: int, blocks: list[Any]) -> ChatMessage:
    text, reasoning, calls = [], [], []
    for j, b in enumerate(blocks):
        if isinstance(b, TextBlock):
            text.append(b.text)
        elif isinstance(b, ThinkingBlock):
            reasoning.append(b.thinking)
        elif isinstance(b, ToolUseBlock):
            arguments = json.dumps(b.input, ensure_ascii=False)
            calls.append(
                {
                    "id": b.id,
                    "type": "function",
                    "function": {"name": b.name, "arguments": arguments},
                }
            )
        else:
            raise bad_request(
                f"messages.{i}.content.{j}: a {b.type} block belongs in a user message", "messages"
            )
    return ChatMessage(
        role="assistant",
        content="".join(text) if text or not calls else None,
        tool_calls=calls or None,
        reasoning_content="".join(reasoning) or None,
    )


def _user(i: int, blocks: list[Any]) -> list[ChatMessage]:
    out: list[ChatMessage] = []
    text: list[str] = []
    for j, b in enumerate(blocks):
        if isinstance(b, TextBlock):
            text.append(b.text)
        elif isinstance(b, ToolResultBlock):
            if text:  # keep the turn's order
                out.append(ChatMessage(role="user", content="".join(text)))
                text = []
            content = _text(b.content)
            if b.is_error:  # chat templates have no error flag: say it in the text
                content = f"Error: {content}"
            out.append(ChatMessage(role="tool", content=content, tool_call_id=b.tool_use_id))
        else:
            raise bad_request(
                f"messages.{i}.content.{j}: a {b.type} block belongs in an assistant message",
                "messages",
            )
    if text or not out:
        out.append(ChatMessage(role="user", content="".join(text)))
    return out


def _tools(req: MessagesRequest | CountTokensRequest) -> dict[str, Any]:
    """tools and tool_choice in the chat request's shapes (fields only when given)."""
    out: dict[str, Any] = {}
    if req.tools is not None:
        out["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    **({"description": t.description} if t.description is not None else {}),
                    "parameters": t.input_schema,
                },
            }
            for t in req.tools
        ]
    choice = req.tool_choice
    if choice is not None:
        if choice.type == "tool":
            if not choice.name:
                raise bad_request("tool_choice.name: required when type is tool", "tool_choice")
            out["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        elif choice.name is not None:
            raise bad_request(
                f"tool_choice.name: only for type tool, not {choice.type}", "tool_choice"
            )
        else:
            out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
        if choice.disable_parallel_tool_use:
            out["parallel_tool_calls"] = False
    return out


def to_chat_request(req: MessagesRequest) -> ChatCompletionRequest:
    """The chat request that answers `req` (400s for Anthropic's own rules first)."""
    _check_ranges(req)
    fields: dict[str, Any] = {
        "model": req.model,
        "messages": chat_messages(req),
        "max_tokens": req.max_tokens,
        "stream": bool(req.stream),
        **_tools(req),
    }
    for name in ("temperature", "top_p", "top_k"):
        if getattr(req, name) is not None:
            fields[name] = getattr(req, name)
    if req.stop_sequences:
        fields["stop"] = req.stop_sequences
    if req.metadata is not None and req.metadata.user_id is not None:
        fields["user"] = req.metadata.user_id
    if req.output_config is not None and req.output_config.format is not None:
        schema = req.output_config.format.schema_
        fields["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": schema, "strict": True},
        }
    return ChatCompletionRequest(**fields)


def count_request(req: CountTokensRequest) -> ChatCompletionRequest:
    return ChatCompletionRequest(model=req.model, messages=chat_messages(req), **_tools(req))


# The chat request's field names in its 400s, as this API calls them.
ANTHROPIC_PARAM = {
    "stop": "stop_sequences",
    "parallel_tool_calls": "tool_choice",
    "user": "metadata",
    "max_completion_tokens": "max_tokens",
    "response_format": "output_config",
}
