"""The router's rules (RouterSpec) and its two backends: the torch backend against transformers'
DeepSeek-V3 router (sigmoid scores, correction bias, group-limited top-k, scaling), the Triton
backend against the torch backend, and the MoE layer's per-expert counts on every path."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moeserve.config import ModelConfig
from moeserve.model.backend import ModelBackend
from moeserve.model.dispatch import expert_counts
from moeserve.model.moe import MoE
from moeserve.model.router import RouterSpec, route, triton_routable


def _deepseek_gate(e: int, k: int, n_group: int, topk_group: int, norm: bool, scale: float):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = DeepseekV3Config(
        hidden_size=32,
        n_routed_experts=e,
        num_experts_per_tok=k,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=norm,
        routed_scaling_factor=scale,
    )
    gate = DeepseekV3TopkRouter(cfg)
    g = torch.Generator().manual_seed(e * 100 + k)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(e, 32, generator=g) * 0.3)
        # As large as the scores' spread: the bias moves the selection.
        gate.e_score_correction_bias.copy_(torch.randn(e, generator=g) * 0.2)
    return cfg, gate


def _by_expert(weights_TK: torch.Tensor, experts_TK: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each row's (experts, weights) in ascending expert order: top-k's order is not a rule."""
    experts_TK, order = experts_TK.sort(dim=-1)
    return experts_TK, weights_TK.gather(1, order)


DEEPSEEK_CASES = [
    # (experts, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor)
    (16, 4, 4, 2, True, 2.5),  # DeepSeek-V3's shape, scaled down
    (16, 3, 8, 3, False, 1.0),
    (12, 2, 1, 1, True, 1.0),  # one group: plain top-k of the biased scores
]


@pytest.mark.parametrize(("e", "k", "n_group", "topk_group", "norm", "scale"), DEEPSEEK_CASES)
def test_torch_backend_matches_transformers_deepseek_v3(
    e: int, k: int, n_group: int, topk_group: int, norm: bool, scale: float
) -> None:
    _, gate = _deepseek_gate(e, k, n_group, topk_group, norm, scale)
    spec = RouterSpec(
        num_experts=e,
        top_k=k,
        scoring="sigmoid",
        renormalize=norm,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=scale,
        correction_bias=True,
    )
    h = torch.randn(53, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits_TE, want_w, want_x = gate(h)
    bias_E = gate.e_score_correction_bias
    w, x, align = route(logits_TE, spec, bias_E=bias_E)
    assert align is None and w.dtype == torch.float32 and x.dtype == torch.int64
    got_x, got_w = _by_expert(w, x)
    ref_x, ref_w = _by_expert(want_w, want_x)
    assert torch.equal(got_x, ref_x)
    torch.testing.assert_close(got_w, ref_w, rtol=1e-6, atol=1e-7)
    # The rules at work: without the bias, or without groups, other experts win.
    unbiased_x = _by_expert(*route(logits_TE, spec)[:2])[0]
    assert not torch.equal(unbiased_x, got_x)
    if n_group > 1:
        plain = dataclasses.replace(spec, n_group=None, topk_group=None)
        ungrouped_x = _by_expert(*route(logits_TE, plain, bias_E=bias_E)[:2])[0]
        assert not torch.equal(ungrouped_x, got_x)


def _moe_config(num_experts: int = 16, **router: object) -> ModelConfig:
    return ModelConfig(
        model_type="test",
        vocab_size=32,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        max_position_embeddings=64,
        rope_theta=1e4,
        num_experts=num_experts,
        top_k=4,
        moe_intermediate_size=24,
        sparse_layers=(True,),
        **router,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_moe_layer_with_deepseek_routing_matches_transformers(kernels: str) -> None:
    """The whole layer (router -> dispatch -> experts -> combine) with DeepSeek-V3's routing
    against transformers' gate and experts: the readable path and the fused kernels (routed
    by the Triton program, which covers sigmoid scores, the bias, groups and scaling)."""
    if kernels == "triton":
        pytest.importorskip("triton")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

    hf_cfg, gate = _deepseek_gate(16, 4, 4, 2, True, 2.5)
    hf_cfg.moe_intermediate_size = 24
    experts = DeepseekV3Experts(hf_cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(16, 48, 32, generator=g) * 0.2)
        experts.down_proj.copy_(torch.randn(16, 32, 24, generator=g) * 0.2)
    cfg = _moe_config(
        scoring_func="sigmoid",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        router_correction_bias=True,
    )
    moe = MoE(cfg, torch.float32, torch.device("cpu"), backend=ModelBackend(kernels == "triton"))
    assert moe.spec.scoring == "sigmoid" and moe.spec.triton_rules
    assert moe.router_bias is not None and moe.router_bias.dtype == torch.float32
    with torch.no_grad():
        moe.router.copy_(gate.weight)
        moe.router_bias.copy_(gate.e_score_correction_bias)
        moe.w_gate_up.copy_(experts.gate_up_proj)
        moe.w_down.copy_(experts.down_proj)
        h = torch.randn(9, 32, generator=g)
        _, w, x = gate(h)
        want = experts(h, x, w)
        got = moe(h)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(moe.tokens_per_expert_E, torch.bincount(x.flatten(), minlength=16))


TRITON_CASES = [(1, 8, 2, True), (5, 6, 3, False), (13, 60, 4, True), (64, 8, 2, True)]


@pytest.mark.parametrize(("t", "e", "k", "renorm"), TRITON_CASES)
def test_triton_backend_matches_torch_backend(t: int, e: int, k: int, renorm: bool) -> None:
    pytest.importorskip("triton")
    spec = RouterSpec(num_experts=e, top_k=k, renormalize=renorm)
    assert spec.triton_rules and triton_routable(spec, t)
    g = torch.Generator().manual_seed(t * e + k)
    logits = torch.randn(t, e, generator=g) * 3
    valid = (torch.rand(t, generator=g) > 0.3).long()
    valid[0] = 1
    counts = torch.zeros(e, dtype=torch.int64)
    w, x, align = route(logits, spec, valid_T=valid, backend="triton", block_m=16, counts_E=counts)
    want_w, want_x, none = route(logits, spec, valid_T=valid)
    assert align is not None and none is None
    assert torch.equal(x, want_x)  # padding rows: the sentinel in both
    torch.testing.assert_close(w, want_w, rtol=1e-5, atol=1e-6)
    assert torch.equal(counts, expert_counts(want_x.flatten(), e))  # padding not counted


def test_triton_rules_cover_every_rule() -> None:
    base = RouterSpec(num_experts=8, top_k=2)
    assert base.triton_rules
    for change in (
        dict(scoring="sigmoid"),
        dict(n_group=4, topk_group=2),
        dict(n_group=4, topk_group=2, group_score="max"),
        dict(routed_scaling_factor=2.0),
        dict(correction_bias=True),
    ):
        assert dataclasses.replace(base, **change).triton_rules


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (dict(scoring="relu"), "scoring"),
        (dict(top_k=9), "top_k"),
        (dict(n_group=4), "go together"),
        (dict(n_group=3, topk_group=1), "n_group"),
        (dict(n_group=8, topk_group=1), "groups of >= 2"),
        (dict(n_group=4, topk_group=1, top_k=3), "topk_group"),
    ],
)
def test_spec_refuses_inconsistent_rules(fields: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RouterSpec(**{"num_experts": 8, "top_k": 2, **fields})


def test_todays_families_route_by_softmax() -> None:
    """Without the new fields a config keeps softmax top-k (what the four families run)."""
    spec = RouterSpec.from_config(_moe_config(norm_topk_prob=False))
    assert spec == RouterSpec(num_experts=16, top_k=4, renormalize=False)


@pytest.mark.parametrize(
    "path",
    ["readable", "fused-torch-routing", "fused-triton"],
)
def test_counted_once_padding_never(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every path counts each real token's k assignments once; padding rows (valid_T 0)
    nowhere. The fused path routes larger batches by torch, decode-sized ones by Triton."""
    triton = path != "readable"
    if triton:
        pytest.importorskip("triton")
    if path == "fused-torch-routing":  # the batch overflows the routing program's tile
        from moeserve.kernels import moe_routing

        monkeypatch.setattr(moe_routing, "MAX_TILE", 64)
    e, t = 16, 11
    cfg = _moe_config(e)
    moe = MoE(cfg, torch.float32, torch.device("cpu"), backend=ModelBackend(triton=triton))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    assert not triton or triton_routable(moe.spec, t) == (path == "fused-triton")
    h = torch.randn(t, 32, generator=g)
    valid = (torch.rand(t, generator=g) > 0.25).long()
    out = moe(h, valid)
    _, chosen = moe.select_experts(h[valid.bool()])
    assert torch.equal(moe.tokens_per_expert_E, torch.bincount(chosen.flatten(), minlength=e))
    assert (out[~valid.bool()] == 0).all()  # padding rows: no expert output
