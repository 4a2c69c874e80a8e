"""Safetensors checkpoints -> a MoEForCausalLM, tensor by tensor, validated.

Never unpickles and never runs code from the checkpoint. Every header is checked (and every
tensor's name, shape and dtype against the model) before any tensor data is read; then every
tensor is read from the memory-mapped file and copied straight into its preallocated
parameter, so peak host memory stays near the size of the weights plus one tensor.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from moeserve.config import ConfigError, ModelConfig
from moeserve.model.backend import ModelBackend
from moeserve.model.decoder import DTYPES, MoEForCausalLM
from moeserve.model.deepseek_moe import mtp_layer_prefixes
from moeserve.model.families import (
    IGNORED_PREFIXES,
    IGNORED_SUFFIXES,
    TRANSFORMS,
    PlanEntry,
    parse_config,
    weight_plan,
)
from moeserve.model.params import empty_param
from moeserve.model.quant import (
    CHECKPOINT_METHODS,
    checkpoint_method,
    fill_random,
    resolve_dense_quant,
    resolve_expert_quant,
)
from moeserve.model.quant_load import (
    QuantLoadError,
    check_tensor,
    copy_into,
    pop_scales,
    scale_param,
)
from moeserve.model.safetensors_check import HeaderError, TensorEntry, read_header

log = logging.getLogger(__name__)

# quant_method values (lower case) whose weights the loader can run (model/quant.py); every
# other one is refused at startup.
SUPPORTED_QUANT_METHODS: tuple[str, ...] = CHECKPOINT_METHODS

# Files some checkpoints ship instead of, or beside, config.json's quantization_config: old
# AutoGPTQ's quantize_config.json, AutoAWQ's quant_config.json, NVIDIA ModelOpt's
# hf_quant_config.json.
QUANT_CONFIG_FILES = ("quantize_config.json", "quant_config.json", "hf_quant_config.json")


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be loaded; the message names file and tensor."""


@dataclass(frozen=True)
class Checkpoint:
    """What a model directory holds, before any weight is read."""

    path: Path
    config: ModelConfig
    raw_config: dict[str, Any]
    generation_config: dict[str, Any]
    shards: tuple[Path, ...]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _find_shards(path: Path) -> tuple[Path, ...]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: 'weight_map' is missing or empty")
        shards = []
        for name in sorted(set(weight_map.values())):
            shard = path / name
            if Path(name).name != name:
                raise CheckpointError(f"{index}: shard name {name!r} must be a plain file name")
            if not shard.exists():
                raise CheckpointError(f"{index}: lists shard {name}, which does not exist")
            shards.append(shard)
        return tuple(shards)
    single = path / "model.safetensors"
    if single.exists():
        return (single,)
    found = sorted(path.glob("*.safetensors"))
    if found:
        return tuple(found)
    if list(path.glob("*.bin")) or list(path.glob("*.pt")) or list(path.glob("*.pth")):
        raise CheckpointError(
            f"{path}: only PyTorch pickle weights (.bin/.pt) found; moeserve requires safetensors "
            "(pickles can run arbitrary code). Convert the checkpoint to safetensors first."
        )
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _supported_quant() -> str:
    methods = ", ".join(SUPPORTED_QUANT_METHODS)
    return (
        f"supported: {methods} checkpoints, or float32 / bfloat16 / float16 ones "
        "(--quantization fp8 quantizes those at load)"
    )


def _refuse_quantized(path: Path, raw: dict[str, Any]) -> None:
    """Refuse quantization we cannot run: read as plain floats its weights are garbage."""
    found: list[tuple[Path, str, Any]] = []
    # compressed-tensors checkpoints of some releases say compression_config instead.
    for key in ("quantization_config", "compression_config"):
        if raw.get(key) is not None:
            quant = raw[key]
            method = quant.get("quant_method") if isinstance(quant, dict) else None
            found.append((path / "config.json", f"{key}.quant_method", method))
    for name in QUANT_CONFIG_FILES:
        file = path / name
        if file.exists():
            data = _read_json(file)
            modelopt = data.get("quantization")
            if isinstance(modelopt, dict) and "quant_algo" in modelopt:
                found.append((file, "quantization.quant_algo", modelopt["quant_algo"]))
            else:
                found.append((file, "quant_method", data.get("quant_method")))
    for file, field, method in found:
        # Only config.json's quantization_config can name a supported method: ModelOpt's
        # "FP8" (hf_quant_config.json) is per-tensor FP8, another format.
        supported = field == "quantization_config.quant_method" and isinstance(method, str)
        if supported and method.lower() in SUPPORTED_QUANT_METHODS:
            continue
        what = (
            f"{field} {method!r} is"
            if method is not None
            else f"quantized weights (no {field}) are"
        )
        raise CheckpointError(f"{file}: {what} not supported ({_supported_quant()})")


def inspect_checkpoint(
    model_dir: str | Path, *, need_weights: bool = True, quantization: str | None = None
) -> Checkpoint:
    """Read and validate config.json (+ generation_config.json) and locate the shards.
    quantization: "fp8" quantizes a float checkpoint's experts and dense linears at load
    (model/quant.py)."""
    path = Path(model_dir)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    config_path = path / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{path}: config.json is missing")
    raw = _read_json(config_path)
    _refuse_quantized(path, raw)
    try:
        cfg = parse_config(raw)
        method = checkpoint_method(raw)
        quant = resolve_expert_quant(method, quantization)
    except ConfigError as e:
        raise CheckpointError(f"{config_path}: {str(e).removeprefix('config.json: ')}") from e
    cfg = replace(cfg, expert_quant=quant, dense_quant=resolve_dense_quant(method, quantization))
    gen: dict[str, Any] = {}
    gen_path = path / "generation_config.json"
    if gen_path.exists():
        gen = _read_json(gen_path)
        eos = gen.get("eos_token_id")
        if eos is not None:
            eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
            if not all(isinstance(i, int) for i in eos_ids):
                raise CheckpointError(f"{gen_path}: eos_token_id must be ints, got {eos!r}")
            cfg = replace(cfg, eos_token_ids=eos_ids)
    return Checkpoint(path, cfg, raw, gen, _find_shards(path) if need_weights else ())


def _open(shard: Path) -> Any:
    try:
        return safe_open(str(shard), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{shard}: corrupt or truncated safetensors file ({e})") from e


def _read_headers(shards: tuple[Path, ...]) -> dict[Path, dict[str, TensorEntry]]:
    try:
        return {shard: read_header(shard) for shard in shards}
    except HeaderError as e:
        raise CheckpointError(str(e)) from e


def _index_tensors(
    ckpt: Checkpoint,
    plan: dict[str, PlanEntry],
    headers: dict[Path, dict[str, TensorEntry]],
) -> tuple[dict[str, Path], dict[str, Path]]:
    """(tensor name -> shard, FP8 weight name -> its block scale's shard), refusing
    duplicates, unknown tensors, missing ones and scales of no planned weight."""
    where: dict[str, Path] = {}
    mtp_prefixes = mtp_layer_prefixes(ckpt.config)
    for shard in ckpt.shards:
        for name in headers[shard]:
            if name in where:
                raise CheckpointError(
                    f"tensor '{name}' appears in two shards: {where[name].name} and {shard.name}"
                )
            where[name] = shard
    scales = pop_scales(where)
    skip = IGNORED_PREFIXES.get(ckpt.config.model_type, ())
    skipped = [n for n in where if n not in plan and skip and n.startswith(skip)]
    if skipped:
        log.info("ignoring %d tensors we do not run (%s...)", len(skipped), ", ".join(skip))
        for name in skipped:
            del where[name]
    dropped = set(skipped)  # tensors we do not run: their FP8 scales go with them
    for name, shard in list(where.items()):
        if name in plan:
            continue
        if (
            name.endswith(IGNORED_SUFFIXES)
            or name.startswith(mtp_prefixes)
            or (name == "lm_head.weight" and ckpt.config.tie_word_embeddings)
        ):
            del where[name]
            dropped.add(name)
            continue
        raise CheckpointError(
            f"{shard}: unexpected tensor '{name}' for model_type {ckpt.config.model_type} "
            "(does config.json match these weights?)"
        )
    missing = [n for n in plan if n not in where]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{ckpt.path}: tensor '{missing[0]}'{more} missing from the checkpoint "
            f"(shards: {', '.join(s.name for s in ckpt.shards)})"
        )
    for name, shard in list(scales.items()):
        if name in dropped:
            del scales[name]
        elif name not in where:
            raise CheckpointError(f"{shard}: block scale '{name}_scale_inv' of no loaded weight")
    return where, scales


def _target(params: dict[str, torch.Tensor], plan_entry: PlanEntry) -> torch.Tensor:
    name, index = plan_entry[0], plan_entry[1]
    return params[name][index] if index else params[name]


def _transformed(tensor: torch.Tensor, plan_entry: PlanEntry) -> torch.Tensor:
    return TRANSFORMS[plan_entry[2]](tensor) if len(plan_entry) == 3 else tensor


def _check_against_model(
    where: dict[str, Path],
    scales: dict[str, Path],
    headers: dict[Path, dict[str, TensorEntry]],
    plan: dict[str, PlanEntry],
    params: dict[str, torch.Tensor],
) -> None:
    """Every tensor's shape and dtype against its parameter, before any data is read."""
    for name, shard in where.items():
        entry = headers[shard][name]
        target = _target(params, plan[name])
        expected = list(target.shape)
        shape = list(_transformed(torch.empty(entry.shape, device="meta"), plan[name]).shape)
        if shape != expected:
            raise CheckpointError(
                f"{shard}: tensor '{name}' has shape {list(entry.shape)}, expected {expected} "
                "from config.json"
            )
        scale = headers[scales[name]][name + "_scale_inv"] if name in scales else None
        try:
            check_tensor(name, entry, target, len(plan[name]) == 3, scale)
        except QuantLoadError as e:
            raise CheckpointError(f"{shard}: {e}") from e


def keep_float_linears(
    model: MoEForCausalLM,
    plan: dict[str, PlanEntry],
    where: dict[str, Path],
    headers: dict[Path, dict[str, TensorEntry]],
) -> None:
    """An FP8 checkpoint's dense linears stay FP8 where it ships them so; a linear it ships
    in float (`modules_to_not_convert`), or that the plan re-lays out, or whose fused
    parameter (qkv) mixes the two, becomes a float parameter again (its FP8 parts are then
    dequantized at load)."""
    params = dict(model.named_parameters())
    as_shipped: dict[str, bool] = {}
    for name, shard in where.items():
        target = plan[name][0]
        p = params[target]
        if p.dtype != torch.float8_e4m3fn or p.dim() != 2:  # not a dense FP8 linear
            continue
        fp8 = headers[shard][name].dtype == "F8_E4M3" and len(plan[name]) == 2
        as_shipped[target] = as_shipped.get(target, True) and fp8
    for target in (t for t, keep in as_shipped.items() if not keep):
        module_name, attr = target.rsplit(".", 1)
        module = model.get_submodule(module_name)
        old = getattr(module, attr)
        setattr(module, attr, empty_param(*old.shape, dtype=model.dtype, device=old.device))
        setattr(module, attr + "_scale", None)


def resolve_dtype(cfg: ModelConfig, dtype: str | None) -> torch.dtype:
    name = cfg.dtype if dtype in (None, "auto") else dtype
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[name]


def load_model(
    model_dir: str | Path,
    *,
    dtype: str | None = None,
    device: str | torch.device = "cpu",
    expert_device: str | torch.device | None = None,
    load_format: str = "safetensors",
    progress: bool = True,
    backend: ModelBackend | None = None,
    quantization: str | None = None,
) -> tuple[Checkpoint, MoEForCausalLM]:
    """Load and validate a checkpoint; raises CheckpointError naming the file and tensor.

    Routed experts go to `expert_device` (host memory when offloading). load_format "dummy"
    reads config.json only and fills random weights of the right shapes (for benchmarks).
    backend: how the model computes (MoEForCausalLM); the readable torch path by default.
    quantization: "fp8" quantizes a float checkpoint's routed experts and dense linears at load.
    """
    if load_format not in ("safetensors", "dummy"):
        raise ConfigError(f"load_format must be safetensors or dummy, got {load_format!r}")
    dummy = load_format == "dummy"
    ckpt = inspect_checkpoint(model_dir, need_weights=not dummy, quantization=quantization)
    cfg = ckpt.config
    torch_dtype = resolve_dtype(cfg, dtype)
    home = torch.device(expert_device) if expert_device is not None else None
    if dummy:
        model = MoEForCausalLM(cfg, torch_dtype, torch.device(device), home, backend)
        _fill_dummy(model)
        model.bound_moe_inputs()
        return ckpt, model.eval()
    # Headers and names first: a bad shard fails before the model's memory is allocated.
    plan = weight_plan(cfg)
    headers = _read_headers(ckpt.shards)
    where, scales = _index_tensors(ckpt, plan, headers)
    model = MoEForCausalLM(cfg, torch_dtype, torch.device(device), home, backend)
    if checkpoint_method(ckpt.raw_config) == "fp8":
        keep_float_linears(model, plan, where, headers)
    params = dict(model.named_parameters())
    _check_against_model(where, scales, headers, plan, params)
    total = sum(s.stat().st_size for s in ckpt.shards)
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="loading weights",
        delay=1.0,
        disable=not progress,
    )
    filled = 0
    # FP8 block scales are small (1/16384 of their weights): read first, used with the weight.
    scale_invs: dict[str, torch.Tensor] = {}
    for shard in set(scales.values()):
        with _open(shard) as f:
            for name in (n for n, s in scales.items() if s == shard):
                scale_invs[name] = f.get_tensor(name + "_scale_inv")
    for shard in ckpt.shards:
        # In file order, so the memory-mapped reads run sequentially through the shard.
        entries = sorted(headers[shard].values(), key=lambda t: t.begin)
        with _open(shard) as f:
            for entry in entries:
                name = entry.name
                if where.get(name) != shard:
                    continue
                try:
                    tensor = f.get_tensor(name)
                except (SafetensorError, RuntimeError) as e:
                    raise CheckpointError(f"{shard}: cannot read tensor '{name}' ({e})") from e
                entry = plan[name]
                copy_into(
                    params,
                    entry[0],
                    entry[1],
                    tensor,
                    lambda t, e=entry: _transformed(t, e),
                    scale_invs.get(name),
                )
                filled += 1
                bar.update(tensor.numel() * tensor.element_size())
                del tensor
    bar.close()
    assert filled == len(plan), (filled, len(plan))
    model.bound_moe_inputs()
    return ckpt, model.eval()


def _fill_dummy(model: MoEForCausalLM) -> None:
    """Random weights at the reference init scale (std 0.02); norms 1, biases 0."""
    bound = 0.02 * 3**0.5  # uniform with std 0.02: faster than normal_ on GBs of host memory
    gpu = torch.cuda.is_available()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            if name.endswith("_scale"):
                continue  # filled with its weight
            if p.dtype in (torch.float8_e4m3fn, torch.uint8):
                kind = "fp8" if p.dtype == torch.float8_e4m3fn else "mxfp4"
                fill_random(p, params[scale_param(name)], kind, bound)
            elif p.ndim == 1:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
            elif p.device.type == "cpu" and gpu and p.ndim == 3:
                # Offloaded experts: tens of GB of host memory fill far faster from the GPU.
                for e in range(p.shape[0]):
                    p[e].copy_(torch.empty_like(p[e], device="cuda").uniform_(-bound, bound))
            else:
                p.uniform_(-bound, bound)
