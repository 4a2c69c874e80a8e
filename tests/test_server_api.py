"""The OpenAI-compatible API against a real uvicorn server: the openai client and raw SSE."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from moeserve import LLM, SamplingParams
from tests.server_fixture import (
    MODEL_NAME,
    RunningServer,
    build_checkpoint,
    serving,
    sse_events,
    wait_for,
)

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def srv(ckpt: Path) -> Iterator[RunningServer]:
    yield from serving(ckpt)


@pytest.fixture(scope="module")
def client(srv: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def offline(ckpt: Path) -> LLM:
    return LLM(ckpt, progress=False, block_size=4, max_model_len=128)


def test_models_health_ready_metrics(srv: RunningServer, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    http = srv.client()
    assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/ready").status_code == 200
    client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2)
    metrics = http.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    for name in (
        "moeserve_generation_tokens_total",
        "moeserve_expert_tokens_total",
        "moeserve_request_success_total",
        "moeserve_kv_cache_usage_perc",
    ):
        assert name in metrics.text


def test_completion_matches_offline_greedy(client: openai.OpenAI, offline: LLM) -> None:
    ids = [1, 17, 42, 99, 7]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    want = offline.generate([PROMPT, ids], params)
    for prompt, ref in zip([PROMPT, ids], want):
        r = client.completions.create(
            model=MODEL_NAME,
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert r.id.startswith("cmpl-") and r.object == "text_completion"
        assert r.model == MODEL_NAME
        assert r.choices[0].text == ref.outputs[0].text
        assert r.choices[0].finish_reason == "length"
        assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert r.usage.completion_tokens == 12
        assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_batch_times_n_indices_and_seed(client: openai.OpenAI) -> None:
    prompts = ["Hello", "Once upon a time", "Numbers: 1 2"]
    kw = dict(
        model=MODEL_NAME,
        prompt=prompts,
        n=2,
        max_tokens=6,
        temperature=1.0,
        seed=7,
        extra_body={"ignore_eos": True},
    )
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == list(range(6))
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # same seed, same text
    assert a.usage.completion_tokens == 36
    # choice p*n+i belongs to prompt p: the single-prompt request reproduces it
    single = client.completions.create(**{**kw, "prompt": prompts[1]})
    assert [c.text for c in single.choices] == [c.text for c in a.choices[2:4]]
    other = client.completions.create(**{**kw, "seed": 8})
    assert [c.text for c in other.choices] != [c.text for c in a.choices]


def test_stop_string_and_max_tokens_default(client: openai.OpenAI) -> None:
    base = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT,
        max_tokens=16,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    text = base.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT,
        max_tokens=16,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    # no max_tokens: the rest of the context (max_model_len 128)
    rest = client.completions.create(
        model=MODEL_NAME, prompt=[5, 6, 7], temperature=0, extra_body={"ignore_eos": True}
    )
    assert rest.usage.completion_tokens == 128 - 3
    assert rest.choices[0].finish_reason == "length"


def test_logprobs_and_echo(client: openai.OpenAI, offline: LLM) -> None:
    kw = dict(
        model=MODEL_NAME,
        prompt=PROMPT,
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    r = client.completions.create(**kw, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    ref = offline.generate(
        PROMPT, SamplingParams(max_tokens=5, temperature=0, logprobs=3, ignore_eos=True)
    )[0].outputs[0]
    assert lp.token_logprobs == pytest.approx([e.logprob for e in ref.logprobs], abs=1e-4)
    for top, tok, chosen in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs):
        assert 3 <= len(top) <= 4 and top[tok] == pytest.approx(chosen)
    echo = client.completions.create(**kw, echo=True)
    assert echo.choices[0].text == PROMPT + r.choices[0].text


def test_streaming_completion_with_usage(srv: RunningServer, client: openai.OpenAI) -> None:
    kw = dict(
        model=MODEL_NAME,
        prompt=["Hello", "Once upon"],
        n=2,
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    full = client.completions.create(**kw)
    chunks = list(
        client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    texts = ["", "", "", ""]
    reasons: dict[int, str] = {}
    for ch in chunks[:-1]:
        assert len(ch.choices) == 1 and ch.usage is None
        texts[ch.choices[0].index] += ch.choices[0].text
        if ch.choices[0].finish_reason:
            reasons[ch.choices[0].index] = ch.choices[0].finish_reason
    assert texts == [c.text for c in full.choices]
    assert reasons == {i: "length" for i in range(4)}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 32
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    # the raw framing: data: {json}\n\n ... data: [DONE]\n\n
    body = {"prompt": "Hi", "max_tokens": 3, "stream": True, "logprobs": 1, "echo": False}
    with srv.client().stream("POST", "/v1/completions", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    assert raw.endswith("data: [DONE]\n\n") and "\n\n\n" not in raw
    events = sse_events(iter(raw.split("\n")))
    assert events[-1] == "[DONE]"
    assert sum(len(e["choices"][0]["logprobs"]["tokens"]) for e in events[:-1]) == 3


def test_chat_completion_logprobs(client: openai.OpenAI, offline: LLM) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=messages,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    # the prompt is the chat template's text, tokenised without a second BOS
    tok = offline.tokenizer
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    ref = offline.generate(ids, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert choice.message.content == ref[0].outputs[0].text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 6
    content = choice.logprobs.content
    assert len(content) == 6
    for entry in content:
        assert len(entry.top_logprobs) == 2
        # a token that is part of a UTF-8 character has no text alone: token_id:N, no bytes
        assert entry.bytes == (
            None if entry.token.startswith("token_id:") else list(entry.token.encode())
        )
        assert entry.logprob <= 0
    # max_completion_tokens wins over max_tokens
    r2 = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=6, max_completion_tokens=3, temperature=0
    )
    assert r2.usage.completion_tokens <= 3


def test_chat_streaming_role_content_finish(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]
    kw = dict(
        model=MODEL_NAME,
        messages=messages,
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    full = client.chat.completions.create(**kw)
    usage_on = {"include_usage": True}
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options=usage_on))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == full.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_async_client_concurrent(srv: RunningServer) -> None:
    async def main() -> list[str]:
        async with openai.AsyncOpenAI(
            base_url=srv.url + "/v1", api_key="x", max_retries=0
        ) as aclient:

            async def one(i: int) -> str:
                r = await aclient.completions.create(
                    model=MODEL_NAME, prompt=f"Hello {i}", max_tokens=5, temperature=0
                )
                return r.choices[0].text

            async def streamed(i: int) -> str:
                text = ""
                stream = await aclient.chat.completions.create(
                    model=MODEL_NAME,
                    messages=[{"role": "user", "content": f"Hi {i}"}],
                    max_tokens=5,
                    temperature=0,
                    stream=True,
                )
                async for chunk in stream:
                    text += chunk.choices[0].delta.content or "" if chunk.choices else ""
                return text

            return await asyncio.gather(
                *(one(i) for i in range(6)), *(streamed(i) for i in range(6))
            )

    results = asyncio.run(main())
    assert len(results) == 12
    srv.wait_idle()


def test_output_neutral_fields_accepted_and_one_log_line_without_prompt(
    srv: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "my secret prompt text"
    with caplog.at_level(logging.INFO, logger="moeserve.server"):
        body = {
            "prompt": secret,
            "max_tokens": 2,
            "user": "u1",
            "metadata": {"k": "v"},
            "store": False,
            "service_tier": "auto",
        }
        r = srv.client().post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        rid = r.json()["id"]
        wait_for(lambda: any(rid in rec.getMessage() for rec in caplog.records), 5, "log line")
    lines = [rec.getMessage() for rec in caplog.records if rid in rec.getMessage()]
    assert len(lines) == 1
    assert " 200 " in lines[0] and "completion_tokens=2" in lines[0] and lines[0].endswith("s")
    assert all(secret not in rec.getMessage() for rec in caplog.records)


@pytest.mark.parametrize("text", ["", "plain", 'quo"te\\back\nnew', "ünï ✓ 😀", None])
@pytest.mark.parametrize("reason", [None, "stop", "length"])
def test_chunk_template_renders_what_pydantic_would(text: str | None, reason: str | None) -> None:
    """The fast streaming chunks are byte-for-byte the models' own JSON."""
    from moeserve.server.protocol import (
        ChatCompletionChunk,
        ChatStreamChoice,
        CompletionChoice,
        CompletionResponse,
        DeltaMessage,
    )
    from moeserve.server.streaming import ChunkTemplate, sse

    head = {"id": "cmpl-1", "created": 1700000000, "model": 'm"odel'}
    comp = ChunkTemplate({"id": head["id"], "object": "text_completion", **head}, "text")
    want = CompletionResponse(
        **head, choices=[CompletionChoice(index=3, text=text or "", finish_reason=reason)]
    )
    assert comp.render(3, text or "", reason) == sse(want.model_dump(exclude={"usage"}))
    chat = ChunkTemplate({"id": head["id"], "object": "chat.completion.chunk", **head}, "delta")
    delta = DeltaMessage() if text is None else DeltaMessage(content=text)
    want_chat = ChatCompletionChunk(
        **head, choices=[ChatStreamChoice(index=1, delta=delta, finish_reason=reason)]
    )
    assert chat.render(1, text, reason) == sse(want_chat.model_dump(exclude={"usage"}))
