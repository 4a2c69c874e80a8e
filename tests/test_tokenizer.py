"""Tokenizer (against transformers), chat templates (and their sandbox), incremental
detokenization and stop strings, on the fixture tokenizer built in tests/tokenizer_fixture."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from moeserve.detokenizer import IncrementalDetokenizer
from moeserve.tokenizer import Tokenizer
from tests.tokenizer_fixture import CHAT_TEMPLATE, TOOL_CHAT_TEMPLATE, write_test_tokenizer

TEXTS = [
    "Hello, world!",
    "The capital of France is Paris.",
    "  leading and trailing spaces  ",
    "Numbers 3.14159 and 2024, emoji \U0001f600\U0001f680 and \u65e5\u672c\u8a9e.",
    "Caf\u00e9 na\u00efve \u00fcber \u041f\u0440\u0438\u0432\u0435\u0442\n\ttabs\r\n",
    "<s> literal special tokens </s> inside text",
    "",
]
CHATS = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And Japan? \U0001f5fe"},
    ],
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    write_test_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def test_fixture_is_deterministic(tmp_path: Path) -> None:
    sizes = [write_test_tokenizer(tmp_path / name) for name in ("a", "b")]
    assert sizes[0] == sizes[1] and 300 <= sizes[0] <= 400
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_encode_decode_match_transformers(tok: Tokenizer, hf: Any) -> None:
    rng = random.Random(0)
    alphabet = "ab c.\u00e9\u65e5\U0001f600 </s>"
    texts = TEXTS + ["".join(rng.choices(alphabet, k=rng.randint(1, 30))) for _ in range(50)]
    for text in texts:
        assert tok.encode(text) == hf(text)["input_ids"], text
        assert (
            tok.encode(text, add_special_tokens=False)
            == hf(text, add_special_tokens=False)["input_ids"]
        )
        ids = tok.encode(text)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids)
    assert tok.encode("x")[0] == tok.bos_token_id == hf.bos_token_id
    assert tok.eos_token_id == hf.eos_token_id
    assert tok.vocab_size == len(hf)
    assert tok.all_special_ids == set(hf.all_special_ids)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    tok: Tokenizer, hf: Any, add_generation_prompt: bool
) -> None:
    for chat in CHATS:
        ours = tok.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
        theirs = hf.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert ours == theirs
    assert tok.chat_template == CHAT_TEMPLATE


def test_continue_final_message_matches_transformers(
    tok: Tokenizer, hf: Any, tmp_path: Path
) -> None:
    """The prompt ends inside the last message, as transformers cuts it: with this fixture's
    template and Qwen3's (spaces around the message kept or trimmed by the template)."""
    from tests.tool_templates import QWEN3

    transformers = pytest.importorskip("transformers")
    write_test_tokenizer(tmp_path, chat_template=False)
    (tmp_path / "chat_template.jinja").write_text(QWEN3)
    qwen = (Tokenizer.from_dir(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path))
    prefix = [{"role": "user", "content": "Capital of France?"}]
    for ours, theirs in ((tok, hf), qwen):
        for final in ("The capital is", "It is  ", " Paris,"):
            chat = [*prefix, {"role": "assistant", "content": final}]
            got = ours.apply_chat_template(
                chat, add_generation_prompt=False, continue_final_message=True
            )
            want = theirs.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=False, continue_final_message=True
            )
            assert got == want
            assert got.rstrip().endswith(("is", "Paris,"))
    with pytest.raises(ValueError, match="add_generation_prompt false"):
        tok.apply_chat_template(CHATS[1], continue_final_message=True)
    with pytest.raises(ValueError, match="text to continue"):
        tok.apply_chat_template(
            [*prefix, {"role": "assistant", "content": " "}],
            add_generation_prompt=False,
            continue_final_message=True,
        )


def test_chat_template_raise_exception_and_missing(tok: Tokenizer, tmp_path: Path) -> None:
    bad_roles = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ValueError, match="roles must alternate"):
        tok.apply_chat_template(bad_roles)
    write_test_tokenizer(tmp_path, chat_template=False)
    with pytest.raises(ValueError, match="has no chat_template"):
        Tokenizer.from_dir(tmp_path).apply_chat_template(CHATS[0])


TOOL_CHATS = [
    [{"role": "user", "content": "<b>\u00e9 & \U0001f600</b>", "name": None}],
    [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "w", "arguments": {"c": 1}}}],
        },
        {"role": "tool", "content": "22C"},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is 22C."},
    ],
]
TOOLS = [{"type": "function", "function": {"name": "w", "description": '<now> & "later"'}}]


def test_jinja_file_and_named_templates_match_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    write_test_tokenizer(tmp_path, chat_template=False)
    (tmp_path / "chat_template.jinja").write_text(TOOL_CHAT_TEMPLATE)
    ours = Tokenizer.from_dir(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for chat in TOOL_CHATS:
        for tools in (None, TOOLS):
            for gen in (True, False):
                rendered = ours.apply_chat_template(chat, add_generation_prompt=gen, tools=tools)
                expected = hf.apply_chat_template(
                    chat, add_generation_prompt=gen, tools=tools, tokenize=False
                )
                assert rendered == expected
    assert "null" not in rendered and '"<now> & \\"later\\""' in rendered  # HF's tojson

    (tmp_path / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {
            "name": "default",
            "template": "D{{ messages | length }}{% generation %}!{% endgeneration %}",
        },
        {"name": "tool_use", "template": "T{{ tools | length }}"},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    named = Tokenizer.from_dir(tmp_path)
    assert named.apply_chat_template(TOOL_CHATS[1]) == "D6!"
    assert named.apply_chat_template(TOOL_CHATS[1], tools=TOOLS) == "T1"


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__ }}",
        "{{ raise_exception.__globals__ }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{{ 'x' * 1000000000 }}",
        "{{ [1] * 1000000000 }}",
        "{{ 2 ** (10 ** 10) }}",
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}{{ ns.s | length }}",
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "{% if %}",
        "{{ messages[0]['role'].format.__globals__ }}",
    ],
)
def test_malicious_or_runaway_templates_are_refused(tok_dir: Path, template: str) -> None:
    tok = Tokenizer.from_dir(tok_dir)
    tok._templates["default"] = template  # as if the model directory shipped it
    with pytest.raises(ValueError, match="chat template failed"):
        tok.apply_chat_template(CHATS[0])
    assert tok.apply_chat_template is not None  # and the tokenizer stays usable
    tok._templates["default"] = "{{ messages[0].content }}"
    assert tok.apply_chat_template(CHATS[0]) == "Hi"


def test_from_dir_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    write_test_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()  # optional: loads without it
    assert Tokenizer.from_dir(tmp_path).chat_template is None


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> tuple[list[str], bool]:
    """Feed ids one by one; the deltas (and flush) until a stop string fires."""
    deltas = []
    for t in ids:
        delta, stopped = detok.step([t])
        deltas.append(delta)
        if stopped:
            return deltas, True
    deltas.append(detok.flush())
    return deltas, False


def test_detokenizer_matches_decode_on_random_ids(tok: Tokenizer) -> None:
    rng = random.Random(1234)
    prompts = [tok.encode(t) for t in TEXTS]
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 40))]
        for skip in (True, False):
            detok = IncrementalDetokenizer(tok, rng.choice(prompts), skip_special_tokens=skip)
            deltas, stopped = stream(detok, ids)
            assert not stopped
            assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip) == detok.output_text


def test_multibyte_characters_are_never_split(tok: Tokenizer) -> None:
    text = " \U0001f600\U0001f680 \u65e5\u672c\u8a9e\u306e\u6587 \U0001f44d\U0001f3fd caf\u00e9"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # the small vocab really splits characters into bytes
    deltas, _ = stream(IncrementalDetokenizer(tok, tok.encode("Emoji:")), ids)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    # A sequence that ends inside a character: the partial character comes out at flush.
    cut = IncrementalDetokenizer(tok, [])
    assert "".join(stream(cut, ids[:2])[0]) == tok.decode(ids[:2])


def test_first_token_keeps_its_leading_space(tok: Tokenizer) -> None:
    prompt = tok.encode("The capital of France is")
    ids = tok.encode(" Paris.", add_special_tokens=False)
    deltas, _ = stream(IncrementalDetokenizer(tok, prompt), ids)
    assert deltas[0].startswith(" ") and "".join(deltas) == " Paris."


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_split_across_tokens(tok: Tokenizer, include: bool) -> None:
    ids = tok.encode("The answer is 42. Done and more", add_special_tokens=False)
    pieces = [tok.decode([t]) for t in ids]
    assert "42. Done" not in pieces  # the stop string spans several tokens
    detok = IncrementalDetokenizer(
        tok, tok.encode("Q:"), stop=["42. Done", "never"], include_stop_str_in_output=include
    )
    deltas, stopped = stream(detok, ids)
    expected = "The answer is 42. Done" if include else "The answer is "
    assert stopped and detok.stop_str == "42. Done"
    assert "".join(deltas) + detok.flush() == expected == detok.output_text
    assert detok.step(ids[:1]) == ("", True)  # finished: nothing more


@pytest.mark.parametrize("include", [False, True])
def test_streaming_never_emits_what_a_stop_string_takes_back(tok: Tokenizer, include: bool) -> None:
    rng = random.Random(7)
    hits = 0
    for _ in range(300):
        text = "".join(rng.choices(["a", "b", " ", "\u00e9", "ab", "ba"], k=rng.randint(1, 25)))
        stops = rng.sample(["abba", "bab", "\u00e9a", "aaa", "b b"], k=rng.randint(1, 3))
        ids = tok.encode(text, add_special_tokens=False)
        expected = reference_cut(tok, ids, stops, include)
        detok = IncrementalDetokenizer(tok, [], stop=stops, include_stop_str_in_output=include)
        emitted = ""
        for t in ids:
            delta, stopped = detok.step([t])
            emitted += delta
            # Never emitted and then taken back: always a prefix of the final output.
            assert expected.startswith(emitted), (text, stops, emitted)
            if stopped:
                break
        emitted += detok.flush()
        assert emitted == detok.output_text == expected
        hits += detok.stopped
    assert 50 < hits < 250  # both outcomes are well exercised


def reference_cut(tok: Tokenizer, ids: list[int], stops: list[str], include: bool) -> str:
    """The output text with stop strings, from full decodes of each prefix of ids."""
    for k in range(1, len(ids) + 1):
        text = tok.decode(ids[:k])
        hits = [(text.find(s), s) for s in stops if s in text]
        if hits:
            start, s = min(hits)
            return text[: start + len(s)] if include else text[:start]
    return tok.decode(ids)


def test_min_tokens_is_a_lower_bound() -> None:
    import random

    from moeserve.assets import model_or_demo
    from tests.tokenizer_fixture import build_test_tokenizer

    tok = Tokenizer(build_test_tokenizer())
    assert tok.bytes_per_token is not None
    rng = random.Random(0)
    texts = ["", "hello world", " " * 700, "x" * 5000, "é" * 900, "😀" * 300]
    texts += [
        "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(rng.randint(1, 3000)))
        for _ in range(20)
    ]
    for text in texts:
        assert tok.min_tokens(text) <= len(tok.encode(text, add_special_tokens=False))
    assert tok.min_tokens("x" * 90_000) >= 10_000  # and it bounds something
    # The demo's word-level vocabulary maps any unknown word to one token: no bound.
    assert Tokenizer.from_dir(model_or_demo(None)).min_tokens("x" * 10_000) == 0


def test_template_variables_are_what_the_templates_read() -> None:
    """The context variables a template reads (not those it sets), unparsable ones none."""
    from moeserve.chat_template import ChatTemplateRenderer

    env = ChatTemplateRenderer()
    src = (
        "{% set ns = namespace(x=1) %}{% for m in messages %}{{ m.content }}{% endfor %}"
        "{% if enable_thinking is defined %}{{ bos_token }}{% endif %}"
    )
    assert env.variables(src) == {"messages", "enable_thinking", "bos_token"}  # not globals
    assert env.variables("{% if %}") == frozenset()
