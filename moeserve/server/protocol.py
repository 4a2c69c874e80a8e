"""Request and response bodies of the OpenAI-compatible API (pydantic models, OpenAI shapes).

Requests are parsed in strict mode: a JSON string where a number belongs is a 400, not a
silent coercion. An unknown field is a 400 naming it, as OpenAI's API answers, so a typo
(`max_token`) or an option this server lacks never vanishes silently. Accepted besides
OpenAI's sampling fields: the vLLM-style extras that are honoured (`top_k`, `min_p`, ...) and
OpenAI fields that do not change the output (`user`, `metadata`, `store`, ...). Options that
OpenAI or vLLM define but this server does not implement yet (`suffix`, `functions`,
`prediction`, ...) parse, then `unsupported_option` refuses them with a 400 naming the
field, unless their value is the no-op default. Range checks live in SamplingParams (one
place for the engine and the server); these models only check types and shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, model_serializer


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = False
    # vLLM's (guidellm sends it): every chunk carries the usage so far.
    continuous_usage_stats: bool = False


def _absent(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {}


# Fields OpenAI or vLLM define that this server does not implement: accepted only with a
# value that asks for nothing (field -> that test). Anything else is a 400 naming the field.
_NOT_IMPLEMENTED: dict[str, Callable[[Any], bool]] = {
    "functions": _absent,
    "function_call": lambda v: v is None or v == "none",
    "suffix": lambda v: v is None or v == "",
    "audio": _absent,
    "modalities": lambda v: v is None or v == ["text"],
    "prediction": _absent,
    "web_search_options": _absent,
    # Structured outputs run on llguidance, vLLM's "guidance" backend: naming another is a
    # request for something else.
    "guided_decoding_backend": lambda v: v is None or v in ("auto", "guidance"),
}


class SamplingFields(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions; None means the default."""

    model: str | None = None
    max_tokens: int | None = None  # None: the rest of the context
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # Extras (vLLM's names), honoured.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None  # vLLM's: words the output may not contain
    # vLLM's: keep only the prompt's last k tokens (-1: as many as the context holds).
    truncate_prompt_tokens: int | None = None
    # vLLM's: each prompt token's log-prob and this many alternatives (0..20), in the
    # response's `prompt_logprobs` (not when streaming).
    prompt_logprobs: int | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    # OpenAI's: token id (a JSON object key, so a string) -> bias in [-100, 100].
    logit_bias: dict[str, float] | None = None
    # vLLM's: the tokenizer's special tokens (BOS, ...) around a text prompt; default true
    # for completions, false for chat (its template writes them).
    add_special_tokens: bool | None = None
    # vLLM's: under --scheduling-policy priority, lower runs first (else only 0).
    priority: int | None = None
    # vLLM's: only requests with the same salt share prefix-cache blocks.
    cache_salt: str | None = None
    # vLLM's: the response's id is "<cmpl|chatcmpl>-<request_id>" (1-128 visible ASCII).
    request_id: str | None = None
    # vLLM's: log-probs name each token "token_id:<id>" instead of its text.
    return_tokens_as_token_ids: bool | None = None
    # vLLM's: the prompt's token ids and each choice's generated ids in the response
    # (streaming: the prompt's in the first chunk, each chunk's new ids in it).
    return_token_ids: bool | None = None
    # OpenAI fields that do not change the output: accepted, not used.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    parallel_tool_calls: bool | None = None  # chat with tools: may the model call several
    # Structured outputs, OpenAI's and vLLM's spellings (shapes checked in server/structured.py;
    # a guided_decoding_backend other than llguidance's: _NOT_IMPLEMENTED).
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_decoding_backend: Any = None
    structured_outputs: Any = None
    response_format: Any = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


def unsupported_option(req: BaseModel) -> str | None:
    """The first field of `req` that asks for something this server does not implement."""
    for name, harmless in _NOT_IMPLEMENTED.items():
        if name in req.model_fields_set and not harmless(getattr(req, name)):
            return name
    return None


Prompt = str | list[int] | list[str] | list[list[int]]


class CompletionRequest(SamplingFields):
    prompt: Prompt
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None  # accepted only when equal to n
    suffix: Any = None  # no fill-in-the-middle: see _NOT_IMPLEMENTED


class TextPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    # A conversation may carry earlier tool calls and results; the chat template renders
    # them as transformers does.
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    # The reasoning a reasoning model returned, when a client sends its message back; handed
    # to the chat template under this name (Qwen3's reads it; gpt-oss's drops past reasoning).
    reasoning_content: str | None = None
    # What the openai SDK puts in an assistant message it returned, when a client sends
    # that message back: accepted when empty.
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: None = None
    function_call: None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # wins over max_tokens, as in OpenAI
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: Any = None  # checked in moeserve/server/tools.py (400s naming the problem)
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    # vLLM's: end the prompt inside the last (assistant) message, for the model to continue
    # it; needs add_generation_prompt false.
    continue_final_message: bool | None = None
    add_generation_prompt: bool | None = None
    # vLLM's: a template's source to render this request with (--trust-request-chat-template).
    chat_template: str | None = None
    # vLLM's: extra variables for the chat template (Qwen3's enable_thinking, ...).
    chat_template_kwargs: dict[str, Any] | None = None
    # vLLM's: documents for a retrieval-augmented chat template (objects of strings, such
    # as {"title": ..., "text": ...}); a template that does not read them: a 400.
    documents: list[dict[str, str]] | None = None


# ------------------------------------------------------------------------------ responses
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens the prefix cache held (not computed again)


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    """Legacy completions format: parallel lists over the choice's tokens."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's entry of a prompt token's log-prob, keyed by token id in `prompt_logprobs`."""

    logprob: float
    rank: int | None = None
    decoded_token: str


# Per prompt token (the first None): the token and its alternatives, by token id.
PromptLogprobs = list[dict[str, PromptLogprob] | None]


def _drop_unset(out: dict[str, Any], model: BaseModel, keys: tuple[str, ...]) -> dict[str, Any]:
    """`out` without those of `keys` the model never set (vLLM's extras appear only when
    asked for, so other responses keep OpenAI's shape)."""
    for key in keys:
        if key not in model.model_fields_set:
            out.pop(key, None)
    return out


_TOKEN_IDS = ("prompt_token_ids", "token_ids")


class CompletionChoice(BaseModel):
    """A choice as a stream chunk carries it; the token ids with `return_token_ids` (the
    prompt's in a choice's first chunk)."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset_ids(self, handler: Any) -> dict[str, Any]:
        return _drop_unset(handler(self), self, _TOKEN_IDS)


class CompletionResponseChoice(CompletionChoice):
    """A whole response's choice: vLLM's prompt_logprobs too (null unless asked)."""

    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[SerializeAsAny[CompletionChoice]]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text of an object, as OpenAI sends it


class ToolCallItem(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    # Set (a string, or null when there was none) only for a model with a reasoning format:
    # other models' messages keep OpenAI's shape.
    reasoning_content: str | None = None
    # Set only when the model called tools.
    tool_calls: list[ToolCallItem] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset_reasoning(self, handler: Any) -> dict[str, Any]:
        return _drop_unset(handler(self), self, ("reasoning_content", "tool_calls"))


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None  # return_token_ids

    @model_serializer(mode="wrap")
    def _drop_unset_ids(self, handler: Any) -> dict[str, Any]:
        return _drop_unset(handler(self), self, _TOKEN_IDS)


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None  # return_token_ids

    @model_serializer(mode="wrap")
    def _drop_unset_ids(self, handler: Any) -> dict[str, Any]:
        return _drop_unset(handler(self), self, _TOKEN_IDS)


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None  # vLLM's and DeepSeek's name
    # OpenAI's tool-call deltas: {index, id, type, function: {name, arguments}} first, then
    # {index, function: {arguments}} appending to that call's arguments.
    tool_calls: list[dict[str, Any]] | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        # OpenAI sends {"content": "x"} or {} rather than explicit nulls in a delta.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None  # return_token_ids: this chunk's new ids

    @model_serializer(mode="wrap")
    def _drop_unset_ids(self, handler: Any) -> dict[str, Any]:
        return _drop_unset(handler(self), self, _TOKEN_IDS)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None  # return_token_ids: the first chunk's

    @model_serializer(mode="wrap")
    def _drop_unset_ids(self, handler: Any) -> dict[str, Any]:
        return _drop_unset(handler(self), self, _TOKEN_IDS)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moeserve"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# Every top-level request field: an engine error whose message starts with one names it.
REQUEST_FIELDS = frozenset(CompletionRequest.model_fields) | frozenset(
    ChatCompletionRequest.model_fields
)
