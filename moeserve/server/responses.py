"""POST /v1/responses: the OpenAI Responses API over the chat path.

The request is translated into a ChatCompletionRequest (responses_protocol.py) and run by
chat.run_chat: the same template, sampling, tool calling, structured output, reasoning split,
admission and abort on disconnect as /v1/chat/completions. This module only formats the
engine's output: `reasoning`, `message` and `function_call` output items, and in a stream the
typed events (`event: NAME` + data with "type" and "sequence_number").
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from moeserve.engine.outputs import CompletionOutput
from moeserve.server.chat import ChatJob, run_chat
from moeserve.server.common import parse_body
from moeserve.server.errors import APIError
from moeserve.server.responses_protocol import ResponsesRequest, chat_request
from moeserve.server.state import ServerState
from moeserve.server.streaming import as_api_error
from moeserve.tool_parsers import ToolCall

# The chat path names its fields; a client of this route knows these names.
_PARAMS = {
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
    "messages": "input",
    "reasoning_effort": "reasoning",
}


async def create_response(request: Request, state: ServerState) -> Response:
    state.check_admissible()
    req = await parse_body(request, state, ResponsesRequest)
    request.state.responses_request = req  # read by _ResponsesJob, which run_chat builds
    try:
        return await run_chat(request, state, chat_request(req), _ResponsesJob, "resp")
    except APIError as e:
        if e.param in _PARAMS:
            new = _PARAMS[e.param]
            e.message = e.message.replace("response_format.json_schema", new)
            e.message, e.param = e.message.replace(e.param, new), new
        raise


def _event(kind: str, seq: int, **data: Any) -> bytes:
    body = json.dumps({"type": kind, "sequence_number": seq, **data}, separators=(",", ":"))
    return f"event: {kind}\ndata: {body}\n\n".encode()


class _ResponsesJob(ChatJob):
    """One /v1/responses request in flight (n is always 1)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.source: ResponsesRequest = self.request.state.responses_request
        self.rid = "resp_" + self.cid.split("-", 1)[1]
        self.created = int(time.time())
        self.reasoning_tokens = 0
        self._seq = 0
        self._output: list[dict[str, Any]] = []  # finished items, in order
        self._open: dict[str, Any] | None = None  # the item being streamed
        self._open_text = ""
        self._finish: str | None = None

    # ------------------------------------------------------------------ shapes
    def _item_id(self, prefix: str) -> str:
        return f"{prefix}_{self.rid[5:]}{len(self._output):03d}"

    def _status(self) -> str:
        return "incomplete" if self._finish == "length" else "completed"

    def _response(self, status: str, usage: dict[str, Any] | None) -> dict[str, Any]:
        r = self.source
        text_format = (r.text or {}).get("format") or {"type": "text"}
        return {
            "id": self.rid,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": (
                {"reason": "max_output_tokens"} if status == "incomplete" else None
            ),
            "instructions": r.instructions,
            "max_output_tokens": r.max_output_tokens,
            "model": self.model,
            "output": self._output,
            "parallel_tool_calls": r.parallel_tool_calls is not False,
            "previous_response_id": None,
            "reasoning": {"effort": (r.reasoning or {}).get("effort"), "summary": None},
            "store": False,  # nothing is kept (see responses_protocol.py)
            "temperature": 1.0 if r.temperature is None else r.temperature,
            "text": {"format": text_format},
            "tool_choice": r.tool_choice or "auto",
            "tools": r.tools or [],
            "top_p": 1.0 if r.top_p is None else r.top_p,
            "truncation": "disabled",
            "usage": usage,
            "user": r.user,
            "metadata": r.metadata or {},
        }

    def _usage_dict(self) -> dict[str, Any]:
        u = self._usage()  # also records the count for the access log and metrics
        return {
            "input_tokens": u.prompt_tokens,
            "input_tokens_details": {"cached_tokens": self.cached_tokens},
            "output_tokens": u.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
            "total_tokens": u.total_tokens,
        }

    def _new_item(self, kind: str) -> dict[str, Any]:
        if kind == "reasoning":
            return {"id": self._item_id("rs"), "type": "reasoning", "summary": [], "content": []}
        return {
            "id": self._item_id("msg"),
            "type": "message",
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        }

    @staticmethod
    def _part(kind: str, text: str) -> dict[str, Any]:
        if kind == "reasoning":
            return {"type": "reasoning_text", "text": text}
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _finished(self, kind: str, text: str) -> dict[str, Any]:
        item = self._new_item(kind)
        item["content"] = [self._part(kind, text)]
        if kind == "message":
            item["status"] = self._status()
        return item

    def _call_item(self, call: ToolCall, arguments: str) -> dict[str, Any]:
        return {
            "id": self._item_id("fc"),
            "type": "function_call",
            "call_id": call.id,
            "name": call.name,
            "arguments": arguments,
            "status": "completed" if arguments else "in_progress",
        }

    def _count(self, o: CompletionOutput) -> None:
        self.completion_tokens += len(o.token_ids)
        if o.reasoning_text and not o.text:  # a delta all reasoning: its tokens are
            self.reasoning_tokens += len(o.token_ids)
        if o.finish_reason is not None:
            self._finish = o.finish_reason

    # ------------------------------------------------------------------ whole response
    async def collect(self) -> JSONResponse:
        result = CompletionOutput(index=0)
        async with aclosing(self._outputs()) as outs:
            async for _, delta in outs:
                for o in delta.outputs:
                    self._count(o)
                    result.merge(o)
        content, calls = self._parse(result.text)
        if self.split and result.reasoning_text:
            self._output.append(self._finished("reasoning", result.reasoning_text))
        if content or not calls:
            self._output.append(self._finished("message", content or ""))
        for c in calls:
            self._output.append(self._call_item(c, c.arguments))
        return JSONResponse(self._response(self._status(), self._usage_dict()))

    # ------------------------------------------------------------------ stream
    def _emit(self, kind: str, **data: Any) -> bytes:
        self._seq += 1
        return _event(kind, self._seq - 1, **data)

    def _where(self) -> dict[str, Any]:
        assert self._open is not None
        return {"item_id": self._open["id"], "output_index": len(self._output)}

    def _start(self, kind: str) -> list[bytes]:
        """Open an item of `kind` (closing the open one) unless one is open already."""
        if self._open is not None and self._open["type"] == kind:
            return []
        events = self._close()
        self._open, self._open_text = self._new_item(kind), ""
        out = len(self._output)
        events.append(self._emit("response.output_item.added", output_index=out, item=self._open))
        part = self._part(kind, "")
        events.append(
            self._emit("response.content_part.added", **self._where(), content_index=0, part=part)
        )
        return events

    def _close(self) -> list[bytes]:
        if self._open is None:
            return []
        kind, text, where = self._open["type"], self._open_text, self._where()
        done = (
            "response.reasoning_text.done" if kind == "reasoning" else "response.output_text.done"
        )
        extra = {"logprobs": []} if kind == "message" else {}
        events = [self._emit(done, **where, content_index=0, text=text, **extra)]
        part = self._part(kind, text)
        events.append(self._emit("response.content_part.done", **where, content_index=0, part=part))
        item = self._finished(kind, text)
        item["id"] = self._open["id"]
        events.append(
            self._emit("response.output_item.done", output_index=where["output_index"], item=item)
        )
        self._output.append(item)
        self._open = None
        return events

    def _text_delta(self, kind: str, text: str) -> list[bytes]:
        events = self._start(kind)
        self._open_text += text
        if kind == "reasoning":
            delta = self._emit(
                "response.reasoning_text.delta", **self._where(), content_index=0, delta=text
            )
        else:
            delta = self._emit(
                "response.output_text.delta", **self._where(), content_index=0, delta=text,
                logprobs=[],
            )  # fmt: skip
        return [*events, delta]

    def _call_events(self, call: ToolCall) -> list[bytes]:
        events = self._close()
        out = len(self._output)
        item = self._call_item(call, "")
        events.append(self._emit("response.output_item.added", output_index=out, item=item))
        where = {"item_id": item["id"], "output_index": out}
        args = call.arguments
        events.append(self._emit("response.function_call_arguments.delta", **where, delta=args))
        events.append(
            self._emit(
                "response.function_call_arguments.done", **where, arguments=args, name=call.name
            )
        )
        item = self._call_item(call, args)
        events.append(self._emit("response.output_item.done", output_index=out, item=item))
        self._output.append(item)
        return events

    def _delta_events(self, o: CompletionOutput) -> list[bytes]:
        self._count(o)
        self.request.state.completion_tokens = self.completion_tokens
        events: list[bytes] = []
        if o.reasoning_text:
            events += self._text_delta("reasoning", o.reasoning_text)
        text, calls = self._stream_calls(o) if self.tools.active else (o.text, [])
        if text:
            events += self._text_delta("message", text)
        for call in calls:
            events += self._call_events(call)
        self._num_calls[0] += len(calls)
        return events

    async def stream(self) -> AsyncIterator[bytes]:
        """created, in_progress, the items' events, then completed (or incomplete); an error
        once streaming has begun becomes an `error` event."""
        try:
            yield self._emit("response.created", response=self._response("in_progress", None))
            yield self._emit("response.in_progress", response=self._response("in_progress", None))
            async with aclosing(self._outputs()) as outs:
                async for _, delta in outs:
                    for o in delta.outputs:
                        for event in self._delta_events(o):
                            yield event
            if not self._output and self._open is None:  # nothing at all: an empty message
                for event in self._start("message"):
                    yield event
            for event in self._close():
                yield event
            status = self._status()
            kind = "response.completed" if status == "completed" else "response.incomplete"
            yield self._emit(kind, response=self._response(status, self._usage_dict()))
        except Exception as e:
            err = as_api_error(e)
            self.request.state.error = err.code or err.type
            yield self._emit(
                "error", code=err.code or err.type, message=err.message, param=err.param
            )
