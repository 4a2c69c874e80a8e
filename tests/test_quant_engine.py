"""Quantized experts through the engine: online FP8 (--quantization fp8), the expert cache
moving quantized bytes, and the sizes the log and /metrics report. The hub-layout FP8 and
MXFP4 checkpoints against transformers are in tests/test_quant_checkpoints.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeserve import LLM, SamplingParams
from moeserve.config import ConfigError
from moeserve.engine.executor import describe_weights
from moeserve.kernels.quant import dequantize, quantize_fp8_rows
from moeserve.model.loader import CheckpointError, load_model
from moeserve.model.quant import ExpertFormat
from tests.checkpoints import make_checkpoint
from tests.test_metrics import make, scrape

# Hidden and expert sizes above 128 and not multiples of it: several groups, the last partial.
SIZES = dict(hidden_size=160, moe_intermediate_size=136, intermediate_size=136, head_dim=16)
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 9, 17, 33, 2, 60, 7], [3, 4, 5, 6, 90, 100, 110, 11, 12]]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("q") / "qwen3", "qwen3_moe", **SIZES)


def _tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


def test_fp8_rows_round_trip_within_e4m3_precision() -> None:
    w = torch.randn(3, 40, 200) * torch.logspace(-3, 1, 200)  # groups of very different scale
    q, s = quantize_fp8_rows(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 40, 2)
    back = dequantize(q, s, "fp8", torch.float32)
    # e4m3 keeps 3 mantissa bits: within 2^-4 of each value, relative to its group's amax.
    for g in range(2):
        cols = slice(128 * g, min(128 * (g + 1), 200))
        amax = w[..., cols].abs().amax(-1, keepdim=True)
        assert ((back[..., cols] - w[..., cols]).abs() <= amax / 16 + 1e-12).all()
    assert torch.equal(quantize_fp8_rows(torch.zeros(2, 5))[1], torch.ones(2, 1))


def test_online_fp8_stores_experts_quantized(qwen3: Path) -> None:
    _, plain = load_model(qwen3, progress=False)
    _, fp8 = load_model(qwen3, progress=False, quantization="fp8")
    moe = fp8.moe_layers()[0][1]
    assert moe.w_gate_up.dtype == torch.float8_e4m3fn and moe.w_gate_up_scale.shape == (6, 272, 2)
    assert moe.w_down_scale.shape == (6, 160, 2)
    # The stored values are the per-row quantization of the float weights.
    ref = plain.moe_layers()[0][1].w_gate_up
    q, s = quantize_fp8_rows(ref)
    assert torch.equal(moe.w_gate_up.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(moe.w_gate_up_scale, s)
    plain_b, fp8_b = plain.weight_bytes(), fp8.weight_bytes()
    experts = fp8_b[("experts", "fp8", "device")]
    # float32 -> 1 byte a weight plus one float32 scale per 128 columns (2 groups per row here).
    f, d, e, layers = 136, 160, 6, 3
    want = layers * e * (2 * f * d + 2 * f * 2 * 4 + d * f + d * 2 * 4)
    assert experts == want
    assert plain_b[("experts", "float32", "device")] == layers * e * 3 * f * d * 4
    # The dense projections are FP8 too (a byte a weight and a float32 scale per 128
    # columns); routers, norms, embeddings and the LM head stay float32.
    attn = fp8.layers[0].attn
    assert attn.qkv_weight.dtype == torch.float8_e4m3fn and attn.o_weight_scale is not None
    assert fp8.moe_layers()[0][1].router.dtype == torch.float32
    dense_fp8 = [p for p in fp8.parameters() if p.dtype == torch.float8_e4m3fn and p.dim() == 2]
    weights = sum(p.numel() for p in dense_fp8)
    scales = sum(4 * p.shape[0] * -(-p.shape[1] // 128) for p in dense_fp8)
    assert fp8_b[("dense", "fp8", "device")] == weights + scales
    dense_f32 = fp8_b[("dense", "float32", "device")]
    assert dense_f32 + 4 * weights == plain_b[("dense", "float32", "device")]
    assert ExpertFormat("fp8").expert_bytes(fp8.cfg, torch.float32) * e * layers == experts
    line = describe_weights(fp8_b)
    assert f"experts (fp8) {experts / 2**30:.2f} GiB on the device" in line


def test_online_fp8_generates_as_its_dequantized_weights(qwen3: Path) -> None:
    """--quantization fp8 equals the float model whose expert and dense linear weights are
    replaced by their quantize-dequantize round trip (the readable path dequantizes per
    use)."""
    fp8 = LLM(qwen3, dtype="float32", device="cpu", progress=False, quantization="fp8")
    plain = LLM(qwen3, dtype="float32", device="cpu", progress=False)
    model = fp8.engine.executor.model
    dense = [n for n, p in model.named_parameters() if p.dtype == torch.float8_e4m3fn]
    plain_params = dict(plain.engine.executor.model.named_parameters())
    with torch.no_grad():
        for _, moe in plain.engine.executor.model.moe_layers():
            for w in (moe.w_gate_up, moe.w_down):
                w.copy_(dequantize(*quantize_fp8_rows(w), "fp8", torch.float32))
        for name in (n for n in dense if plain_params[n].dim() == 2):
            w = plain_params[name]
            w.copy_(dequantize(*quantize_fp8_rows(w), "fp8", torch.float32))
    want = _tokens(plain)
    assert _tokens(fp8) == want
    # What the server's /metrics gets from the engine (EngineInfo, sent once it is ready).
    sizes = fp8.engine.info().weight_bytes
    assert (
        sizes == fp8.engine.executor.model.weight_bytes() and ("experts", "fp8", "device") in sizes
    )


@pytest.mark.parametrize("mode", ["fetch", "cpu", "auto"])
def test_offloaded_fp8_experts_match_resident(qwen3: Path, mode: str) -> None:
    kw = dict(dtype="float32", device="cpu", progress=False, quantization="fp8")
    resident = _tokens(LLM(qwen3, **kw))
    llm = LLM(qwen3, expert_cache_slots=2, offload_mode=mode, **kw)
    assert _tokens(llm) == resident
    stats = llm.engine.executor.expert_store.stats()
    layer = llm.engine.executor.expert_store.layers[0]
    # A copied expert is its float8 weights and float32 row scales, not float32 weights.
    assert layer.expert_bytes == 2 * 136 * 160 + 2 * 136 * 2 * 4 + 160 * 136 + 160 * 2 * 4
    if mode == "fetch":
        assert sum(s.bytes_copied for s in stats) == layer.expert_bytes * sum(
            s.misses for s in stats
        )


def test_quantization_option_checked(qwen3: Path) -> None:
    with pytest.raises(ConfigError, match="quantization must be fp8"):
        LLM(qwen3, device="cpu", progress=False, quantization="int4")
    with pytest.raises(CheckpointError, match="quantization must be one of fp8"):
        load_model(qwen3, progress=False, quantization="awq")


def test_metrics_report_weight_bytes() -> None:
    sizes = {("experts", "fp8", "host"): 3 << 30, ("dense", "bfloat16", "device"): 5 << 20}
    samples = scrape(make(weight_bytes=sizes))["moeserve_model_weight_bytes"]
    got = {
        dict(k)["part"] + "/" + dict(k)["format"] + "/" + dict(k)["location"]: v
        for k, v in samples.items()
    }
    assert got == {"experts/fp8/host": 3 << 30, "dense/bfloat16/device": 5 << 20}
