"""What the completion and chat routes share: sampling parameters, context checks, logprobs."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.requests import Request

from moeserve.engine.outputs import TokenLogprob
from moeserve.sampling_params import SamplingParams
from moeserve.server.errors import APIError, bad_request, from_value_error, parse_json
from moeserve.server.middleware import REQUEST_ID
from moeserve.server.protocol import (
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobs,
    SamplingFields,
    TopLogprob,
    unsupported_option,
)
from moeserve.server.state import OFFLOAD_LEN, ServerState
from moeserve.server.structured import structured_output

M = TypeVar("M", bound=BaseModel)
# OpenAI's API caps temperature at 2; the offline API (SamplingParams) does not.
MAX_TEMPERATURE = 2.0

# Request fields copied to SamplingParams under the same name when given.
_SAMPLING_FIELDS = (
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "ignore_eos",
    "min_tokens",
    "allowed_token_ids",
    "bad_words",
    "prompt_logprobs",
    "stop_token_ids",
    "skip_special_tokens",
    "include_stop_str_in_output",
)
_PARAM_NAMES = {f.name for f in dataclasses.fields(SamplingParams)}


async def parse_body(request: Request, state: ServerState, model: type[M]) -> M:
    """The request body as `model` (400 on any problem); big bodies parse off the loop."""
    body = await request.body()
    if len(body) > OFFLOAD_LEN:
        return await state.offload(parse_json, body, model)
    return parse_json(body, model)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def response_id(prefix: str, req: SamplingFields) -> str:
    """The id a response shows: vLLM's `<prefix>-<request_id>` where the client named one
    (sampling_params checked it). The engine's own ids stay unique (new_id): two requests may
    name the same request_id."""
    return f"{prefix}-{req.request_id}" if req.request_id is not None else new_id(prefix)


def check_model(req: SamplingFields, state: ServerState) -> None:
    """404 for a model this server does not serve (absent means the served one)."""
    name = state.config.served_model_name
    if req.model is not None and req.model != name:
        raise APIError(
            404,
            f"the model `{req.model}` does not exist; this server serves `{name}`",
            type="not_found_error",
            param="model",
            code="model_not_found",
            reject_reason="invalid_request",
        )


def sampling_params(
    req: SamplingFields, state: ServerState, *, logprobs: int | None, max_tokens: int | None
) -> SamplingParams:
    """Validated SamplingParams; an absent max_tokens is 1 (or min_tokens) here and fit_context
    later sets it to the rest of the context."""
    option = unsupported_option(req)
    if option is not None:
        raise bad_request(
            f"{option} is not supported by this server (a request that needs it is refused "
            "rather than answered without it)",
            param=option,
        )
    assert state.client is not None  # inference routes run only once the model is loaded
    if req.priority and not state.client.by_priority:
        raise bad_request(
            "priority needs a server started with --scheduling-policy priority",
            param="priority",
        )
    if req.cache_salt is not None and not req.cache_salt:
        raise bad_request("cache_salt must be a non-empty string", param="cache_salt")
    if req.request_id is not None and not REQUEST_ID.fullmatch(req.request_id):
        raise bad_request(
            "request_id must be 1 to 128 visible ASCII characters", param="request_id"
        )
    if req.prompt_logprobs is not None and req.stream:
        raise bad_request("prompt_logprobs is not supported when streaming", param="stream")
    if req.temperature is not None and req.temperature > MAX_TEMPERATURE:
        raise bad_request(
            f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {req.temperature}",
            param="temperature",
        )
    kwargs: dict[str, Any] = {
        name: getattr(req, name) for name in _SAMPLING_FIELDS if getattr(req, name) is not None
    }
    if req.stop is not None:
        kwargs["stop"] = req.stop
    if req.logit_bias:
        kwargs["logit_bias"] = _token_keys(req.logit_bias)
    structured = structured_output(req)  # 400 for a schema/regex/grammar that does not compile
    if structured is not None:
        kwargs["structured"] = structured
    try:
        # Without max_tokens, fit_context sets the rest of the context (min_tokens checked
        # against it there).
        absent = max(1, req.min_tokens or 0)
        params = SamplingParams(
            **kwargs, logprobs=logprobs, max_tokens=absent if max_tokens is None else max_tokens
        )
        if params.seed is not None and params.n > 1:  # sample i uses seed + i: check the last
            dataclasses.replace(params, seed=params.seed + params.n - 1)
    except ValueError as e:
        raise from_value_error(e, _PARAM_NAMES) from None
    vocab = state.client.model_config.vocab_size
    checked = ("stop_token_ids", "logit_bias", "allowed_token_ids")
    for name, ids in ((name, getattr(params, name)) for name in checked):
        bad = [t for t in ids or () if t >= vocab]
        if bad:
            raise bad_request(
                f"{name}: token {bad[0]} is outside the vocabulary (0..{vocab - 1})", param=name
            )
    return params


def _token_keys(bias: dict[str, float]) -> dict[int, float]:
    """logit_bias's keys (token ids as JSON object keys) as ints; 400 for one that is not."""
    out = {}
    for key, value in bias.items():
        if not key.isascii() or not key.isdigit():
            raise bad_request(
                f"logit_bias keys must be token ids (non-negative integers), got {key!r}",
                param="logit_bias",
            )
        out[int(key)] = value
    return out


def truncation(req: SamplingFields, max_model_len: int) -> int | None:
    """truncate_prompt_tokens as the number of prompt tokens to keep (the last ones), or None;
    a 400 for a value that is neither -1 (the context's length) nor >= 1."""
    k = req.truncate_prompt_tokens
    if k is None:
        return None
    if k == -1:
        return max_model_len
    if k < 1:
        raise bad_request(
            f"truncate_prompt_tokens must be -1 or >= 1, got {k}", param="truncate_prompt_tokens"
        )
    return k


def fit_context(
    params: SamplingParams, prompt_len: int, max_tokens: int | None, max_model_len: int
) -> SamplingParams:
    """Params for one prompt: max_tokens defaults to the rest of the context; a request that
    does not fit is a 400 `context_length_exceeded` naming both numbers."""
    if max_tokens is None:
        if prompt_len >= max_model_len:
            raise _context_error(
                f"this model's maximum context length is {max_model_len} tokens, but the "
                f"prompt has {prompt_len} tokens, which leaves no room to generate"
            )
        room = max_model_len - prompt_len
        if params.min_tokens > room:
            raise _context_error(
                f"this model's maximum context length is {max_model_len} tokens, but the "
                f"prompt has {prompt_len} tokens, which leaves room for {room}, fewer than "
                f"min_tokens ({params.min_tokens})"
            )
        return dataclasses.replace(params, max_tokens=room)
    if prompt_len + max_tokens > max_model_len:
        raise _context_error(
            f"this model's maximum context length is {max_model_len} tokens, but "
            f"{prompt_len + max_tokens} were requested ({prompt_len} in the prompt + "
            f"{max_tokens} max_tokens); shorten the prompt or lower max_tokens"
        )
    return params


def refuse_oversized(
    state: ServerState, text: str, max_tokens: int | None, keep: int | None = None
) -> None:
    """context_length_exceeded for a prompt text that cannot fit, from its byte length alone,
    before it is tokenised (a 1 MB prompt would otherwise be tokenised in full first); none
    when the prompt is to be cut to its last `keep` tokens."""
    if keep is not None:
        return
    assert state.client is not None
    tok = state.client.tokenizer
    at_least = tok.min_tokens(text) if tok is not None else 0
    limit = state.client.max_model_len
    if at_least + (1 if max_tokens is None else max_tokens) > limit:
        raise _context_error(
            f"this model's maximum context length is {limit} tokens, but the prompt "
            f"({len(text)} characters) has at least {at_least} tokens; shorten the prompt"
        )


def _context_error(message: str) -> APIError:
    return APIError(
        400,
        message,
        param="max_tokens",
        code="context_length_exceeded",
        reject_reason="context_length_exceeded",
    )


def finish_reason(reason: str | None) -> str | None:
    # "abort"/"error" never reach a client that is still listening; keep OpenAI's two.
    return None if reason is None else ("length" if reason == "length" else "stop")


def _finite(logprob: float) -> float:
    # JSON has no -Infinity; OpenAI reports impossible tokens as -9999.
    return max(logprob, -9999.0)


def token_namer(state: ServerState, as_ids: bool | None) -> Callable[[int], str]:
    """How log-probs name a token: its text, or with vLLM's `return_tokens_as_token_ids`
    "token_id:<id>" (what a token with no text of its own is called anyway)."""
    return (lambda t: f"token_id:{t}") if as_ids else state.token_text


def completion_logprobs(
    entries: list[TokenLogprob], state: ServerState, offset: int, as_ids: bool | None = None
) -> tuple[CompletionLogprobs, int]:
    """The legacy format for `entries`, text offsets from `offset`; returns the next offset.
    top_logprobs holds the k alternatives plus the chosen token, as OpenAI's does. as_ids:
    tokens named by id (token_namer); the offsets still count the tokens' text."""
    name = token_namer(state, as_ids)
    out = CompletionLogprobs()
    for e in entries:
        token = name(e.token_id)
        top = {name(t): _finite(lp) for t, lp in e.top}
        top.setdefault(token, _finite(e.logprob))
        out.tokens.append(token)
        out.token_logprobs.append(_finite(e.logprob))
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(state.token_text(e.token_id))
    return out, offset


def prompt_logprobs(
    prompt_ids: list[int],
    entries: list[TokenLogprob | None],
    state: ServerState,
    generated: CompletionLogprobs,
    as_ids: bool | None = None,
) -> CompletionLogprobs:
    """The legacy format with the prompt's tokens first (echo): its first token's log-prob and
    alternatives are null, as OpenAI's and vLLM's; `generated` follows. as_ids: as
    completion_logprobs'."""
    if len(entries) != len(prompt_ids):  # the engine sends one entry per prompt token
        raise RuntimeError(f"got {len(entries)} prompt log-probs for {len(prompt_ids)} tokens")
    name = token_namer(state, as_ids)
    out = CompletionLogprobs()
    offset = 0
    for token_id, e in zip(prompt_ids, entries, strict=True):
        token = name(token_id)
        out.tokens.append(token)
        out.text_offset.append(offset)
        offset += len(state.token_text(token_id))
        if e is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        top = {name(t): _finite(lp) for t, lp in e.top}
        top.setdefault(token, _finite(e.logprob))
        out.token_logprobs.append(_finite(e.logprob))
        out.top_logprobs.append(top)
    out.tokens += generated.tokens
    out.token_logprobs += generated.token_logprobs
    out.top_logprobs += generated.top_logprobs
    out.text_offset += generated.text_offset
    return out


def vllm_prompt_logprobs(
    prompt_ids: list[int], entries: list[TokenLogprob | None], n: int, state: ServerState
) -> PromptLogprobs:
    """vLLM's `prompt_logprobs`: per prompt token (the first null) a map from token id to its
    log-prob, rank and text: the prompt's token (its rank over the vocabulary) and the top
    `n` alternatives (ranks 1..n)."""
    if len(entries) != len(prompt_ids):  # the engine sends one entry per prompt token
        raise RuntimeError(f"got {len(entries)} prompt log-probs for {len(prompt_ids)} tokens")
    out: PromptLogprobs = []
    for token, e in zip(prompt_ids, entries, strict=True):
        if e is None:
            out.append(None)
            continue
        row = {
            str(token): PromptLogprob(
                logprob=_finite(e.logprob), rank=e.rank, decoded_token=state.token_text(token)
            )
        }
        for rank, (t, lp) in enumerate(e.top[:n], 1):
            row.setdefault(
                str(t),
                PromptLogprob(logprob=_finite(lp), rank=rank, decoded_token=state.token_text(t)),
            )
        out.append(row)
    return out


def chat_logprobs(
    entries: list[TokenLogprob], state: ServerState, as_ids: bool | None = None
) -> list[ChatTokenLogprob]:
    """The chat format: one entry per token with its bytes and the top alternatives (as_ids:
    as completion_logprobs')."""
    name = token_namer(state, as_ids)
    result = []
    for e in entries:
        text = name(e.token_id)
        top = [_top(name(t), lp) for t, lp in e.top]
        result.append(
            ChatTokenLogprob(
                token=text, logprob=_finite(e.logprob), bytes=_bytes(text), top_logprobs=top
            )
        )
    return result


def _top(text: str, logprob: float) -> TopLogprob:
    return TopLogprob(token=text, logprob=_finite(logprob), bytes=_bytes(text))


def _bytes(text: str) -> list[int] | None:
    # OpenAI allows null bytes; a token_id:N stand-in has no true text to encode.
    return None if text.startswith("token_id:") else list(text.encode())
