"""Every bad input gets its status and the OpenAI envelope, and the server keeps serving."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.server_fixture import (
    MODEL_NAME,
    RunningServer,
    assert_envelope,
    build_checkpoint,
    serving,
    start_server,
    wait_for,
)

OK_COMPLETION = {"prompt": "Hello", "max_tokens": 2}
OK_CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMP, CHAT = "/v1/completions", "/v1/chat/completions"

# (route, body, param the error must name or None)
BAD_REQUESTS: list[tuple[str, Any, str | None]] = [
    (COMP, {"max_tokens": 2}, "prompt"),
    (COMP, {"prompt": ""}, "prompt"),
    (COMP, {"prompt": []}, "prompt"),
    (COMP, {"prompt": [[]]}, "prompt"),
    (COMP, {"prompt": ["ok", ""]}, "prompt"),
    (COMP, {"prompt": [1, "a"]}, "prompt"),
    (COMP, {"prompt": [5, 99999]}, None),
    (COMP, {"prompt": [5, -1]}, None),
    (COMP, {"prompt": "Hi", "temperature": "hot"}, "temperature"),
    (COMP, {"prompt": "Hi", "n": "2"}, "n"),
    (COMP, {"prompt": "Hi", "max_tokens": 1.5}, "max_tokens"),
    (COMP, {"prompt": "Hi", "stream": "yes"}, "stream"),
    (COMP, {"prompt": "Hi", "temperature": -1}, "temperature"),
    (COMP, {"prompt": "Hi", "top_p": 0}, "top_p"),
    (COMP, {"prompt": "Hi", "n": 0}, "n"),
    (COMP, {"prompt": "Hi", "n": 129}, "n"),
    (COMP, {"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    (COMP, {"prompt": "Hi", "logprobs": 21}, "logprobs"),
    (COMP, {"prompt": "Hi", "presence_penalty": 3}, "presence_penalty"),
    (COMP, {"prompt": "Hi", "repetition_penalty": 0}, "repetition_penalty"),
    (COMP, {"prompt": "Hi", "min_p": 2}, "min_p"),
    (COMP, {"prompt": "Hi", "seed": 2**70}, "seed"),
    (COMP, {"prompt": "Hi", "seed": 2**64 - 1, "n": 3, "stream": True}, "seed"),
    (COMP, {"prompt": "Hi", "stop": ["x"] * 17}, "stop"),
    (COMP, {"prompt": "Hi", "stop": "y" * 300}, "stop"),
    (COMP, {"prompt": "Hi", "stop": [""]}, "stop"),
    (COMP, {"prompt": "Hi", "stop_token_ids": [10**6]}, "stop_token_ids"),
    (COMP, {"prompt": "Hi", "echo": True, "logprobs": 1, "stream": True}, "stream"),
    (COMP, {"prompt": "Hi", "logit_bias": {"5": 101}}, "logit_bias"),
    (COMP, {"prompt": "Hi", "logit_bias": {"five": 1}}, "logit_bias"),
    (COMP, {"prompt": "Hi", "logit_bias": {"-1": 1}}, "logit_bias"),
    (COMP, {"prompt": "Hi", "logit_bias": {"5": "1"}}, "logit_bias"),
    (COMP, {"prompt": "Hi", "logit_bias": {str(10**6): 1}}, "logit_bias"),
    (COMP, {"prompt": "Hi", "logit_bias": [1]}, "logit_bias"),
    (COMP, {"prompt": "Hi", "best_of": 3}, "best_of"),
    (COMP, {"prompt": "Hi", "stream_options": {"include_usage": 1}}, "stream_options"),
    (CHAT, {"messages": []}, "messages"),
    # this model's template reads no enable_thinking: refused, not ignored
    (
        CHAT,
        {"messages": [{"role": "user", "content": "a"}], "chat_template_kwargs": {"x": 1}},
        "chat_template_kwargs",
    ),
    (CHAT, {"max_tokens": 2}, "messages"),
    (CHAT, {"messages": [{"role": "user"}], "top_logprobs": 2}, "top_logprobs"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": "a"}], "logprobs": True, "top_logprobs": 21},
        "top_logprobs",
    ),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages"),
    (CHAT, {"messages": [{"content": "no role"}]}, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    # the template refuses two user turns in a row (raise_exception)
    (
        CHAT,
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        "messages",
    ),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def srv(ckpt: Path) -> Iterator[RunningServer]:
    yield from serving(ckpt)


@pytest.mark.parametrize("route,body,param", BAD_REQUESTS)
def test_bad_request_is_400_envelope(
    srv: RunningServer, route: str, body: Any, param: str | None
) -> None:
    http = srv.client()
    err = assert_envelope(http.post(route, json=body), 400, param)
    assert err["type"] == "invalid_request_error"
    ok = OK_COMPLETION if route == COMP else OK_CHAT
    assert http.post(route, json=ok).status_code == 200


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe{}", b"[1, 2]", b"", b"null"])
def test_malformed_bodies(srv: RunningServer, content: bytes) -> None:
    http = srv.client()
    for route in (COMP, CHAT):
        assert_envelope(
            http.post(route, content=content, headers={"content-type": "application/json"}), 400
        )
    assert http.post(COMP, json=OK_COMPLETION).status_code == 200


def test_context_length_exceeded_names_both_numbers(srv: RunningServer) -> None:
    http = srv.client()
    err = assert_envelope(http.post(COMP, json={"prompt": [5] * 100, "max_tokens": 50}), 400)
    assert err["code"] == "context_length_exceeded"
    assert "128" in err["message"] and "150" in err["message"] and "100" in err["message"]
    err = assert_envelope(http.post(COMP, json={"prompt": [5] * 128}), 400)
    assert err["code"] == "context_length_exceeded" and "128" in err["message"]
    long_chat = {"messages": [{"role": "user", "content": "word " * 200}]}
    assert (
        assert_envelope(http.post(CHAT, json=long_chat), 400)["code"] == "context_length_exceeded"
    )
    assert http.post(COMP, json={"prompt": [5] * 100, "max_tokens": 28}).status_code == 200


def test_unknown_model_route_and_method(srv: RunningServer) -> None:
    http = srv.client()
    err = assert_envelope(http.post(COMP, json={**OK_COMPLETION, "model": "gpt-4"}), 404, "model")
    assert err["code"] == "model_not_found"
    assert_envelope(http.post(CHAT, json={**OK_CHAT, "model": "nope"}), 404, "model")
    assert_envelope(http.get("/v1/nothing"), 404)
    assert_envelope(http.get(COMP), 405)
    assert http.post(COMP, json={**OK_COMPLETION, "model": MODEL_NAME}).status_code == 200


@pytest.fixture(scope="module")
def guarded_srv(ckpt: Path) -> Iterator[RunningServer]:
    yield from serving(ckpt, api_key="s3cret", max_body_bytes=4096)


def test_api_key(guarded_srv: RunningServer) -> None:
    http = guarded_srv.client()
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "s3cret"},
        {"Authorization": "Basic s3cret"},
    ):
        for route, body in ((COMP, OK_COMPLETION), (CHAT, OK_CHAT)):
            err = assert_envelope(http.post(route, json=body, headers=headers), 401)
            assert err["code"] == "invalid_api_key"
        assert_envelope(http.get("/v1/models", headers=headers), 401)
    for path in ("/health", "/ready", "/metrics"):
        assert http.get(path).status_code == 200
    good = {"Authorization": "Bearer s3cret"}
    assert http.post(COMP, json=OK_COMPLETION, headers=good).status_code == 200
    bad = openai.OpenAI(base_url=guarded_srv.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    ok = openai.OpenAI(base_url=guarded_srv.url + "/v1", api_key="s3cret", max_retries=0)
    assert ok.models.list().data[0].id == MODEL_NAME


def test_body_limit_declared_and_streamed(guarded_srv: RunningServer) -> None:
    http = guarded_srv.client(headers={"Authorization": "Bearer s3cret"})
    big = {"prompt": "x" * 5000, "max_tokens": 1}
    err = assert_envelope(http.post(COMP, json=big), 413)
    assert "4096" in err["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    assert_envelope(http.post(COMP, content=chunks()), 413)
    assert http.post(COMP, json=OK_COMPLETION).status_code == 200


def test_queue_full_is_429_with_retry_after(ckpt: Path) -> None:
    # One sequence runs at a time, so a second request waits in the queue.
    running = start_server(
        ckpt, max_queued_requests=1, max_model_len=1024, engine_kwargs={"max_num_seqs": 1}
    )
    try:
        http = running.client()
        long = {"prompt": "Hello", "max_tokens": 1000, "ignore_eos": True}
        results: dict[str, int] = {}

        def bg(name: str) -> None:
            try:
                short = {**long, "max_tokens": 20}
                results[name] = http.post(COMP, json=short, timeout=60).status_code
            except httpx.HTTPError:
                results[name] = -1

        with http.stream("POST", COMP, json={**long, "stream": True}) as running_stream:
            lines = running_stream.iter_lines()  # kept: a dropped iterator closes the stream
            next(lines)  # the first one runs
            waiter = threading.Thread(target=bg, args=("queued",), daemon=True)
            waiter.start()
            wait_for(lambda: running.state.queued == 1, 10, "a queued request")
            resp = http.post(COMP, json=OK_COMPLETION)
            err = assert_envelope(resp, 429)
            assert err["code"] == "queue_full" and int(resp.headers["Retry-After"]) >= 1
            assert_envelope(http.post(CHAT, json=OK_CHAT), 429)
        # closing the stream frees its slot; the queued request runs and finishes
        waiter.join(60)
        assert results["queued"] == 200
        assert http.post(COMP, json=OK_COMPLETION).status_code == 200
        metrics = http.get("/metrics").text
        assert 'moeserve_request_rejected_total{reason="queue_full"} 2.0' in metrics
    finally:
        running.stop()


def test_huge_top_k_next_to_a_small_one_keeps_the_engine_alive(srv: RunningServer) -> None:
    http = srv.client()
    results: list[int] = []
    bodies = [
        {"prompt": "Hi", "max_tokens": 40, "top_k": k, "ignore_eos": True}
        for k in (5, 10**20, 3, 10**30)
    ]
    threads = [
        threading.Thread(target=lambda b=b: results.append(http.post(COMP, json=b).status_code))
        for b in bodies
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [200] * 4
    assert http.get("/health").status_code == 200
