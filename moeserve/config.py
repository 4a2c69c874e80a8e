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
    # Router rules beyond softmax top-k (model/router.py): "softmax" or "sigmoid" scores,
    # group-limited top-k (both None: plain top-k), a factor on the weights, and whether an
    # e_score_correction_bias steers the selection.
    scoring_func: str = "softmax"
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    router_correction_bias: bool = False
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
    # While decodes run, new requests wait up to this many steps to start together (0: at once).
    admission_wait_steps: int = 8

    def __post_init__(self) -> None:
        if self.admission_wait_steps < 0:
            raise ConfigError(
                f"admission_wait_steps must be >= 0, got {self.admission_wait_steps}"
            )
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len must be >= 1, got {self.max_model_len}")


OFFLOAD_MODES = ("fetch", "cpu", "auto")
CACHE_POLICIES = ("lru", "lfu")


@dataclass(frozen=True)
class OffloadConfig:
    """Where routed experts live: all on the device, or a per-layer device cache over host memory.

    cache_slots (experts per sparse layer) or cache_bytes (all layers together) bound the
    device cache; neither set means every expert is resident when it fits on the device.
    """

    cache_slots: int | None = None
    cache_bytes: int | None = None
    mode: str = "auto"  # how a missed expert runs: copied to the device, or computed on the CPU
    policy: str = "lru"
    # Off by default: on random-weight models the next layer's router guesses ~60% right and
    # wrong guesses cost more bandwidth than right ones save (benchmarks/RESULTS.md).
    prefetch: bool = False
    lfu_decay: float = 0.9  # per-step decay of LFU scores

    def __post_init__(self) -> None:
        if self.cache_slots is not None and self.cache_slots < 1:
            raise ConfigError(f"expert_cache_slots must be >= 1, got {self.cache_slots}")
        if self.cache_bytes is not None and self.cache_bytes <= 0:
            raise ConfigError(f"expert_cache_gb must be > 0, got {self.cache_bytes} bytes")
        if self.cache_slots is not None and self.cache_bytes is not None:
            raise ConfigError("give expert_cache_slots or expert_cache_gb, not both")
        if self.mode not in OFFLOAD_MODES:
            raise ConfigError(f"offload_mode must be one of {', '.join(OFFLOAD_MODES)}")
        if self.policy not in CACHE_POLICIES:
            raise ConfigError(f"expert_cache_policy must be one of {', '.join(CACHE_POLICIES)}")
        if not 0.0 < self.lfu_decay <= 1.0:
            raise ConfigError(f"lfu_decay must be in (0, 1], got {self.lfu_decay}")
