"""Quantized checkpoints moeserve refuses, named: quant methods it does not run, FP8 configs
outside 128x128 e4m3, and FP8 block scales missing or mis-shaped (hub layouts from
tests/quant_checkpoints.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeserve.model.loader import CheckpointError, load_model
from tests.quant_checkpoints import make_fp8_checkpoint


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fp8_checkpoint(tmp_path_factory.mktemp("q") / "fp8", "qwen3_moe")


def _with_quant_config(src: Path, dst: Path, **quant: Any) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    raw = json.loads((dst / "config.json").read_text())
    raw["quantization_config"] = quant
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


def _load_error(path: Path) -> str:
    with pytest.raises(CheckpointError) as e:
        load_model(path, progress=False)
    return str(e.value)


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes"])
def test_unsupported_quant_methods_refused(fp8_ckpt: Path, tmp_path: Path, method: str) -> None:
    path = _with_quant_config(fp8_ckpt, tmp_path / method, quant_method=method, bits=4)
    msg = _load_error(path)
    assert method in msg and "not supported" in msg
    assert "fp8" in msg and "mxfp4" in msg  # the supported methods are listed


@pytest.mark.parametrize(
    "field,value",
    [("weight_block_size", [64, 64]), ("weight_block_size", [1, 128]), ("fmt", "e5m2")],
)
def test_fp8_config_outside_what_runs_is_refused(
    fp8_ckpt: Path, tmp_path: Path, field: str, value: Any
) -> None:
    quant = dict(
        quant_method="fp8", fmt="e4m3", activation_scheme="dynamic", weight_block_size=[128, 128]
    )
    path = _with_quant_config(fp8_ckpt, tmp_path / "bad", **{**quant, field: value})
    msg = _load_error(path)
    assert field in msg and str(value if field == "fmt" else value[0]) in msg


def test_fp8_checkpoint_loads_with_its_config(fp8_ckpt: Path) -> None:
    # The control for the refusals above: the untouched checkpoint loads.
    cfg, model = load_model(fp8_ckpt, dtype="float32", progress=False)
    assert model is not None and cfg is not None


def test_fp8_weight_without_its_scale_is_refused(fp8_ckpt: Path, tmp_path: Path) -> None:
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    path = _with_tensors(fp8_ckpt, tmp_path / "c", lambda t: t.pop(name + "_scale_inv"))
    msg = _load_error(path)
    assert name in msg and "_scale_inv" in msg


def test_fp8_scale_of_the_wrong_shape_is_refused(fp8_ckpt: Path, tmp_path: Path) -> None:
    # 136-wide rows: two 128-blocks, the second partial; a writer that floors gives one.
    name = "model.layers.0.mlp.experts.0.down_proj.weight_scale_inv"

    def edit(t: dict[str, torch.Tensor]) -> None:
        t[name] = t[name][:, :1].contiguous()

    msg = _load_error(_with_tensors(fp8_ckpt, tmp_path / "c", edit))
    assert name in msg and "[2, 1]" in msg and "[2, 2]" in msg


def _with_tensors(src: Path, dst: Path, edit: Any) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst
