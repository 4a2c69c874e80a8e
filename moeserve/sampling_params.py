"""Per-request sampling parameters (OpenAI/vLLM semantics), validated on construction.

Imports no torch so the server and the scheduler can build and check these cheaply.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Literal, get_args

# Below this temperature a request is treated as greedy (argmax); dividing logits by a
# near-zero temperature would only overflow to inf/nan.
GREEDY_TEMPERATURE = 1e-5

MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
# Tokens one request may bias, or allow: bounds what each of its steps adds to the
# sampler's host work.
MAX_LOGIT_BIAS = 1024
MAX_ALLOWED_TOKEN_IDS = 16384
MAX_BAD_WORDS = 256

StructuredKind = Literal["json_object", "json_schema", "regex", "choice", "lark"]
STRUCTURED_KINDS: tuple[str, ...] = get_args(StructuredKind)


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint the engine holds every generated sequence to (its token mask).

    ``kind`` says how to read ``spec``: "json_object" (any JSON object; spec ""),
    "json_schema" (the JSON text of a schema), "regex", "choice" (the JSON text of a
    non-empty list of strings) or "lark" (a Lark grammar, llguidance's dialect). Construction
    checks the kind and the spec's shape (ValueError naming the field); whether a schema, regex
    or grammar compiles is checked when a request carries it (moeserve.engine.structured).
    """

    kind: StructuredKind
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise ValueError(
                f"structured.kind must be one of {', '.join(STRUCTURED_KINDS)}, got {self.kind!r}"
            )
        if not isinstance(self.spec, str):
            raise ValueError(f"structured.spec must be a string, got {type(self.spec).__name__}")
        if self.kind == "json_object" and self.spec:
            raise ValueError("structured.spec must be empty for kind json_object")
        if self.kind in ("regex", "lark") and not self.spec:
            raise ValueError(f"structured.spec must hold the {self.kind} for kind {self.kind}")
        if self.kind in ("json_schema", "choice"):
            try:
                value = json.loads(self.spec)
            except ValueError as e:
                raise ValueError(
                    f"structured.spec is not valid JSON for kind {self.kind}: {e}"
                ) from None
            if self.kind == "json_schema" and not isinstance(value, (dict, bool)):
                raise ValueError(
                    "structured.spec must be a JSON schema (an object) for json_schema"
                )
            if self.kind == "choice" and not (
                isinstance(value, list) and value and all(isinstance(c, str) for c in value)
            ):
                raise ValueError(
                    "structured.spec must be a non-empty JSON list of strings for choice"
                )


@dataclass
class SamplingParams:
    """How to turn logits into tokens for one request, and when to stop.

    Construction raises ``ValueError`` naming the offending field and its allowed range.
    ``stop`` may be given as a single string. ``temperature < 1e-5`` means greedy.
    ``logprobs=None`` returns no logprobs; ``logprobs=k`` (0..20) returns the chosen
    token's logprob plus the top-k alternatives. ``prompt_logprobs=k`` (0..20) returns
    each prompt token's logprob (given the tokens before it) and the top-k alternatives,
    in `RequestOutput.prompt_logprobs` (None for the first token). ``structured`` holds
    every output to a JSON schema, regex, choice or grammar (`StructuredOutput`).
    ``min_tokens``: no EOS (unless ``ignore_eos``), stop token or stop string ends the output
    before this many tokens (vLLM's field). ``logit_bias`` maps token ids to a value in
    [-100, 100] added to that token's logit before the penalties, temperature and filters
    (OpenAI's field; -100 all but bans a token, 100 all but forces it); logprobs stay those of
    the raw logits. ``allowed_token_ids``: only these tokens may be sampled (vLLM's field).
    ``bad_words`` (vLLM's field): words the output may not contain. Each word's tokens, at
    the start of a text and after a space (tokenizer.bad_word_ids), form a sequence whose
    last token is banned when the output's last tokens are the rest of it (a one-token word
    is always banned). The engine fills ``bad_words_token_ids`` from the model's tokenizer.
    """

    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = None
    structured: StructuredOutput | None = None
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    bad_words_token_ids: list[list[int]] | None = None  # the engine's (from bad_words)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self._validate()
        if self.logit_bias is not None:  # a copy the caller cannot change under the engine
            self.logit_bias = {t: float(b) for t, b in self.logit_bias.items()} or None
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = sorted(set(self.allowed_token_ids))
        if self.bad_words is not None:
            self.bad_words = list(self.bad_words) or None

    def _validate(self) -> None:
        _check_int("n", self.n, 1, MAX_N)
        _check_int("max_tokens", self.max_tokens, 1, None)
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        _check_number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be 0 or -1 (off) or an integer >= 1, got {self.top_k!r}")
        _check_number("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            _check_int("seed", self.seed, -(2**63), 2**64 - 1)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_number(name, value)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        _check_number("repetition_penalty", self.repetition_penalty)
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        self._validate_stop()
        for tok in self.stop_token_ids:
            if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
                raise ValueError(f"stop_token_ids must be non-negative integers, got {tok!r}")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS)
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise ValueError(
                f"structured must be a StructuredOutput, got {type(self.structured).__name__}"
            )
        self._validate_logit_bias()
        self._validate_bad_words()
        if self.allowed_token_ids is not None:
            if not isinstance(self.allowed_token_ids, list) or not self.allowed_token_ids:
                raise ValueError(
                    f"allowed_token_ids must be a non-empty list, got {self.allowed_token_ids!r}"
                )
            if len(self.allowed_token_ids) > MAX_ALLOWED_TOKEN_IDS:
                raise ValueError(
                    f"allowed_token_ids may hold at most {MAX_ALLOWED_TOKEN_IDS} tokens, got "
                    f"{len(self.allowed_token_ids)}"
                )
            for tok in self.allowed_token_ids:
                if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
                    raise ValueError(f"allowed_token_ids must be token ids >= 0, got {tok!r}")
            if self.structured is not None:
                raise ValueError(
                    "allowed_token_ids cannot be combined with structured outputs (the grammar "
                    "decides which tokens may follow)"
                )
        _check_int("min_tokens", self.min_tokens, 0, None)
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )
        if self.min_tokens and self.structured is not None:
            raise ValueError(
                "min_tokens cannot be combined with structured outputs (the grammar decides "
                "where the output may end)"
            )

    def _validate_bad_words(self) -> None:
        if self.bad_words is None:
            return
        if not isinstance(self.bad_words, (list, tuple)):
            raise ValueError(f"bad_words must be a list of strings, got {self.bad_words!r}")
        if len(self.bad_words) > MAX_BAD_WORDS:
            raise ValueError(
                f"bad_words may hold at most {MAX_BAD_WORDS} words, got {len(self.bad_words)}"
            )
        for word in self.bad_words:
            if not isinstance(word, str) or not word.strip():
                raise ValueError(f"bad_words must be non-empty strings, got {word!r}")
            if len(word) > MAX_STOP_STRING_CHARS:
                raise ValueError(
                    f"bad_words must be at most {MAX_STOP_STRING_CHARS} characters, got one "
                    f"of {len(word)}"
                )

    def _validate_logit_bias(self) -> None:
        if self.logit_bias is None:
            return
        if not isinstance(self.logit_bias, dict):
            raise ValueError(
                f"logit_bias must map token ids to biases, got {type(self.logit_bias).__name__}"
            )
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(
                f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens, got {len(self.logit_bias)}"
            )
        for tok, bias in self.logit_bias.items():
            if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
                raise ValueError(f"logit_bias keys must be token ids >= 0, got {tok!r}")
            _check_number(f"logit_bias[{tok}]", bias)
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias[{tok}] must be in [-100, 100], got {bias}")

    def _validate_stop(self) -> None:
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(
                f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}"
            )
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise ValueError(
                    f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters, "
                    f"got one of {len(s)}"
                )

    @property
    def greedy(self) -> bool:
        """True when this request takes the argmax (temperature below 1e-5)."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        """True when any of the repetition/presence/frequency penalties changes logits."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @property
    def changes_logits(self) -> bool:
        """True when the sampler must change this row's logits before choosing (penalties, a
        logit bias, allowed tokens, bad words): a greedy row then takes the argmax of the
        changed logits."""
        return (
            self.has_penalties
            or bool(self.logit_bias)
            or self.allowed_token_ids is not None
            or bool(self.bad_words_token_ids)
        )

    @property
    def top_k_enabled(self) -> bool:
        """True when top-k filtering is on (top_k >= 1; 0 and -1 mean off)."""
        return self.top_k >= 1


def _check_int(name: str, value: object, low: int, high: int | None) -> None:
    # bool is an int subclass; `n=True` is a caller bug, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        limit = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {'in ' if high is not None else ''}{limit}, got {value}")


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    # NaN slips past every range comparison; inf would turn logits into NaN.
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
