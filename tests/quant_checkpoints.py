"""Tiny quantized checkpoints in the hub's exact layouts, and their dequantized references.

FP8: DeepSeek-V3 / Qwen3-FP8 block-scaled e4m3 (`weight` float8_e4m3fn plus a float32
`weight_scale_inv` [ceil(N/128), ceil(K/128)] that dequantization multiplies by).
MXFP4: openai/gpt-oss's packed experts (`*_blocks` uint8 [E, N, K/32, 16], two E2M1 values
a byte with element 2i in the low nibble, `*_scales` uint8 E8M0 exponents [E, N, K/32]).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tests.checkpoints import load_reference, make_checkpoint

FP8_BLOCK = 128
E4M3_MAX = 448.0
MX_GROUP = 32
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])

# Sizes above 128 and not multiples of it: several 128-blocks per axis, partial last blocks.
FP8_SIZES: dict[str, dict[str, Any]] = {
    "mixtral": dict(hidden_size=160, intermediate_size=136),
    "qwen3_moe": dict(hidden_size=160, moe_intermediate_size=136),
    "deepseek_v3": dict(hidden_size=160, intermediate_size=136, moe_intermediate_size=96),
}
MXFP4_SIZES: dict[str, Any] = dict(hidden_size=64, intermediate_size=64)

# Routed experts' weights are scaled up by this: at the 0.02-std init the experts add ~2% to
# the residual stream, and their rounding would hide below the tests' 1e-3. gpt-oss clamps
# gate/up at swiglu_limit, so only its down projection grows there, by the gain cubed (what
# the three projections' gains give the others, ~8x their output).
EXPERT_GAIN = 2.0
_GAINED = re.compile(r"\.experts\.(\d+\.\w+\.weight|down_proj)$")

# Linear projections of attention, dense MLPs, shared and routed experts (DeepSeek's MLA
# kv_a_proj_with_mqa included); routers (`gate.weight`), embeddings, lm_head, norms stay.
_FP8_LINEAR = re.compile(r"(_proj|_proj_with_mqa|\.w[123])\.weight$")


def _rewrite_shards(path: Path, rewrite: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Apply `rewrite` to every shard's tensors in place, keeping the index's map in step."""
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    for shard in sorted(path.glob("*.safetensors")):
        tensors = load_file(shard)
        before = set(tensors)
        rewrite(tensors)
        save_file(tensors, shard, metadata={"format": "pt"})
        if index is not None:
            weight_map = index["weight_map"]
            for name in before - set(tensors):
                del weight_map[name]
            for name in set(tensors) - before:
                weight_map[name] = shard.name
    if index is not None:
        index_path.write_text(json.dumps(index, indent=2))


def make_float_checkpoint(path: Path, family: str, **overrides: Any) -> Path:
    """make_checkpoint with the experts scaled by EXPERT_GAIN: what the writers quantize."""
    make_checkpoint(path, family, **overrides)

    def gain(tensors: dict[str, torch.Tensor]) -> None:
        for name in [n for n in tensors if _GAINED.search(n)]:
            g = EXPERT_GAIN**3 if family == "gpt_oss" else EXPERT_GAIN
            tensors[name] = tensors[name] * g

    _rewrite_shards(path, gain)
    return path


def _edit_config(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    cfg_path = path / "config.json"
    raw = json.loads(cfg_path.read_text())
    edit(raw)
    cfg_path.write_text(json.dumps(raw, indent=2))


# ---- FP8, 128x128 blocks ---------------------------------------------------------------


def quantize_fp8_blocks(
    w: torch.Tensor, block: int = FP8_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's weight quantizer: per block scale = amax/448, q = e4m3(w / scale)."""
    n, k = w.shape
    nb, kb = math.ceil(n / block), math.ceil(k / block)
    padded = F.pad(w.float(), (0, kb * block - k, 0, nb * block - n))  # zeros leave amax as is
    blocks = padded.reshape(nb, block, kb, block)
    scale = blocks.abs().amax(dim=(1, 3)) / E4M3_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero block stays 0
    q = (blocks / scale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.reshape(nb * block, kb * block)[:n, :k].contiguous(), scale


def dequantize_fp8_blocks(
    q: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK
) -> torch.Tensor:
    n, k = q.shape
    full = scale_inv.repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
    return q.float() * full


def not_converted(module: str, patterns: list[str]) -> bool:
    """Whether a modules_to_not_convert entry names `module`: as a dotted substring on module
    boundaries ("self_attn" and "model.layers.0.mlp" match, "mlp.gate" not "mlp.gate_proj"),
    `*` matching anything: the hub's entries read the same as transformers reads them."""
    regexes = [re.escape(p).replace(r"\*", ".*") for p in patterns]
    return any(re.search(rf"(^|\.){r}(\.|$)", module) for r in regexes)


def make_fp8_checkpoint(
    path: Path,
    family: str,
    *,
    modules_to_not_convert: list[str] | None = None,
    **overrides: Any,
) -> Path:
    """A `family` checkpoint as the hub ships FP8 block-scaled models (weights float32 elsewhere).

    Modules that `modules_to_not_convert` names (see not_converted) keep float32 weights.
    """
    make_float_checkpoint(path, family, **{**FP8_SIZES.get(family, {}), **overrides})
    skip = modules_to_not_convert or []

    def rewrite(tensors: dict[str, torch.Tensor]) -> None:
        for name in [n for n in tensors if _FP8_LINEAR.search(n)]:
            if not_converted(name.removesuffix(".weight"), skip):
                continue
            tensors[name], tensors[name + "_scale_inv"] = quantize_fp8_blocks(tensors[name])

    def config(raw: dict[str, Any]) -> None:
        quant: dict[str, Any] = dict(
            quant_method="fp8",
            fmt="e4m3",
            activation_scheme="dynamic",
            weight_block_size=[FP8_BLOCK, FP8_BLOCK],
        )
        if modules_to_not_convert is not None:
            quant["modules_to_not_convert"] = modules_to_not_convert
        raw["quantization_config"] = quant

    _rewrite_shards(path, rewrite)
    _edit_config(path, config)
    return path


# ---- MXFP4, groups of 32 along the input dimension --------------------------------------


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N, K] -> blocks uint8 [..., N, K/32, 16], scales uint8 [..., N, K/32].

    The scale is the smallest power of two that brings the group's amax within E2M1's 6, so
    nothing saturates; values round to the nearest E2M1 grid point.
    """
    *lead, n, k = w.shape
    assert k % MX_GROUP == 0, f"input dim {k} is not a multiple of {MX_GROUP}"
    groups = w.float().reshape(*lead, n, k // MX_GROUP, MX_GROUP)
    amax = groups.abs().amax(-1)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    exp = torch.where(amax > 0, exp, torch.full_like(exp, -127))
    x = groups / torch.exp2(exp)[..., None]
    idx = (x.abs()[..., None] - E2M1_VALUES).abs().argmin(-1)  # ties: the lower (even) code
    codes = (idx | ((x < 0) & (idx > 0)).long() << 3).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (exp + 127).to(torch.uint8)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks [..., N, G, 16], scales [..., N, G] -> float32 [..., N, G*32]."""
    lut = torch.cat([E2M1_VALUES, -E2M1_VALUES])
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2).long()
    vals = lut[codes] * torch.exp2(scales.float() - 127)[..., None]
    return vals.flatten(-2)


_MX_EXPERTS = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")

MXFP4_NOT_CONVERTED = [
    "model.layers.*.self_attn",
    "model.layers.*.mlp.router",
    "model.embed_tokens",
    "lm_head",
]


def make_mxfp4_checkpoint(path: Path, **overrides: Any) -> Path:
    """A gpt_oss checkpoint as openai/gpt-oss-20b ships it: MXFP4 experts, the rest as saved."""
    make_float_checkpoint(path, "gpt_oss", **{**MXFP4_SIZES, **overrides})

    def rewrite(tensors: dict[str, torch.Tensor]) -> None:
        for name in [n for n in tensors if _MX_EXPERTS.search(n)]:
            # transformers holds [E, in, out]; the hub packs each output row along its input.
            w = tensors.pop(name).transpose(1, 2)
            tensors[name + "_blocks"], tensors[name + "_scales"] = quantize_mxfp4(w)

    def config(raw: dict[str, Any]) -> None:
        raw["quantization_config"] = dict(
            quant_method="mxfp4", modules_to_not_convert=list(MXFP4_NOT_CONVERTED)
        )

    _rewrite_shards(path, rewrite)
    _edit_config(path, config)
    return path


# ---- dequantized references -------------------------------------------------------------


def dequantized_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float32 tensors a quantized checkpoint's tensors stand for, under the float names."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith("_scale_inv") or name.endswith("_scales"):
            continue
        if name + "_scale_inv" in tensors:
            out[name] = dequantize_fp8_blocks(t, tensors[name + "_scale_inv"])
        elif name.endswith("_blocks"):
            base = name.removesuffix("_blocks")
            out[base] = dequantize_mxfp4(t, tensors[base + "_scales"]).transpose(1, 2).contiguous()
        else:
            out[name] = t.float() if t.is_floating_point() else t
    return out


def write_dequantized(path: Path, out: Path) -> Path:
    """A float32 copy of quantized checkpoint `path` under `out`, without quantization_config."""
    out.mkdir(parents=True, exist_ok=True)
    for f in path.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(shard))
    save_file(dequantized_tensors(tensors), out / "model.safetensors", metadata={"format": "pt"})
    _edit_config(out, lambda raw: raw.pop("quantization_config", None))
    return out


def dequantized_reference(path: Path, out: Path | None = None) -> Any:
    """transformers in float32 on the dequantized weights of quantized checkpoint `path`."""
    out = out or path.with_name(path.name + "-dequantized")
    return load_reference(write_dequantized(path, out))


def fake_quant_fp8_rows(w: torch.Tensor, group: int = FP8_BLOCK) -> torch.Tensor:
    """Quantize-dequantize [..., N, K] with one e4m3 scale (amax/448) per row per 128 inputs:
    what online FP8 quantization of float weights must compute."""
    k = w.shape[-1]
    kb = math.ceil(k / group)
    g = F.pad(w.float(), (0, kb * group - k)).unflatten(-1, (kb, group))
    scale = g.abs().amax(-1, keepdim=True) / E4M3_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (g / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).flatten(-2)[..., :k].contiguous()
