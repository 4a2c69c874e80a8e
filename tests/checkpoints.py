"""Tiny random checkpoints built with transformers (the reference) for the tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

SMALL = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    num_experts_per_tok=2,
    vocab_size=128,
)

# DeepSeek's yarn as its hub configs give it; each family adds its own mscale pair.
_YARN: dict[str, Any] = dict(
    rope_type="yarn",
    rope_theta=10000.0,
    factor=4.0,
    original_max_position_embeddings=64,
    beta_fast=32,
    beta_slow=1,
)

FAMILIES: dict[str, dict[str, Any]] = {
    "mixtral": dict(num_local_experts=6),
    "qwen2_moe": dict(
        num_experts=6,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
        norm_topk_prob=False,
    ),
    "qwen3_moe": dict(num_experts=6, moe_intermediate_size=24, norm_topk_prob=True, head_dim=16),
    "olmoe": dict(num_experts=6, norm_topk_prob=False),
    # Every DeepSeek-style routing rule on: sigmoid + correction bias, 4 groups keeping 2,
    # scaling, 2 ungated shared experts, a dense first layer; q/k norms, biases, partial rotary.
    "glm4_moe": dict(
        n_routed_experts=8,
        moe_intermediate_size=24,
        n_shared_experts=2,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        use_qk_norm=True,
        attention_bias=True,
        head_dim=16,
        partial_rotary_factor=0.5,
    ),
    # MLA with a plain q projection, group-limited softmax routing, 2 shared experts, a dense
    # first layer, yarn with DeepSeek-V2's mscale pair.
    "deepseek_v2": dict(
        num_key_value_heads=4,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=12,
        n_routed_experts=8,
        moe_intermediate_size=24,
        n_shared_experts=2,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=1.5,
        first_k_dense_replace=1,
        rope_parameters=_YARN | dict(mscale=0.707, mscale_all_dim=0.707),
    ),
    # MLA with a low-rank q, sigmoid routing with correction bias over 4 groups keeping 2,
    # one shared expert, a dense first layer, yarn whose mscale pair scales the softmax.
    "deepseek_v3": dict(
        num_key_value_heads=4,
        kv_lora_rank=16,
        q_lora_rank=12,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=12,
        n_routed_experts=8,
        moe_intermediate_size=24,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        first_k_dense_replace=1,
        rope_parameters=_YARN | dict(mscale=1.0, mscale_all_dim=0.8),
    ),
    # Every Llama 4 feature on at tiny sizes: attention chunks shorter than the prompt, NoPE
    # layers (global, temperature-tuned with a floor_scale that matters at these positions)
    # between chunked RoPE layers with L2 q/k norms, MoE on every second layer, llama3 rope.
    "llama4_text": dict(
        num_hidden_layers=4,
        num_local_experts=4,
        num_experts_per_tok=1,
        intermediate_size_mlp=40,
        interleave_moe_layer_step=2,
        attention_chunk_size=4,
        no_rope_layers=[1, 0, 1, 0],
        floor_scale=3,
        attn_scale=0.5,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=10000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),
    # Every feature on: sinks and biases (perturbed below), a window shorter than the test
    # prompts, alternating sliding/full layers, yarn rope (the family's default).
    "gpt_oss": dict(
        num_local_experts=6,
        head_dim=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        swiglu_limit=0.1,  # the tiny model's gate/up values reach ~0.5: clamp some
    ),
}


# Families whose attention weights are scaled up from the 0.02-std init: with it, the scores
# are so small that attention is nearly uniform and rotary or scale mistakes hide below 1e-4.
SHARP_ATTENTION = {"deepseek_v2": 10.0, "deepseek_v3": 10.0}


def hf_classes(family: str) -> tuple[Any, Any]:
    import transformers as tf

    return {
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM),
        "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM),
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM),
        "olmoe": (tf.OlmoeConfig, tf.OlmoeForCausalLM),
        "glm4_moe": (tf.Glm4MoeConfig, tf.Glm4MoeForCausalLM),
        "deepseek_v2": (tf.DeepseekV2Config, tf.DeepseekV2ForCausalLM),
        "deepseek_v3": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM),
        "llama4_text": (tf.Llama4TextConfig, tf.Llama4ForCausalLM),
        "gpt_oss": (tf.GptOssConfig, tf.GptOssForCausalLM),
    }[family]


def make_checkpoint(
    path: Path,
    family: str,
    *,
    seed: int = 0,
    max_shard_size: str | None = None,
    hub_style: bool = False,
    dtype: torch.dtype = torch.float32,
    tokenizer: bool = False,
    **overrides: Any,
) -> Path:
    """Save a random `family` model in the Hugging Face layout under `path`.

    hub_style rewrites config.json the way hub checkpoints spell it (rope_theta at the top
    level, torch_dtype), instead of the transformers-5 rope_parameters form.
    """
    config_cls, model_cls = hf_classes(family)
    kwargs = {**SMALL, **FAMILIES[family], **overrides}
    if tokenizer:
        from tests.tokenizer_fixture import write_test_tokenizer

        path.mkdir(parents=True, exist_ok=True)
        vocab = write_test_tokenizer(path)
        kwargs["vocab_size"] = max(kwargs["vocab_size"], vocab)
        kwargs.setdefault("bos_token_id", 1)  # the fixture's <s> and </s>
        kwargs.setdefault("eos_token_id", 2)
    torch.manual_seed(seed)
    cfg = config_cls(**kwargs)
    model = model_cls(cfg).to(dtype)
    # Random init leaves norms at 1 and biases at 0; perturb them so they are exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
            elif "gate.weight" in name or "embed" in name or "router.weight" in name:
                p.mul_(20.0)  # sharper routing and logits than the 0.02-std init
            elif "self_attn" in name and family in SHARP_ATTENTION:
                p.mul_(SHARP_ATTENTION[family])
            elif family.startswith("llama4") and ("router.weight" in name or "q_proj" in name):
                p.mul_(20.0)  # Llama 4: sharper routing, and NoPE attention too
            elif name.endswith("_bias"):  # per-expert biases [E, N] (gpt-oss)
                p.add_(torch.randn_like(p) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # inits to 0: make it steer
                b.add_(torch.randn_like(b) * 0.3)
    if family == "gpt_oss":
        # Older transformers (5.17, the GPU image's) hard-code the clamped SwiGLU's alpha
        # 1.702 and limit 7.0 whatever config.json says (5.25 reads it): write down the values
        # the reference actually runs, so our engine, which reads config.json, computes the same.
        experts = model.model.layers[0].mlp.experts
        cfg.swiglu_alpha, cfg.swiglu_limit = experts.alpha, experts.limit
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **save_kwargs)
    if hub_style:
        cfg_path = path / "config.json"
        raw = json.loads(cfg_path.read_text())
        rope = raw.pop("rope_parameters", None) or {}
        raw["rope_theta"] = rope.pop("rope_theta", 10000.0)
        if rope.get("rope_type", "default") != "default":
            raw["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
        raw["torch_dtype"] = raw.pop("dtype", "float32")
        cfg_path.write_text(json.dumps(raw, indent=2))
    return path


def load_reference(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
