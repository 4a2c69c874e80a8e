"""POST /v1/completions: string, token-id and batched prompts; plain JSON or SSE.

A batch of P prompts with n samples each runs as P engine requests (each with n sequences);
choice `p * n + i` is sample i of prompt p, as in OpenAI's API.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from moeserve.engine.messages import EngineRequest
from moeserve.engine.outputs import CompletionOutput, TokenLogprob
from moeserve.server.common import (
    check_model,
    completion_logprobs,
    finish_reason,
    fit_context,
    new_id,
    parse_body,
    prompt_logprobs,
    refuse_oversized,
    response_id,
    sampling_params,
    truncation,
    vllm_prompt_logprobs,
)
from moeserve.server.errors import bad_request
from moeserve.server.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    PromptTokensDetails,
    UsageInfo,
)
from moeserve.server.state import ServerState, Ticket
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


def split_prompts(prompt: Any) -> list[str | list[int]]:
    """The prompts of a request: one string, one id list, or a batch of either; 400 if empty."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise bad_request("prompt must not be empty (nor hold an empty prompt)", param="prompt")
    return prompts


async def create_completion(request: Request, state: ServerState) -> Response:
    state.check_admissible()
    req = await parse_body(request, state, CompletionRequest)
    check_model(req, state)
    # echo + logprobs: the prompt tokens' log-probs lead each choice's (lm-evaluation-harness's
    # log-likelihood requests); with max_tokens 0 one token runs and is dropped, as in vLLM.
    prompt_lp = bool(req.echo) and req.logprobs is not None
    if prompt_lp and req.stream:
        raise bad_request("echo with logprobs is not supported when streaming", param="stream")
    echo_only = bool(req.echo) and req.max_tokens == 0
    max_tokens = 1 if echo_only else req.max_tokens
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise bad_request("best_of is not supported (except equal to n)", param="best_of")
    prompts = split_prompts(req.prompt)
    params = sampling_params(req, state, logprobs=req.logprobs, max_tokens=max_tokens)
    if prompt_lp:  # the engine computes the larger of echo's and prompt_logprobs' top-n
        wanted = max(req.logprobs or 0, req.prompt_logprobs or 0)
        params = dataclasses.replace(params, prompt_logprobs=wanted)
    assert state.client is not None  # sampling_params checked it
    keep = truncation(req, state.client.max_model_len)
    cid = response_id("cmpl", req)
    uid = new_id("cmpl")  # the engine's ids: unique whatever request_id says
    request.state.request_id = cid
    if state.config.log_prompts:
        request.state.prompt = req.prompt

    async def work(ticket: Ticket, guard: Guard) -> Response:
        assert state.client is not None
        reqs = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                refuse_oversized(state, prompt, max_tokens, keep)
            ids = await state.encode(prompt, req.add_special_tokens is not False)
            text = prompt if isinstance(prompt, str) else None
            if keep is not None and len(ids) > keep:  # the last `keep` tokens (echo shows them)
                ids, text = ids[-keep:], None
            p = fit_context(params, len(ids), max_tokens, state.client.max_model_len)
            reqs.append(
                EngineRequest(
                    f"{uid}-{i}",
                    ids,
                    p,
                    prompt=text,
                    cache_salt=req.cache_salt,
                    priority=req.priority or 0,
                )
            )
        request.state.prompt_tokens = sum(len(r.prompt_ids) for r in reqs)
        job = _Completion(state, req, cid, reqs, ticket, request, echo_only)
        if req.stream:
            return SSEResponse(job.stream(), guard=guard, on_close=ticket.close, request=request)
        return await job.collect()

    return await run_admitted(request, state, len(prompts), work)


class _Completion:
    """One completion request in flight: formats engine deltas as OpenAI responses."""

    def __init__(
        self,
        state: ServerState,
        req: CompletionRequest,
        cid: str,
        reqs: list[EngineRequest],
        ticket: Ticket,
        request: Request,
        echo_only: bool = False,
    ) -> None:
        """echo_only: max_tokens 0 with echo; the one token generated is not returned."""
        self.state, self.req, self.cid, self.reqs = state, req, cid, reqs
        self.echo_only = echo_only
        self.ticket, self.request = ticket, request
        self.n = reqs[0].params.n
        self.created = int(time.time())
        self.model = state.config.served_model_name
        self._template: ChunkTemplate | None = None
        self.echo = [self._echo_text(r) if req.echo else "" for r in reqs]
        self.prompt_tokens = sum(len(r.prompt_ids) for r in reqs)
        self.completion_tokens = 0
        self.cached = [0] * len(reqs)  # per prompt, its prefix-cache hit
        self._prompt_ids_sent: set[int] = set()  # choices whose chunk carried the prompt's ids

    def _echo_text(self, r: EngineRequest) -> str:
        if r.prompt is not None:
            return r.prompt
        tok = self.state.client.tokenizer if self.state.client else None
        return tok.decode(r.prompt_ids, r.params.skip_special_tokens) if tok else ""

    def _usage(self) -> UsageInfo:
        self.request.state.completion_tokens = self.completion_tokens
        total = self.prompt_tokens + self.completion_tokens
        return UsageInfo(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=total,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self.cached)),
        )

    async def collect(self) -> JSONResponse:
        assert self.state.client is not None
        results = [[CompletionOutput(index=i) for i in range(self.n)] for _ in self.reqs]
        prompt_lps: list[list[TokenLogprob | None]] = [[] for _ in self.reqs]
        async with aclosing(merged_outputs(self.state.client, self.reqs, self.ticket)) as outs:
            async for p, delta in outs:
                if delta.num_cached_tokens is not None:
                    self.cached[p] = delta.num_cached_tokens
                prompt_lps[p].extend(delta.prompt_logprobs or [])
                for o in delta.outputs:
                    results[p][o.index].merge(o)
        choices = []
        for p, outputs in enumerate(results):
            for o in outputs:
                if self.echo_only:  # the token generated to run the prompt is dropped
                    dropped = None if o.logprobs is None else []
                    o = CompletionOutput(o.index, logprobs=dropped, finish_reason="length")
                self.completion_tokens += len(o.token_ids)
                logprobs = None
                as_ids = self.req.return_tokens_as_token_ids
                if o.logprobs is not None:
                    logprobs, _ = completion_logprobs(
                        o.logprobs, self.state, len(self.echo[p]), as_ids
                    )
                ids = self.reqs[p].prompt_ids
                if self.req.echo and logprobs is not None:  # echo + logprobs: prompt first
                    k = self.req.logprobs or 0
                    echoed = [
                        e if e is None else dataclasses.replace(e, top=e.top[:k])
                        for e in prompt_lps[p]
                    ]
                    logprobs = prompt_logprobs(ids, echoed, self.state, logprobs, as_ids)
                vllm = None
                if self.req.prompt_logprobs is not None:
                    vllm = vllm_prompt_logprobs(
                        ids, prompt_lps[p], self.req.prompt_logprobs, self.state
                    )
                choice = CompletionResponseChoice(
                    index=p * self.n + o.index,
                    text=self.echo[p] + o.text,
                    logprobs=logprobs,
                    finish_reason=finish_reason(o.finish_reason),
                    prompt_logprobs=vllm,
                )
                if self.req.return_token_ids:
                    choice.prompt_token_ids = list(ids)
                    choice.token_ids = list(o.token_ids)
                choices.append(choice)
        body = CompletionResponse(
            id=self.cid,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=self._usage(),
        )
        return JSONResponse(body.model_dump())

    def _chunk(
        self,
        index: int,
        text: str,
        logprobs: Any = None,
        reason: str | None = None,
        token_ids: list[int] | None = None,
    ) -> bytes:
        """One choice's chunk; token_ids (return_token_ids): the ids it adds, and a choice's
        first chunk carries the prompt's."""
        usage = self._usage() if self.req.continuous_usage else None
        if logprobs is None and usage is None and not self.req.return_token_ids:
            if self._template is None:
                self._template = ChunkTemplate(
                    {
                        "id": self.cid,
                        "object": "text_completion",
                        "created": self.created,
                        "model": self.model,
                    },
                    "text",
                )
            return self._template.render(index, text, reason)
        choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=reason)
        if self.req.return_token_ids:
            choice.token_ids = token_ids or []
            if index not in self._prompt_ids_sent:
                self._prompt_ids_sent.add(index)
                choice.prompt_token_ids = list(self.reqs[index // self.n].prompt_ids)
        body = CompletionResponse(
            id=self.cid, created=self.created, model=self.model, choices=[choice], usage=usage
        )
        return sse(body.model_dump(exclude=None if usage else {"usage"}))

    async def stream(self) -> AsyncIterator[bytes]:
        """SSE chunks; an error after the first chunk becomes an error chunk, then [DONE]."""
        assert self.state.client is not None
        offsets: dict[int, int] = {}
        try:
            for p, text in enumerate(self.echo):
                for i in range(self.n if text else 0):
                    offsets[p * self.n + i] = len(text)
                    yield self._chunk(p * self.n + i, text)
            async with aclosing(merged_outputs(self.state.client, self.reqs, self.ticket)) as outs:
                async for p, delta in outs:
                    if delta.num_cached_tokens is not None:
                        self.cached[p] = delta.num_cached_tokens
                    for o in delta.outputs:
                        if self.echo_only:  # the token run for the prompt is dropped
                            done = "length" if o.finish_reason is not None else None
                            o = CompletionOutput(o.index, finish_reason=done)
                        index = p * self.n + o.index
                        self.completion_tokens += len(o.token_ids)
                        self.request.state.completion_tokens = self.completion_tokens
                        logprobs = None
                        if o.logprobs is not None:
                            logprobs, offsets[index] = completion_logprobs(
                                o.logprobs,
                                self.state,
                                offsets.get(index, 0),
                                self.req.return_tokens_as_token_ids,
                            )
                        ids = o.token_ids if self.req.return_token_ids else []
                        if o.text or ids or logprobs is not None or o.finish_reason is not None:
                            yield self._chunk(
                                index, o.text, logprobs, finish_reason(o.finish_reason), ids
                            )
            usage = self._usage()
            if self.req.include_usage:
                yield sse(
                    CompletionResponse(
                        id=self.cid, created=self.created, model=self.model, choices=[], usage=usage
                    ).model_dump()
                )
        except Exception as e:
            err = as_api_error(e)
            self.request.state.error = err.code or err.type
            yield sse(err.body())
        yield DONE
