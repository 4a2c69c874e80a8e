"""The physical floors of the design notes, measured in the run that is compared with them.

Rates: a device copy (HBM read + write), a pinned host-to-device copy, a bf16 matmul. Work: the
bytes of weights a step reads and the FLOPs it runs, from the model built on the meta device. A step
takes at least max(bytes / HBM rate, FLOPs / matmul rate); an offloaded expert that missed
the cache also crosses the host link once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from moeserve.config import ModelConfig

GiB = 1 << 30


def _seconds_per_call(fn: Callable[[], object], reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy, read and write counted (the HBM rate)."""
    src = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * GiB / _seconds_per_call(lambda: dst.copy_(src), 20)


def host_to_device_bandwidth() -> float:
    """Bytes/s of a 1 GiB copy from pinned host memory to the device."""
    src = torch.empty(GiB, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    return GiB / _seconds_per_call(lambda: dst.copy_(src, non_blocking=True), 10)


def matmul_rate() -> float:
    """FLOP/s of an 8192^3 bf16 matmul."""
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    return 2 * 8192**3 / _seconds_per_call(lambda: a @ b, 20)


@dataclass(frozen=True)
class ModelWork:
    """What a step reads and computes, in parameters (times element_size: bytes)."""

    dense: int  # read every step: attention, routers, shared experts, dense MLPs, lm_head
    lm_head: int  # part of dense, computed for the sampled rows only
    expert: int  # one routed expert: gate, up and down projections
    sparse_layers: int
    num_experts: int
    top_k: int
    kv_per_token: int  # K and V of one token, all layers
    element_size: int  # bytes per weight
    expert_bytes: float  # one routed expert as stored (quantized, with its scales, or not)

    def experts_touched(self, tokens: int) -> float:
        """Distinct experts per sparse layer that `tokens` tokens reach under uniform routing."""
        e, k = self.num_experts, self.top_k
        return e * (1 - (1 - k / e) ** tokens) if e else 0.0

    def step_bytes(self, tokens: int, context_tokens: int = 0) -> float:
        """Bytes a step of `tokens` tokens reads at least: the dense weights, the experts
        uniform routing touches, and the K/V of `context_tokens` cached tokens."""
        experts = self.sparse_layers * self.experts_touched(tokens) * self.expert_bytes
        return (self.dense + self.kv_per_token * context_tokens) * self.element_size + experts

    def step_flops(self, tokens: int, sampled: int) -> float:
        """Linear-layer FLOPs of a step (attention's own are left out: a floor may
        underestimate, never overestimate)."""
        active = self.dense - self.lm_head + self.sparse_layers * self.top_k * self.expert
        return 2.0 * (tokens * active + sampled * self.lm_head)


def model_work(cfg: ModelConfig, element_size: int) -> ModelWork:
    """The ModelWork of a config, counted on the model itself built on the meta device (no
    memory), so every family's layers are priced as they are built. Vectors (norms, biases,
    sinks) are left out, and so is the embedding table unless it is also the lm_head.
    Quantized experts (cfg.expert_quant) count their stored bytes and scales."""
    from moeserve.engine.runner import kv_bytes_per_block
    from moeserve.model.decoder import MoEForCausalLM
    from moeserve.model.quant import ExpertFormat

    model = MoEForCausalLM(replace(cfg, expert_quant=""), torch.float32, torch.device("meta"))
    expert = 0
    routed: set[int] = set()
    for _, moe in model.moe_layers():
        e = moe.num_experts
        per_layer = 0
        for name, p in moe.named_parameters(recurse=False):
            if p.ndim >= 2 and p.shape[0] == e and not name.startswith("router"):
                routed.add(id(p))
                per_layer += p[0].numel()
        expert = max(expert, per_layer)
    lm_head = model.lm_head_weight.numel()
    dense = lm_head + sum(
        p.numel()
        for name, p in model.named_parameters()
        if p.ndim >= 2 and id(p) not in routed and name not in ("embed_tokens", "lm_head")
    )
    kv_elements = kv_bytes_per_block(cfg, 1, torch.float32) // 4
    return ModelWork(
        dense=dense,
        lm_head=lm_head,
        expert=expert,
        sparse_layers=cfg.num_sparse_layers,
        num_experts=cfg.num_experts,
        top_k=cfg.top_k,
        kv_per_token=kv_elements,
        element_size=element_size,
        expert_bytes=(
            ExpertFormat(cfg.expert_quant).expert_bytes(cfg, torch.float32)
            if cfg.expert_quant
            else expert * element_size
        ),
    )
