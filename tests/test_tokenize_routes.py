"""POST /tokenize, POST /detokenize, GET /tokenizer_info (vLLM's shapes) on the demo model,
and lm-evaluation-harness's remote tokenizer, which uses them, against the real server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from moeserve.assets import demo_model_path
from moeserve.tokenizer import Tokenizer
from tests.server_fixture import MODEL_NAME, RunningServer, assert_envelope, serving

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEXT = "[INST] 47+85 [/INST]132"


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    yield from serving(demo_model_path(), max_model_len=None, api_key=KEY)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(demo_model_path())


def test_tokenize_a_prompt(server: RunningServer, tok: Tokenizer) -> None:
    c = server.client(headers=AUTH)
    body = c.post("/tokenize", json={"prompt": TEXT, "model": MODEL_NAME}).json()
    assert body["tokens"] == tok.encode(TEXT) and body["tokens"][0] == tok.bos_token_id
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 256
    assert body["token_strs"] is None
    plain = c.post(
        "/tokenize", json={"prompt": TEXT, "add_special_tokens": False, "return_token_strs": True}
    ).json()
    assert plain["tokens"] == tok.encode(TEXT, add_special_tokens=False)
    assert plain["token_strs"] == ["[INST]", " ", "4", "7", "+", "8", "5", " ", "[/INST]"] + list(
        "132"
    )


def test_tokenize_messages_as_the_chat_route_does(server: RunningServer) -> None:
    c = server.client(headers=AUTH)
    messages = [{"role": "user", "content": "sort 5193"}]
    body = c.post("/tokenize", json={"messages": messages}).json()
    chat = c.post(
        "/v1/chat/completions", json={"messages": messages, "max_tokens": 1, "temperature": 0}
    ).json()
    assert body["count"] == chat["usage"]["prompt_tokens"]
    assert body["tokens"][:2] == [1, 4]  # one BOS (the template's), then [INST]


def test_detokenize_round_trips(server: RunningServer, tok: Tokenizer) -> None:
    c = server.client(headers=AUTH)
    ids = tok.encode(TEXT)
    text = c.post("/detokenize", json={"tokens": ids}).json()["prompt"]
    assert text == "<s>" + TEXT  # special tokens kept: it tokenizes back to the same ids
    assert tok.encode(text, add_special_tokens=False) == ids
    assert c.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


def test_tokenizer_info(server: RunningServer, tok: Tokenizer) -> None:
    info = server.client(headers=AUTH).get("/tokenizer_info").json()
    assert (info["bos_token"], info["eos_token"], info["pad_token"]) == ("<s>", "</s>", "<pad>")
    assert info["chat_template"] == tok.chat_template and info["model_max_length"] == 256


def test_errors(server: RunningServer) -> None:
    c = server.client(headers=AUTH)
    assert_envelope(c.post("/tokenize", json={}), 400, "prompt")
    both = {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}
    assert_envelope(c.post("/tokenize", json=both), 400, "prompt")
    assert_envelope(c.post("/tokenize", json={"prompt": "a", "model": "x"}), 404, "model")
    assert_envelope(c.post("/tokenize", json={"prompt": 5}), 400)
    bad_role = {"messages": [{"role": "tool", "content": "b"}]}
    assert_envelope(c.post("/tokenize", json=bad_role), 400, "messages")
    assert_envelope(c.post("/detokenize", json={"tokens": [1, 45]}), 400, "tokens")
    anon = server.client()
    for resp in (
        anon.post("/tokenize", json={"prompt": "a"}),
        anon.post("/detokenize", json={"tokens": [1]}),
        anon.get("/tokenizer_info"),
    ):
        assert_envelope(resp, 401)


def test_lm_eval_remote_tokenizer(server: RunningServer, tok: Tokenizer) -> None:
    """lm-evaluation-harness's own client of these routes: its local-completions model
    detects them and then tokenizes through the server."""
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    url = f"{server.url}/v1/completions"
    assert check_remote_tokenizer_support(url, auth_token=KEY)
    assert not check_remote_tokenizer_support(url, auth_token="wrong", max_retries=1)
    remote = RemoteTokenizer(url, auth_token=KEY)
    assert remote.encode(TEXT) == tok.encode(TEXT, add_special_tokens=False)
    assert (remote.bos_token_id, remote.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert remote.batch_decode([tok.encode(TEXT, add_special_tokens=False)]) == [TEXT]
