"""Reasoning formats: gpt-oss's harmony channels (and <think> blocks) split into
reasoning_content and content, by the splitter alone, through the output processor, and
through /v1/chat/completions with the model's output scripted."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from moeserve.engine.messages import EngineRequest
from moeserve.engine.output import OutputProcessor
from moeserve.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from moeserve.reasoning import SplitDetokenizer, reasoning_format
from moeserve.sampling_params import SamplingParams
from moeserve.tokenizer import Tokenizer
from tests.checkpoints import make_checkpoint
from tests.harmony_fixture import write_harmony_tokenizer, write_think_tokenizer
from tests.server_fixture import MODEL_NAME, RunningServer, assert_envelope, serving, sse_events
from tests.tokenizer_fixture import write_test_tokenizer

THINKING = "Let me think. Café 😀 ünï"
ANSWER = "The answer is 42. Paris!"
HARMONY_OUT = (
    f"<|channel|>analysis<|message|>{THINKING}<|end|>"
    f"<|start|>assistant<|channel|>final<|message|>{ANSWER}<|return|>"
)
TOOL_CALL = (
    "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>"
    'commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>'
)
USER = [{"role": "user", "content": "What is the answer?"}]


@pytest.fixture(scope="module")
def harmony(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = tmp_path_factory.mktemp("harmony")
    write_harmony_tokenizer(path)
    return Tokenizer.from_dir(path)


@pytest.fixture(scope="module")
def think(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = tmp_path_factory.mktemp("think")
    write_think_tokenizer(path)
    return Tokenizer.from_dir(path)


def _ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _prompt(tok: Tokenizer, **kwargs: Any) -> list[int]:
    return _ids(tok, tok.apply_chat_template(USER, **kwargs))


def _split(
    tok: Tokenizer, prompt: list[int], chunks: list[list[int]], stop: list[str] | None = None
) -> tuple[str, str]:
    fmt = reasoning_format(tok)
    assert fmt is not None
    d = SplitDetokenizer(fmt, tok, prompt, stop=stop or [], include_stop_str_in_output=False)
    content = reasoning = ""
    for chunk in chunks:
        content += d.step(chunk)[0]
        reasoning += d.take_reasoning()
    content += d.flush()
    return content, reasoning + d.take_reasoning()


def test_the_format_is_decided_from_the_tokenizer_and_template(
    harmony: Tokenizer, think: Tokenizer, tmp_path: Path
) -> None:
    fmt = reasoning_format(harmony)
    assert fmt is not None and fmt.kind == "harmony"
    assert harmony.chat_template is not None  # read from chat_template.jinja
    think_fmt = reasoning_format(think)
    assert think_fmt is not None and think_fmt.kind == "think"
    write_test_tokenizer(tmp_path / "plain")
    assert reasoning_format(Tokenizer.from_dir(tmp_path / "plain")) is None
    assert reasoning_format(None) is None
    # The harmony tokens without a template that writes channels: no split.
    write_harmony_tokenizer(tmp_path / "notemplate")
    (tmp_path / "notemplate" / "chat_template.jinja").write_text("{{ messages[0].content }}")
    assert reasoning_format(Tokenizer.from_dir(tmp_path / "notemplate")) is None


def test_harmony_splits_the_same_at_every_delta_boundary(harmony: Tokenizer) -> None:
    prompt, out = _prompt(harmony), _ids(harmony, HARMONY_OUT)
    assert _split(harmony, prompt, [out]) == (ANSWER, THINKING)
    assert _split(harmony, prompt, [[t] for t in out]) == (ANSWER, THINKING)
    for k in range(1, len(out)):
        assert _split(harmony, prompt, [out[:k], out[k:]]) == (ANSWER, THINKING), k
    # Cut before <|return|> (the engine ends there and never feeds it): the same.
    assert _split(harmony, prompt, [[t] for t in out[:-1]]) == (ANSWER, THINKING)


def test_harmony_channels_tool_calls_and_unformatted_output(harmony: Tokenizer) -> None:
    prompt = _prompt(harmony)
    # A commentary preamble is user-visible: content, as the final message is.
    preamble = "<|channel|>commentary<|message|>Checking. <|end|><|start|>assistant"
    out = _ids(harmony, preamble + "<|channel|>final<|message|>Done.<|return|>")
    assert _split(harmony, prompt, [[t] for t in out]) == ("Checking. Done.", "")
    # A tool call is returned raw (header and all) as content; nothing is invented.
    content, reasoning = _split(harmony, prompt, [[t] for t in _ids(harmony, TOOL_CALL)])
    assert reasoning == "Need the weather."
    assert content == (
        "assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
        '<|message|>{"city":"Paris"}'
    )
    # A model that ignores the format: its text comes back as content when it ends.
    assert _split(harmony, prompt, [_ids(harmony, "Just text.")]) == ("Just text.", "")
    # Cut off while reasoning: the reasoning so far, no content.
    partial = _ids(harmony, f"<|channel|>analysis<|message|>{THINKING}")
    assert _split(harmony, prompt, [[t] for t in partial]) == ("", THINKING)


def test_think_blocks_split_from_the_prompts_state(think: Tokenizer) -> None:
    out = _ids(think, "<think>I reason.</think>\n\nAnswer.")
    prompt = _prompt(think)
    for k in range(1, len(out)):
        assert _split(think, prompt, [out[:k], out[k:]]) == ("\n\nAnswer.", "I reason."), k
    # The generation prompt opened the block: the output starts inside it.
    opened = prompt + _ids(think, "<think>\n")
    assert _split(think, opened, [_ids(think, "Hmm.</think>Yes.")]) == ("Yes.", "Hmm.")
    # Thinking switched off: the prompt closed the block; all content.
    closed = _prompt(think, enable_thinking=False)
    assert _split(think, closed, [_ids(think, "Yes.")]) == ("Yes.", "")


class _Core:
    def __init__(self) -> None:
        self.finished: list[tuple[str, int, str]] = []

    def finish_seq(self, request_id: str, index: int, reason: str) -> RequestMetrics | None:
        self.finished.append((request_id, index, reason))
        return RequestMetrics(arrival_time=0.0)


def _process(
    tok: Tokenizer, out: list[int], params: SamplingParams, split: bool = True
) -> tuple[CompletionOutput, _Core]:
    """Drive the output processor one token per step, as the core hands them out."""
    core = _Core()
    proc = OutputProcessor(tok, core)
    proc.add(EngineRequest("r", _prompt(tok), params, split_reasoning=split))
    merged = CompletionOutput(index=0)
    end = _ids(tok, "<|return|>")[0]
    for i, t in enumerate(out):
        last = i == len(out) - 1
        delta = CompletionOutput(index=0, token_ids=[t])
        if last:  # the scheduler's decision: EOS is a stop token, else max_tokens
            delta.finish_reason, delta.stop_reason = ("stop", t) if t == end else ("length", None)
        proc.process([RequestOutput("r", [], [delta], finished=last)], None)
        merged.merge(delta)
        if merged.finish_reason is not None:
            break
    return merged, core


def test_output_processor_applies_stop_strings_to_the_content(harmony: Tokenizer) -> None:
    out = _ids(harmony, HARMONY_OUT)
    # "think" is in the reasoning only: it does not stop; "42" stops the answer.
    o, core = _process(harmony, out, SamplingParams(max_tokens=99, stop=["think", "42"]))
    assert (o.reasoning_text, o.text) == (THINKING, "The answer is ")
    assert (o.finish_reason, o.stop_reason) == ("stop", "42") and core.finished == [
        ("r", 0, "stop")
    ]
    o, _ = _process(harmony, out, SamplingParams(max_tokens=99))
    assert (o.reasoning_text, o.text, o.finish_reason) == (THINKING, ANSWER, "stop")
    assert len(o.token_ids) == len(out)  # every token counts, markers included
    # Without the split (completions, skip_special_tokens=false): the plain detokenizer.
    o, _ = _process(harmony, out, SamplingParams(max_tokens=99, skip_special_tokens=False), False)
    assert o.reasoning_text == "" and o.text == HARMONY_OUT.removesuffix("<|return|>")


# ------------------------------------------------------------------ through the server
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("srv") / "harmony"
    make_checkpoint(path, "mixtral", tokenizer=True, vocab_size=400)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).unlink()
    write_harmony_tokenizer(path)
    tok = Tokenizer.from_dir(path)
    ends = [_ids(tok, t)[0] for t in ("<|return|>", "<|call|>")]  # as gpt-oss's lists them
    gen = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": ends}))
    return path


class _Script:
    """Makes the model emit `tokens` (then their last one again): the real scheduler, sampler,
    output processor and server around an executor whose logits name the scripted token
    (no forward pass: the split, not the model, is under test here)."""

    def __init__(self, srv: RunningServer) -> None:
        self.tokens: list[int] = []
        self.prompts: list[list[int]] = []
        vocab = srv.engine.vocab_size

        def execute(
            work: Any, feed: Any = None, prompt: Any = None
        ) -> tuple[torch.Tensor, list[int]]:
            rows = [i for i, w in enumerate(work) if w.sample]
            logits = torch.full((len(rows), vocab), -30.0)
            for r, i in enumerate(rows):
                seq = work[i].seq
                if seq.num_output_tokens == 0:
                    self.prompts.append(list(seq.prompt_ids))
                logits[r, self.tokens[min(seq.num_output_tokens, len(self.tokens) - 1)]] = 30.0
            return logits, rows

        srv.engine.executor.execute = execute


@pytest.fixture(scope="module")
def srv(ckpt: Path) -> Iterator[RunningServer]:
    yield from serving(ckpt, max_model_len=256)


@pytest.fixture(scope="module")
def script(srv: RunningServer) -> _Script:
    return _Script(srv)


@pytest.fixture(scope="module")
def tok(ckpt: Path) -> Tokenizer:
    return Tokenizer.from_dir(ckpt)


def _chat(srv: RunningServer, **body: Any) -> Any:
    r = srv.client().post("/v1/chat/completions", json={"messages": USER, **body})
    return r


def test_chat_returns_reasoning_content_and_content(
    srv: RunningServer, script: _Script, tok: Tokenizer
) -> None:
    script.tokens = _ids(tok, HARMONY_OUT)
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model=MODEL_NAME, messages=USER, n=2)  # type: ignore[arg-type]
    assert r.object == "chat.completion" and len(r.choices) == 2
    for choice in r.choices:
        assert choice.message.content == ANSWER and choice.finish_reason == "stop"
        assert choice.message.role == "assistant"
        assert getattr(choice.message, "reasoning_content", None) == THINKING
    assert r.usage is not None and r.usage.completion_tokens == 2 * len(script.tokens)
    assert script.prompts[-1] == _prompt(tok)  # the chat_template.jinja prompt
    # The returned message, reasoning_content and all, can be sent back in the next turn.
    turn = [*USER, r.choices[0].message, {"role": "user", "content": "Sure?"}]
    again = client.chat.completions.create(model=MODEL_NAME, messages=turn)  # type: ignore[arg-type]
    assert again.choices[0].message.content == ANSWER
    assert tok.decode(script.prompts[-1], skip_special_tokens=False).endswith(
        f"<|channel|>final<|message|>{ANSWER}<|end|><|start|>user<|message|>Sure?<|end|>"
        "<|start|>assistant"
    )
    # Logprobs cover every generated token, markers included; a stop string cuts content.
    body = _chat(srv, logprobs=True, stop=["think", "is 4"]).json()
    choice = body["choices"][0]
    assert choice["message"] == {
        "role": "assistant",
        "content": "The answer ",
        "reasoning_content": THINKING,
    }
    assert choice["finish_reason"] == "stop"
    assert len(choice["logprobs"]["content"]) == body["usage"]["completion_tokens"]
    assert choice["logprobs"]["content"][0]["token"] == "<|channel|>"
    # Cut off while reasoning: no answer yet; finish_reason length.
    body = _chat(srv, max_tokens=9).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == ""
    assert THINKING.startswith(body["choices"][0]["message"]["reasoning_content"])
    # skip_special_tokens=false: the raw output as content, no split.
    body = _chat(srv, skip_special_tokens=False).json()
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": HARMONY_OUT.removesuffix("<|return|>"),
    }


@pytest.mark.parametrize("logprobs", [False, True])
def test_streamed_chat_sends_reasoning_content_deltas(
    srv: RunningServer, script: _Script, tok: Tokenizer, logprobs: bool
) -> None:
    script.tokens = _ids(tok, HARMONY_OUT)
    body = {"stream": True, "stream_options": {"include_usage": True}, "logprobs": logprobs}
    with srv.client().stream("POST", "/v1/chat/completions", json={"messages": USER, **body}) as r:
        assert r.status_code == 200
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-1]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == THINKING
    assert "".join(d.get("content", "") for d in deltas) == ANSWER
    first_content = next(i for i, d in enumerate(deltas) if d.get("content"))
    # Tokens that arrive together may end the reasoning and start the answer in one chunk;
    # after that chunk, no reasoning.
    assert all("reasoning_content" not in d for d in deltas[first_content + 1 :])
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == len(script.tokens)
    if logprobs:
        n = sum(len(c["choices"][0]["logprobs"]["content"]) for c in chunks[1:-2])
        assert n == len(script.tokens)


def test_reasoning_effort_reaches_the_template_or_is_refused(
    srv: RunningServer, script: _Script, tok: Tokenizer
) -> None:
    script.tokens = _ids(tok, HARMONY_OUT)
    assert _chat(srv, reasoning_effort="high").status_code == 200
    assert "Reasoning: high\n" in tok.decode(script.prompts[-1], skip_special_tokens=False)
    assert_envelope(_chat(srv, reasoning_effort="extreme"), 400, "reasoning_effort")


def test_tool_calls_without_tools_come_back_as_text(
    srv: RunningServer, script: _Script, tok: Tokenizer
) -> None:
    script.tokens = _ids(tok, TOOL_CALL)
    body = _chat(srv).json()
    message = body["choices"][0]["message"]
    assert message["reasoning_content"] == "Need the weather."
    assert message["content"].endswith(
        'to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}'
    )
    assert "tool_calls" not in message and body["choices"][0]["finish_reason"] == "stop"
    # With tools they become tool_calls (tests/test_tool_calls.py); other tool types: 400.
    assert_envelope(_chat(srv, tools=[{"type": "web_search"}]), 400, "tools")


def test_messages_without_the_split_keep_openais_shape() -> None:
    from moeserve.server.protocol import (
        ChatCompletionChunk,
        ChatResponseMessage,
        ChatStreamChoice,
        DeltaMessage,
    )
    from moeserve.server.streaming import ChunkTemplate, sse

    assert ChatResponseMessage(content="x").model_dump() == {"role": "assistant", "content": "x"}
    split = ChatResponseMessage(content="x", reasoning_content=None).model_dump()
    assert split == {"role": "assistant", "content": "x", "reasoning_content": None}
    head = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    want = ChatCompletionChunk(
        **head,
        choices=[ChatStreamChoice(index=2, delta=DeltaMessage(reasoning_content='ü"\n'))],
    )
    rendered = ChunkTemplate(head, "delta").render(2, 'ü"\n', None, "reasoning_content")
    assert rendered == sse(want.model_dump(exclude={"usage"}))
