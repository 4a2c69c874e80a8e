"""Test tokenizers with reasoning markers: harmony's special tokens (gpt-oss) with a
harmony-style ``chat_template.jinja``, and ``<think>``/``</think>`` (Qwen3-style)."""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers

from tests.tokenizer_fixture import build_test_tokenizer

HARMONY_SPECIALS = [
    "<|start|>",
    "<|channel|>",
    "<|message|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|constrain|>",
]

# A condensed gpt-oss template: the system message (with reasoning_effort, as gpt-oss's
# reads it), a developer message from a system/developer turn, earlier turns on the final
# channel, and the generation prompt `<|start|>assistant`.
HARMONY_TEMPLATE = """{#- A condensed gpt-oss (harmony) chat template #}
{{- "<|start|>system<|message|>You are a test model.\\nReasoning: " }}
{{- reasoning_effort if reasoning_effort is defined else "medium" }}
{{- "\\n\\n# Valid channels: analysis, commentary, final.<|end|>" }}
{%- if messages[0].role in ["developer", "system"] %}
    {{- "<|start|>developer<|message|># Instructions\\n\\n" + messages[0].content + "<|end|>" }}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if message.role == "assistant" %}
        {{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|end|>" }}
    {%- else %}
        {{- "<|start|>" + message.role + "<|message|>" + message.content + "<|end|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- "<|start|>assistant" }}
{%- endif %}"""

# Qwen3-like: the thinking switch renders an empty think block into the prompt.
THINK_TEMPLATE = """{%- for message in messages %}
    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""


def _write(path: Path, added: list[str], special: bool, config: dict[str, object]) -> int:
    path.mkdir(parents=True, exist_ok=True)
    tok: tokenizers.Tokenizer = build_test_tokenizer()
    tok.add_tokens([tokenizers.AddedToken(t, special=special) for t in added])
    tok.save(str(path / "tokenizer.json"), pretty=False)
    base = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    (path / "tokenizer_config.json").write_text(json.dumps({**base, **config}, indent=2))
    return tok.get_vocab_size(with_added_tokens=True)


def write_harmony_tokenizer(path: Path) -> int:
    """tokenizer.json with harmony's special tokens, tokenizer_config.json without a template
    and the template in chat_template.jinja (as gpt-oss ships it); returns the vocab size."""
    config = {"bos_token": "<s>", "eos_token": "<|return|>", "pad_token": "<pad>"}
    vocab = _write(path, HARMONY_SPECIALS, True, config)
    (path / "chat_template.jinja").write_text(HARMONY_TEMPLATE)
    return vocab


def write_think_tokenizer(path: Path) -> int:
    """<think> and </think> as added, non-special tokens (as Qwen3 has them)."""
    config = {"eos_token": "</s>", "chat_template": THINK_TEMPLATE}
    return _write(path, ["<think>", "</think>", "<|im_start|>", "<|im_end|>"], False, config)
