"""Structured outputs: grammars compiled by llguidance, one matcher per sequence, and each
step's token bitmask for the rows that have a grammar.

A `StructuredOutput` becomes an llguidance grammar (`grammar_text`); `check` compiles it
without a tokenizer, so the server can refuse a bad schema or regex before the request enters
the engine. Inside the engine `Grammars` holds the llguidance tokenizer (built from the
model's tokenizer.json, in a thread, while the engine starts), a bounded LRU of compiled
grammars keyed by (kind, spec), and hands each sequence its own matcher (a copy of the
compiled one). Per step `Grammars.mask` fills the bitmask of the grammar rows (llguidance's
thread pool, one call) for the sampler to apply on the device; `SeqGrammar.ends_after` advances a
matcher by the token the step sampled.

A preempted sequence keeps its output tokens (recompute preemption re-feeds them to the
model, not to the sampler), so its matcher, which has consumed exactly those tokens, stays
valid: nothing rolls back.

Legend: G grammar rows in a step, W 32-bit words of a row's bitmask.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import llguidance as llg
import numpy as np
import torch

from moeserve.engine.sampler import GrammarMask
from moeserve.sampling_params import StructuredOutput
from moeserve.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Compiled grammars kept for reuse: a repeated schema (the common case: one app, one schema)
# costs a matcher copy, not a compile.
CACHE_SIZE = 64
# JSON as Python's json.dumps writes it: fixed separators, no free whitespace. Free whitespace
# lets a model pad endlessly with newlines (a known failure of "any whitespace" grammars); a
# schema's own "x-guidance" options still win over these.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Threads that fill a step's masks (one row each): half the cores, so that they do not starve
# the engine's own thread and torch's; one on a 2-core machine.
MASK_THREADS = max(1, min(16, (os.cpu_count() or 1) // 2))
# llguidance's own limits on a grammar's size (lexer states, parser items) stay the defaults:
# a schema past them is refused with llguidance's message.


class GrammarError(ValueError):
    """A structured-output spec that does not compile; the message names the problem."""


def grammar_text(so: StructuredOutput) -> str:
    """The llguidance grammar for `so` (not yet checked: see `check`)."""
    if so.kind in ("json_object", "json_schema"):
        schema = so.spec if so.kind == "json_schema" else '{"type": "object"}'
        try:
            return llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as e:
            raise GrammarError(f"invalid JSON schema: {e}") from None
    if so.kind == "choice":
        choices = json.loads(so.spec)
        return llg.grammar_from("lark", "start: " + " | ".join(json.dumps(c) for c in choices))
    return llg.grammar_from(so.kind, so.spec)  # regex, lark


def check(so: StructuredOutput) -> None:
    """GrammarError naming the problem when `so` does not compile (no tokenizer needed)."""
    error = llg.LLMatcher.validate_grammar(grammar_text(so))
    if error:
        raise GrammarError(f"invalid {_NAMES[so.kind]}: {error.strip()}")


_NAMES = {
    "json_object": "JSON object grammar",
    "json_schema": "JSON schema",
    "regex": "regex",
    "choice": "choice list",
    "lark": "grammar",
}


def ll_tokenizer(tokenizer: Tokenizer, vocab_size: int, eos_ids: Iterable[int]) -> llg.LLTokenizer:
    """llguidance's view of `tokenizer` with a mask as wide as the model's vocabulary
    (`vocab_size` logits; ids past the tokenizer's are never allowed), `eos_ids` allowed
    wherever the grammar may end.

    llguidance reads a tokenizer.json whose decoder it knows (byte-level BPE, sentencepiece
    with byte fallback); for others (e.g. a word-level vocabulary) each token's bytes are its
    decoded text, which is exact for tokenizers whose tokens are whole characters."""
    eos = sorted(t for t in eos_ids if 0 <= t < vocab_size) or None
    n_vocab = vocab_size if vocab_size >= tokenizer.vocab_size else None
    backend = tokenizer.backend
    try:
        return llg.LLTokenizer(backend.to_str(), n_vocab=n_vocab, eos_token=eos)
    except ValueError:
        pass
    special = set(tokenizer.all_special_ids)
    tokens = []
    for i in range(tokenizer.vocab_size):
        text = backend.id_to_token(i)
        if text is None:  # a hole in the ids: a token nothing can produce
            special.add(i)
            tokens.append(b"")
        else:
            tokens.append(backend.decode([i], skip_special_tokens=False).encode())
    wrapper = llg.TokenizerWrapper(_Vocabulary(tokenizer, tokens, sorted(special), eos))
    return llg.LLTokenizer(wrapper, n_vocab=n_vocab, eos_token=eos)


@dataclass
class _Vocabulary:
    """What llguidance's TokenizerWrapper reads from a tokenizer."""

    tokenizer: Tokenizer
    tokens: list[bytes]
    special_token_ids: list[int]
    eos: list[int] | None

    @property
    def eos_token_id(self) -> int | None:
        return self.eos[0] if self.eos else self.tokenizer.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return self.tokenizer.encode(text, add_special_tokens=False)


class SeqGrammar:
    """One sequence's matcher and how many of its output tokens it has consumed."""

    def __init__(self, matcher: llg.LLMatcher) -> None:
        self.matcher = matcher
        self.consumed = 0

    def ends_after(self, token: int) -> bool:
        """Advance by the sampled `token`; True when the sequence must end there: the grammar
        is complete and admits nothing more (EOS aside), or, never expected since the mask
        allowed only tokens the matcher takes, the matcher refused the token."""
        self.consumed += 1
        if not self.matcher.consume_token(token):
            log.warning("grammar refused token %d: %s", token, self.matcher.get_error())
            return True
        return self.matcher.is_stopped()


class Grammars:
    """The engine's grammar state: the llguidance tokenizer, compiled grammars, mask fills."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: Iterable[int]) -> None:
        self.vocab_size = vocab_size
        self._eos = list(eos_ids)
        self._tokenizer: llg.LLTokenizer | None = None
        self._error: BaseException | None = None
        # A 150k vocabulary takes a while (benchmarks/RESULTS.md): build it while the engine
        # loads and warms up, not on the first structured request.
        self._thread = threading.Thread(
            target=self._build, args=(tokenizer,), name="grammar-tokenizer", daemon=True
        )
        self._thread.start()
        self._compiled: OrderedDict[tuple[str, str], llg.LLMatcher] = OrderedDict()
        self._executor: llg.LLExecutor | None = None

    def _build(self, tokenizer: Tokenizer) -> None:
        try:
            self._tokenizer = ll_tokenizer(tokenizer, self.vocab_size, self._eos)
        except BaseException as e:  # reported to the first request that needs it
            self._error = e

    @property
    def tokenizer(self) -> llg.LLTokenizer:
        self._thread.join()
        if self._tokenizer is None:
            raise GrammarError(f"structured outputs are unavailable: {self._error}")
        return self._tokenizer

    @property
    def words(self) -> int:
        """32-bit words in one row's bitmask."""
        return (self.tokenizer.vocab_size + 31) // 32

    def matcher(self, so: StructuredOutput) -> SeqGrammar:
        """A fresh matcher for `so`; GrammarError naming the problem when it does not compile."""
        key = (so.kind, so.spec)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = llg.LLMatcher(self.tokenizer, grammar_text(so), log_level=0)
            if compiled.is_error():
                raise GrammarError(f"invalid {_NAMES[so.kind]}: {compiled.get_error().strip()}")
            self._check_writable(compiled, so)
            self._compiled[key] = compiled
            if len(self._compiled) > CACHE_SIZE:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(key)
        return SeqGrammar(compiled.deep_copy())

    def _check_writable(self, compiled: llg.LLMatcher, so: StructuredOutput) -> None:
        """A grammar whose first token could only be a special one (or none) cannot be
        written in this vocabulary (a tiny model's, say): refuse it rather than answer an
        empty "stop"."""
        if compiled.is_accepting():
            return
        tok = self.tokenizer
        bits = np.unpackbits(np.frombuffer(compiled.compute_bitmask(), np.uint8), bitorder="little")
        allowed = np.flatnonzero(bits[: tok.vocab_size])
        if any(not tok.is_special_token(int(i)) for i in allowed):  # stops at the first
            return
        raise GrammarError(
            f"the model's vocabulary cannot write any text this {_NAMES[so.kind]} allows"
        )

    @property
    def num_compiled(self) -> int:
        return len(self._compiled)

    def mask(self, rows: list[tuple[int, SeqGrammar]], pin: bool) -> GrammarMask | None:
        """The bitmask of the (row, grammar) pairs, one llguidance call over its thread pool;
        None when there are none. pin: page-locked host memory (the copy to a GPU then
        overlaps the host's work)."""
        if not rows:
            return None
        if self._executor is None:
            self._executor = llg.LLExecutor(num_threads=MASK_THREADS)
        G, W = len(rows), self.words
        bits_GW = torch.empty((G, W), dtype=torch.int32, pin_memory=pin)
        matchers = [(g.matcher, j) for j, (_, g) in enumerate(rows)]
        self._executor.unsafe_compute_mask_ptr(matchers, bits_GW.data_ptr(), W * 4, G)
        return GrammarMask([r for r, _ in rows], bits_GW)
