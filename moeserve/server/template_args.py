"""The chat template's arguments a request may set, checked: how the prompt ends
(add_generation_prompt, continue_final_message), a request's own template
(--trust-request-chat-template), extra template variables (chat_template_kwargs), documents
and reasoning_effort. Shared by the chat route and /tokenize; each problem is a 400 naming its
field."""

from __future__ import annotations

from typing import Any

from moeserve.server.errors import bad_request
from moeserve.server.protocol import ChatCompletionRequest
from moeserve.server.state import ServerState
from moeserve.tokenizer import Tokenizer


def chat_template_args(
    req: ChatCompletionRequest, tokenizer: Tokenizer, state: ServerState
) -> dict[str, Any]:
    """apply_chat_template's keyword arguments for a chat request: template_args, and
    reasoning_effort as a template variable."""
    args = template_args(
        tokenizer,
        state,
        req.add_generation_prompt,
        req.continue_final_message,
        req.chat_template,
        req.chat_template_kwargs,
        req.documents,
    )
    effort = _reasoning_effort(req, tokenizer)
    if effort and "reasoning_effort" in args:
        raise bad_request(
            "reasoning_effort is given twice (the field and chat_template_kwargs): give it once",
            param="reasoning_effort",
        )
    return args | effort


def template_args(
    tokenizer: Tokenizer,
    state: ServerState,
    add_generation_prompt: bool | None,
    continue_final_message: bool | None,
    chat_template: str | None,
    chat_template_kwargs: dict[str, Any] | None,
    documents: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """apply_chat_template's keyword arguments for these request fields."""
    return (
        _turn(add_generation_prompt, continue_final_message)
        | _request_template(chat_template, state)
        | _template_kwargs(chat_template_kwargs, tokenizer, chat_template)
        | _documents(documents, tokenizer, chat_template)
    )


def _documents(
    documents: list[dict[str, str]] | None, tokenizer: Tokenizer, chat_template: str | None
) -> dict[str, Any]:
    """vLLM's (and transformers') `documents` for a RAG chat template (Command-R's, Granite's:
    objects with "title" and "text", as the template reads them). vLLM drops them where the
    template does not read `documents`; here that is a 400 naming the field (refused, not
    ignored)."""
    if documents is None:
        return {}
    if "documents" not in tokenizer.variables_of(chat_template):
        raise bad_request(
            "documents: this model's chat template does not read documents (it has no "
            "retrieval-augmented format), so they would change nothing",
            param="documents",
        )
    return {"documents": documents}


def _turn(
    add_generation_prompt: bool | None, continue_final_message: bool | None
) -> dict[str, Any]:
    """How the prompt ends, as apply_chat_template's arguments: an open assistant turn
    (default), or inside the last message (continue_final_message, which needs
    add_generation_prompt false: vLLM's pair); a 400 for both at once."""
    if continue_final_message and add_generation_prompt is not False:
        raise bad_request(
            "continue_final_message needs add_generation_prompt set to false (the prompt "
            "ends inside the last message, not in a new assistant turn)",
            param="continue_final_message",
        )
    return {
        "add_generation_prompt": add_generation_prompt is not False,
        "continue_final_message": bool(continue_final_message),
    }


# Template variables the server sets from the request itself (and the tokenizer's special
# tokens): a chat_template_kwargs entry may not replace them.
_SERVER_TEMPLATE_VARS = frozenset(
    {
        "messages",
        "tools",
        "documents",
        "add_generation_prompt",
        "continue_final_message",
        "chat_template",
    }
)


def _request_template(source: str | None, state: ServerState) -> dict[str, str]:
    """A request's chat_template as apply_chat_template's argument: only on a server started
    with --trust-request-chat-template (else a 400 naming it)."""
    if source is None:
        return {}
    if not state.config.trust_request_chat_template:
        raise bad_request(
            "chat_template in a request is off on this server: start it with "
            "--trust-request-chat-template to render requests' own templates",
            param="chat_template",
        )
    return {"chat_template": source}


def _template_kwargs(
    kwargs: dict[str, Any] | None, tokenizer: Tokenizer, chat_template: str | None = None
) -> dict[str, Any]:
    """chat_template_kwargs, checked: extra variables for the chat template (Qwen3's
    enable_thinking, ...). A 400 names a key the server sets itself, or one that no chat
    template of this model (or the request's `chat_template`) mentions (it would change
    nothing: refused, not ignored)."""
    if not kwargs:
        return {}
    read = tokenizer.variables_of(chat_template)
    for key in kwargs:
        if key in _SERVER_TEMPLATE_VARS or key in tokenizer.special_tokens:
            raise bad_request(
                f"chat_template_kwargs: {key!r} is set by the server from the request and the "
                "tokenizer; it cannot be given here",
                param="chat_template_kwargs",
            )
        if key not in read:
            raise bad_request(
                f"chat_template_kwargs: this model's chat template does not read {key!r}",
                param="chat_template_kwargs",
            )
    return dict(kwargs)


_EFFORTS = ("low", "medium", "high")


def _reasoning_effort(req: ChatCompletionRequest, tokenizer: Tokenizer) -> dict[str, str]:
    """reasoning_effort as the chat template's variable (gpt-oss's template reads it); a 400
    for a value the template does not take or a template that does not read it."""
    effort = req.reasoning_effort
    if effort is None:
        return {}
    if effort not in _EFFORTS:
        raise bad_request(
            f"reasoning_effort must be one of {', '.join(_EFFORTS)}, got {effort!r}",
            param="reasoning_effort",
        )
    if "reasoning_effort" not in tokenizer.variables_of(req.chat_template):
        raise bad_request(
            "reasoning_effort is not supported for this model: its chat template does not read it",
            param="reasoning_effort",
        )
    return {"reasoning_effort": effort}
