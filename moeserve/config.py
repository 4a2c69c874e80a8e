"""Frozen configuration records.

ModelConfig is what the model code needs to know about a checkpoint, normalised across the
supported families (see model/families.py, which parses config.json into it). The engine-side
records (cache, scheduler) carry the operator's choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config.json (or an option) holds a value we cannot run; the message names the field."""


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    # RoPE: rope_type in {"default", "linear", "yarn", "llama3"} plus that type's parameters.
    rope_theta: float
    rope_params: dict[str, Any] = field(default_factory=dict)
    qkv_bias: bool = False
    # "none", "head" (RMSNorm over each head's head_dim, Qwen3) or "full" (over the whole
    # q / k projection, OLMoE).
    qk_norm: str = "none"
    clip_qkv: float | None = None
    # Sliding-window size per layer (None: full attention).
    layer_windows: tuple[int | None, ...] = ()
    # MoE.
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    sparse_layers: tuple[bool, ...] = ()  # True where the layer is MoE, False for a dense MLP
    dense_intermediate_size: int = 0  # the MLP of dense layers
    tie_word_embeddings: bool = False
    dtype: str = "float32"  # the checkpoint's dtype
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def num_sparse_layers(self) -> int:
        return sum(self.sparse_layers)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache sizing: an explicit byte budget, or a fraction of free GPU memory."""

    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None: decided from the device
    gpu_memory_utilization: float = 0.9

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size > 1024:
            raise ConfigError(f"block_size must be in 1..1024, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ConfigError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len must be >= 1, got {self.max_model_len}")
