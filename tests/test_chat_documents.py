"""vLLM's `documents` for retrieval-augmented chat templates: rendered as transformers renders
them (chat route and /tokenize), and refused where the template does not read them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from moeserve.tokenizer import Tokenizer
from tests.checkpoints import make_checkpoint
from tests.server_fixture import RunningServer, assert_envelope, serving

# A Granite-style RAG template: the documents, numbered, in a system turn before the chat.
RAG_TEMPLATE = (
    "{% if documents %}<|system|>Answer from these documents:\n"
    "{% for d in documents %}[{{ loop.index }}] {{ d.title }}: {{ d.text }}\n{% endfor %}"
    "{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
DOCS = [
    {"title": "Paris", "text": "Paris is the capital of France."},
    {"title": "Lyon", "text": "Lyon lies on the Rhone."},
]
USER = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = make_checkpoint(tmp_path_factory.mktemp("rag") / "mixtral", "mixtral", tokenizer=True)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = RAG_TEMPLATE
    config_file.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def srv(ckpt: Path) -> Iterator[RunningServer]:
    yield from serving(ckpt, max_model_len=256)


def test_documents_render_as_transformers_renders_them(srv: RunningServer, ckpt: Path) -> None:
    hf = AutoTokenizer.from_pretrained(ckpt)
    text = hf.apply_chat_template(USER, documents=DOCS, tokenize=False, add_generation_prompt=True)
    assert "[2] Lyon: Lyon lies on the Rhone." in text
    tok = Tokenizer.from_dir(ckpt)
    want = tok.encode(text, add_special_tokens=False)
    plain = hf.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    assert len(want) > len(tok.encode(plain, add_special_tokens=False))
    c = srv.client()
    body = {"messages": USER, "documents": DOCS}
    assert c.post("/tokenize", json=body).json()["tokens"] == want
    r = c.post("/v1/chat/completions", json={**body, "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(want)
    # Not objects of strings: a 400 naming the field; on a prompt (no template): likewise.
    for bad in (["a text"], [{"title": 1}], {"title": "t"}):
        r = c.post("/v1/chat/completions", json={"messages": USER, "documents": bad})
        assert_envelope(r, 400, "documents")
    r = c.post("/tokenize", json={"prompt": "hi", "documents": DOCS})
    assert_envelope(r, 400, "documents")


def test_a_template_without_documents_refuses_them(tmp_path: Path) -> None:
    """The tests' default template reads no `documents`: sending them is a 400 naming the
    field (vLLM would drop them silently), on chat and /tokenize."""
    ckpt = make_checkpoint(tmp_path / "mixtral", "mixtral", tokenizer=True)
    assert "documents" not in Tokenizer.from_dir(ckpt).variables_of(None)
    for running in serving(ckpt):
        c = running.client()
        body = {"messages": USER, "documents": DOCS}
        r = c.post("/v1/chat/completions", json=body)
        assert_envelope(r, 400, "documents")
        assert "does not read documents" in r.json()["error"]["message"]
        assert_envelope(c.post("/tokenize", json=body), 400, "documents")
        ok = c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1})
        assert ok.status_code == 200
