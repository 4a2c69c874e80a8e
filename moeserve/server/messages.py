"""POST /v1/messages (Anthropic's Messages API) and /v1/messages/count_tokens.

A Messages request is translated into a chat request (anthropic_protocol.py) and run by the
chat route's own code (chat.run_chat); `_Message`, a ChatJob, formats its
results as Anthropic's message and its SSE event sequence. The route takes the key as
`x-api-key` (Anthropic's header) or `Authorization: Bearer`, and answers every error in
Anthropic's envelope: {"type": "error", "error": {"type", "message"}}.
"""

from __future__ import annotations

import hmac
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from moeserve.engine.outputs import CompletionOutput
from moeserve.server.anthropic_protocol import (
    ANTHROPIC_PARAM,
    CountTokensRequest,
    MessagesRequest,
    count_request,
    to_chat_request,
)
from moeserve.server.chat import ChatJob, _messages, _render, run_chat
from moeserve.server.common import check_model, parse_body
from moeserve.server.errors import APIError, bad_request, internal_error
from moeserve.server.state import ServerState
from moeserve.server.streaming import as_api_error
from moeserve.server.tools import template_messages, tool_request
from moeserve.tool_parsers import ToolCall

log = logging.getLogger("moeserve.server")

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def anthropic_body(e: APIError) -> dict[str, Any]:
    """`e` in Anthropic's envelope; the field it names is said in the message, under this
    API's name for it (Anthropic's envelope has no `param`)."""
    message, param = e.message, e.param
    if param in ANTHROPIC_PARAM:
        ours = ANTHROPIC_PARAM[param]
        message = ours + message[len(param) :] if message.startswith(param) else message
        param = ours
    if param and param not in message:
        message = f"{param}: {message}"
    message = message.replace("OpenAI's fields", "the Anthropic Messages API's fields")
    kind = _ERROR_TYPES.get(e.status, "invalid_request_error" if e.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def _error_response(request: Request, e: APIError, state: ServerState) -> JSONResponse:
    if e.reject_reason:
        state.reject(e.reject_reason)
    request.state.error = e.code or e.type
    return JSONResponse(anthropic_body(e), status_code=e.status, headers=e.headers)


def _check_key(request: Request, state: ServerState) -> None:
    """401 unless `x-api-key: KEY` or `Authorization: Bearer KEY` matches (constant time)."""
    key = state.config.api_key
    if not key:
        return
    token = request.headers.get("x-api-key")
    if token is None:
        scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
        token = bearer if scheme.lower() == "bearer" else ""
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(
            401,
            "missing or invalid API key: send `x-api-key: <key>` or `Authorization: Bearer <key>`",
            code="invalid_api_key",
            reject_reason="unauthorized",
        )


async def _answer(request: Request, state: ServerState, create: Any) -> Response:
    try:
        _check_key(request, state)
        return await create(request, state)
    except APIError as e:
        return _error_response(request, e, state)
    except Exception as e:  # noqa: BLE001 - a bug: logged, answered with a 500 envelope
        log.error("unexpected error on %s", request.url.path, exc_info=e)
        return _error_response(request, internal_error(), state)


async def messages_endpoint(request: Request, state: ServerState) -> Response:
    return await _answer(request, state, _create_message)


async def count_tokens_endpoint(request: Request, state: ServerState) -> Response:
    return await _answer(request, state, _count_tokens)


async def _create_message(request: Request, state: ServerState) -> Response:
    state.check_admissible()
    req = await parse_body(request, state, MessagesRequest)
    chat = to_chat_request(req)
    return await run_chat(request, state, chat, _Message, "msg")


async def _count_tokens(request: Request, state: ServerState) -> Response:
    """The prompt's tokens as /v1/messages would render it (template and tools included)."""
    state.check_admissible()
    req = count_request(await parse_body(request, state, CountTokensRequest))
    check_model(req, state)
    assert state.client is not None
    tokenizer = state.client.tokenizer
    if tokenizer is None:
        raise bad_request("this model has no tokenizer.json, so messages are not available")
    messages = _messages(req.messages)
    model_type = state.client.model_config.model_type
    tools = tool_request(req, tokenizer, model_type, state.config.tool_call_parser)
    converted = template_messages(messages)
    try:
        text = await state.offload(_render, tokenizer, messages, converted, tools.tools, {})
    except ValueError as e:
        raise bad_request(str(e), param="messages") from None
    ids = await state.offload(tokenizer.encode, text, add_special_tokens=False)
    return JSONResponse({"input_tokens": len(ids)})


def _event(name: str, payload: dict[str, Any]) -> bytes:
    data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"event: {name}\ndata: {data}\n\n".encode()


def _tool_use(call: ToolCall) -> dict[str, Any]:
    return {
        "type": "tool_use",
        "id": f"toolu_{uuid.uuid4().hex[:24]}",
        "name": call.name,
        "input": json.loads(call.arguments),
    }


class _Message(ChatJob):
    """One /v1/messages request in flight (n is 1): engine deltas as Anthropic content
    blocks, whole or as the event sequence."""

    def _stop(self, o: CompletionOutput) -> tuple[str, str | None]:
        """stop_reason and stop_sequence."""
        if o.finish_reason == "length":
            return "max_tokens", None
        if self._num_calls[o.index]:
            return "tool_use", None
        stops = self.engine_req.params.stop
        if isinstance(o.stop_reason, str) and o.stop_reason in stops:
            return "stop_sequence", o.stop_reason
        return "end_turn", None

    def _usage_dict(self) -> dict[str, int]:
        """Anthropic's split: input_tokens excludes what the prefix cache supplied."""
        self.request.state.completion_tokens = self.completion_tokens
        prompt = len(self.engine_req.prompt_ids)
        return {
            "input_tokens": prompt - self.cached_tokens,
            "output_tokens": self.completion_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": self.cached_tokens,
        }

    def _head(self, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.cid,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": None,
            "stop_sequence": None,
        }

    async def collect(self) -> JSONResponse:  # type: ignore[override]
        o = CompletionOutput(index=0)
        async with aclosing(self._outputs()) as outs:
            async for _, delta in outs:
                for part in delta.outputs:
                    o.merge(part)
        self.completion_tokens = len(o.token_ids)
        text, calls = self._parse(o.text)
        self._num_calls[0] = len(calls)
        content: list[dict[str, Any]] = []
        if self.split and o.reasoning_text:
            content.append({"type": "thinking", "thinking": o.reasoning_text, "signature": ""})
        if text:
            content.append({"type": "text", "text": text})
        content.extend(_tool_use(c) for c in calls)
        body = self._head(content)
        body["stop_reason"], body["stop_sequence"] = self._stop(o)
        body["usage"] = self._usage_dict()
        return JSONResponse(body)

    async def stream(self) -> AsyncIterator[bytes]:  # type: ignore[override]
        """message_start, per block content_block_start / _delta... / _stop, message_delta,
        message_stop; an error once streaming has begun becomes an `error` event."""
        blocks = _Blocks()
        # At once, as Anthropic's API sends it; the prefix cache's hit is known only after
        # the first step, so message_delta's usage carries the final input split.
        yield self._message_start()
        try:
            async with aclosing(self._outputs()) as outs:
                async for _, delta in outs:
                    for o in delta.outputs:
                        self.completion_tokens += len(o.token_ids)
                        self.request.state.completion_tokens = self.completion_tokens
                        for chunk in self._delta_events(o, blocks):
                            yield chunk
        except Exception as e:
            err = as_api_error(e)
            self.request.state.error = err.code or err.type
            yield _event("error", anthropic_body(err))

    def stopped_tail(self, err: APIError) -> bytes:  # type: ignore[override]
        """The drain stopped the stream: an `error` event ends it."""
        return _event("error", anthropic_body(err))

    def _message_start(self) -> bytes:
        message = self._head([])
        prompt = len(self.engine_req.prompt_ids)
        message["usage"] = {
            "input_tokens": prompt,
            "output_tokens": 0,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }
        return _event("message_start", {"type": "message_start", "message": message})

    def _delta_events(self, o: CompletionOutput, blocks: _Blocks) -> list[bytes]:
        text, calls = self._stream_calls(o) if self.tools.active else (o.text, [])
        out: list[bytes] = []
        if o.reasoning_text:
            out += blocks.delta(
                "thinking", {"type": "thinking_delta", "thinking": o.reasoning_text}
            )
        if text:
            out += blocks.delta("text", {"type": "text_delta", "text": text})
        for call in calls:
            use = _tool_use(call)
            out += blocks.open("tool_use", {**use, "input": {}})
            out += blocks.delta(
                "tool_use", {"type": "input_json_delta", "partial_json": call.arguments}
            )
        self._num_calls[o.index] += len(calls)
        if o.finish_reason is None:
            return out
        out += blocks.close()
        stop_reason, stop_sequence = self._stop(o)
        usage = self._usage_dict()
        out.append(
            _event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                    "usage": usage,
                },
            )
        )
        out.append(_event("message_stop", {"type": "message_stop"}))
        return out


_EMPTY = {
    "text": {"type": "text", "text": ""},
    "thinking": {"type": "thinking", "thinking": "", "signature": ""},
}


class _Blocks:
    """The content blocks of one streamed message: which is open, and its index."""

    def __init__(self) -> None:
        self.index = -1
        self.kind: str | None = None

    def close(self) -> list[bytes]:
        if self.kind is None:
            return []
        self.kind = None
        return [_event("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def open(self, kind: str, block: dict[str, Any]) -> list[bytes]:
        out = self.close()
        self.index += 1
        self.kind = kind
        start = {"type": "content_block_start", "index": self.index, "content_block": block}
        return [*out, _event("content_block_start", start)]

    def delta(self, kind: str, delta: dict[str, Any]) -> list[bytes]:
        """A delta for the open block of `kind`, opening a new one when another is open."""
        out = [] if self.kind == kind else self.open(kind, dict(_EMPTY[kind]))
        payload = {"type": "content_block_delta", "index": self.index, "delta": delta}
        return [*out, _event("content_block_delta", payload)]
