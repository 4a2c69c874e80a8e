"""The routed experts' activation, as data: one place decides what an expert computes between
its two projections, for every expert path (resident, fused Triton, the expert store's device
slots and CPU compute).

    silu:            silu(gate) * up                                   Mixtral, Qwen, OLMoE
    clamped_swiglu:  g = min(gate, limit), u = clamp(up, -limit, limit),
                     g * sigmoid(alpha * g) * (u + 1)                  gpt-oss

gate and up are the two halves of the [.., 2F] gate_up projection (gate first), whatever
interleaving the checkpoint stored them in (the loader's TRANSFORMS undo it).

Shapes: N rows, F expert intermediate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeserve.config import ConfigError, ModelConfig

ACTIVATIONS = ("silu", "clamped_swiglu")


@dataclass(frozen=True)
class ExpertActivation:
    kind: str = "silu"
    alpha: float = 1.702  # clamped_swiglu: the sigmoid's gain
    limit: float = 7.0  # clamped_swiglu: gate clamped above, up on both sides

    def __post_init__(self) -> None:
        if self.kind not in ACTIVATIONS:
            raise ConfigError(
                f"expert activation must be one of {', '.join(ACTIVATIONS)}, got {self.kind!r}"
            )
        if self.kind == "clamped_swiglu" and not self.limit > 0:
            raise ConfigError(f"swiglu_limit must be > 0, got {self.limit}")

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> ExpertActivation:
        return cls(cfg.expert_activation, cfg.swiglu_alpha, cfg.swiglu_limit)

    def __call__(self, gate_up_NF2: torch.Tensor) -> torch.Tensor:
        """[N, F] from [N, 2F], in the input's dtype, op by op as the references compute it."""
        gate, up = gate_up_NF2.chunk(2, dim=-1)
        if self.kind == "silu":
            return F.silu(gate) * up
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


SILU = ExpertActivation()
