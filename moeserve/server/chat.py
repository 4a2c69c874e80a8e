"""POST /v1/chat/completions: messages rendered with the checkpoint's chat template.

The template renders in a worker thread (a template is code; a long conversation must not
stall the event loop) and its text is tokenised without adding special tokens again: the
template already wrote BOS, as transformers' apply_chat_template(tokenize=True) does.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from moeserve.engine.messages import EngineRequest
from moeserve.engine.outputs import CompletionOutput, TokenLogprob
from moeserve.reasoning import reasoning_format
from moeserve.sampling_params import MAX_LOGPROBS
from moeserve.server.common import (
    chat_logprobs,
    check_model,
    finish_reason,
    fit_context,
    new_id,
    parse_body,
    refuse_oversized,
    response_id,
    sampling_params,
    truncation,
    vllm_prompt_logprobs,
)
from moeserve.server.errors import APIError, bad_request
from moeserve.server.protocol import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChatResponseMessage,
    ChatStreamChoice,
    DeltaMessage,
    PromptTokensDetails,
    UsageInfo,
)
from moeserve.server.state import OFFLOAD_LEN, ServerState, Ticket
from moeserve.server.streaming import (
    DONE,
    ChunkTemplate,
    Guard,
    SSEResponse,
    as_api_error,
    merged_outputs,
    run_admitted,
    sse,
)
from moeserve.server.template_args import chat_template_args
from moeserve.server.tools import (
    ToolRequest,
    call_deltas,
    template_messages,
    tool_call_items,
    tool_request,
)
from moeserve.tokenizer import Tokenizer
from moeserve.tool_parsers import ToolCall, ToolCallStream


def _messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Plain dicts for the template; text content parts are joined, other parts refused."""
    if not messages:
        raise bad_request("messages must not be empty", param="messages")
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise bad_request(
                    f"messages.{i}.content: only text parts are supported", param="messages"
                )
            content = "".join(part.text or "" for part in content)
        out.append(
            {
                "role": m.role,
                "content": content,
                "name": m.name,
                "tool_calls": m.tool_calls,
                "tool_call_id": m.tool_call_id,
                "reasoning_content": m.reasoning_content,
            }
        )
    return out


async def create_chat_completion(request: Request, state: ServerState) -> Response:
    state.check_admissible()
    req = await parse_body(request, state, ChatCompletionRequest)
    return await run_chat(request, state, req)


async def run_chat(
    request: Request,
    state: ServerState,
    req: ChatCompletionRequest,
    job_class: type[_Chat] | None = None,
    id_prefix: str = "chatcmpl",
) -> Response:
    """The chat path for a parsed request: template, sampling, tools, admission. Other API
    shapes (/v1/responses, /v1/messages) translate into `req` and format the output with
    their own `job_class` (a subclass of ChatJob, which also says how a drained stream
    ends: `stopped_tail`)."""
    check_model(req, state)
    messages = _messages(req.messages)
    top = req.top_logprobs
    if top is not None and not (0 <= top <= MAX_LOGPROBS):
        raise bad_request(
            f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {top}", param="top_logprobs"
        )
    if top and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true", param="top_logprobs")
    max_tokens = (
        req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    )
    logprobs = (top or 0) if req.logprobs else None
    params = sampling_params(req, state, logprobs=logprobs, max_tokens=max_tokens)
    tokenizer = state.client.tokenizer if state.client else None
    if tokenizer is None:
        raise bad_request("this model has no tokenizer.json, so chat is not available")
    template_vars = chat_template_args(req, tokenizer, state)
    assert state.client is not None
    model_type = state.client.model_config.model_type
    tools = tool_request(req, tokenizer, model_type, state.config.tool_call_parser)
    converted = template_messages(messages)
    # The split into reasoning_content and content (moeserve/reasoning.py decides the format);
    # skip_special_tokens=false asks for the raw output, markers and all, as content.
    split = params.skip_special_tokens and reasoning_format(tokenizer) is not None
    if tools.parses and tools.parser.needs_special_tokens:
        params = dataclasses.replace(params, skip_special_tokens=False)  # the call markers
    if tools.forced:
        if params.structured is not None:
            raise bad_request(
                "tool_choice required or a named function forces its own grammar: it cannot "
                "be combined with response_format or a guided_* field",
                param="tool_choice",
            )
        params = dataclasses.replace(params, structured=tools.structured())
    keep = truncation(req, state.client.max_model_len)
    cid = response_id(id_prefix, req)
    uid = new_id(id_prefix)  # the engine's ids: unique whatever request_id says
    request.state.request_id = cid
    if state.config.log_prompts:
        request.state.prompt = messages

    async def work(ticket: Ticket, guard: Guard) -> Response:
        assert state.client is not None
        try:
            text = await state.offload(
                _render, tokenizer, messages, converted, tools.tools, template_vars
            )
        except ValueError as e:
            raise bad_request(str(e), param="messages") from None
        refuse_oversized(state, text, max_tokens, keep)
        special = bool(req.add_special_tokens)  # the template wrote them (vLLM's default)
        if len(text) > OFFLOAD_LEN:
            ids = await state.offload(tokenizer.encode, text, add_special_tokens=special)
        else:
            ids = tokenizer.encode(text, add_special_tokens=special)
        if not ids:
            raise bad_request("the chat template rendered an empty prompt", param="messages")
        prompt: str | None = text
        if keep is not None and len(ids) > keep:  # the rendered prompt's last `keep` tokens
            ids, prompt = ids[-keep:], None
        p = fit_context(params, len(ids), max_tokens, state.client.max_model_len)
        request.state.prompt_tokens = len(ids)
        engine_req = EngineRequest(
            f"{uid}-0",
            ids,
            p,
            prompt=prompt,
            split_reasoning=split,
            cache_salt=req.cache_salt,
            priority=req.priority or 0,
        )
        chat = (job_class or _Chat)(state, req, cid, engine_req, ticket, request, tools)
        if req.stream:
            return SSEResponse(
                chat.stream(),
                guard=guard,
                on_close=ticket.close,
                request=request,
                stopped=chat.stopped_tail,
            )
        return await chat.collect()

    return await run_admitted(request, state, 1, work)


def _render(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    converted: list[dict[str, Any]] | None,
    tools: list[dict[str, Any]] | None,
    variables: dict[str, Any],
) -> str:
    """The prompt, tool calls' arguments given to the template as objects (transformers'
    convention, which most templates serialise with tojson); a template that fails on them
    (DeepSeek-V3's concatenates the arguments as text) gets them as the client sent them.
    variables: apply_chat_template's (template_args.chat_template_args)."""
    if converted is not None:
        try:
            return tokenizer.apply_chat_template(converted, tools=tools, **variables)
        except ValueError:
            pass
    return tokenizer.apply_chat_template(messages, tools=tools, **variables)


class _Chat:
    """One chat request in flight: formats engine deltas as chat completions (subclasses, as
    ChatJob, format them in another API's shapes)."""

    # A subclass's stream end when the drain stops it (SSEResponse's `stopped`).
    stopped_tail: Callable[[APIError], bytes] | None = None

    def __init__(
        self,
        state: ServerState,
        req: ChatCompletionRequest,
        cid: str,
        engine_req: EngineRequest,
        ticket: Ticket,
        request: Request,
        tools: ToolRequest,
    ) -> None:
        self.state, self.req, self.cid, self.engine_req = state, req, cid, engine_req
        self.ticket, self.request, self.tools = ticket, request, tools
        n = engine_req.params.n
        # Streaming, per choice: the parser's stream (auto), or the forced JSON so far.
        parses = tools.parses
        self._streams = [ToolCallStream(tools.parser) for _ in range(n)] if parses else []
        self._forced = [""] * n
        self._num_calls = [0] * n
        self.created = int(time.time())
        self.model = state.config.served_model_name
        self.completion_tokens = 0
        self.split = engine_req.split_reasoning
        self.cached_tokens = 0  # the prefix cache's hit, as the engine reports it
        self._prompt_ids_sent = False  # return_token_ids: the first chunk carried them

    def _usage(self) -> UsageInfo:
        self.request.state.completion_tokens = self.completion_tokens
        prompt = len(self.engine_req.prompt_ids)
        return UsageInfo(
            prompt_tokens=prompt,
            completion_tokens=self.completion_tokens,
            total_tokens=prompt + self.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens),
        )

    def _logprobs(self, o: CompletionOutput) -> ChatChoiceLogprobs | None:
        if o.logprobs is None:
            return None
        as_ids = self.req.return_tokens_as_token_ids
        return ChatChoiceLogprobs(content=chat_logprobs(o.logprobs, self.state, as_ids))

    async def _outputs(self) -> AsyncIterator[tuple[int, Any]]:
        assert self.state.client is not None
        outs = merged_outputs(self.state.client, [self.engine_req], self.ticket)
        async with aclosing(outs):
            async for p, delta in outs:
                if delta.num_cached_tokens is not None:
                    self.cached_tokens = delta.num_cached_tokens
                yield p, delta

    async def collect(self) -> JSONResponse:
        results = [CompletionOutput(index=i) for i in range(self.engine_req.params.n)]
        prompt_lps: list[TokenLogprob | None] = []
        async with aclosing(self._outputs()) as outs:
            async for _, delta in outs:
                prompt_lps.extend(delta.prompt_logprobs or [])
                for o in delta.outputs:
                    results[o.index].merge(o)
        choices = []
        for o in results:
            self.completion_tokens += len(o.token_ids)
            content, calls = self._parse(o.text)
            message = ChatResponseMessage(content=content)
            if self.split:
                message.reasoning_content = o.reasoning_text or None
            if calls:
                message.tool_calls = tool_call_items(calls)
            self._num_calls[o.index] = len(calls)
            choice = ChatChoice(
                index=o.index,
                message=message,
                logprobs=self._logprobs(o),
                finish_reason=self._finish_reason(o),
            )
            if self.req.return_token_ids:
                choice.token_ids = list(o.token_ids)
            choices.append(choice)
        n = self.req.prompt_logprobs
        body = ChatCompletionResponse(
            id=self.cid,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=self._usage(),
            prompt_logprobs=None
            if n is None
            else vllm_prompt_logprobs(self.engine_req.prompt_ids, prompt_lps, n, self.state),
        )
        if self.req.return_token_ids:
            body.prompt_token_ids = list(self.engine_req.prompt_ids)
        return JSONResponse(body.model_dump())

    def _parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """A whole output's content and tool calls."""
        if self.tools.parses:
            content, calls = self.tools.parser.parse(text)
            return content, calls if self.tools.parallel else calls[:1]
        if self.tools.forced:
            calls = self.tools.forced_calls(text)
            if calls:
                return None, calls
        return text, []

    def _stream_calls(self, o: CompletionOutput) -> tuple[str, list[ToolCall]]:
        """A delta's content and the calls it completed (streaming)."""
        i, done = o.index, o.finish_reason is not None
        if self._streams:
            text, calls = self._streams[i].feed(o.text)
            if done:
                more, rest = self._streams[i].finish()
                text, calls = text + more, calls + rest
            if not self.tools.parallel:  # the first call only, as vLLM does
                calls = calls[: max(0, 1 - self._num_calls[i])]
            return text, calls
        if self.tools.forced:
            self._forced[i] += o.text
            if not done:
                return "", []
            found = self.tools.forced_calls(self._forced[i])
            return ("", found) if found else (self._forced[i], [])
        return o.text, []

    def _finish_reason(self, o: CompletionOutput) -> str | None:
        reason = finish_reason(o.finish_reason)
        return "tool_calls" if reason == "stop" and self._num_calls[o.index] else reason

    def _chunk(self, choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> bytes:
        chunk = ChatCompletionChunk(
            id=self.cid, created=self.created, model=self.model, choices=choices, usage=usage
        )
        if self.req.return_token_ids and not self._prompt_ids_sent:  # the first chunk's
            self._prompt_ids_sent = True
            chunk.prompt_token_ids = list(self.engine_req.prompt_ids)
        return sse(chunk.model_dump(exclude=None if usage else {"usage"}))

    def _running_usage(self) -> UsageInfo | None:
        """The usage so far on every chunk, with stream_options.continuous_usage_stats."""
        return self._usage() if self.req.continuous_usage else None

    def _delta_chunks(self, o: CompletionOutput, template: ChunkTemplate) -> list[bytes]:
        """The chunks of one engine delta: its text (reasoning_content before content), then
        its finish. Plain deltas (no logprobs, no running usage, no token ids) render from the
        template. With return_token_ids the delta's first chunk carries its new ids (a chunk
        of its own when the text is held back)."""
        logprobs = self._logprobs(o)
        text, calls = self._stream_calls(o) if self.tools.active else (o.text, [])
        reasoning = o.reasoning_text
        chunks: list[bytes] = []
        plain = logprobs is None and not self.req.continuous_usage and not self.req.return_token_ids
        if plain:
            if reasoning:
                chunks.append(template.render(o.index, reasoning, None, "reasoning_content"))
            if text:
                chunks.append(template.render(o.index, text, None))
            for call in call_deltas(calls, self._num_calls[o.index]):
                choice = ChatStreamChoice(index=o.index, delta=DeltaMessage(tool_calls=[call]))
                chunks.append(self._chunk([choice]))
            self._num_calls[o.index] += len(calls)
            reason = self._finish_reason(o)
            if reason is not None:
                chunks.append(template.render(o.index, None, reason))
            return chunks
        choices: list[ChatStreamChoice] = []
        if text or reasoning or logprobs is not None:
            content = text or (None if reasoning else "")
            delta = DeltaMessage(content=content, reasoning_content=reasoning or None)
            choices.append(ChatStreamChoice(index=o.index, delta=delta, logprobs=logprobs))
        choices += [
            ChatStreamChoice(index=o.index, delta=DeltaMessage(tool_calls=[call]))
            for call in call_deltas(calls, self._num_calls[o.index])
        ]
        self._num_calls[o.index] += len(calls)
        reason = self._finish_reason(o)
        if reason is not None:
            choices.append(
                ChatStreamChoice(index=o.index, delta=DeltaMessage(), finish_reason=reason)
            )
        if self.req.return_token_ids and o.token_ids:
            if not choices:
                choices.append(ChatStreamChoice(index=o.index, delta=DeltaMessage()))
            choices[0].token_ids = list(o.token_ids)
        return [self._chunk([choice], self._running_usage()) for choice in choices]

    async def stream(self) -> AsyncIterator[bytes]:
        """Role chunk per choice, content deltas, a finish chunk per choice, [usage], [DONE];
        an error once streaming has begun becomes an error chunk before [DONE]."""
        head = {
            "id": self.cid,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
        }
        template = ChunkTemplate(head, "delta")
        try:
            for i in range(self.engine_req.params.n):
                role = DeltaMessage(role="assistant", content="")
                yield self._chunk([ChatStreamChoice(index=i, delta=role)], self._running_usage())
            async with aclosing(self._outputs()) as outs:
                async for _, delta in outs:
                    for o in delta.outputs:
                        self.completion_tokens += len(o.token_ids)
                        self.request.state.completion_tokens = self.completion_tokens
                        for chunk in self._delta_chunks(o, template):
                            yield chunk
            usage = self._usage()
            if self.req.include_usage:
                yield self._chunk([], usage)
        except Exception as e:
            err = as_api_error(e)
            self.request.state.error = err.code or err.type
            yield sse(err.body())
        yield DONE


ChatJob = _Chat  # the seam other API shapes subclass (see run_chat)
