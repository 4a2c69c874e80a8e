"""Device memory budgets: expert cache slots (when experts are offloaded) and KV blocks."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from moeserve.config import CacheConfig, ConfigError, ModelConfig, OffloadConfig, SchedulerConfig
from moeserve.engine.kv_groups import KVGroups
from moeserve.engine.runner import Runner, check_kv_capacity, kv_bytes_per_block
from moeserve.model.decoder import MoEForCausalLM
from moeserve.model.experts import ExpertProvider
from moeserve.model.quant import expert_format

CPU_DEFAULT_KV_BYTES = 2 << 30  # cap for the CPU KV budget when none is given


def plan_num_blocks(
    model: MoEForCausalLM,
    cache: CacheConfig,
    sched: SchedulerConfig,
    max_model_len: int,
    experts: Mapping[int, ExpertProvider] | None = None,
    groups: KVGroups | None = None,
) -> int:
    """Blocks for the KV pool; raises KVCacheTooSmall when one max-length sequence won't fit.
    groups: the KV groups (kv_groups.py), which size a block and a sequence's need.

    --kv-cache-memory wins; on CUDA, gpu_memory_utilization of the device minus weights and
    measured peak activations; on CPU, max_num_seqs full-length sequences capped at 2 GiB.
    experts: the expert providers the engine's forwards take (the probe's forward takes them).
    """
    groups = groups or KVGroups.single(model.cfg.num_layers)
    per_block = kv_bytes_per_block(model.cfg, cache.block_size, model.dtype, groups)
    per_seq = groups.blocks_to_run(max_model_len, cache.block_size)
    if cache.kv_cache_memory is not None:
        blocks = cache.kv_cache_memory // per_block
    elif model.device.type == "cuda":
        blocks = _cuda_blocks(model, cache, sched, max_model_len, per_block, experts)
    else:
        blocks = max(per_seq, min(per_seq * sched.max_num_seqs, CPU_DEFAULT_KV_BYTES // per_block))
    check_kv_capacity(blocks, cache.block_size, max_model_len, per_block, groups)
    return blocks


def _cuda_blocks(
    model: MoEForCausalLM,
    cache: CacheConfig,
    sched: SchedulerConfig,
    max_model_len: int,
    per_block: int,
    experts: Mapping[int, ExpertProvider] | None,
) -> int:
    """Blocks that fit in gpu_memory_utilization of the device after weights and the peak
    activations of a maximal step (measured with one forward of max_num_batched_tokens)."""
    n = min(sched.max_num_batched_tokens, max_model_len)
    bs = cache.block_size
    probe = Runner(model, -(-n // bs), bs, experts=experts)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    probe.scratch_prefill(n)  # not traffic: its tokens are not counted
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del probe
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    # Memory held by other processes counts against the budget too.
    others = total - free - torch.cuda.memory_reserved()
    budget = int(total * cache.gpu_memory_utilization) - peak - others
    return max(0, budget // per_block)


def offload_reserve_bytes(
    cfg: ModelConfig, dtype: torch.dtype, sched: SchedulerConfig, max_model_len: int
) -> int:
    """What an expert cache must leave free: the KV of one max-length sequence (the least the
    KV pool accepts), a maximal step's activations (an upper bound: every routed row's expert
    intermediate at once) and 512 MiB for workspaces and fragmentation."""
    elem = torch.empty((), dtype=dtype).element_size()
    kv = cfg.kv_elements_per_token * elem * max_model_len
    t = min(sched.max_num_batched_tokens, max_model_len)
    per_token = 6 * cfg.hidden_size + _attention_activations(cfg)
    per_token += cfg.top_k * (cfg.hidden_size + 3 * cfg.moe_intermediate_size)
    logits = sched.max_num_seqs * cfg.vocab_size * 8  # float32 logits and their softmax
    return kv + t * per_token * elem + logits + (512 << 20)


def _attention_activations(cfg: ModelConfig) -> int:
    """Elements per token of a step's attention intermediates (q, k, v)."""
    if cfg.mla:  # q and the latents expanded into per-head keys and values (prefill)
        qk = cfg.qk_nope_head_dim + cfg.head_dim
        return cfg.num_heads * (2 * qk + cfg.v_head_dim) + cfg.kv_lora_rank + cfg.head_dim
    return cfg.q_size + 2 * cfg.kv_size


def plan_expert_slots(
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    offload: OffloadConfig,
    gpu_memory_utilization: float,
    reserve_bytes: int = 0,
    memory_info: tuple[int, int] | None = None,
    staging_experts: int = 0,
) -> int | None:
    """Device cache slots per sparse layer, or None when every expert stays on the device.

    An explicit --expert-cache-slots / --expert-cache-gb wins. Otherwise, on CUDA, the experts
    are offloaded only when all weights and `reserve_bytes` (offload_reserve_bytes) would not
    fit in gpu_memory_utilization of the device; the cache then takes what remains.
    memory_info: (free, total) bytes, by default torch.cuda.mem_get_info().
    staging_experts: experts' worth of staging slots the cache adds (device_cache.py),
    taken from the budget before it is cut into slots.
    """
    per_expert = expert_format(cfg).expert_bytes(cfg, dtype)  # quantized bytes when quantized
    per_slot = per_expert * cfg.num_sparse_layers  # one slot in every sparse layer
    if offload.cache_slots is not None:
        slots = offload.cache_slots
    elif offload.cache_bytes is not None:
        slots = (offload.cache_bytes - staging_experts * per_expert) // per_slot
        if slots < 1:
            raise ConfigError(
                f"expert_cache_gb {offload.cache_bytes / 2**30:.2f} GiB holds no expert: one slot "
                f"in each of the {cfg.num_sparse_layers} sparse layers needs {per_slot} bytes"
            )
    elif device.type == "cuda":
        meta = MoEForCausalLM(cfg, dtype, torch.device("meta"))
        total = sum(p.numel() * p.element_size() for p in meta.parameters())
        experts = per_slot * cfg.num_experts
        dense = total - experts
        free, capacity = memory_info or torch.cuda.mem_get_info()
        budget = int(capacity * gpu_memory_utilization) - (capacity - free)
        usable = budget - reserve_bytes
        if dense + experts <= usable:
            return None
        slots = (usable - dense - staging_experts * per_expert) // per_slot
        if slots < 1:
            raise ConfigError(
                f"the dense weights ({dense / 2**30:.1f} GiB) and {reserve_bytes / 2**30:.1f} GiB "
                f"for the KV cache and activations leave no room for one expert per layer in "
                f"{budget / 2**30:.1f} GiB of GPU memory (gpu_memory_utilization "
                f"{gpu_memory_utilization}): lower --max-model-len or raise the utilization"
            )
    else:
        return None
    return None if slots >= cfg.num_experts else slots
