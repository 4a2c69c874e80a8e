"""Checkpoint loading: config styles, dtypes, and a clear error for every kind of bad file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeserve.cli import main
from moeserve.model import loader
from moeserve.model.families import parse_config
from moeserve.model.loader import CheckpointError, inspect_checkpoint, load_model
from tests.checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "mixtral", "mixtral")


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_config(path: Path, **changes) -> None:
    raw = json.loads((path / "config.json").read_text())
    raw.update(changes)
    (path / "config.json").write_text(json.dumps(raw))


def _edit_tensors(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _load_error(path: Path) -> str:
    with pytest.raises(CheckpointError) as e:
        load_model(path, progress=False)
    return str(e.value)


def test_loads_in_checkpoint_dtype_or_override(mixtral: Path) -> None:
    _, model = load_model(mixtral, progress=False)
    assert model.embed_tokens.dtype == torch.float32
    _, model = load_model(mixtral, dtype="bfloat16", progress=False)
    assert model.embed_tokens.dtype == torch.bfloat16
    ref = load_file(mixtral / "model.safetensors")
    w1 = ref["model.layers.2.block_sparse_moe.experts.5.w1.weight"]
    w3 = ref["model.layers.2.block_sparse_moe.experts.5.w3.weight"]
    fused = model.layers[2].mlp.w_gate_up[5].float()
    assert torch.allclose(fused, torch.cat([w1, w3]).bfloat16().float())


def test_hub_and_transformers5_rope_styles_agree() -> None:
    base = dict(
        model_type="mixtral",
        vocab_size=10,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        num_local_experts=2,
        num_experts_per_tok=1,
        intermediate_size=4,
    )
    hub = parse_config({**base, "rope_theta": 5e5, "rope_scaling": None})
    tf5 = parse_config({**base, "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}})
    assert hub == tf5 and hub.rope_theta == 5e5 and hub.head_dim == 4
    given = parse_config({**base, "head_dim": 16})
    assert given.head_dim == 16


def test_truncated_safetensors(mixtral: Path, tmp_path: Path) -> None:
    path = _copy(mixtral, tmp_path / "c")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    msg = _load_error(path)
    assert "model.safetensors" in msg and "truncated" in msg


def test_missing_tensor(mixtral: Path, tmp_path: Path) -> None:
    path = _copy(mixtral, tmp_path / "c")
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    _edit_tensors(path, lambda t: t.pop(name))
    assert name in _load_error(path)


def test_wrong_shape(mixtral: Path, tmp_path: Path) -> None:
    path = _copy(mixtral, tmp_path / "c")
    name = "model.layers.0.self_attn.q_proj.weight"
    _edit_tensors(path, lambda t: t.__setitem__(name, torch.zeros(31, 32)))
    msg = _load_error(path)
    assert name in msg and "[31, 32]" in msg and "[32, 32]" in msg


def test_unexpected_tensor(mixtral: Path, tmp_path: Path) -> None:
    path = _copy(mixtral, tmp_path / "c")
    _edit_tensors(path, lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(2)))
    msg = _load_error(path)
    assert "model.layers.0.extra.weight" in msg and "model.safetensors" in msg


def test_tensor_in_two_shards(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "sharded", "mixtral", max_shard_size="20KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    first = load_file(path / shards[0])
    name = next(iter(first))
    second = load_file(path / shards[1])
    second[name] = first[name]
    save_file(second, path / shards[1], metadata={"format": "pt"})
    msg = _load_error(path)
    assert name in msg and shards[0] in msg and shards[1] in msg


def test_missing_shard(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "sharded", "mixtral", max_shard_size="20KB")
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert shard.name in _load_error(path)


def test_unknown_model_type(mixtral: Path, tmp_path: Path) -> None:
    path = _copy(mixtral, tmp_path / "c")
    _edit_config(path, model_type="llama")
    msg = _load_error(path)
    assert "'llama'" in msg and "mixtral" in msg and "qwen3_moe" in msg and "olmoe" in msg


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_experts_per_tok", 9),
        ("hidden_size", 0),
        ("num_key_value_heads", 3),
        ("rms_norm_eps", -1.0),
        ("vocab_size", "many"),
    ],
)
def test_config_out_of_range(mixtral: Path, tmp_path: Path, field: str, value) -> None:
    path = _copy(mixtral, tmp_path / "c")
    _edit_config(path, **{field: value})
    msg = _load_error(path)
    assert field in msg and "config.json" in msg


def test_pickle_only_checkpoint_refused(tmp_path: Path, mixtral: Path) -> None:
    path = tmp_path / "bin"
    path.mkdir()
    (path / "config.json").write_text((mixtral / "config.json").read_text())
    (path / "pytorch_model.bin").write_bytes(b"not read")
    assert "safetensors" in _load_error(path)


@pytest.mark.parametrize(
    ("key", "method"),
    [("quantization_config", m) for m in ("gptq", "awq", "bitsandbytes", "fbgemm_fp8")]
    + [("quantization_config", "compressed-tensors"), ("compression_config", "sparseml")],
)
def test_quantized_checkpoint_refused(mixtral: Path, tmp_path: Path, key: str, method: str) -> None:
    # The weights here are plain float32: what matters is that config.json says otherwise.
    path = _copy(mixtral, tmp_path / "c")
    _edit_config(path, **{key: {"quant_method": method, "bits": 4, "group_size": 128}})
    msg = _load_error(path)
    assert f"config.json: {key}.quant_method '{method}' is not supported" in msg
    assert "(supported: fp8, mxfp4 checkpoints, or float32 / bfloat16 / float16 ones" in msg
    with pytest.raises(CheckpointError, match=method):  # from config.json, no weight read
        inspect_checkpoint(path, need_weights=False)


@pytest.mark.parametrize(
    ("file", "content", "expected"),
    [
        (
            "quantize_config.json",
            {"bits": 4, "group_size": 128, "desc_act": False},
            "quantized weights (no quant_method) are not supported",
        ),
        (
            "quantize_config.json",
            {"bits": 4, "quant_method": "gptq"},
            "quant_method 'gptq' is not supported",
        ),
        (
            "quant_config.json",
            {"w_bit": 4, "q_group_size": 128, "version": "GEMM"},
            "quantized weights (no quant_method) are not supported",
        ),
        (
            "hf_quant_config.json",
            {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "FP8"}},
            "quantization.quant_algo 'FP8' is not supported",
        ),
    ],
)
def test_quantization_config_file_refused(
    mixtral: Path, tmp_path: Path, file: str, content: dict, expected: str
) -> None:
    path = _copy(mixtral, tmp_path / "c")
    (path / file).write_text(json.dumps(content))
    msg = _load_error(path)
    assert f"{file}: {expected}" in msg and "supported: fp8, mxfp4 checkpoints" in msg


def test_supported_quant_methods_are_one_list(
    mixtral: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _copy(mixtral, tmp_path / "c")
    fp8 = {"quant_method": "FP8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    _edit_config(path, quantization_config=fp8)
    assert inspect_checkpoint(path).config.expert_quant == "fp8"
    monkeypatch.setattr(loader, "SUPPORTED_QUANT_METHODS", ("mxfp4",))
    assert "(supported: mxfp4 checkpoints" in _load_error(path)


@pytest.mark.parametrize(
    ("field", "value"),
    [("weight_block_size", [64, 64]), ("weight_block_size", None), ("fmt", "e5m2")],
)
def test_fp8_layout_we_do_not_run_is_refused(
    mixtral: Path, tmp_path: Path, field: str, value: object
) -> None:
    path = _copy(mixtral, tmp_path / "c")
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], field: value}
    _edit_config(path, quantization_config=fp8)
    assert f"config.json: quantization_config.{field} {value!r} is not supported" in (
        _load_error(path)
    )


def test_quantized_checkpoint_exits_2(
    mixtral: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _copy(mixtral, tmp_path / "c")
    _edit_config(path, quantization_config={"quant_method": "awq"})
    assert main(["generate", "--model", str(path), "--prompt-ids", "1,2", "--device", "cpu"]) == 2
    assert "quantization_config.quant_method 'awq' is not supported" in capsys.readouterr().err


def test_auto_map_ignored_with_warning(
    mixtral: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _copy(mixtral, tmp_path / "c")
    _edit_config(path, auto_map={"AutoModelForCausalLM": "evil.Model"})
    with caplog.at_level(logging.WARNING):
        inspect_checkpoint(path)
    assert "auto_map" in caplog.text


def test_generation_config_eos(mixtral: Path, tmp_path: Path) -> None:
    path = _copy(mixtral, tmp_path / "c")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert inspect_checkpoint(path).config.eos_token_ids == (2, 7)


_MEMORY_PROBE = """
import sys, threading, time
from moeserve.model.loader import load_model

def anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

peak = [0]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], anon_kb())
        time.sleep(0.002)

base = anon_kb()
t = threading.Thread(target=sample)
t.start()
_, model = load_model(sys.argv[1], progress=False)
stop.set()
t.join()
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(base, max(peak[0], anon_kb()), weights // 1024)
"""


def test_peak_host_memory_stays_near_weight_size(tmp_path: Path) -> None:
    """Anonymous memory during a load grows by the weights plus about one tensor."""
    import subprocess
    import sys

    path = make_checkpoint(
        tmp_path / "big",
        "mixtral",
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_local_experts=8,
        vocab_size=4096,
    )
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.split()
    base_kb, peak_kb, weights_kb = map(int, out)
    assert weights_kb > 90_000  # ~100 MB of float32 weights
    # A second full copy would double the growth; one tensor is 1 MB here.
    assert peak_kb - base_kb < 1.15 * weights_kb + 20_000
