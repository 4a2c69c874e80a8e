"""Reasoning formats: a model's generated tokens split into reasoning and content.

One decision, `reasoning_format(tokenizer)`, says whether and how a model's output splits:

- ``harmony`` (gpt-oss): the tokenizer has the harmony special tokens and the chat template
  writes ``<|channel|>``. Output is a run of messages, each ``[<|start|>role]`` + header
  (``<|channel|>analysis``, maybe `` to=functions.x <|constrain|>json``) + ``<|message|>`` +
  body + ``<|end|>`` / ``<|return|>`` / ``<|call|>``. The analysis channel's bodies are
  reasoning; every other body (final, commentary preambles) is content. A message with a
  recipient outside the analysis channel (a tool call) goes to content raw, header included,
  since the server does not parse tool calls yet.
- ``think`` (DeepSeek-R1, Qwen3, GLM-4.5): ``<think>`` and ``</think>`` are single tokens and
  the template writes ``</think>``; text between them is reasoning, the rest content.

The split works on token ids (the markers are single tokens), so it never depends on how the
detokenizer treats special tokens; each side's ids are detokenized on their own. Where the
output starts (inside reasoning, or in a harmony header) comes from the prompt's tail: the
template's generation prompt opens the assistant's turn, sometimes with ``<think>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from moeserve.detokenizer import IncrementalDetokenizer
from moeserve.tokenizer import Tokenizer

Kind = Literal["reasoning", "content"]
HARMONY_TOKENS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>")
_CHANNEL = re.compile(r"<\|channel\|>\s*([A-Za-z_]+)")
_RECIPIENT = re.compile(r"\bto=")


@dataclass(frozen=True)
class ReasoningFormat:
    """How one model marks its reasoning: the kind and the marker tokens' ids by text."""

    kind: Literal["harmony", "think"]
    ids: dict[str, int]


def reasoning_format(tokenizer: Tokenizer | None) -> ReasoningFormat | None:
    """The model's reasoning format, decided from its tokenizer and chat template alone
    (None: its output is all content). The one place this is decided."""
    template = tokenizer.chat_template if tokenizer is not None else None
    if tokenizer is None or template is None:
        return None
    harmony = _single_tokens(tokenizer, HARMONY_TOKENS)
    if harmony is not None and "<|channel|>" in template:
        return ReasoningFormat("harmony", harmony)
    think = _single_tokens(tokenizer, ("<think>", "</think>"))
    if think is not None and "</think>" in template:
        return ReasoningFormat("think", think)
    return None


def _single_tokens(tokenizer: Tokenizer, texts: tuple[str, ...]) -> dict[str, int] | None:
    ids = {}
    for text in texts:
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) != 1:
            return None
        ids[text] = encoded[0]
    return ids


class ChannelSplitter:
    """Routes a sequence's generated token ids to reasoning or content, token by token.

    ``feed(ids)`` returns the ids in order as (kind, ids) runs; markers and harmony headers go
    nowhere. ``finish()`` returns what is still owed at the end: harmony output that never
    opened a message (a model ignoring the format) comes back whole as content.
    """

    def __init__(self, fmt: ReasoningFormat, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
        self._fmt, self._tokenizer = fmt, tokenizer
        self._kind: Kind | None = "content"  # None: inside a harmony header
        self._header: list[int] = []
        self._opened = False  # a harmony message body began in the output
        self._loose: list[int] = []  # output ids while no message has opened
        ids = fmt.ids
        if fmt.kind == "harmony":
            self._kind = None
            starts = [i for i, t in enumerate(prompt_ids) if t == ids["<|start|>"]]
            # Replay the prompt's last message so the output continues its state (usually
            # a header holding the role: the template ended with <|start|>assistant).
            self.feed(prompt_ids[starts[-1] :] if starts else [])
            self._opened, self._loose = False, []
        else:
            opened = [i for i, t in enumerate(prompt_ids) if t == ids["<think>"]]
            closed = [i for i, t in enumerate(prompt_ids) if t == ids["</think>"]]
            if opened and (not closed or opened[-1] > closed[-1]):
                self._kind = "reasoning"  # the generation prompt opened the thinking

    def feed(self, token_ids: list[int]) -> list[tuple[Kind, list[int]]]:
        runs: list[tuple[Kind, list[int]]] = []
        for t in token_ids:
            routed = self._route(t)
            if routed is None:
                continue
            kind, ids = routed
            if runs and runs[-1][0] == kind:
                runs[-1][1].extend(ids)
            else:
                runs.append((kind, list(ids)))
        return runs

    def finish(self) -> list[tuple[Kind, list[int]]]:
        if self._fmt.kind == "harmony" and not self._opened and self._loose:
            loose, self._loose = self._loose, []
            return [("content", loose)]
        return []

    def _route(self, t: int) -> tuple[Kind, list[int]] | None:
        ids = self._fmt.ids
        if self._fmt.kind == "think":
            if t == ids["<think>"] or t == ids["</think>"]:
                self._kind = "reasoning" if t == ids["<think>"] else "content"
                return None
            assert self._kind is not None
            return self._kind, [t]
        if not self._opened:
            self._loose.append(t)
        if self._kind is None:  # in a header (or between messages)
            if t == ids["<|start|>"]:
                self._header = []
            elif t == ids["<|message|>"]:
                return self._open()
            else:
                self._header.append(t)
            return None
        if t in (ids["<|end|>"], ids["<|return|>"], ids["<|call|>"], ids["<|start|>"]):
            self._kind, self._header = None, []  # a <|start|> without <|end|>: also a new one
            return None
        return self._kind, [t]

    def _open(self) -> tuple[Kind, list[int]] | None:
        """A harmony message body starts: its kind from the header."""
        header = self._tokenizer.decode(self._header, skip_special_tokens=False)
        channel = _CHANNEL.search(header)
        self._opened = True
        if channel is not None and channel.group(1) == "analysis":
            self._kind = "reasoning"
        else:
            self._kind = "content"
            if _RECIPIENT.search(header):  # a tool call: its raw text, for the client
                return "content", [*self._header, self._fmt.ids["<|message|>"]]
        return None


class SplitDetokenizer:
    """An IncrementalDetokenizer per side of the split: ``step``/``flush`` return the content
    (stop strings apply to it alone) and ``take_reasoning()`` the reasoning produced since its
    last call. Same interface as IncrementalDetokenizer otherwise."""

    def __init__(
        self,
        fmt: ReasoningFormat,
        tokenizer: Tokenizer,
        prompt_ids: list[int],
        *,
        stop: list[str],
        include_stop_str_in_output: bool,
        skip_special_tokens: bool = True,
    ) -> None:
        self._splitter = ChannelSplitter(fmt, tokenizer, prompt_ids)
        # Harmony bodies hold no special tokens; a tool call's raw header keeps its markers.
        # skip_special_tokens=False keeps them in the content (a tool parser reads them).
        keep = fmt.kind == "harmony"
        self._content = IncrementalDetokenizer(
            tokenizer,
            [],
            skip_special_tokens=skip_special_tokens and not keep,
            stop=stop,
            include_stop_str_in_output=include_stop_str_in_output,
        )
        self._reasoning = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=not keep)
        self._reasoning_text = ""

    @property
    def stopped(self) -> bool:
        return self._content.stopped

    @property
    def stop_str(self) -> str | None:
        return self._content.stop_str

    @property
    def output_text(self) -> str:
        return self._content.output_text

    def step(self, new_token_ids: list[int], check_stop: bool = True) -> tuple[str, bool]:
        return self._route(self._splitter.feed(new_token_ids), check_stop), self.stopped

    def flush(self) -> str:
        text = "" if self.stopped else self._route(self._splitter.finish())
        self._reasoning_text += self._reasoning.flush()
        return text + self._content.flush()

    def take_reasoning(self) -> str:
        out, self._reasoning_text = self._reasoning_text, ""
        return out

    def _route(self, runs: list[tuple[Kind, list[int]]], check_stop: bool = True) -> str:
        content = ""
        for kind, ids in runs:
            if kind == "reasoning":
                self._reasoning_text += self._reasoning.step(ids)[0]
            elif not self.stopped:
                content += self._content.step(ids, check_stop)[0]
        return content
