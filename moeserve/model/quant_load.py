"""The loader's part of quantized checkpoints (formats in model/quant.py): which tensors are
scales, their checks, and how each checkpoint tensor reaches its parameter.

    hub FP8 weight -> a quantized expert   copied as is; its block scales repeated per row
    hub FP8 weight -> a float parameter    dequantized at load (dense linears)
    float weight   -> a quantized expert   quantized at load (--quantization fp8)
    anything else                          copied, as for float checkpoints
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from moeserve.kernels.quant import quantize_fp8_rows
from moeserve.model.quant import FP8_BLOCK, dequantize_fp8_blocks, fp8_block_rows
from moeserve.model.safetensors_check import TensorEntry

SCALE_SUFFIX = "_scale_inv"  # DeepSeek-V3 / Qwen3-FP8: "<linear>.weight_scale_inv"
_FLOAT = ("F32", "BF16", "F16", "F64")
_STORED = {torch.float8_e4m3fn: "F8_E4M3", torch.uint8: "U8"}


class QuantLoadError(ValueError):
    """A quantized tensor that does not fit its parameter; the loader names the file."""


def pop_scales(where: dict[str, Path]) -> dict[str, Path]:
    """Remove the hub FP8 block scales from the tensor index: {weight name: its shard}
    (the scale is the weight's name + SCALE_SUFFIX)."""
    names = [n for n in where if n.endswith(".weight" + SCALE_SUFFIX)]
    return {n.removesuffix(SCALE_SUFFIX): where.pop(n) for n in names}


def scale_param(name: str) -> str:
    """The scale parameter beside a quantized expert parameter (MoE._expert_param)."""
    return name + "_scale"


def check_tensor(
    name: str,
    entry: TensorEntry,
    target: torch.Tensor,
    has_transform: bool,
    scale: TensorEntry | None,
) -> None:
    """A checkpoint tensor's dtype (and its block scale's shape) against its parameter."""
    stored = _STORED.get(target.dtype)
    if entry.dtype == "F8_E4M3":
        if scale is None:
            raise QuantLoadError(f"tensor '{name}' is float8 but has no '{name}{SCALE_SUFFIX}'")
        n, k = entry.shape[-2:]
        want = [math.ceil(n / FP8_BLOCK), math.ceil(k / FP8_BLOCK)]
        if list(scale.shape) != want:
            raise QuantLoadError(
                f"tensor '{name}{SCALE_SUFFIX}' has shape {list(scale.shape)}, expected {want} "
                f"(one scale per {FP8_BLOCK}x{FP8_BLOCK} block of {list(entry.shape)})"
            )
        if stored == "F8_E4M3" and has_transform:
            raise QuantLoadError(f"tensor '{name}': a float8 expert cannot be re-laid out")
        if stored not in (None, "F8_E4M3"):
            raise QuantLoadError(f"tensor '{name}' is float8, its parameter is {target.dtype}")
        return
    if scale is not None:
        raise QuantLoadError(f"tensor '{name}' has a block scale but is {entry.dtype}")
    if stored == "U8" and entry.dtype == "U8":
        return
    if entry.dtype not in _FLOAT or stored == "U8":
        raise QuantLoadError(
            f"tensor '{name}' has dtype {entry.dtype}, its parameter is {target.dtype}; "
            f"float weights ({', '.join(_FLOAT)}) or the quantized formats' tensors expected"
        )


def copy_into(
    params: dict[str, torch.Tensor],
    target_name: str,
    index: tuple,
    tensor: torch.Tensor,
    transform: Callable[[torch.Tensor], torch.Tensor],
    scale_inv: torch.Tensor | None,
) -> None:
    """Copy one checkpoint tensor into its parameter (slice), converting as the table above."""
    target = params[target_name][index] if index else params[target_name]
    if scale_inv is not None and target.dtype != torch.float8_e4m3fn:
        target.copy_(transform(dequantize_fp8_blocks(tensor, scale_inv)))
        return
    if target.dtype == torch.float8_e4m3fn:
        scales = params[scale_param(target_name)]
        scales = scales[index] if index else scales
        if scale_inv is not None:  # hub FP8: the values as shipped, block scales per row
            target.copy_(tensor)
            scales.copy_(fp8_block_rows(scale_inv, tensor.shape[-2]))
        else:  # online: the (re-laid-out) float weight quantized per row, on a GPU if any
            # (a CPU quantizes some 60 MB/s a core: minutes for a Mixtral-8x7B)
            src = transform(tensor)
            if torch.cuda.is_available():
                src = src.to(target.device if target.is_cuda else torch.device("cuda"))
            q, s = quantize_fp8_rows(src)
            target.copy_(q)
            scales.copy_(s)
        return
    target.copy_(transform(tensor))
