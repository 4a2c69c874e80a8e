"""GLM-4.5 (glm4_moe) and the DeepSeek-style MoE rules it shares with DeepSeek-V2/V3.

Routing rules against a plain per-token reference and transformers' own routers; the config
fields of hub-style configs; a hub-style checkpoint (yarn rope, top-level partial rotary, an
MTP layer) against transformers; the float32 router under bf16; the engine's greedy output
under batching, chunked prefill, the fused path and every offload mode.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeserve import LLM, SamplingParams
from moeserve.config import ConfigError, ModelConfig
from moeserve.model.deepseek_moe import deepseek_moe_fields
from moeserve.model.families import parse_config
from moeserve.model.loader import load_model
from moeserve.model.router import RouterSpec, route
from tests.checkpoints import make_checkpoint
from tests.test_fidelity import DECODE_STEPS, TOL, ours, reference


def _plain_route(
    logits_E: torch.Tensor, spec: RouterSpec, bias_E: torch.Tensor | None
) -> dict[int, float]:
    """One token's {expert: weight}, step by step as DeepSeek's papers state the rules."""
    e = spec.num_experts
    scores = logits_E.softmax(-1) if spec.scoring == "softmax" else logits_E.sigmoid()
    choice = [
        float(scores[i]) + (float(bias_E[i]) if bias_E is not None else 0.0) for i in range(e)
    ]
    allowed = list(range(e))
    if spec.n_group is not None:
        per = e // spec.n_group
        groups = [choice[g * per : (g + 1) * per] for g in range(spec.n_group)]
        if spec.group_score == "max":
            score = [max(g) for g in groups]
        else:
            score = [sum(sorted(g, reverse=True)[:2]) for g in groups]
        best = sorted(range(spec.n_group), key=lambda g: -score[g])[: spec.topk_group]
        allowed = [i for i in range(e) if i // per in best]
    chosen = sorted(allowed, key=lambda i: -choice[i])[: spec.top_k]
    weights = {i: float(scores[i]) for i in chosen}
    if spec.renormalize:
        total = sum(weights.values())
        weights = {i: w / total for i, w in weights.items()}
    return {i: w * spec.routed_scaling_factor for i, w in weights.items()}


SPECS = [
    RouterSpec(12, 3, "sigmoid", True, 4, 2, 2.5, True, "sum_top2"),  # DeepSeek-V3, GLM-4.5
    RouterSpec(12, 3, "sigmoid", False, 3, 1, 1.0, True, "sum_top2"),
    RouterSpec(12, 4, "softmax", False, 6, 3, 16.0, False, "max"),  # DeepSeek-V2 groups
    RouterSpec(12, 2, "softmax", False, None, None, 16.0, False),  # DeepSeek-V2 greedy
    RouterSpec(12, 3, "sigmoid", True, 4, 2, 1.0, True, "max"),  # max with bias
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.scoring}-{s.n_group}-{s.group_score}")
def test_route_matches_plain_reference(spec: RouterSpec) -> None:
    g = torch.Generator().manual_seed(spec.num_experts * spec.top_k)
    logits_TE = torch.randn(40, spec.num_experts, generator=g) * 2
    bias_E = torch.randn(spec.num_experts, generator=g) * 0.3 if spec.correction_bias else None
    weights_TK, experts_TK, _ = route(logits_TE, spec, bias_E=bias_E)
    for t in range(logits_TE.shape[0]):
        want = _plain_route(logits_TE[t], spec, bias_E)
        got = dict(zip(experts_TK[t].tolist(), weights_TK[t].tolist()))
        assert got.keys() == want.keys()
        assert all(abs(got[i] - want[i]) < 1e-5 for i in want)


def test_bias_steers_selection_only() -> None:
    spec = SPECS[0]
    logits_TE = torch.randn(16, 12, generator=torch.Generator().manual_seed(3))
    bias_E = torch.zeros(12)
    bias_E[5] = 10.0  # expert 5 always chosen, weighed by its unbiased score
    weights_TK, experts_TK, _ = route(logits_TE, spec, bias_E=bias_E)
    assert (experts_TK == 5).any(dim=1).all()
    scores = logits_TE.sigmoid().gather(1, experts_TK)
    want = scores / scores.sum(-1, keepdim=True) * spec.routed_scaling_factor
    torch.testing.assert_close(weights_TK, want)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.scoring}-{s.n_group}-{s.group_score}")
@pytest.mark.parametrize("split", [0, 3], ids=["logits", "partials"])
def test_interpreted_triton_routing_matches_torch(spec: RouterSpec, split: int) -> None:
    """The routing program (decode sizes) with every rule: route() and moe_align()'s results,
    padding rows routed nowhere and not counted."""
    pytest.importorskip("triton")
    from moeserve.kernels.fused_moe import moe_align
    from moeserve.model.dispatch import expert_counts

    g = torch.Generator().manual_seed(spec.top_k + split)
    t, e = 11, spec.num_experts
    logits = torch.randn(max(split, 1), t, e, generator=g) * 2
    bias_E = torch.randn(e, generator=g) * 0.3 if spec.correction_bias else None
    valid = (torch.rand(t, generator=g) > 0.3).long()
    counts = torch.zeros(e, dtype=torch.int64)
    arg = logits if split else logits[0]
    w, x, align = route(
        arg, spec, bias_E=bias_E, valid_T=valid, backend="triton", block_m=4, counts_E=counts
    )
    want_w, want_x, _ = route(logits.sum(0), spec, bias_E=bias_E, valid_T=valid)
    order, want_order = x.argsort(-1), want_x.argsort(-1)
    assert torch.equal(x.gather(1, order), want_x.gather(1, want_order))
    torch.testing.assert_close(w.gather(1, order), want_w.gather(1, want_order))
    assert torch.equal(counts, expert_counts(want_x.flatten(), e))
    assert align is not None
    sorted_ids, block_expert, used = moe_align(x, e, 4)
    assert torch.equal(align[1], block_expert) and torch.equal(align[2], used)
    assert torch.equal(align[0][: int(used)], sorted_ids[: int(used)])


def _hf_router(kind: str, **cfg: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    import transformers as tf
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as v2
    from transformers.models.glm4_moe import modeling_glm4_moe as glm

    base = dict(
        hidden_size=16, num_attention_heads=2, num_experts_per_tok=3, moe_intermediate_size=8
    )
    if kind == "glm4_moe":
        config = tf.Glm4MoeConfig(**base, n_routed_experts=12, **cfg)
        router = glm.Glm4MoeTopkRouter(config)
    else:
        config = tf.DeepseekV2Config(**base, n_routed_experts=12, **cfg)
        router = v2.DeepseekV2TopkRouter(config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g))
        if hasattr(router, "e_score_correction_bias"):
            router.e_score_correction_bias.copy_(torch.randn(12, generator=g) * 0.3)
    raw = {**config.to_dict(), "model_type": kind, "num_hidden_layers": 2}
    return router, raw


@pytest.mark.parametrize(
    ("kind", "cfg"),
    [
        ("glm4_moe", dict(n_group=4, topk_group=2, routed_scaling_factor=2.5)),
        ("glm4_moe", dict(n_group=1, topk_group=1, norm_topk_prob=False)),
        ("deepseek_v2", dict(topk_method="greedy", routed_scaling_factor=16.0)),
        (
            "deepseek_v2",
            dict(topk_method="group_limited_greedy", n_group=4, topk_group=2),
        ),
    ],
)
def test_rules_from_config_match_transformers_router(kind: str, cfg: dict) -> None:
    router, raw = _hf_router(kind, **cfg)
    fields = deepseek_moe_fields(raw)
    spec = RouterSpec.from_config(ModelConfig("x", 1, 16, 2, 1, 1, 16, 1e-6, 8, 1e4, **fields))
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, ref_w, ref_e = router(x)
    bias = getattr(router, "e_score_correction_bias", None)
    weights_TK, experts_TK, _ = route(x @ router.weight.T, spec, bias_E=bias)
    order, ref_order = experts_TK.argsort(-1), ref_e.argsort(-1)
    assert torch.equal(experts_TK.gather(1, order), ref_e.gather(1, ref_order))
    torch.testing.assert_close(weights_TK.gather(1, order), ref_w.gather(1, ref_order))


# Abridged hub config.json files (the routing-related fields as published).
_V2_LITE = dict(
    model_type="deepseek_v2",
    num_hidden_layers=27,
    n_routed_experts=64,
    num_experts_per_tok=6,
    moe_intermediate_size=1408,
    intermediate_size=10944,
    n_shared_experts=2,
    first_k_dense_replace=1,
    moe_layer_freq=1,
    topk_method="greedy",
    n_group=1,
    topk_group=1,
    norm_topk_prob=False,
    routed_scaling_factor=1.0,
    scoring_func="softmax",
)
_V3 = dict(
    model_type="deepseek_v3",
    num_hidden_layers=61,
    n_routed_experts=256,
    num_experts_per_tok=8,
    moe_intermediate_size=2048,
    intermediate_size=18432,
    n_shared_experts=1,
    first_k_dense_replace=3,
    moe_layer_freq=1,
    topk_method="noaux_tc",
    n_group=8,
    topk_group=4,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    scoring_func="sigmoid",
    num_nextn_predict_layers=1,
)
_GLM_AIR = dict(
    model_type="glm4_moe",
    num_hidden_layers=46,
    n_routed_experts=128,
    num_experts_per_tok=8,
    moe_intermediate_size=1408,
    intermediate_size=10944,
    n_shared_experts=1,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    norm_topk_prob=True,
    routed_scaling_factor=1.0,
    num_nextn_predict_layers=1,
)


def test_hub_config_fields() -> None:
    lite = deepseek_moe_fields(_V2_LITE)
    assert (lite["scoring_func"], lite["n_group"], lite["norm_topk_prob"]) == (
        "softmax",
        None,
        False,
    )
    assert lite["sparse_layers"] == (False,) + (True,) * 26
    assert lite["shared_expert_intermediate_size"] == 2 * 1408 and not lite["shared_expert_gate"]
    assert not lite["router_correction_bias"] and lite["num_mtp_layers"] == 0
    v25 = deepseek_moe_fields({**_V2_LITE, "topk_method": "group_limited_greedy", "n_group": 8,
                               "topk_group": 3, "routed_scaling_factor": 16.0})  # fmt: skip
    assert (v25["n_group"], v25["topk_group"], v25["router_group_score"]) == (8, 3, "max")
    assert v25["routed_scaling_factor"] == 16.0
    v3 = deepseek_moe_fields(_V3)
    assert (v3["scoring_func"], v3["n_group"], v3["topk_group"]) == ("sigmoid", 8, 4)
    assert v3["router_group_score"] == "sum_top2" and v3["router_correction_bias"]
    assert v3["sparse_layers"] == (False,) * 3 + (True,) * 58 and v3["router_float32"]
    assert v3["num_mtp_layers"] == 1 and v3["dense_intermediate_size"] == 18432
    air = deepseek_moe_fields(_GLM_AIR)
    assert air["n_group"] is None and air["routed_scaling_factor"] == 1.0  # one group: plain
    freq = deepseek_moe_fields({**_V3, "moe_layer_freq": 2})
    assert freq["sparse_layers"][:6] == (False, False, False, False, True, False)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (dict(topk_method="noaux_tc"), "topk_method"),
        (dict(scoring_func="sigmoid"), "scoring_func"),
        (dict(topk_method="group_limited_greedy", n_group=5, topk_group=2), "n_group"),
        (dict(first_k_dense_replace=-1), "first_k_dense_replace"),
        (dict(routed_scaling_factor=0), "routed_scaling_factor"),
    ],
)
def test_bad_moe_fields(change: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        deepseek_moe_fields({**_V2_LITE, **change})


def test_glm_config_partial_rotary() -> None:
    common = dict(
        vocab_size=100,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=64,
        rope_theta=1e6,
        attention_bias=True,
        use_qk_norm=True,
        partial_rotary_factor=0.5,
    )
    cfg = parse_config({**_GLM_AIR, **common})
    assert (cfg.rotary_dim, cfg.rotary_width, cfg.qk_norm, cfg.qkv_bias) == (16, 16, "head", True)
    assert cfg.num_mtp_layers == 1 and cfg.sparse_layers[0] is False
    full = parse_config({**_GLM_AIR, **common, "partial_rotary_factor": 1.0})
    assert full.rotary_dim == 0 and full.rotary_width == 32
    with pytest.raises(ConfigError, match="partial_rotary_factor"):
        parse_config({**_GLM_AIR, **common, "partial_rotary_factor": 0.01})


def test_hub_style_checkpoint_with_yarn_and_mtp_layer(tmp_path: Path) -> None:
    """Hub spelling (rope_scaling yarn, top-level partial_rotary_factor) and the MTP layer a
    hub checkpoint stores after the decoder's, which is ignored."""
    rope = dict(
        rope_type="yarn",
        rope_theta=10000.0,
        factor=4.0,
        original_max_position_embeddings=64,
        partial_rotary_factor=0.5,
    )
    path = make_checkpoint(tmp_path / "glm", "glm4_moe", hub_style=True, rope_parameters=rope)
    raw = json.loads((path / "config.json").read_text())
    raw["partial_rotary_factor"] = raw["rope_scaling"].pop("partial_rotary_factor")
    (path / "config.json").write_text(json.dumps(raw))
    tensors = load_file(path / "model.safetensors")
    n = raw["num_hidden_layers"]
    mtp = {  # a copy of the last layer, as the MTP layer's tensors are named alike
        k.replace("layers.2.", f"layers.{n}."): v.clone()
        for k, v in tensors.items()
        if k.startswith("model.layers.2.")
    }
    mtp[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(32, 64)
    save_file({**tensors, **mtp}, path / "model.safetensors", metadata={"format": "pt"})
    assert parse_config(raw).rope_params["rope_type"] == "yarn"
    prompt = torch.randint(2, 120, (13,), generator=torch.Generator().manual_seed(1)).tolist()
    our_prompt, our_decode, our_tokens = ours(path, prompt, chunk=5)
    ref_prompt, ref_decode, ref_tokens = reference(path, prompt)
    assert (our_prompt - ref_prompt).abs().max().item() <= TOL
    assert our_tokens.tolist() == ref_tokens[:DECODE_STEPS].tolist()
    assert (our_decode - ref_decode).abs().max().item() <= TOL


def test_router_runs_in_float32_under_bf16(tmp_path: Path) -> None:
    """The reference keeps gate.weight in float32 and casts the activations up: so do we."""
    from transformers.models.glm4_moe import modeling_glm4_moe as glm

    path = make_checkpoint(tmp_path / "glm", "glm4_moe", dtype=torch.bfloat16)
    _, model = load_model(path, progress=False)
    moe = model.layers[1].mlp
    assert moe.router.dtype == torch.float32 and moe.w_gate_up.dtype == torch.bfloat16
    cfg = glm.Glm4MoeConfig(**json.loads((path / "config.json").read_text()))
    router = glm.Glm4MoeTopkRouter(cfg)
    with torch.no_grad():
        router.weight.copy_(moe.router)
        router.e_score_correction_bias.copy_(moe.router_bias)
        x = torch.randn(64, 32, generator=torch.Generator().manual_seed(2)).bfloat16()
        _, ref_w, ref_e = router(x)
    weights_TK, experts_TK = moe.select_experts(x)
    order, ref_order = experts_TK.argsort(-1), ref_e.argsort(-1)
    assert torch.equal(experts_TK.gather(1, order), ref_e.gather(1, ref_order))
    torch.testing.assert_close(weights_TK.gather(1, order), ref_w.gather(1, ref_order))


PROMPTS = [[5 + i, 9, 40 + 3 * i, 7, 11, 13, 17, 19][: 3 + i % 6] for i in range(8)]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("glm") / "glm", "glm4_moe", tokenizer=True)


def _outputs(outs) -> list[tuple[list[int], list[float]]]:
    return [(o.outputs[0].token_ids, [lp.logprob for lp in o.outputs[0].logprobs]) for o in outs]


@pytest.fixture(scope="module")
def alone(ckpt: Path) -> list[tuple[list[int], list[float]]]:
    llm = LLM(ckpt, progress=False, kernels="torch")
    return [_outputs(llm.generate([p], GREEDY))[0] for p in PROMPTS]


def _same(got: list, want: list, tol: float = 1e-4) -> None:
    for (tok_g, lp_g), (tok_w, lp_w) in zip(got, want, strict=True):
        assert tok_g == tok_w
        assert max(abs(a - b) for a, b in zip(lp_g, lp_w, strict=True)) <= tol


@pytest.mark.parametrize(
    "options",
    [
        dict(kernels="torch"),
        dict(kernels="torch", max_num_batched_tokens=8, max_num_seqs=8, block_size=4),
        dict(kernels="torch", expert_cache_slots=4, offload_mode="fetch"),
        dict(kernels="torch", expert_cache_slots=2, offload_mode="cpu", prefetch=True),
        dict(kernels="torch", expert_cache_slots=1, offload_mode="auto"),
    ],
    ids=["batched", "chunked", "fetch-4", "cpu-2-prefetch", "auto-1"],
)
def test_greedy_identical_batched_chunked_offloaded(ckpt: Path, alone, options: dict) -> None:
    llm = LLM(ckpt, progress=False, **options)
    _same(_outputs(llm.generate(PROMPTS, GREEDY)), alone)
    if "expert_cache_slots" in options:
        stats = llm.engine.expert_cache_stats()
        assert len(stats) == 2 and all(s.misses > 0 for s in stats)  # layers 1, 2 offloaded


@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk-norm"])
def test_interpreted_fused_path_both_routings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, qk_norm: bool
) -> None:
    """Triton kernels (interpreted on the CPU): the routing program with GLM's rules (sigmoid,
    bias, groups, scaling) and the fused GEMMs; then what a captured decode step runs (forced
    at every step: fused norms, the rotary kernels over a partial head) with the torch routing
    before the fused GEMMs (the program's tile limit forced to nothing)."""
    pytest.importorskip("triton")
    import moeserve.kernels.moe_routing as moe_routing
    import moeserve.model.backend as backend

    # No qkv bias: a forced decode step takes qkv's split-K partials straight into the rotary
    # kernel (rotary_from_partials), prefills the in-place one; either norms the q and k
    # heads first (over the whole head, the unrotated half too) when the checkpoint has them.
    path = make_checkpoint(
        tmp_path / "glm", "glm4_moe", num_hidden_layers=2, attention_bias=False, use_qk_norm=qk_norm
    )
    prompts, params = PROMPTS[:3], SamplingParams(max_tokens=4, temperature=0.0, logprobs=2)
    kw = dict(progress=False, device="cpu", max_num_batched_tokens=12, max_num_seqs=4)
    want = _outputs(LLM(path, kernels="torch", **kw).generate(prompts, params))
    _same(_outputs(LLM(path, kernels="triton", **kw).generate(prompts, params)), want)
    monkeypatch.setattr(backend, "FUSED_ELEMENTWISE_MIN_TOKENS", 1)
    monkeypatch.setattr(moe_routing, "MAX_TILE", 0)
    _same(_outputs(LLM(path, kernels="triton", **kw).generate(prompts, params)), want)


@pytest.mark.parametrize("from_partials", [False, True], ids=["in-place", "partials"])
def test_interpreted_partial_rotary_kernels(from_partials: bool) -> None:
    """The Triton rotary kernels with cos/sin narrower than the head (GLM's partial rotary):
    the readable rotary and K/V write, exactly, the unrotated tail passed through."""
    pytest.importorskip("triton")
    from moeserve.kernels.norm_rope import apply_rotary_, rotary_from_partials
    from moeserve.model.layers import write_kv
    from moeserve.model.rotary import apply_rotary

    g = torch.Generator().manual_seed(11)
    t, h, gk, x, rot, split = 5, 4, 2, 24, 8, 3
    parts = torch.randn(split, t, (h + 2 * gk) * x, generator=g)
    qkv = parts.sum(0)
    q = qkv[:, : h * x].reshape(t, h, x)
    k = qkv[:, h * x : (h + gk) * x].reshape(t, gk, x)
    v = qkv[:, (h + gk) * x :].reshape(t, gk, x)
    ang = torch.randn(t, rot // 2, generator=g).repeat(1, 2)
    cos, sin = ang.cos(), ang.sin()
    slots = torch.tensor([3, 17, 0, 22, 9])
    want_k_cache = torch.zeros(6, 4, gk, x)
    want_v_cache = torch.zeros_like(want_k_cache)
    want_q, want_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    assert torch.equal(want_q[..., rot:], q[..., rot:])  # the tail is not rotated
    write_kv(want_k_cache, want_v_cache, want_k, v, slots)
    k_cache, v_cache = torch.zeros_like(want_k_cache), torch.zeros_like(want_v_cache)
    if from_partials:
        got_q = rotary_from_partials(parts, h, gk, cos, sin, (k_cache, v_cache, slots), q.dtype)
    else:
        got_q, got_k = q.clone(), k.clone()
        apply_rotary_(got_q, got_k, cos, sin, (v, k_cache, v_cache, slots))
        torch.testing.assert_close(got_k, want_k, rtol=0, atol=0)
    torch.testing.assert_close(got_q, want_q, rtol=0, atol=0)
    torch.testing.assert_close(k_cache, want_k_cache, rtol=0, atol=0)
    assert torch.equal(v_cache, want_v_cache)


@pytest.mark.gpu
def test_gpu_graphs_match_readable_path(ckpt: Path) -> None:
    """float32 on the device: CUDA-graph decode through the torch routing and fused GEMMs."""
    kw = dict(progress=False, device="cuda", max_num_seqs=8, kv_cache_memory=2**28)
    fast = LLM(ckpt, **kw)
    assert fast.engine.executor.runner.graphs is not None
    _same(_outputs(fast.generate(PROMPTS, GREEDY)), alone_on(ckpt, "cuda"), 1e-3)


def alone_on(ckpt: Path, device: str) -> list[tuple[list[int], list[float]]]:
    llm = LLM(ckpt, progress=False, kernels="torch", device=device, kv_cache_memory=2**28)
    return [_outputs(llm.generate([p], GREEDY))[0] for p in PROMPTS]
