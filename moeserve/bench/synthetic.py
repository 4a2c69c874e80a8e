"""Synthetic checkpoints for the benchmarks: the shapes of real checkpoints, random weights.

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

# The hub configs of the families' reference checkpoints, as shipped (quantization_config
# left out: these shapes run in bf16, or quantized at load with --quantization fp8).
QWEN3_30B_A3B: dict[str, Any] = {
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "decoder_sparse_step": 1,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "mlp_only_layers": [],
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-6,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_sliding_window": False,
    "vocab_size": 151936,
}

DEEPSEEK_V2_LITE: dict[str, Any] = {
    "model_type": "deepseek_v2",
    "architectures": ["DeepseekV2ForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "num_key_value_heads": 16,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-6,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "greedy",
    "torch_dtype": "bfloat16",
    "v_head_dim": 128,
    "vocab_size": 102400,
}

GPT_OSS_20B: dict[str, Any] = {
    "model_type": "gpt_oss",
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "eos_token_id": 200002,
    "pad_token_id": 199999,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072,
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "rms_norm_eps": 1e-5,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "rope_theta": 150000,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 201088,
}

# openai/gpt-oss-120b as shipped: MXFP4 experts (about 65 GB in all), everything else bf16.
GPT_OSS_120B: dict[str, Any] = GPT_OSS_20B | {
    "layer_types": ["sliding_attention", "full_attention"] * 18,
    "num_hidden_layers": 36,
    "num_local_experts": 128,
    "quantization_config": {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    },
}

GLM_4_5_AIR: dict[str, Any] = {
    "model_type": "glm4_moe",
    "architectures": ["Glm4MoeForCausalLM"],
    "attention_bias": True,
    "eos_token_id": [151329, 151336, 151338],
    "pad_token_id": 151329,
    "first_k_dense_replace": 1,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 10944,
    "max_position_embeddings": 131072,
    "moe_intermediate_size": 1408,
    "n_group": 1,
    "n_routed_experts": 128,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 96,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 46,
    "num_key_value_heads": 8,
    "num_nextn_predict_layers": 1,
    "partial_rotary_factor": 0.5,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000,
    "routed_scaling_factor": 1.0,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "torch_dtype": "bfloat16",
    "use_qk_norm": False,
    "vocab_size": 151552,
}

SHAPES: dict[str, dict[str, Any]] = {
    "mixtral-8x7b": MIXTRAL_8X7B,
    "qwen3-30b-a3b": QWEN3_30B_A3B,
    "deepseek-v2-lite": DEEPSEEK_V2_LITE,
    "gpt-oss-20b": GPT_OSS_20B,
    "gpt-oss-120b": GPT_OSS_120B,
    # 106B parameters (212 GB in bf16): offload its experts or cut its layers.
    "glm-4.5-air": GLM_4_5_AIR,
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
        _save_random_weights(path, config.get("dtype") or config["torch_dtype"])
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
