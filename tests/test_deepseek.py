"""DeepSeek-V2/V3 (and Kimi-K2) end to end on CPU: hub configs parsed, the latent cache's
accounting, and the engine's outputs unchanged by batching, chunked prefill, preemption,
expert offloading and the Triton kernels (interpreted). tests/test_fidelity.py compares the
model with transformers; tests/test_mla.py the attention layer."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeserve import LLM, SamplingParams
from moeserve.config import CacheConfig, ConfigError, SchedulerConfig
from moeserve.engine.kv_budget import plan_num_blocks
from moeserve.engine.runner import kv_bytes_per_block
from moeserve.model.decoder import MoEForCausalLM
from moeserve.model.families import parse_config
from tests.checkpoints import make_checkpoint
from tests.test_fidelity import DECODE_STEPS, TOL, ours, reference

YARN = dict(
    type="yarn",
    factor=40,
    original_max_position_embeddings=4096,
    beta_fast=32,
    beta_slow=1,
    mscale=0.707,
    mscale_all_dim=0.707,
)
# The fields of the hub's config.json files that matter here.
V2_LITE: dict[str, Any] = dict(
    model_type="deepseek_v2",
    vocab_size=102400,
    hidden_size=2048,
    intermediate_size=10944,
    moe_intermediate_size=1408,
    num_hidden_layers=27,
    num_attention_heads=16,
    num_key_value_heads=16,
    n_routed_experts=64,
    n_shared_experts=2,
    num_experts_per_tok=6,
    first_k_dense_replace=1,
    topk_method="greedy",
    norm_topk_prob=False,
    routed_scaling_factor=1.0,
    kv_lora_rank=512,
    q_lora_rank=None,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    max_position_embeddings=163840,
    rope_theta=10000,
    rope_scaling=YARN,
    rms_norm_eps=1e-6,
    torch_dtype="bfloat16",
)
V3: dict[str, Any] = dict(
    V2_LITE,
    model_type="deepseek_v3",
    vocab_size=129280,
    hidden_size=7168,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    num_hidden_layers=61,
    num_attention_heads=128,
    num_key_value_heads=128,
    n_routed_experts=256,
    n_shared_experts=1,
    num_experts_per_tok=8,
    first_k_dense_replace=3,
    n_group=8,
    topk_group=4,
    topk_method="noaux_tc",
    scoring_func="sigmoid",
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    q_lora_rank=1536,
    num_nextn_predict_layers=1,
    rope_scaling=dict(YARN, mscale=1.0, mscale_all_dim=1.0),
)
KIMI_K2: dict[str, Any] = dict(
    V3, num_attention_heads=64, num_key_value_heads=64, n_routed_experts=384, n_group=1
)
KIMI_K2["topk_group"] = 1
KIMI_K2["routed_scaling_factor"] = 2.827
KIMI_K2["rope_scaling"] = dict(YARN, factor=32.0, mscale=1.0, mscale_all_dim=1.0)


@pytest.mark.parametrize(
    ("raw", "heads", "q_lora", "interleave"),
    [(V2_LITE, 16, None, True), (V3, 128, 1536, True), (KIMI_K2, 64, 1536, True)],
    ids=["v2-lite", "v3", "kimi-k2"],
)
def test_hub_configs_parse(raw: dict, heads: int, q_lora: int | None, interleave: bool) -> None:
    cfg = parse_config(raw)
    assert cfg.mla and cfg.num_heads == heads and cfg.q_lora_rank == q_lora
    assert (cfg.kv_lora_rank, cfg.head_dim, cfg.qk_nope_head_dim) == (512, 64, 128)
    assert cfg.v_head_dim == 128 and cfg.rope_interleave is interleave
    assert cfg.kv_cache_shape == (1, 1, 576)
    assert cfg.rope_params["rope_type"] == "yarn"
    assert cfg.sparse_layers == tuple(
        i >= raw["first_k_dense_replace"] for i in range(len(cfg.sparse_layers))
    )


def test_latent_cache_block_accounting() -> None:
    """DeepSeek-V2-Lite in bf16: (512 + 64) x 27 layers x 2 bytes = 31104 bytes a token (a
    per-head K/V cache would take 2 x 16 x 192 x 27 x 2 = 331776), and a byte budget holds
    budget // (block bytes) blocks."""
    cfg = parse_config(V2_LITE)
    assert kv_bytes_per_block(cfg, 1, torch.bfloat16) == 31104
    assert kv_bytes_per_block(cfg, 16, torch.bfloat16) == 16 * 31104
    model = MoEForCausalLM(cfg, torch.bfloat16, torch.device("meta"))
    budget = 1000 * 16 * 31104 + 5
    blocks = plan_num_blocks(
        model, CacheConfig(block_size=16, kv_cache_memory=budget), SchedulerConfig(), 4096
    )
    assert blocks == 1000


@pytest.mark.parametrize(
    ("field", "value"),
    [("kv_lora_rank", None), ("qk_rope_head_dim", 63), ("v_head_dim", 0), ("q_lora_rank", 1.5)],
)
def test_bad_mla_fields_are_named(field: str, value: Any) -> None:
    raw = dict(V2_LITE)
    if value is None:
        del raw[field]
    else:
        raw[field] = value
    with pytest.raises(ConfigError, match=field):
        parse_config(raw)


def test_v3_hub_checkpoint_with_mtp_layer(tmp_path: Path) -> None:
    """A hub-style DeepSeek-V3 checkpoint carrying its multi-token-prediction layer after the
    decoder's (model.layers.{n}.*, not run): loaded and matching transformers."""
    path = make_checkpoint(tmp_path / "v3", "deepseek_v3", hub_style=True)
    raw = json.loads((path / "config.json").read_text())
    n = raw["num_hidden_layers"]
    assert parse_config(raw).num_mtp_layers == 1
    tensors = load_file(path / "model.safetensors")
    last = f"model.layers.{n - 1}."
    mtp = {
        k.replace(last, f"model.layers.{n}."): v.clone() for k, v in tensors.items() if last in k
    }
    mtp[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(32, 64)
    save_file({**tensors, **mtp}, path / "model.safetensors", metadata={"format": "pt"})
    prompt = torch.randint(2, 120, (9,), generator=torch.Generator().manual_seed(2)).tolist()
    our_prompt, _, our_tokens = ours(path, prompt, chunk=4)
    ref_prompt, _, ref_tokens = reference(path, prompt)
    assert (our_prompt - ref_prompt).abs().max().item() <= TOL
    assert our_tokens.tolist() == ref_tokens[:DECODE_STEPS].tolist()


PROMPTS = [[5 + i, 9, 40 + 3 * i, 7, 11, 13, 17, 19, 23, 29][: 2 + (3 * i) % 9] for i in range(8)]


def _params(i: int) -> SamplingParams:
    return SamplingParams(max_tokens=2 + (i % 4) * 2, temperature=0.0, ignore_eos=True, logprobs=2)


def _run(llm: LLM, prompts: list[list[int]] = PROMPTS) -> list[tuple[list[int], list[float]]]:
    outs = llm.generate(prompts, [_params(PROMPTS.index(p)) for p in prompts])
    return [
        (o.outputs[0].token_ids, [lp.logprob for lp in o.outputs[0].logprobs or []]) for o in outs
    ]


def _assert_same(got: list, want: list, tol: float) -> None:
    for (tok_g, lp_g), (tok_w, lp_w) in zip(got, want, strict=True):
        assert tok_g == tok_w
        assert max(abs(a - b) for a, b in zip(lp_g, lp_w, strict=True)) <= tol


@pytest.fixture(scope="module", params=["deepseek_v2", "deepseek_v3"])
def ckpt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ds") / request.param, request.param)


def test_batching_chunked_prefill_and_preemption(ckpt: Path) -> None:
    roomy = LLM(ckpt, progress=False, block_size=4, max_num_seqs=8)
    alone = [_run(roomy, [p])[0] for p in PROMPTS]
    _assert_same(_run(roomy), alone, 1e-5)
    chunked = LLM(ckpt, progress=False, block_size=4, max_num_batched_tokens=8, max_num_seqs=4)
    _assert_same(_run(chunked), alone, 1e-5)
    per_block = kv_bytes_per_block(roomy.engine.model_config, 4, torch.float32)
    tight = LLM(
        ckpt, progress=False, block_size=4, max_model_len=32, kv_cache_memory=12 * per_block
    )
    assert tight.engine.executor.num_blocks == 12
    _assert_same(_run(tight), alone, 1e-5)
    assert tight.engine.scheduler.stats().num_preemptions_total > 0


@pytest.mark.parametrize(("mode", "slots"), [("fetch", 2), ("cpu", 3), ("auto", 1)])
def test_offloaded_experts_give_the_same_outputs(ckpt: Path, mode: str, slots: int) -> None:
    want = _run(LLM(ckpt, progress=False))
    llm = LLM(ckpt, progress=False, expert_cache_slots=slots, offload_mode=mode, prefetch=True)
    _assert_same(_run(llm), want, 1e-5)
    stats = llm.engine.expert_cache_stats()
    assert stats and all(s.misses > 0 for s in stats)


def test_startup_logs_latent_cache_size(ckpt: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="moeserve.engine.executor"):
        llm = LLM(ckpt, progress=False, block_size=4, kv_cache_memory=1 << 20)
    cfg = llm.engine.model_config
    per_token = cfg.num_layers * (cfg.kv_lora_rank + cfg.head_dim) * 4
    blocks = (1 << 20) // (4 * per_token)
    line = next(r.getMessage() for r in caplog.records if "model ready" in r.getMessage())
    assert f"{blocks} KV blocks of 4 tokens ({4 * blocks} tokens at {per_token} bytes" in line
    assert "latent cache" in line


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
@pytest.mark.parametrize("n", [3, 1], ids=["three-prompts", "one-prompt"])
def test_interpreted_kernels_match_readable_path(
    tmp_path: Path, family: str, n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The MLA decode kernel beside prefill chunks, with what a captured decode step runs
    forced at every step: fused norms, split-K partials of the output projection. One
    prompt: its one-token decode steps take the expert GEMVs with the shared expert's rows
    in their launches."""
    pytest.importorskip("triton")
    import moeserve.model.backend as backend

    path = make_checkpoint(tmp_path / family, family, num_hidden_layers=2)
    kw = dict(progress=False, device="cpu", max_num_batched_tokens=8, max_num_seqs=3)
    prompts = [PROMPTS[i] for i in (1, 2, 6)][:n]
    want = _run(LLM(path, kernels="torch", **kw), prompts)
    monkeypatch.setattr(backend, "FUSED_ELEMENTWISE_MIN_TOKENS", 1)
    import moeserve.kernels.fused_moe as fm

    shared_launches, gemv = [], fm.gemv_gate_up_act

    def counting(*args: Any, **kwargs: Any) -> Any:
        shared_launches.append(kwargs.get("shared") is not None)
        return gemv(*args, **kwargs)

    monkeypatch.setattr(fm, "gemv_gate_up_act", counting)
    _assert_same(_run(LLM(path, kernels="triton", **kw), prompts), want, 1e-4)
    assert any(shared_launches) == (n == 1)


@pytest.mark.gpu
@pytest.mark.parametrize("offloaded", [False, True], ids=["resident", "offloaded"])
def test_gpu_graphs_match_readable_path(ckpt: Path, offloaded: bool) -> None:
    """float32 on the device: CUDA-graph decode over the latent cache (the MLA kernel, padded
    batches; with offloaded experts one graph per stage) = the readable eager path."""
    kw = dict(progress=False, device="cuda", max_num_seqs=8, kv_cache_memory=2**28)
    want = _run(LLM(ckpt, kernels="torch", **kw))
    if offloaded:
        kw |= dict(expert_cache_slots=3, offload_mode="fetch")
    fast = LLM(ckpt, **kw)
    assert fast.engine.executor.runner.graphs is not None
    _assert_same(_run(fast), want, 1e-3)


@pytest.mark.gpu
def test_gpu_bf16_graphs_match_eager_kernels(ckpt: Path) -> None:
    kw = dict(progress=False, device="cuda", dtype="bfloat16", kv_cache_memory=2**28)
    graphs = LLM(ckpt, max_num_seqs=8, **kw)
    eager = LLM(ckpt, max_num_seqs=8, enforce_eager=True, **kw)
    assert graphs.engine.executor.runner.graphs is not None
    _assert_same(_run(graphs), _run(eager), 5e-2)
