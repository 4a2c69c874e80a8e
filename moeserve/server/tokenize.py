"""POST /tokenize, POST /detokenize and GET /tokenizer_info: the served model's tokenizer over
HTTP, in vLLM's shapes.

lm-evaluation-harness's `local-completions` model probes /tokenizer_info and /tokenize and,
when both answer, tokenizes through the server (its `remote` tokenizer backend), so that a
client needs no tokenizer files of its own. As vLLM's, these sit at the root, beside /v1,
and need the API key when one is set.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.params import Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from moeserve.server.common import parse_body
from moeserve.server.errors import APIError, bad_request
from moeserve.server.protocol import ChatMessage
from moeserve.server.state import OFFLOAD_LEN, ServerState
from moeserve.server.template_args import template_args
from moeserve.tokenizer import Tokenizer


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = None


class TokenizeRequest(_Body):
    """`prompt` (a text) or `messages` (rendered with the chat template, as the chat route
    does). add_special_tokens defaults to true for a prompt (the BOS token a completion's
    prompt gets) and false for messages (the template writes its own)."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None  # default true
    # As the chat route's (messages only).
    continue_final_message: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None
    documents: list[dict[str, str]] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    tokens: list[int]


def tokenizer_router(state: ServerState, auth: Depends) -> APIRouter:
    """The three routes, each behind `auth` (the API-key dependency)."""
    router = APIRouter(dependencies=[auth])

    @router.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        tok = _tokenizer(state)
        req = await parse_body(request, state, TokenizeRequest)
        _check_model(req, state)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give either `prompt` or `messages`", param="prompt")
        if req.prompt is not None:
            for name in (
                "chat_template_kwargs",
                "continue_final_message",
                "chat_template",
                "documents",
            ):
                if getattr(req, name):
                    raise bad_request(f"{name} applies to `messages`, not a prompt", param=name)
            text, special = req.prompt, req.add_special_tokens is not False
        else:
            assert req.messages is not None
            messages = [m.model_dump(exclude_none=True) for m in req.messages]
            args = template_args(
                tok,
                state,
                req.add_generation_prompt,
                req.continue_final_message,
                req.chat_template,
                req.chat_template_kwargs,
                req.documents,
            )
            try:
                text = tok.apply_chat_template(messages, **args)
            except ValueError as e:
                raise bad_request(str(e), param="messages") from None
            special = bool(req.add_special_tokens)
        if len(text) > OFFLOAD_LEN:
            ids = await state.offload(tok.encode, text, special)
        else:
            ids = tok.encode(text, special)
        assert state.client is not None
        body: dict[str, Any] = {
            "count": len(ids),
            "max_model_len": state.client.max_model_len,
            "tokens": ids,
            "token_strs": [state.token_text(t) for t in ids] if req.return_token_strs else None,
        }
        return JSONResponse(body)

    @router.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        tok = _tokenizer(state)
        req = await parse_body(request, state, DetokenizeRequest)
        _check_model(req, state)
        assert state.client is not None
        if req.tokens:  # ids outside the vocabulary: 400 naming the first
            try:
                await state.encode(req.tokens)
            except ValueError as e:
                raise bad_request(str(e), param="tokens") from None
        # Special tokens kept: the text tokenizes back to the same ids.
        return JSONResponse({"prompt": tok.decode(req.tokens, skip_special_tokens=False)})

    @router.get("/tokenizer_info")
    async def tokenizer_info() -> JSONResponse:
        tok = _tokenizer(state)
        assert state.client is not None
        info: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **tok.special_tokens,
            "model_max_length": state.client.max_model_len,
            "chat_template": tok.chat_template,
        }
        return JSONResponse(info)

    return router


def _tokenizer(state: ServerState) -> Tokenizer:
    """The model's tokenizer: 503 while loading, 400 for a model without one."""
    state.check_serving()
    assert state.client is not None
    if state.client.tokenizer is None:
        raise bad_request("this model has no tokenizer.json: it takes token ids only")
    return state.client.tokenizer


def _check_model(req: _Body, state: ServerState) -> None:
    name = state.config.served_model_name
    if req.model is not None and req.model != name:
        raise APIError(
            404,
            f"the model `{req.model}` does not exist; this server serves `{name}`",
            type="not_found_error",
            param="model",
            code="model_not_found",
        )
