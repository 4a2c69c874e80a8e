"""Tool-call parsers: each format's single and parallel calls, text before the calls, malformed
output left as content, and streams cut at every boundary reassembling to the whole parse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeserve.tokenizer import Tokenizer
from moeserve.tool_parsers import (
    PARSERS,
    ToolCall,
    ToolCallStream,
    ToolParser,
    detect_parser,
    get_parser,
)
from tests.harmony_fixture import write_harmony_tokenizer
from tests.tokenizer_fixture import write_test_tokenizer

W = ("get_weather", '{"city": "Paris", "unit": "°C"}')
T = ("get_time", '{"zone": "UTC"}')


def _hermes(name: str, args: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


def _mistral_new(name: str, args: str) -> str:
    return f"[TOOL_CALLS]{name}[ARGS]{args}"


def _deepseek(*calls: tuple[str, str]) -> str:
    body = "\n".join(
        f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>{n}\n```json\n{a}\n```<｜tool▁call▁end｜>"
        for n, a in calls
    )
    return f"<｜tool▁calls▁begin｜>{body}<｜tool▁calls▁end｜>"


def _harmony(name: str, args: str) -> str:
    return f"assistant<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>{args}"


def _mistral_list(*calls: tuple[str, str]) -> str:
    items = ", ".join(f'{{"name": "{n}", "arguments": {a}}}' for n, a in calls)
    return f"[TOOL_CALLS] [{items}]"


# parser, output text, expected content, expected (name, arguments) pairs
CASES: list[tuple[str, str, str | None, list[tuple[str, str]]]] = [
    ("hermes", _hermes(*W), None, [W]),
    ("hermes", "Let me check.\n\n" + _hermes(*W) + "\n" + _hermes(*T), "Let me check.", [W, T]),
    ("hermes", '<tool_call>{"name": "f"}</tool_call>', None, [("f", "{}")]),
    ("hermes", _hermes(*W) + "\nDone.", "Done.", [W]),
    ("mistral", _mistral_list(W, T), None, [W, T]),
    ("mistral", "Sure." + _mistral_list(W), "Sure.", [W]),
    ("mistral", _mistral_new(*W), None, [W]),
    ("mistral", "On it. " + _mistral_new(*W) + _mistral_new(*T), "On it.", [W, T]),
    ("mistral", "[TOOL_CALLS]f[CALL_ID]a1B2c3D4e[ARGS]{}", None, [("f", "{}")]),
    ("deepseek_v3", _deepseek(W), None, [W]),
    ("deepseek_v3", "Checking both.\n" + _deepseek(W, T), "Checking both.", [W, T]),
    (
        "deepseek_v3",
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>"
        '{"zone": "UTC"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
        None,
        [T],
    ),
    ("harmony", _harmony(*W), None, [W]),
    ("harmony", "Checking. " + _harmony(*W) + "<|call|>", "Checking.", [W]),
    (
        "harmony",
        "<|start|>assistant to=functions.get_time<|channel|>commentary json<|message|>"
        '{"zone": "UTC"}<|call|>',
        None,
        [T],
    ),
]

# Output that looks like a call but is not one: all of it stays content.
MALFORMED: list[tuple[str, str]] = [
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {bad}}\n</tool_call>'),
    ("hermes", '<tool_call>{"arguments": {}}</tool_call>'),
    ("hermes", '<tool_call>{"name": "f", "arguments": [1]}</tool_call> tail'),
    ("hermes", 'Cut off: <tool_call>{"name": "f", "argu'),
    ("mistral", '[TOOL_CALLS] [{"name": "f", "arguments": {}'),
    ("mistral", "[TOOL_CALLS]Sorry, I cannot."),
    ("mistral", "[TOOL_CALLS]f[ARGS]not json"),
    (
        "deepseek_v3",
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{",
    ),
    ("deepseek_v3", "<｜tool▁calls▁begin｜>oops<｜tool▁calls▁end｜>"),
    ("harmony", 'assistant<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"a"'),
    ("harmony", "assistant<|channel|>final<|message|>plain"),
    ("hermes", "No tools needed: the answer is 42."),
    ("hermes", "Ends in a partial marker <tool_c"),
]


def _pairs(calls: list[ToolCall]) -> list[tuple[str, str]]:
    return [(c.name, c.arguments) for c in calls]


def _streamed(parser: ToolParser, pieces: list[str]) -> tuple[str | None, list[ToolCall]]:
    stream = ToolCallStream(parser)
    content, calls = "", []
    for piece in pieces:
        text, found = stream.feed(piece)
        content += text
        calls += found
    text, found = stream.finish()
    return stream.content(content + text), calls + found


@pytest.mark.parametrize("name,text,content,calls", CASES)
def test_parsers_read_calls_and_the_text_around_them(
    name: str, text: str, content: str | None, calls: list[tuple[str, str]]
) -> None:
    parsed_content, parsed = get_parser(name).parse(text)
    assert parsed_content == content
    assert [(c.name, json.loads(c.arguments)) for c in parsed] == [
        (n, json.loads(a)) for n, a in calls
    ]
    if name == "mistral":  # its templates take 9 letters and digits back, nothing else
        assert all(len(c.id) == 9 and c.id.isalnum() for c in parsed)
    else:
        assert all(c.id.startswith("call_") and len(c.id) == 29 for c in parsed)
    assert len({c.id for c in parsed}) == len(parsed)


@pytest.mark.parametrize("name,text", MALFORMED)
def test_malformed_calls_stay_content(name: str, text: str) -> None:
    assert get_parser(name).parse(text) == (text, [])


@pytest.mark.parametrize("name,text", [(c[0], c[1]) for c in CASES] + MALFORMED)
def test_streams_reassemble_to_the_whole_parse_at_every_boundary(name: str, text: str) -> None:
    parser = get_parser(name)
    content, calls = parser.parse(text)
    want = (content, _pairs(calls))
    assert (lambda r: (r[0], _pairs(r[1])))(_streamed(parser, list(text))) == want
    for k in range(1, len(text)):
        got = _streamed(parser, [text[:k], text[k:]])
        assert (got[0], _pairs(got[1])) == want, k


def test_content_streams_before_the_call_and_no_markup_leaks() -> None:
    stream = ToolCallStream(get_parser("hermes"))
    assert stream.feed("Let me ") == ("Let me", [])  # the space may touch a call: held
    assert stream.feed("check <tool") == (" check", [])
    assert stream.feed('_call>{"name": "f", ') == ("", [])
    text, calls = stream.feed('"arguments": {"x": 1}}</tool_call>')
    assert text == "" and _pairs(calls) == [("f", '{"x": 1}')]
    assert stream.finish() == ("", [])


def test_the_parser_is_chosen_from_the_checkpoint(tmp_path: Path) -> None:
    assert set(PARSERS) == {"hermes", "mistral", "deepseek_v3", "harmony"}
    assert detect_parser("gpt_oss", None) == "harmony"
    write_harmony_tokenizer(tmp_path / "h")
    (tmp_path / "h" / "chat_template.jinja").write_text("{{ '<|start|>assistant' }}")
    assert detect_parser("mixtral", Tokenizer.from_dir(tmp_path / "h")) is None
    (tmp_path / "h" / "chat_template.jinja").write_text("<|channel|>final<|message|>")
    assert detect_parser("mixtral", Tokenizer.from_dir(tmp_path / "h")) == "harmony"
    for marker, want in [
        ("<tool_call>", "hermes"),
        ("[TOOL_CALLS]", "mistral"),
        ("<｜tool▁calls▁begin｜>", "deepseek_v3"),
        ("plain", None),
        ("<tool_call>x<arg_key>", None),  # GLM-4.5: tags, not Hermes' JSON
    ]:
        write_test_tokenizer(tmp_path / "t")
        (tmp_path / "t" / "chat_template.jinja").write_text(f"{{{{ '{marker}' }}}}")
        assert detect_parser("qwen3_moe", Tokenizer.from_dir(tmp_path / "t")) == want, marker
    with pytest.raises(ValueError, match="unknown tool-call parser 'nope'; known: deepseek_v3"):
        get_parser("nope")
