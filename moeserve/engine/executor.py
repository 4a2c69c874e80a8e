"""The executor: the loaded model on its device, its KV cache and expert store, and one call
that runs a step's flat batch through it.

Building it is the engine's heavy start: check the device, read the checkpoint's config,
plan device memory (expert cache slots, then KV blocks), load the weights, choose the
kernels, capture CUDA graphs and compile every kernel variant a step can pick.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import torch

from moeserve.config import ConfigError, EngineConfig, flag_of
from moeserve.engine.device_cache import graph_fetch_batch, staging_slots
from moeserve.engine.expert_store import ExpertCacheStats, ExpertStore
from moeserve.engine.kv_budget import offload_reserve_bytes, plan_expert_slots, plan_num_blocks
from moeserve.engine.kv_groups import KVGroups
from moeserve.engine.placement import resolve_device, resolve_kernels
from moeserve.engine.prompt_logprobs import PromptRows
from moeserve.engine.runner import Runner, Work, kv_bytes_per_block
from moeserve.model.backend import ModelBackend
from moeserve.model.loader import inspect_checkpoint, load_model, resolve_dtype
from moeserve.model.quant import expert_format

log = logging.getLogger(__name__)


class Executor:
    """The model, ready to run steps. Shapes: R sampled rows, V vocab."""

    def __init__(self, config: EngineConfig, *, progress: bool = True) -> None:
        dev = resolve_device(config.parallel.device)
        self._cuda_index = dev.index if dev.type == "cuda" else None
        with self.on_device():
            self._build(config, str(dev), progress)

    def on_device(self) -> AbstractContextManager[object]:
        """The engine's CUDA device as the current one, then the caller's again: Triton
        launches, streams, graph capture and the memory probe use the current device (per
        thread), not the tensors'."""
        return nullcontext() if self._cuda_index is None else torch.cuda.device(self._cuda_index)

    def _build(self, config: EngineConfig, device: str, progress: bool) -> None:
        load, sched, cache, offload = config.model, config.scheduler, config.cache, config.offload
        dtype = None if load.dtype == "auto" else load.dtype
        ckpt = inspect_checkpoint(
            load.path, need_weights=load.load_format != "dummy", quantization=load.quantization
        )
        model_dtype = resolve_dtype(ckpt.config, dtype)
        max_positions = ckpt.config.max_position_embeddings
        self.max_model_len = sched.max_model_len or max_positions
        if self.max_model_len > max_positions:  # before any weight is read
            raise ConfigError(
                f"max_model_len {self.max_model_len} exceeds the model's "
                f"max_position_embeddings {max_positions} ({flag_of('max_model_len')})"
            )
        if not sched.enable_chunked_prefill and sched.max_num_batched_tokens < self.max_model_len:
            raise ConfigError(
                f"max_num_batched_tokens ({sched.max_num_batched_tokens}) must be >= "
                f"max_model_len ({self.max_model_len}) when chunked prefill is disabled "
                f"({flag_of('enable_chunked_prefill')}), or a long prompt never runs"
            )
        self.kernels = resolve_kernels(config.kernels.kernels, torch.device(device))
        if offload.kernels == "fused" and self.kernels != "triton":  # before any weight is read
            raise ConfigError(
                f"{flag_of('expert_cache_kernels')} fused runs the Triton kernels; this engine "
                f"uses the {self.kernels} kernels ({flag_of('kernels')} triton, or auto on CUDA)"
            )
        on_cuda = torch.device(device).type == "cuda"
        self.graphs = self.kernels == "triton" and on_cuda and not config.kernels.enforce_eager
        fused = offload.kernels == "fused" or (
            offload.kernels == "auto" and self.kernels == "triton"
        )
        graph_batch = graph_fetch_batch(
            offload,
            self.graphs,
            fused,
            sched.max_num_seqs,
            expert_format(ckpt.config).expert_bytes(ckpt.config, model_dtype),
        )
        reserve = offload_reserve_bytes(ckpt.config, model_dtype, sched, self.max_model_len)
        slots = plan_expert_slots(
            ckpt.config,
            model_dtype,
            torch.device(device),
            offload,
            cache.gpu_memory_utilization,
            reserve_bytes=reserve,
            staging_experts=staging_slots(ckpt.config.num_experts, ckpt.config.top_k, graph_batch),
        )
        self.checkpoint, self.model = load_model(
            load.path,
            dtype=dtype,
            device=device,
            progress=progress,
            load_format=load.load_format,
            quantization=load.quantization,
            expert_device="cpu" if slots is not None else None,
            backend=ModelBackend(triton=self.kernels == "triton"),
        )
        # Experts in host memory run through a per-layer device cache, handed to every forward.
        self.expert_store = (
            ExpertStore(self.model, offload, slots, fused=fused, graph_batch=graph_batch)
            if slots is not None
            else None
        )
        experts = self.expert_store.providers() if self.expert_store is not None else None
        self.model_config = self.model.cfg
        # Sliding-window layers beside full ones keep only their window's blocks.
        self.kv_groups = KVGroups.for_model(self.model.cfg)
        self.num_blocks = plan_num_blocks(
            self.model, cache, sched, self.max_model_len, experts, self.kv_groups
        )
        self.block_size = cache.block_size
        self.runner = Runner(
            self.model,
            self.num_blocks,
            cache.block_size,
            decode_graphs_up_to=sched.max_num_seqs if self.graphs else 0,
            max_model_len=self.max_model_len,
            max_num_seqs=sched.max_num_seqs,
            experts=experts,
            kv_groups=self.kv_groups,
            device_cache=self.expert_store.device_cache if self.expert_store else None,
        )
        asynchronous = config.kernels.async_scheduling
        self.async_scheduling = on_cuda if asynchronous is None else asynchronous
        if self.kernels == "triton" and on_cuda:
            secs = self.runner.warm_up(sched.max_num_batched_tokens)
            log.info("Triton kernels compiled for every step size in %.1f s", secs)
            from moeserve.kernels import log_later_compiles

            log_later_compiles()
        if self.expert_store is not None:
            # The KV probe's and the warm-up's expert fetches are not traffic.
            self.expert_store.reset_stats()
        self.weight_bytes = self.model.weight_bytes()
        log.info("weights: %s", describe_weights(self.weight_bytes))
        kv_token = kv_bytes_per_block(self.model_config, 1, self.model.dtype)
        log.info(
            "model ready: %s on %s, %d KV blocks of %d tokens (%d tokens at %d bytes a token%s), "
            "max_model_len %d, %s kernels, decode CUDA graphs %s, async scheduling %s",
            self.model_config.model_type,
            device,
            self.num_blocks,
            cache.block_size,
            self.num_blocks * cache.block_size,
            kv_token,
            ", latent cache" if self.model_config.mla else "",
            self.max_model_len,
            self.kernels,
            "on" if self.graphs else "off",
            "on" if self.async_scheduling else "off",
        )

    @property
    def offloads_experts(self) -> bool:
        return self.expert_store is not None

    @property
    def fed_R(self) -> torch.Tensor:
        """The last step's sampled tokens on the device (async scheduling feeds them)."""
        return self.runner.fed_R

    def execute(
        self,
        work: Sequence[Work],
        feed: Sequence[int] | None = None,
        prompt: PromptRows | None = None,
    ) -> tuple[torch.Tensor, list[int]]:
        """Logits [R, V] of the step's sampled rows and, per row, its index into `work`
        (and, with `prompt`, the prompt log-probs it names: prompt_logprobs.py)."""
        return self.runner.execute(work, feed, prompt)

    def keep_sampled(self, tokens_R: torch.Tensor) -> None:
        self.runner.keep_sampled(tokens_R)

    def expert_token_counts(self) -> torch.Tensor:
        """[sparse layers, E] tokens routed to each expert since start (one host copy)."""
        return self.model.tokens_per_expert().cpu()

    def expert_cache_stats(self) -> list[ExpertCacheStats]:
        """Per sparse layer cache counters; empty when every expert is resident."""
        return self.expert_store.stats() if self.expert_store is not None else []

    def reset_expert_counts(self) -> None:
        """Zero the per-expert counters (after a warm-up, whose tokens are not traffic)."""
        self.model.reset_expert_counts()


def describe_weights(weight_bytes: dict[tuple[str, str, str], int]) -> str:
    """The startup log's line of weight sizes, e.g. "dense (bfloat16) 1.40 GiB on the device,
    experts (fp8) 15.20 GiB on the device"."""
    return ", ".join(
        f"{part} ({fmt}) {n / 2**30:.2f} GiB on the {where}"
        for (part, fmt, where), n in sorted(weight_bytes.items())
    )
