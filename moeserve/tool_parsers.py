"""Tool-call parsers: a model's generated text split into content and tool calls.

Each format (``PARSERS``, by name) says where a call region starts (its markers) and how to
read one region; ``ToolCallStream`` does the rest, the same way for every format and for
whole texts and streams alike: content outside the calls passes through (whitespace touching
a call dropped), a region becomes its calls once it is complete, and a region that turns out
malformed (bad JSON, no name, cut off by the end) goes back to content whole. A streamed text
therefore yields exactly what the whole text parses to, at any delta boundaries. A call is
only handed out complete (name and arguments together): nothing is announced that could
still turn out to be text.

- ``hermes`` (Qwen2.5, Qwen3, Hermes): ``<tool_call>{"name": .., "arguments": {..}}</tool_call>``.
- ``mistral``: ``[TOOL_CALLS][{"name": .., "arguments": {..}}, ..]`` and the newer
  ``[TOOL_CALLS]name[ARGS]{..}`` (``[CALL_ID]id`` between them allowed).
- ``deepseek_v3``: ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME``
  ``\\n```json\\n{..}\\n```<｜tool▁call▁end｜>..<｜tool▁calls▁end｜>`` (V3.1's
  ``<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{..}<｜tool▁call▁end｜>`` too).
- ``harmony`` (gpt-oss): the tool call's raw header as moeserve/reasoning.py leaves it in the
  content, ``assistant<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{..}``
  (or the recipient before the channel), up to ``<|call|>`` or the end of the output.
"""

from __future__ import annotations

import json
import re
import secrets
import string
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar

from moeserve.tokenizer import Tokenizer

_DECODER = json.JSONDecoder()
# A region needs more text before it can be read (it may still complete).
INCOMPLETE = "incomplete"


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: the function's name and its arguments as JSON text (an object)."""

    name: str
    arguments: str
    id: str = ""

    def with_id(self, call_id: str) -> ToolCall:
        return ToolCall(self.name, self.arguments, call_id)


def arguments_text(value: Any) -> str | None:
    """The arguments of a call as JSON text of an object (None: not an object). A string is
    taken as JSON text already (some models write the arguments as a JSON string)."""
    if isinstance(value, str):
        try:
            decoded = json.loads(value)
        except ValueError:
            return None
        return value if isinstance(decoded, dict) else None
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return None


def call_from_object(obj: Any) -> ToolCall | None:
    """A call from a ``{"name": .., "arguments": {..}}`` object (``parameters`` accepted for
    ``arguments``, absent arguments meaning none); None when it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    text = arguments_text(args)
    return None if text is None else ToolCall(obj["name"], text)


def _json_prefix(text: str, final: bool) -> tuple[Any, int] | str | None:
    """The JSON value at the start of ``text`` (leading whitespace skipped) and where it ends;
    INCOMPLETE while more text may complete it, None when it cannot."""
    start = len(text) - len(text.lstrip())
    if start == len(text):
        return None if final else INCOMPLETE
    try:
        value, end = _DECODER.raw_decode(text, start)
    except ValueError:
        return None if final else INCOMPLETE
    return value, end


Region = tuple[list[ToolCall], int] | str | None


class ToolParser:
    """One format: ``markers`` open a call region; ``read`` reads the region at the start of
    its text (a marker first). ``read`` returns the calls and the region's end, INCOMPLETE
    (more text may complete it; never when ``final``) or None (not a call: it is text).
    Once a region reads as None for some text, it must for every longer text too."""

    name: ClassVar[str] = ""
    markers: ClassVar[tuple[str, ...]] = ()
    # The markers are special tokens: the text must be detokenized with them kept.
    needs_special_tokens: ClassVar[bool] = False

    def read(self, text: str, final: bool) -> Region:
        return None  # the base class has no markers: never asked

    def new_id(self) -> str:
        """A fresh id for a call, of the shape the model's chat template accepts back."""
        return f"call_{uuid.uuid4().hex[:24]}"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The whole output: its content (None when it had calls and no other text) and calls."""
        stream = ToolCallStream(self)
        content, calls = stream.feed(text)
        more, rest = stream.finish()
        return stream.content(content + more), calls + rest


class HermesParser(ToolParser):
    name = "hermes"
    markers = ("<tool_call>",)
    _END = "</tool_call>"

    def read(self, text: str, final: bool) -> Region:
        body = text[len(self.markers[0]) :]
        end = body.find(self._END)
        if end < 0 and not final:
            return INCOMPLETE
        inner = body[:end] if end >= 0 else body
        try:
            call = call_from_object(json.loads(inner))
        except ValueError:
            return None
        if call is None:
            return None
        stop = len(self.markers[0]) + (end + len(self._END) if end >= 0 else len(body))
        return [call], stop


class MistralParser(ToolParser):
    name = "mistral"
    markers = ("[TOOL_CALLS]",)
    needs_special_tokens = True
    _NAMED = re.compile(r"([A-Za-z0-9_.\-]+)(?:\[CALL_ID\][A-Za-z0-9]*)?\[ARGS\]")
    # What may still grow into `name[CALL_ID]id[ARGS]`.
    _NAMED_PREFIX = re.compile(r"[A-Za-z0-9_.\-]*(?:\[[A-Z_]*\]?[A-Za-z0-9]*)*")

    def new_id(self) -> str:
        # Mistral's templates refuse any id but 9 letters and digits.
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))

    def read(self, text: str, final: bool) -> Region:
        start = len(self.markers[0])
        body = text[start:]
        if not body.strip():
            return None if final else INCOMPLETE
        if body.lstrip()[:1] in ("[", "{"):  # the JSON list (or one object) format
            found = _json_prefix(body, final)
            if found is None or found == INCOMPLETE:
                return found  # type: ignore[return-value]
            value, end = found  # type: ignore[misc]
            items = value if isinstance(value, list) else [value]
            calls = [call_from_object(item) for item in items]
            if not calls or any(c is None for c in calls):
                return None
            return [c for c in calls if c is not None], start + end
        named = self._NAMED.match(body)
        if named is None:
            partial = self._NAMED_PREFIX.fullmatch(body) is not None
            return INCOMPLETE if partial and not final else None
        found = _json_prefix(body[named.end() :], final)
        if found is None or found == INCOMPLETE:
            return found  # type: ignore[return-value]
        value, end = found  # type: ignore[misc]
        args = arguments_text(value)
        if args is None:
            return None
        return [ToolCall(named.group(1), args)], start + named.end() + end


class DeepSeekV3Parser(ToolParser):
    name = "deepseek_v3"
    markers = ("<｜tool▁calls▁begin｜>",)
    needs_special_tokens = True
    _END = "<｜tool▁calls▁end｜>"
    _CALL = re.compile(r"\s*<｜tool▁call▁begin｜>(.*?)<｜tool▁call▁end｜>", re.S)
    _V3 = re.compile(r"function<｜tool▁sep｜>([^\n]+)\n```(?:json)?\n(.*)\n```\s*", re.S)
    _V31 = re.compile(r"([^<\n]+)<｜tool▁sep｜>(.*)", re.S)

    def read(self, text: str, final: bool) -> Region:
        start = len(self.markers[0])
        end = text.find(self._END, start)
        if end < 0 and not final:
            return INCOMPLETE
        body = text[start : end if end >= 0 else len(text)]
        calls, pos = [], 0
        while (m := self._CALL.match(body, pos)) is not None:
            call = self._call(m.group(1))
            if call is None:
                return None
            calls.append(call)
            pos = m.end()
        if not calls or body[pos:].strip():
            return None
        return calls, (end + len(self._END) if end >= 0 else len(text))

    def _call(self, inner: str) -> ToolCall | None:
        m = self._V3.fullmatch(inner) or self._V31.fullmatch(inner)
        if m is None:
            return None
        args = arguments_text(m.group(2).strip())
        return None if args is None else ToolCall(m.group(1).strip(), args)


class HarmonyParser(ToolParser):
    name = "harmony"
    # The header as the reasoning split leaves it (role first), or as raw output has it.
    markers = ("<|start|>assistant", "assistant<|channel|>", "assistant to=")
    needs_special_tokens = True
    _RECIPIENT = re.compile(r"\bto=functions\.([^\s<]+)")
    _ENDS = ("<|call|>", "<|end|>", "<|return|>", "<|start|>")
    _MAX_HEADER = 512

    def read(self, text: str, final: bool) -> Region:
        # Only a header within the first _MAX_HEADER characters counts (whole or streamed).
        body = text.find("<|message|>", 0, self._MAX_HEADER)
        if body < 0:
            return INCOMPLETE if not final and len(text) < self._MAX_HEADER else None
        recipient = self._RECIPIENT.search(text, 0, body)
        if recipient is None:
            return None
        args_start = body + len("<|message|>")
        ends = [i for e in self._ENDS if (i := text.find(e, args_start)) >= 0]
        if not ends and not final:
            return INCOMPLETE
        args_end = min(ends) if ends else len(text)
        args = arguments_text(text[args_start:args_end].strip())
        if args is None:
            return None
        stop = args_end + (len("<|call|>") if text.startswith("<|call|>", args_end) else 0)
        return [ToolCall(recipient.group(1), args)], stop


PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesParser, MistralParser, DeepSeekV3Parser, HarmonyParser)
}


def get_parser(name: str | None) -> ToolParser:
    """The parser registered under ``name`` (None: the base class, which reads no calls and
    gives OpenAI-style ids); ValueError listing the names otherwise."""
    if name is None:
        return ToolParser()
    if name not in PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; known: {', '.join(sorted(PARSERS))}")
    return PARSERS[name]()


def detect_parser(model_type: str | None, tokenizer: Tokenizer | None) -> str | None:
    """The parser for a checkpoint, from its model_type and what its chat template writes
    (None: no known tool-call format)."""
    if model_type == "gpt_oss":
        return "harmony"
    template = "\n".join(tokenizer.chat_templates.values()) if tokenizer is not None else ""
    if "<|channel|>" in template and "<|message|>" in template:
        return "harmony"
    if "<｜tool▁calls▁begin｜>" in template:
        return "deepseek_v3"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<tool_call>" in template and "<arg_key>" not in template:  # GLM-4.5's is not JSON
        return "hermes"
    return None


class ToolCallStream:
    """Splits one output, fed as text deltas, into content deltas and complete calls.

    ``feed(delta)`` returns the content that is settled (text that cannot be the start of a
    call) and the calls completed; ``finish()`` settles the rest. Whitespace right before or
    after a call is dropped, so content never ends in the gap between a text and its calls.
    """

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self._text = ""  # the unsettled tail
        self._after_call = False  # strip whitespace that follows a call
        self.num_calls = 0

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        self._text += delta
        return self._settle(final=False)

    def finish(self) -> tuple[str, list[ToolCall]]:
        return self._settle(final=True)

    def content(self, text: str) -> str | None:
        """The message content of a whole output: None when it had calls and no text."""
        return None if self.num_calls and not text else text

    def _settle(self, final: bool) -> tuple[str, list[ToolCall]]:
        text, pos = self._text, 0
        out: list[str] = []
        calls: list[ToolCall] = []
        while True:
            at, marker = self._next_marker(text, pos)
            if at < 0:
                keep = 0 if final else self._held(text[pos:])
                self._emit(out, text[pos : len(text) - keep])
                pos = len(text) - keep
                break
            region = self.parser.read(text[at:], final)
            if region is None:  # not a call: the marker is text
                self._emit(out, text[pos : at + len(marker)])
                pos = at + len(marker)
                continue
            before = text[pos:at].rstrip()
            if region == INCOMPLETE:
                self._emit(out, before)
                pos += len(before)
                break
            found, end = region  # type: ignore[misc]
            self._emit(out, before)
            calls.extend(c.with_id(self.parser.new_id()) for c in found)
            self._after_call = True
            pos = at + end
        self._text = text[pos:]
        self.num_calls += len(calls)
        return "".join(out), calls

    def _emit(self, out: list[str], text: str) -> None:
        if self._after_call:
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        out.append(text)

    def _next_marker(self, text: str, pos: int) -> tuple[int, str]:
        best, which = -1, ""
        for m in self.parser.markers:
            i = text.find(m, pos)
            if i >= 0 and (best < 0 or i < best):
                best, which = i, m
        return best, which

    def _held(self, tail: str) -> int:
        """How much of the end of ``tail`` to hold back: a partial marker and the whitespace
        before it (both may turn out to belong to a call)."""
        partial = 0
        for m in self.parser.markers:
            for k in range(min(len(m) - 1, len(tail)), 0, -1):
                if tail.endswith(m[:k]):
                    partial = max(partial, k)
                    break
        rest = tail[: len(tail) - partial]
        return partial + len(rest) - len(rest.rstrip())
