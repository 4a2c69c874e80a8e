"""IncrementalDetokenizer: a stream of token ids as a stream of text, cut at stop strings."""

from __future__ import annotations

from collections.abc import Iterable

from moeserve.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence
# Tokens of prompt context decoded with the output, so the first output token gets the
# leading space (or merge) it has after the prompt; vLLM uses the same number.
_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    """Streams the text of one sequence's output tokens, cut at stop strings.

    Each ``step`` decodes a window of recent tokens twice (up to the last emitted token, and
    through the new ones) and emits the difference, as vLLM and TGI do: the window starts
    in the prompt so the first output token keeps its leading space, and a decode ending
    in U+FFFD (a split UTF-8 character) waits for more tokens. Without a stop string, all
    deltas + ``flush()`` equal ``tokenizer.decode(output_ids)`` for byte-level BPE (for a
    SentencePiece-style decoder the text also keeps the first token's leading space).

    Stop strings: the output is cut before the earliest match (after it with
    ``include_stop_str_in_output``), also when the match spans tokens. Unless the stop
    string is included, the last ``max(len(stop)) - 1`` characters are held back while
    streaming, so text that turns out to start a stop string is never emitted.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: list[int],
        *,
        skip_special_tokens: bool = True,
        stop: Iterable[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-_PROMPT_CONTEXT:])
        self._prefix = 0  # window start in _ids
        self._read = len(self._ids)  # _ids before this are already in the text
        self._prefix_text: str | None = None  # decode of _ids[_prefix:_read], cached
        self._stop = [s for s in stop if s]
        self._include = include_stop_str_in_output
        self._hold = 0 if self._include or not self._stop else max(map(len, self._stop)) - 1
        self._text = ""
        self._emitted = 0  # characters of _text already returned
        self._finished = False
        self.stopped = False
        self.stop_str: str | None = None  # the stop string that matched

    @property
    def output_text(self) -> str:
        """All output text decoded so far (held-back characters included), cut at a stop."""
        return self._text

    def step(self, new_token_ids: list[int], check_stop: bool = True) -> tuple[str, bool]:
        """Add tokens; return (text newly safe to emit, whether a stop string matched).
        check_stop=False: stop strings the new text completes do not count (an output short
        of its min_tokens), now or later."""
        if self.stopped or self._finished:
            return "", self.stopped
        self._ids.extend(new_token_ids)
        self._advance(final=False, check_stop=check_stop)
        return self._release(final=False), self.stopped

    def flush(self) -> str:
        """At finish: the rest of the output (held-back text and a trailing partial char)."""
        if self.stopped or self._finished:
            return self._release(final=True)
        self._advance(final=True)
        self._finished = True
        return self._release(final=True)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def _advance(self, final: bool, check_stop: bool = True) -> None:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        full = self._decode(self._ids[self._prefix :])
        if len(full) <= len(self._prefix_text) or (not final and full.endswith(_REPLACEMENT)):
            return  # nothing new, or a character still incomplete: wait
        self._append(full[len(self._prefix_text) :], check_stop)
        self._prefix, self._read, self._prefix_text = self._read, len(self._ids), None
        if self._prefix > 256:  # keep the id list short on long outputs
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0

    def _append(self, delta: str, check_stop: bool = True) -> None:
        old_len = len(self._text)
        self._text += delta
        if not check_stop:
            return
        best: tuple[int, str] | None = None
        for s in self._stop:
            # Only matches that end in the new text: earlier ones were checked before.
            i = self._text.find(s, max(0, old_len - len(s) + 1))
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            i, s = best
            self._text = self._text[: i + len(s) if self._include else i]
            self.stopped, self.stop_str = True, s

    def _release(self, final: bool) -> str:
        end = len(self._text) if final or self.stopped else len(self._text) - self._hold
        if end <= self._emitted:
            return ""
        out = self._text[self._emitted : end]
        self._emitted = end
        return out
