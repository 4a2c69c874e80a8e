"""A tiny Llama/Mixtral-like byte-level BPE tokenizer, trained in the test (no download).

``write_test_tokenizer(path)`` writes ``tokenizer.json`` + ``tokenizer_config.json`` that load
in ``moeserve.tokenizer.Tokenizer.from_dir`` and in transformers' ``AutoTokenizer``; the
files are the same on every run.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_TARGET = 384
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, Llama order

# Mixtral's template, spread over lines so trim_blocks/lstrip_blocks matter, plus a system
# role. Like Mixtral's, it has no generation prompt: "[/INST]" already asks for the answer.
CHAT_TEMPLATE = """{{ bos_token }}
{%- for message in messages %}
    {% if message['role'] == 'system' %}
[SYS] {{ message['content'] }} [/SYS]
    {% elif message['role'] == 'user' %}
        {% if loop.index0 > 0 and messages[loop.index0 - 1]['role'] == 'user' %}
            {{ raise_exception('Conversation roles must alternate user/assistant') }}
        {% endif %}
[INST] {{ message['content'] }} [/INST]
    {%- elif message['role'] == 'assistant' %}
 {{ message['content'] }}{{ eos_token }}
    {% else %}
        {{ raise_exception('Only system, user and assistant roles are supported!') }}
    {% endif %}
{% endfor %}"""

# A Qwen2.5-like template with tools: namespace, tojson (with indent), strftime_now,
# loop controls, `is defined` and a variable rebound inside a loop.
TOOL_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant. Year: ' }}
        {{- strftime_now('%Y') + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(n_tool=0) %}
{%- for message in messages %}
    {%- set plain = message.role == "assistant" and not message.tool_calls %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) or plain %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- set ns.n_tool = ns.n_tool + 1 %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
{%- for m in messages %}
    {%- if m.role != 'tool' %}{% continue %}{% endif %}
    {{- m | tojson(indent=2) }}
{%- endfor %}"""

_CORPUS_LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture of experts models route each token to a few experts.",
    "The server keeps the experts in a cache and fetches the missing ones.",
    "Hello, world! How are you today? I am fine, thank you.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159 -7 1e-5",
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "Once upon a time there was a little model that could.",
    "def main():\n    print('hello')\n    return 0\n",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber gro\u00df se\u00f1or",
    "\u65e5\u672c\u8a9e\u306e\u6587\u7ae0\u3067\u3059\u3002\u4e2d\u6587\u4e5f\u53ef\u4ee5\u3002",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440!",
    "\u0393\u03b5\u03b9\u03ac \u03c3\u03bf\u03c5",
    "Emoji: \U0001f600 \U0001f680 \U0001f44d\U0001f3fd \u2764\ufe0f \U0001f1eb\U0001f1f7",
    "[INST] What is the answer? [/INST] The answer is 42.</s>",
]


def _corpus() -> list[str]:
    # Repeats give the frequent English pairs enough weight to be merged first.
    return [line for line in _CORPUS_LINES for _ in range(3)]


def build_test_tokenizer() -> Tokenizer:
    """Train the fixture tokenizer in memory (deterministic, a few milliseconds)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", bos_id)]
    )
    return tok


def write_test_tokenizer(path: Path, *, chat_template: bool = True) -> int:
    """Write tokenizer.json and tokenizer_config.json into ``path``; return the vocab size."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_test_tokenizer()
    tok.save(str(path / "tokenizer.json"), pretty=False)
    config: dict[str, object] = {
        # The generic class: transformers then uses tokenizer.json as written (a
        # model-specific class such as LlamaTokenizer would rebuild its own pipeline).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
    }
    if chat_template:
        config["chat_template"] = CHAT_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tok.get_vocab_size(with_added_tokens=True)
