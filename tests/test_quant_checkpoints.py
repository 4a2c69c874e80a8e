"""Quantized checkpoints (issue 22): the hub-layout writers, and moeserve against transformers
on the dequantized float32 weights (greedy tokens equal, top-5 log-probs within 1e-3)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moeserve.engine.llm import LLM
from moeserve.sampling_params import SamplingParams
from tests.quant_checkpoints import (
    E4M3_MAX,
    FP8_BLOCK,
    FP8_SIZES,
    dequantize_fp8_blocks,
    dequantize_mxfp4,
    dequantized_tensors,
    fake_quant_fp8_rows,
    make_float_checkpoint,
    make_fp8_checkpoint,
    make_mxfp4_checkpoint,
    not_converted,
    quantize_fp8_blocks,
    quantize_mxfp4,
    write_dequantized,
)
from tests.test_fidelity import reference

LP_TOL = 1e-3
STEPS = 12
TOP = 5


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def _dtypes(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            out.update({n: f.get_slice(n).get_dtype() for n in f.keys()})  # noqa: SIM118
    return out


# ---- the writers ------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "mixtral"])
def test_fp8_checkpoint_has_the_hub_layout(tmp_path: Path, family: str) -> None:
    plain = _tensors(make_float_checkpoint(tmp_path / "plain", family, **FP8_SIZES[family]))
    path = make_fp8_checkpoint(tmp_path / "fp8", family)
    quant, dtypes = _tensors(path), _dtypes(path)
    quantized = [n for n in quant if n + "_scale_inv" in quant]
    # Every projection of attention, experts (and dense / shared MLPs) is quantized ...
    assert any(".self_attn.o_proj." in n for n in quantized)
    assert any(".experts." in n for n in quantized)
    if family == "deepseek_v3":
        for part in ("kv_a_proj_with_mqa", "q_b_proj", "shared_experts.down_proj", "0.mlp.up_proj"):
            assert any(part in n for n in quantized), part
    # ... and nothing else is, nor is anything lost or added besides the scales.
    assert set(quant) == set(plain) | {n + "_scale_inv" for n in quantized}
    for name in plain:
        if name in quantized:
            continue
        assert dtypes[name] == "F32" and torch.equal(quant[name], plain[name]), name
        assert "_proj" not in name and not name.endswith(("w1.weight", "w2.weight", "w3.weight"))
    sizes_seen: set[int] = set()
    for name in quantized:
        w, s, orig = quant[name], quant[name + "_scale_inv"], plain[name]
        n, k = orig.shape
        assert dtypes[name] == "F8_E4M3" and dtypes[name + "_scale_inv"] == "F32"
        assert w.shape == orig.shape
        assert s.shape == (-(-n // FP8_BLOCK), -(-k // FP8_BLOCK))
        sizes_seen.update((n, k))
        # e4m3 keeps 3 mantissa bits: round-to-nearest errs by at most 2^-4 of the value,
        # and by half the subnormal step (2^-10 of the block's scale) near zero.
        bound = orig.abs() * 2**-4 + dequantize_fp8_blocks(torch.ones_like(w), s) * 2**-10
        assert ((dequantize_fp8_blocks(w, s) - orig).abs() <= bound * (1 + 1e-6)).all(), name
    # Several 128-blocks per axis, with a partial last block.
    assert any(d > FP8_BLOCK and d % FP8_BLOCK for d in sizes_seen)
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert cfg == dict(
        quant_method="fp8", fmt="e4m3", activation_scheme="dynamic", weight_block_size=[128, 128]
    )


def test_fp8_block_scales_are_deepseeks() -> None:
    # One block per 128x128 tile, scale = the tile's amax / 448, its largest value maps to 448.
    w = torch.randn(200, 300)
    w[130:, 260:] *= 1000  # a partial corner tile with its own, much larger scale
    q, s = quantize_fp8_blocks(w)
    assert s.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            tile = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            assert s[i, j].item() == pytest.approx(tile.abs().max().item() / E4M3_MAX, rel=1e-6)
            qt = q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].float()
            assert qt.abs().max().item() == E4M3_MAX
    # transformers' own FP8 dequantizer reads the layout the same way.
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    theirs = _dequantize_fp8_weight(q, s, [FP8_BLOCK, FP8_BLOCK], torch.float32)
    assert torch.equal(theirs, dequantize_fp8_blocks(q, s))


def test_fp8_modules_to_not_convert_stay_float(tmp_path: Path) -> None:
    path = make_fp8_checkpoint(tmp_path / "m", "qwen3_moe", modules_to_not_convert=["self_attn"])
    dtypes = _dtypes(path)
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == "F32"
    assert "model.layers.0.self_attn.q_proj.weight_scale_inv" not in dtypes
    assert dtypes["model.layers.0.mlp.experts.0.gate_proj.weight"] == "F8_E4M3"
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert cfg["modules_to_not_convert"] == ["self_attn"]


def test_not_converted_patterns() -> None:
    names = ["self_attn", "model.layers.0.mlp", "mlp.gate", "model.layers.*.self_attn"]
    for module, want in [
        ("model.layers.3.self_attn.q_proj", True),
        ("model.layers.0.mlp.gate_proj", True),
        ("model.layers.10.mlp.gate_proj", False),  # "layers.0" is not "layers.10"
        ("model.layers.1.mlp.gate", True),
        ("model.layers.1.mlp.experts.0.gate_proj", False),
        ("model.layers.2.mlp.shared_experts.up_proj", False),
    ]:
        assert not_converted(module, names) == want, module
    assert not_converted("model.layers.7.self_attn.o_proj", ["model.layers.*.self_attn"])
    assert not not_converted("model.layers.1.mlp.gate_proj", ["mlp.gate"])


def test_mxfp4_layout_matches_transformers_dequantizer(tmp_path: Path) -> None:
    plain = _tensors(
        make_float_checkpoint(tmp_path / "plain", "gpt_oss", hidden_size=64, intermediate_size=64)
    )
    path = make_mxfp4_checkpoint(tmp_path / "mx")
    quant, dtypes = _tensors(path), _dtypes(path)
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    e, d, f = 6, 64, 64
    for layer in range(3):
        p = f"model.layers.{layer}.mlp.experts."
        for proj, (n, k) in (("gate_up_proj", (2 * f, d)), ("down_proj", (d, f))):
            blocks, scales = quant[p + proj + "_blocks"], quant[p + proj + "_scales"]
            assert blocks.shape == (e, n, k // 32, 16) and scales.shape == (e, n, k // 32)
            assert dtypes[p + proj + "_blocks"] == dtypes[p + proj + "_scales"] == "U8"
            assert p + proj not in quant and dtypes[p + proj + "_bias"] == "F32"
            theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
            ours = dequantize_mxfp4(blocks, scales).transpose(1, 2)
            assert torch.equal(theirs, ours)
            # transformers' [E, in, out] tensor; each value within half an E2M1 step: the
            # grid's steps are at most 2 (between 4 and 6), times the group's scale.
            orig = plain[p + proj]
            assert theirs.shape == orig.shape
            step = torch.exp2(scales.float() - 127).repeat_interleave(32, -1).transpose(1, 2)
            assert ((theirs - orig).abs() <= step).all()
            assert (theirs - orig).abs().max() > 0  # really quantized
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "mxfp4"
    assert "model.layers.*.self_attn" in cfg["modules_to_not_convert"]
    assert set(quant) - {n for n in quant if "_blocks" in n or "_scales" in n} == {
        n for n in plain if not n.endswith(("experts.gate_up_proj", "experts.down_proj"))
    }


def test_mxfp4_packing_order() -> None:
    # Element 2i is byte i's low nibble; the code's high bit is the sign.
    w = torch.tensor([[0.5, -1.0, 6.0, 0.0] + [0.0] * 28])
    blocks, scales = quantize_mxfp4(w)
    assert scales.tolist() == [[127]]  # amax 6: scale 2^0
    assert blocks[0, 0, :2].tolist() == [0x1 | (0xA << 4), 0x7]
    assert torch.equal(dequantize_mxfp4(blocks, scales), w[:, None, :].flatten(-2))


def test_dequantized_copy_is_plain_float32(tmp_path: Path) -> None:
    path = make_fp8_checkpoint(tmp_path / "q", "mixtral", max_shard_size="200KB")
    assert (path / "model.safetensors.index.json").exists()
    out = write_dequantized(path, tmp_path / "deq")
    raw = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in raw
    assert set(_dtypes(out).values()) == {"F32"}
    assert _tensors(out).keys() == dequantized_tensors(_tensors(path)).keys()
    assert not any(n.endswith("_scale_inv") for n in _tensors(out))


# ---- end to end: moeserve against transformers on the dequantized weights ---------------


def _prompt() -> list[int]:
    return torch.randint(2, 120, (13,), generator=torch.Generator().manual_seed(1)).tolist()


def _assert_matches(
    path: Path, ref_path: Path, steps: int = STEPS, device: str = "cpu", **options: Any
) -> None:
    """moeserve on `path` (float32, CPU) greedy-decodes what transformers on `ref_path` does,
    with each step's top-5 log-probs within LP_TOL of transformers' for the same tokens."""
    prompt = _prompt()
    llm = LLM(path, dtype="float32", device=device, progress=False, block_size=4, **options)
    sp = SamplingParams(temperature=0, max_tokens=steps, logprobs=TOP, ignore_eos=True)
    out = llm.generate(prompt, sp)[0].outputs[0]
    ref_prompt, ref_decode, ref_tokens = reference(ref_path, prompt)
    # The first step's distribution is the prompt's last position; then one per decode step.
    ref_steps = torch.cat([ref_prompt[-1:], ref_decode])[:steps]
    assert out.token_ids == ref_tokens[:steps].tolist()
    assert out.logprobs is not None and len(out.logprobs) == steps
    for step, lp in enumerate(out.logprobs):
        assert len(lp.top) == TOP
        ref_top = ref_steps[step].topk(TOP).values
        ours_top = torch.tensor([v for _, v in lp.top])
        assert (ours_top - ref_top).abs().max().item() <= LP_TOL, step
        for token, value in lp.top:  # the same tokens, not just the same values
            assert abs(value - ref_steps[step, token].item()) <= LP_TOL, (step, token)


def test_comparison_sees_fp8_rounding(tmp_path: Path) -> None:
    # The harness itself: a float checkpoint matches transformers on it, and FP8 rounding of
    # its weights moves the log-probs well past LP_TOL (so the tests below can fail).
    path = make_float_checkpoint(tmp_path / "f", "qwen3_moe", **FP8_SIZES["qwen3_moe"])
    _assert_matches(path, path)
    deq = write_dequantized(make_fp8_checkpoint(tmp_path / "q", "qwen3_moe"), tmp_path / "d")
    with pytest.raises(AssertionError):
        _assert_matches(path, deq)


FP8_CASES: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(family="qwen3_moe"),
    # MLA, one shared expert, a dense first layer.
    "deepseek_v3": dict(family="deepseek_v3"),
    "mixtral": dict(family="mixtral"),
    # The hub's modules_to_not_convert: attention stays float32 beside FP8 experts.
    "qwen3_moe-attention-not-converted": dict(
        family="qwen3_moe", modules_to_not_convert=["self_attn"]
    ),
    "deepseek_v3-sharded": dict(family="deepseek_v3", max_shard_size="300KB"),
    # As the hub ships them: bfloat16 beside the FP8 weights and their float32 scales.
    "qwen3_moe-bf16-hub-config": dict(family="qwen3_moe", dtype=torch.bfloat16, hub_style=True),
    # Hub-style full names (Qwen3-FP8 lists lm_head and routers): the dense first layer's
    # MLP stays float32 between FP8 attention and FP8 experts.
    "deepseek_v3-dense-mlp-not-converted": dict(
        family="deepseek_v3",
        modules_to_not_convert=["lm_head", "model.layers.0.mlp", "model.layers.1.mlp.gate"],
    ),
}


@pytest.mark.parametrize("case", sorted(FP8_CASES))
def test_fp8_checkpoint_matches_dequantized_transformers(tmp_path: Path, case: str) -> None:
    kw = dict(FP8_CASES[case])
    path = make_fp8_checkpoint(tmp_path / case, kw.pop("family"), **kw)
    _assert_matches(path, write_dequantized(path, tmp_path / "ref"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_checkpoint_matches_dequantized_transformers(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    path = make_mxfp4_checkpoint(tmp_path / "gpt_oss", dtype=dtype)
    _assert_matches(path, write_dequantized(path, tmp_path / "ref"))


OFFLOAD = {
    "fetch": dict(expert_cache_slots=2, offload_mode="fetch"),
    "cpu": dict(expert_cache_slots=1, offload_mode="cpu"),
}


def test_fp8_deepseek_v3_hub_checkpoint_with_mtp_layer(tmp_path: Path) -> None:
    # DeepSeek-V3's hub FP8 checkpoint carries its multi-token-prediction layer
    # (model.layers.{n}.*, not run), FP8 with block scales like every other layer.
    path = make_fp8_checkpoint(tmp_path / "v3", "deepseek_v3", hub_style=True)
    n = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    last, mtp = f"model.layers.{n - 1}.", f"model.layers.{n}."

    def add_mtp(t: dict[str, torch.Tensor]) -> None:
        t.update({k.replace(last, mtp): v.clone() for k, v in list(t.items()) if last in k})
        w, s = quantize_fp8_blocks(torch.randn(160, 320) * 0.02)
        t[mtp + "eh_proj.weight"], t[mtp + "eh_proj.weight_scale_inv"] = w, s

    tensors = load_file(path / "model.safetensors")
    add_mtp(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    assert any(k.startswith(mtp) and k.endswith("_scale_inv") for k in tensors)
    _assert_matches(path, write_dequantized(path, tmp_path / "ref"))


@pytest.mark.parametrize("mode", sorted(OFFLOAD))
@pytest.mark.parametrize("kind", ["fp8", "mxfp4"])
def test_offloaded_quantized_experts_match(tmp_path: Path, kind: str, mode: str) -> None:
    # Quantized experts in host memory, fetched into (or computed beside) a small cache.
    if kind == "fp8":
        path = make_fp8_checkpoint(tmp_path / kind, "qwen3_moe")
    else:
        path = make_mxfp4_checkpoint(tmp_path / kind)
    _assert_matches(path, write_dequantized(path, tmp_path / "ref"), **OFFLOAD[mode])


@pytest.mark.parametrize("kind", ["fp8", "mxfp4"])
def test_interpreted_kernels_on_quantized_experts(tmp_path: Path, kind: str) -> None:
    # The interpreter runs every kernel in Python: one layer (of each kind for gpt-oss's
    # alternating attention), a few steps.
    pytest.importorskip("triton")
    if kind == "fp8":
        path = make_fp8_checkpoint(tmp_path / kind, "qwen3_moe", num_hidden_layers=1)
    else:
        layers = ["sliding_attention", "full_attention"]
        path = make_mxfp4_checkpoint(tmp_path / kind, num_hidden_layers=2, layer_types=layers)
    ref = write_dequantized(path, tmp_path / "ref")
    _assert_matches(path, ref, steps=4, kernels="triton")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case",
    [
        "fp8-deepseek_v3",
        "fp8-qwen3_moe",
        "mxfp4",
    ],
)
def test_gpu_quantized_checkpoints_in_cuda_graphs(tmp_path: Path, case: str) -> None:
    """The Triton kernels on the quantized experts, decode steps replayed from CUDA graphs."""
    if case == "mxfp4":
        path = make_mxfp4_checkpoint(tmp_path / case)
    else:
        path = make_fp8_checkpoint(tmp_path / case, case.split("-")[1])
    _assert_matches(path, write_dequantized(path, tmp_path / "ref"), device="cuda")


def _online_fp8(name: str) -> bool:
    """Whether --quantization fp8 stores this checkpoint tensor in FP8: the routed experts
    and the dense projections (the routers are `*.gate.weight`)."""
    return (".experts." in name and name.endswith(".weight")) or name.endswith("_proj.weight")


def _online_fp8_reference(path: Path, out: Path) -> Path:
    """A copy of float checkpoint `path` whose routed experts' and dense linears' weights
    (not the routers') are quantize-dequantized in 1x128 groups (scale = amax/448 per row
    per 128 inputs)."""
    out.mkdir()
    for f in path.iterdir():
        if f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    for shard in sorted(path.glob("*.safetensors")):
        tensors = load_file(shard)
        for name, t in tensors.items():
            if _online_fp8(name) and t.ndim == 2:
                tensors[name] = fake_quant_fp8_rows(t)
        save_file(tensors, out / shard.name, metadata={"format": "pt"})
    return out


@pytest.mark.parametrize(
    "family,options",
    [
        ("qwen3_moe", {}),
        ("mixtral", {}),
        ("qwen3_moe", OFFLOAD["fetch"]),
    ],
    ids=["qwen3_moe", "mixtral", "qwen3_moe-offload-fetch"],
)
def test_online_fp8_matches_row_quantized_experts(
    tmp_path: Path, family: str, options: dict[str, Any]
) -> None:
    path = make_float_checkpoint(tmp_path / family, family, **FP8_SIZES[family])
    ref = _online_fp8_reference(path, tmp_path / "ref")
    changed = [n for n, t in _tensors(ref).items() if not torch.equal(t, _tensors(path)[n])]
    assert any(".experts." in n for n in changed) and any("self_attn" in n for n in changed)
    assert all(_online_fp8(n) for n in changed)
    _assert_matches(path, ref, quantization="fp8", **options)


def test_row_fake_quant_groups_of_128() -> None:
    w = torch.randn(3, 136)
    w[1, 128:] *= 1e-3  # the partial last group of a row has its own, tiny scale
    got = fake_quant_fp8_rows(w)
    for row in range(3):
        for lo, hi in ((0, 128), (128, 136)):
            g = w[row, lo:hi]
            scale = g.abs().max() / E4M3_MAX
            want = (g / scale).to(torch.float8_e4m3fn).float() * scale
            assert torch.allclose(got[row, lo:hi], want, rtol=1e-6, atol=0)
