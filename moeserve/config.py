"""Frozen configuration records.

ModelConfig is what the model code needs to know about a checkpoint, normalised across the
supported families (see model/families.py, which parses config.json into it). EngineConfig
carries the operator's choices in sections (model, cache, scheduler, offload, kernels,
parallel); it is built once, from CLI flags and MOESERVE_* variables (cli.py) or LLM(...)
keywords, with `EngineConfig.from_options`, validated there, and handed whole to the engine
(also across the process boundary: it pickles).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
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
    # q / k projection, OLMoE) or "l2" (weightless, over each head, on rotary layers only:
    # Llama 4).
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
    # DeepSeek-style MoE (families.deepseek_moe_fields). How a group of experts is scored for
    # group-limited top-k: "sum_top2" (DeepSeek-V3, GLM-4.5) or "max" (DeepSeek-V2).
    router_group_score: str = "sum_top2"
    # The router weight is kept and its GEMM run in float32 (DeepSeek, GLM-4.5), whatever the
    # model dtype.
    router_float32: bool = False
    # False: the shared experts are a plain MLP added to the routed output (DeepSeek, GLM);
    # True: Qwen2-MoE's sigmoid-gated shared expert.
    shared_expert_gate: bool = True
    # Rotary over the first rotary_dim of each head only (GLM's partial_rotary_factor); 0: all.
    rotary_dim: int = 0
    # Multi-token-prediction layers the checkpoint stores after the decoder's (DeepSeek-V3,
    # GLM-4.5: model.layers.{num_layers + j}): not run, their tensors ignored by the loader.
    num_mtp_layers: int = 0
    # Multi-head latent attention (DeepSeek-V2/V3, model/mla.py), on when kv_lora_rank > 0;
    # head_dim is then the rotary part (qk_rope_head_dim), as transformers sets it.
    kv_lora_rank: int = 0
    q_lora_rank: int | None = None  # None: a plain q projection
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    attention_bias: bool = False  # biases of q_a / kv_a / o projections
    rope_interleave: bool = False  # the rotary dims come in (even, odd) pairs
    # Llama 4. The router's weights scale each expert's input, not its output.
    router_scales_input: bool = False
    # Layers that skip rotary (NoPE); empty: every layer rotates.
    nope_layers: tuple[bool, ...] = ()
    # Chunked local attention per layer: a query at p sees keys from p // chunk * chunk.
    layer_chunks: tuple[int | None, ...] = ()
    # (floor_scale, attn_scale): NoPE layers scale q by log1p(floor((p + 1) / floor_scale))
    # * attn_scale + 1 at position p. None: no temperature tuning.
    attn_temperature: tuple[float, float] | None = None
    # gpt-oss: a learned per-head sink logit in each attention softmax, a bias on the output
    # projection and on the router's logits, biased experts, and the experts' activation:
    # "silu" (silu(gate) * up) or "clamped_swiglu" (model/activation.py, with alpha and limit).
    attention_sinks: bool = False
    o_bias: bool = False
    router_logit_bias: bool = False
    expert_bias: bool = False
    expert_activation: str = "silu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # How the routed experts are stored (model/quant.py): "" in the model dtype, "fp8" or
    # "mxfp4"; from the checkpoint's quantization_config or --quantization.
    expert_quant: str = ""
    # How the dense linears are stored: "" in the model dtype or "fp8" (model/quant.py).
    dense_quant: str = ""

    @property
    def num_sparse_layers(self) -> int:
        return sum(self.sparse_layers)

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def kv_cache_shape(self) -> tuple[int, int, int]:
        """What one layer's paged cache holds per token, as (tensors, heads, width): K and V
        of every kv head, or (MLA) one row of the normalised latent then the rotated rope key.
        The one place the cache layout is decided (allocation, block bytes, budgets)."""
        if self.mla:
            return (1, 1, self.kv_lora_rank + self.head_dim)
        return (2, self.num_kv_heads, self.head_dim)

    @property
    def kv_elements_per_token(self) -> int:
        """Cache elements a token takes over all layers."""
        tensors, heads, width = self.kv_cache_shape
        return self.num_layers * tensors * heads * width

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def rotary_width(self) -> int:
        """The rotated part of each head (the first rotary_width entries)."""
        return self.rotary_dim or self.head_dim


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache sizing: an explicit byte budget, or a fraction of free GPU memory."""

    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None: decided from the device
    gpu_memory_utilization: float = 0.9
    # Full KV blocks stay cached by content; a prompt reuses its longest cached prefix.
    enable_prefix_caching: bool = True

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
    # "fcfs", or "priority": requests' priority orders admission and preemption (vLLM's).
    scheduling_policy: str = "fcfs"

    def __post_init__(self) -> None:
        if self.admission_wait_steps < 0:
            raise ConfigError(f"admission_wait_steps must be >= 0, got {self.admission_wait_steps}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ConfigError(
                f"scheduling_policy must be fcfs or priority, got {self.scheduling_policy!r}"
            )
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # Otherwise a full batch of decodes would not fit in one step's budget.
            raise ConfigError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs})"
            )


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
    # How the cache's device experts run: "eager" one expert at a time (torch), "fused" all of
    # a call's experts through the fused MoE kernels over the slots (Triton path only), "auto"
    # fused where the engine runs the Triton kernels. On an H200, batch 1, fused decoded 1.25x
    # (bf16) and 3.1x (fp8) eager's rate for Qwen3-30B-A3B on a 16 GB card, 1.54x for FP8
    # Mixtral-8x7B on a 24 GB card (benchmarks/RESULTS.md, 2026-12-04).
    kernels: str = "auto"
    # Decode batches of up to this many sequences run the cache on the GPU inside one CUDA
    # graph (engine/device_cache.py); 0: never; None: device_cache.graph_fetch_batch decides.
    graph_batch: int | None = None

    def __post_init__(self) -> None:
        if self.graph_batch is not None and self.graph_batch < 0:
            raise ConfigError(f"expert_cache_graph_batch must be >= 0, got {self.graph_batch}")
        if self.cache_slots is not None and self.cache_slots < 1:
            raise ConfigError(f"expert_cache_slots must be >= 1, got {self.cache_slots}")
        if self.cache_bytes is not None and self.cache_bytes <= 0:
            raise ConfigError(f"expert_cache_gb must be > 0, got {self.cache_bytes} bytes")
        if self.cache_slots is not None and self.cache_bytes is not None:
            raise ConfigError("expert_cache_slots and expert_cache_gb: give one, not both")
        if self.mode not in OFFLOAD_MODES:
            raise ConfigError(f"offload_mode must be one of {', '.join(OFFLOAD_MODES)}")
        if self.policy not in CACHE_POLICIES:
            raise ConfigError(f"expert_cache_policy must be one of {', '.join(CACHE_POLICIES)}")
        if not 0.0 < self.lfu_decay <= 1.0:
            raise ConfigError(f"lfu_decay must be in (0, 1], got {self.lfu_decay}")
        if self.kernels not in ("auto", "eager", "fused"):
            raise ConfigError(
                f"expert_cache_kernels must be auto, eager or fused, got {self.kernels!r}"
            )


DTYPES = ("auto", "float32", "bfloat16", "float16")
LOAD_FORMATS = ("safetensors", "dummy")
KERNELS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class LoadConfig:
    """Which checkpoint, in which dtype, read how."""

    path: str
    dtype: str = "auto"  # the checkpoint's own, or float32 / bfloat16 / float16
    load_format: str = "safetensors"  # dummy: random weights of config.json's shapes
    # "fp8": quantize a float checkpoint's experts and dense linears at load
    quantization: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ConfigError(
                f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}"
            )
        if self.quantization not in (None, "fp8"):
            raise ConfigError(f"quantization must be fp8 or None, got {self.quantization!r}")


@dataclass(frozen=True)
class KernelConfig:
    """How the model runs: Triton kernels or the readable torch path, CUDA graphs, and whether
    a step is queued before the last one's tokens reach the host (None: on for CUDA)."""

    kernels: str = "auto"
    enforce_eager: bool = False
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        if self.kernels not in KERNELS:
            raise ConfigError(f"kernels must be one of {', '.join(KERNELS)}, got {self.kernels!r}")


@dataclass(frozen=True)
class ParallelConfig:
    """Where the engine runs; one device today (several GPUs are a later section's fields)."""

    device: str | None = None  # cpu, cuda, cuda:N; None: CUDA when available


# Every engine option: its name (an LLM(...) keyword, and the CLI flag with dashes), the
# section and field it sets, and how the value converts. One table for both front ends.
_GIB = 1 << 30
_OPTIONS: dict[str, tuple[str, str]] = {
    "dtype": ("model", "dtype"),
    "load_format": ("model", "load_format"),
    "quantization": ("model", "quantization"),
    "device": ("parallel", "device"),
    "block_size": ("cache", "block_size"),
    "kv_cache_memory": ("cache", "kv_cache_memory"),
    "gpu_memory_utilization": ("cache", "gpu_memory_utilization"),
    "max_num_seqs": ("scheduler", "max_num_seqs"),
    "max_num_batched_tokens": ("scheduler", "max_num_batched_tokens"),
    "max_model_len": ("scheduler", "max_model_len"),
    "enable_chunked_prefill": ("scheduler", "enable_chunked_prefill"),
    "admission_wait_steps": ("scheduler", "admission_wait_steps"),
    "scheduling_policy": ("scheduler", "scheduling_policy"),
    "expert_cache_slots": ("offload", "cache_slots"),
    "expert_cache_gb": ("offload", "cache_bytes"),
    "offload_mode": ("offload", "mode"),
    "expert_cache_policy": ("offload", "policy"),
    "prefetch": ("offload", "prefetch"),
    "expert_cache_kernels": ("offload", "kernels"),
    "expert_cache_graph_batch": ("offload", "graph_batch"),
    "kernels": ("kernels", "kernels"),
    "enforce_eager": ("kernels", "enforce_eager"),
    "async_scheduling": ("kernels", "async_scheduling"),
    "seed": ("engine", "seed"),
    "enable_prefix_caching": ("cache", "enable_prefix_caching"),
}
_FLAGS = {name: "--" + name.replace("_", "-") for name in _OPTIONS}
_FLAGS["enable_chunked_prefill"] = "--no-chunked-prefill"
OPTION_NAMES = tuple(_OPTIONS)


def flag_of(option: str) -> str:
    """The CLI flag that sets an engine option."""
    return _FLAGS[option]


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine is built from, in sections; see `from_options`."""

    model: LoadConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int | None = None  # of the sampler's generator, for requests without their own

    @classmethod
    def from_options(cls, model: str | Path, **options: Any) -> EngineConfig:
        """The config of `model` with `options` (names as in OPTION_NAMES; None keeps the
        default). TypeError for an unknown name; ConfigError, naming the option and its CLI
        flag, for a bad value."""
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise TypeError(f"unknown engine options: {', '.join(unknown)}")
        sections: dict[str, dict[str, Any]] = {}
        for name, value in options.items():
            if value is None:
                continue
            section, fld = _OPTIONS[name]
            if name == "expert_cache_gb":
                value = int(value * _GIB)
            sections.setdefault(section, {})[fld] = value
        top = sections.pop("engine", {})
        built: dict[str, Any] = {}
        try:
            built["model"] = LoadConfig(path=str(model), **sections.pop("model", {}))
            for name, values in sections.items():
                built[name] = _SECTIONS[name](**values)
        except ConfigError as e:
            raise _with_flag(e) from None
        return cls(**built, **top)

    def options(self) -> dict[str, Any]:
        """The options that rebuild this config with from_options (e.g. in a benchmark)."""
        out: dict[str, Any] = {}
        for name, (section, fld) in _OPTIONS.items():
            value = getattr(self if section == "engine" else getattr(self, section), fld)
            if name == "expert_cache_gb" and value is not None:
                value = value / _GIB
            out[name] = value
        return out


_SECTIONS: dict[str, type] = {
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "offload": OffloadConfig,
    "kernels": KernelConfig,
    "parallel": ParallelConfig,
}


def _with_flag(e: ConfigError) -> ConfigError:
    """The error with the CLI flag of the option its message starts with."""
    name = str(e).split(" ", 1)[0]
    return ConfigError(f"{e} ({_FLAGS[name]})") if name in _FLAGS else e
