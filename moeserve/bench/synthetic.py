"""Synthetic checkpoints for the benchmarks: Mixtral shapes, random weights.

A benchmark's speed depends on the shapes, not the values, so these directories hold a
config.json that moeserve loads with `load_format="dummy"` (nothing read from disk: the full
Mixtral-8x7B shape is 93 GB), or, where a peer (transformers) must load the same weights,
random weights saved by transformers.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

MIXTRAL_8X7B: dict[str, Any] = {
    "model_type": "mixtral",
    "architectures": ["MixtralForCausalLM"],
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1e6,
    "rms_norm_eps": 1e-5,
    "dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}

SHAPES: dict[str, dict[str, Any]] = {
    "mixtral-8x7b": MIXTRAL_8X7B,
    # The GPU reference shape: 12.1 GB in bf16, fits any 80 GB card with room for KV.
    "mixtral-4l": MIXTRAL_8X7B | {"num_hidden_layers": 4, "max_position_embeddings": 4096},
    # CPU shapes, where per-step overhead matters as much as FLOPs.
    "small": MIXTRAL_8X7B
    | {
        "vocab_size": 8192,
        "hidden_size": 512,
        "intermediate_size": 1024,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
        "dtype": "float32",
    },
    "tiny": MIXTRAL_8X7B
    | {
        "vocab_size": 1024,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "dtype": "float32",
    },
}


def synthetic_model(
    shape: str, *, weights: bool = False, tokenizer: bool = False, **overrides: Any
) -> Path:
    """A new temporary checkpoint directory of `shape` (SHAPES) with `overrides` applied to
    its config. Without `weights` only config.json (load it with load_format="dummy");
    with `weights`, random weights of the config's dtype saved by transformers (slow for
    the large shapes on a CPU-only machine). `tokenizer` writes the demo model's character
    tokenizer, so text prompts of N characters are N tokens, with its vocabulary padded to
    the config's (`<x45>`, `<x46>`, ...): every id a random model samples then decodes to
    text, and a stream sends a chunk per token as it would with a real tokenizer."""
    if shape not in SHAPES:
        raise ValueError(f"unknown synthetic shape {shape!r}: one of {', '.join(SHAPES)}")
    config = SHAPES[shape] | overrides
    path = Path(tempfile.mkdtemp(prefix=f"moeserve-{shape}-"))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if weights:
        _save_random_weights(path, config["dtype"])
    if tokenizer:
        _padded_demo_tokenizer(path, config["vocab_size"])
    return path


def _padded_demo_tokenizer(path: Path, vocab_size: int) -> None:
    """The demo tokenizer with its vocabulary filled up to `vocab_size` ids. Sampling covers
    every row of the lm_head, as transformers does; without the padding, ids past the demo's
    45 would decode to nothing and a stream would hold back its chunks until a token with
    text came (which made HTTP TTFT and ITL look 6-30x worse than they were)."""
    from moeserve.assets import demo_model_path

    spec = json.loads((demo_model_path() / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), vocab_size):
        vocab[f"<x{i}>"] = i
    (path / "tokenizer.json").write_text(json.dumps(spec))
    shutil.copy(demo_model_path() / "tokenizer_config.json", path / "tokenizer_config.json")


def _save_random_weights(path: Path, dtype: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    # Initialising gigabytes of random weights is slow on a CPU: on the GPU where there is one.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    model.to(getattr(torch, dtype)).save_pretrained(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
