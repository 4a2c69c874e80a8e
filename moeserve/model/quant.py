"""Quantized weights: which formats a checkpoint may ship, how experts are stored, and the
loader's conversions.

Routed experts stay quantized in device memory, in host memory and over PCIe; kernels
dequantize in registers, the readable path (ResidentExperts) one expert at a time. A stacked
expert weight that is [E, N, K] in real values (N output rows, K reduced) is stored as (w, s)
with a scale per output row and per group of K elements:

    fp8    w float8_e4m3fn [E, N, K]  s float32 [E, N, ceil(K/128)]  real = w * s
    mxfp4  w uint8 [E, N, K/2]        s uint8 [E, N, K/32] (E8M0)    real = e2m1(nibble) * 2^(s-127)

Row-wise groups keep every row self-contained: the loader may stack gate and up, reorder rows
(gpt-oss's interleaving) or copy one expert into a cache slot without touching a scale. Hub
FP8 checkpoints (DeepSeek-V3, Qwen3-FP8) ship one float32 scale per 128x128 block; their
scales are repeated down the block's 128 rows at load (1/32 of the FP8 bytes).

Dense linears (attention's qkv and output projections, dense and shared-expert MLPs) of an
FP8 model (`ModelConfig.dense_quant`) are stored the same way, [N, K] float8 with [N,
ceil(K/128)] scales (dense_weight), and computed by ModelBackend.linear. What stays in the
model dtype: routers, norms, embeddings, the LM head, multi-head latent attention's
projections (its decode absorbs them), and any linear a hub FP8 checkpoint ships in float
(`modules_to_not_convert`): the loader keeps those float (loader.keep_float_linears).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moeserve.config import ConfigError, ModelConfig
from moeserve.kernels.quant import FP8_MAX, group_size
from moeserve.model.params import empty_param

# quant_method values a checkpoint's config.json may give, and --quantization's choices.
CHECKPOINT_METHODS = ("fp8", "mxfp4")
ONLINE_METHODS = ("fp8",)
FP8_BLOCK = 128  # hub FP8 checkpoints' block edge


@dataclass(frozen=True)
class ExpertFormat:
    """How routed experts are stored: "" (the model dtype), "fp8" or "mxfp4"."""

    kind: str = ""

    @property
    def quantized(self) -> bool:
        return bool(self.kind)

    @property
    def group(self) -> int:
        return group_size(self.kind) if self.kind else 0

    def weight(self, n: int, k: int, dtype: torch.dtype) -> tuple[tuple[int, int], torch.dtype]:
        """Shape per expert and dtype of a [N, K] weight's stored values."""
        if self.kind == "fp8":
            return (n, k), torch.float8_e4m3fn
        if self.kind == "mxfp4":
            return (n, k // 2), torch.uint8
        return (n, k), dtype

    def scale(self, n: int, k: int) -> tuple[tuple[int, int], torch.dtype] | None:
        """Shape per expert and dtype of its scales; None for plain weights."""
        if not self.quantized:
            return None
        return (n, math.ceil(k / self.group)), torch.float32 if self.kind == "fp8" else torch.uint8

    def expert_bytes(self, cfg: ModelConfig, dtype: torch.dtype) -> int:
        """Bytes of one routed expert's weights and scales (biases not counted)."""
        f, d = cfg.moe_intermediate_size, cfg.hidden_size
        total = 0
        for n, k in ((2 * f, d), (d, f)):
            shape, wdt = self.weight(n, k, dtype)
            total += math.prod(shape) * _itemsize(wdt)
            sc = self.scale(n, k)
            if sc is not None:
                total += math.prod(sc[0]) * _itemsize(sc[1])
        return total


@dataclass(frozen=True)
class ExpertScales:
    """A layer's (or an expert cache's) scales beside its stored expert weights."""

    kind: str
    gate_up: torch.Tensor  # [E, 2F, groups of D]
    down: torch.Tensor  # [E, D, groups of F]

    @staticmethod
    def of(holder: Any) -> ExpertScales | None:
        """From anything with format, w_gate_up_scale and w_down_scale (an MoE layer, an
        expert cache); None when its experts are plain."""
        if not holder.format.quantized:
            return None
        return ExpertScales(holder.format.kind, holder.w_gate_up_scale, holder.w_down_scale)

    def kernel_args(self) -> dict[str, Any]:
        """fused_moe's keyword arguments for these weights."""
        return dict(w_gate_up_scale=self.gate_up, w_down_scale=self.down, quant=self.kind)


def dense_weight(
    n: int, k: int, dtype: torch.dtype, device: torch.device, quant: str
) -> tuple[nn.Parameter, nn.Parameter | None]:
    """A dense linear's [N, K] weight and its scales: FP8 (quant "fp8") float8 values with a
    float32 scale per row and 128 columns; otherwise the model dtype and no scales."""
    if quant != "fp8":
        return empty_param(n, k, dtype=dtype, device=device), None
    w = empty_param(n, k, dtype=torch.float8_e4m3fn, device=device)
    return w, empty_param(n, math.ceil(k / FP8_BLOCK), dtype=torch.float32, device=device)


def resolve_dense_quant(checkpoint: str | None, online: str | None) -> str:
    """The dense linears' format: FP8 for an FP8 checkpoint (as shipped) and under
    --quantization fp8 (quantized at load, as the experts); MXFP4 checkpoints (gpt-oss)
    ship their dense weights in bf16."""
    return "fp8" if "fp8" in (checkpoint, online) else ""


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def expert_format(cfg: ModelConfig) -> ExpertFormat:
    return ExpertFormat(cfg.expert_quant)


# ---- checkpoint configs


def checkpoint_method(raw: dict[str, Any]) -> str | None:
    """The supported quant_method a config.json declares (validated), or None for float
    weights. Unsupported methods are refused by the loader before this is asked."""
    q = raw.get("quantization_config")
    if not isinstance(q, dict):
        return None
    method = str(q.get("quant_method", "")).lower()
    if method == "fp8":
        fmt = q.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ConfigError(f"quantization_config.fmt {fmt!r} is not supported (only e4m3)")
        block = q.get("weight_block_size")
        if block is None or list(block) != [FP8_BLOCK, FP8_BLOCK]:
            raise ConfigError(
                f"quantization_config.weight_block_size {block!r} is not supported: FP8 "
                f"checkpoints must be block-scaled with [{FP8_BLOCK}, {FP8_BLOCK}] blocks"
            )
        scheme = q.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise ConfigError(
                f"quantization_config.activation_scheme {scheme!r} is not supported (dynamic)"
            )
    return method if method in CHECKPOINT_METHODS else None


def resolve_expert_quant(checkpoint: str | None, online: str | None) -> str:
    """The experts' format from the checkpoint's method and --quantization."""
    if online is not None and online not in ONLINE_METHODS:
        raise ConfigError(
            f"quantization must be one of {', '.join(ONLINE_METHODS)}, got {online!r}"
        )
    if checkpoint and online and checkpoint != online:
        raise ConfigError(
            f"--quantization {online} on a checkpoint already quantized with {checkpoint}"
        )
    return checkpoint or online or ""


# ---- conversions


def fp8_block_rows(scale_inv: torch.Tensor, rows: int) -> torch.Tensor:
    """A hub checkpoint's [ceil(N/128), ceil(K/128)] block scales -> one row per weight row
    [rows, ceil(K/128)] (works on meta tensors, for the loader's shape checks)."""
    return scale_inv.repeat_interleave(FP8_BLOCK, dim=-2)[..., :rows, :]


def dequantize_fp8_blocks(w: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """A [N, K] float8 weight with its 128x128 block scales -> float32."""
    n, k = w.shape
    s = scale_inv.repeat_interleave(FP8_BLOCK, 0)[:n].repeat_interleave(FP8_BLOCK, 1)[:, :k]
    return w.to(torch.float32) * s


def fill_random(w: torch.Tensor, s: torch.Tensor, kind: str, bound: float) -> None:
    """Fill stored weights (in place, on their device) with values about uniform in
    [-bound, bound]: dummy loads for benchmarks. Generated on a GPU when there is one (tens
    of GB of offloaded experts fill far faster), one expert at a time."""
    gen = torch.device("cuda") if torch.cuda.is_available() else w.device
    for one in w if w.dim() == 3 else [w]:  # a dense [N, K] weight in one go
        if kind == "fp8":
            tmp = torch.empty(one.shape, dtype=torch.float16, device=gen)
            one.copy_(tmp.uniform_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn))
        else:
            one.copy_(torch.randint(0, 256, one.shape, dtype=torch.uint8, device=gen))
    if kind == "fp8":
        s.fill_(bound / FP8_MAX)
        return
    # E2M1's largest value is 6: the exponent that brings 6 near the bound.
    s.fill_(127 + math.floor(math.log2(bound / 6.0)))
