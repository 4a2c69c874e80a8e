"""A chat server whose model writes what a test scripts (tests/test_harmony.py `_Script`),
behind a Qwen3-style template with tools: shared by the tool-call, Responses and Messages
tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeserve.tokenizer import Tokenizer
from tests.checkpoints import make_checkpoint
from tests.test_harmony import _Script
from tests.tool_templates import QWEN3


def qwen3_like_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Mixtral with a real tokenizer, a 2048-token context and Qwen3's tool template."""
    path = tmp_path_factory.mktemp("srv") / "qwen3-like"
    make_checkpoint(path, "mixtral", tokenizer=True, max_position_embeddings=2048)
    (path / "chat_template.jinja").write_text(QWEN3)
    return path


def say(script: _Script, tok: Tokenizer, text: str) -> None:
    """The model writes `text`, then its end of sequence."""
    assert tok.eos_token_id is not None
    script.tokens = [*tok.encode(text, add_special_tokens=False), tok.eos_token_id]
