"""gpt-oss's additions to the Triton kernels against the readable paths (interpreter on CPU):
sinks in the paged decode kernel (with windows and the split-K merge), biased clamped-SwiGLU
experts in the fused MoE (split and unsplit, through an expert-slot map), a bias in the
split-K few-row linear; and the readable sinks against the reference's eager formula.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from moeserve.config import ModelConfig  # noqa: E402
from moeserve.kernels.fused_moe import fused_moe  # noqa: E402
from moeserve.kernels.linear import linear_partials  # noqa: E402
from moeserve.kernels.paged_attention import PARTITION_SIZE as P  # noqa: E402
from moeserve.kernels.paged_attention import paged_decode_attention  # noqa: E402
from moeserve.model.attention import LayerMask, PagedAttention  # noqa: E402
from moeserve.model.layers import explicit_attention, with_sinks  # noqa: E402
from moeserve.model.moe import MoE  # noqa: E402
from tests.test_kernel_paged_attention import _make_case  # noqa: E402


def _sinks(heads: int, seed: int) -> torch.Tensor:
    # Around the scores' size, so the sink takes a visible share of each softmax.
    return torch.randn(heads, generator=torch.Generator().manual_seed(seed)) * 2.0


def _eager_reference(case: dict, scale: float, window: int | None, sinks: torch.Tensor):
    """transformers' eager_attention_forward for gpt-oss, one decode query per sequence."""
    q, k, v = case["q"], case["k_clean"], case["v_clean"]
    meta, s = case["meta"], k.shape[1]
    outs = []
    for b, ctx in enumerate(meta.context_lens):
        blocks = meta.block_tables_BM[b, : (ctx + s - 1) // s]
        keys = k[blocks].flatten(0, 1)[:ctx].transpose(0, 1)  # [G, C, X]
        vals = v[blocks].flatten(0, 1)[:ctx].transpose(0, 1)
        rep = q.shape[1] // keys.shape[0]
        keys, vals = keys.repeat_interleave(rep, 0), vals.repeat_interleave(rep, 0)
        w = (q[b][:, None, :] @ keys.transpose(1, 2)) * scale  # [H, 1, C]
        if window is not None:
            pos = torch.arange(ctx)
            w = w.masked_fill(~(pos > ctx - 1 - window), float("-inf"))
        logits = torch.cat([w, sinks[:, None, None]], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        probs = torch.softmax(logits, dim=-1)[..., :-1]
        outs.append((probs @ vals)[:, 0])
    return torch.stack(outs)


# (batch, heads, kv heads, head dim, block size, context lengths, window)
CASES = [
    pytest.param(1, 4, 2, 16, 8, [1], None, id="ctx1"),
    pytest.param(3, 4, 2, 16, 8, [5, 9, 17], 4, id="window4"),
    pytest.param(2, 8, 2, 16, 16, [P + 21, 40], None, id="merge"),
    pytest.param(2, 4, 1, 16, 16, [2 * P + 7, 3], P // 2, id="merge-window"),
]


@pytest.mark.parametrize("batch,heads,groups,head_dim,block,ctxs,window", CASES)
def test_decode_kernel_sinks(batch, heads, groups, head_dim, block, ctxs, window):
    gen = torch.Generator().manual_seed(sum(ctxs))
    case = _make_case(batch, heads, groups, head_dim, block, ctxs, gen=gen)
    sinks, scale = _sinks(heads, batch), head_dim**-0.5
    want = _eager_reference(case, scale, window, sinks)
    readable = PagedAttention().attend(
        case["q"],
        (case["k_clean"], case["v_clean"]),
        case["meta"],
        LayerMask(scale, window, sinks_H=sinks),
    )
    torch.testing.assert_close(readable, want, atol=1e-5, rtol=1e-5)
    out = torch.full_like(case["q"], float("nan"))
    paged_decode_attention(
        case["q"],
        case["k"],
        case["v"],
        case["table"],
        case["ctx"],
        scale,
        window,
        out,
        sinks_H=sinks,
    )
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    no_sinks = PagedAttention().attend(
        case["q"], (case["k_clean"], case["v_clean"]), case["meta"], LayerMask(scale, window)
    )
    assert (no_sinks - want).abs().max() > 1e-3  # the sinks matter in these cases


def test_lse_rescaling_equals_the_explicit_softmax():
    """The varlen flash path's sinks: out * sigmoid(lse - sink) is the sink softmax, exactly."""
    g = torch.Generator().manual_seed(0)
    h, n, c, x = 4, 5, 9, 16
    q, k, v = (torch.randn(1, h, m, x, generator=g) for m in (n, c, c))
    sinks = _sinks(h, 1)
    mask = torch.ones(n, c, dtype=torch.bool).tril(c - n)
    scores = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf"))
    plain = torch.softmax(scores, dim=-1) @ v  # what flash returns, and its lse
    lse_HQ = torch.logsumexp(scores, dim=-1)[0]
    got = with_sinks(plain[0].transpose(0, 1), lse_HQ, sinks)
    want = explicit_attention(q, k, v, mask[None], 0.3, sinks)[0].transpose(0, 1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def _gpt_oss_moe(E: int, D: int, F_: int, K: int, seed: int) -> MoE:
    cfg = ModelConfig(
        model_type="gpt_oss",
        vocab_size=32,
        hidden_size=D,
        num_layers=1,
        num_heads=1,
        num_kv_heads=1,
        head_dim=D,
        rms_norm_eps=1e-5,
        max_position_embeddings=64,
        rope_theta=1e4,
        num_experts=E,
        top_k=K,
        moe_intermediate_size=F_,
        router_logit_bias=True,
        expert_bias=True,
        expert_activation="clamped_swiglu",
        swiglu_limit=1.0,  # clamps a good share of these O(1) activations
    )
    moe = MoE(cfg, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    moe.w_gate_up.copy_(torch.randn(E, 2 * F_, D, generator=g) / D**0.5)
    moe.w_down.copy_(torch.randn(E, D, F_, generator=g) / F_**0.5)
    assert moe.b_gate_up is not None and moe.b_down is not None
    moe.b_gate_up.copy_(torch.randn(E, 2 * F_, generator=g))
    moe.b_down.copy_(torch.randn(E, D, generator=g))
    return moe


def _routing(T: int, E: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    probs_TE = torch.softmax(torch.randn(T, E, generator=g), dim=-1)
    return torch.topk(probs_TE, K, dim=-1)


@pytest.mark.parametrize(
    ("T", "split_k", "gemv"),
    [(1, 1, False), (6, 1, False), (1, 3, False), (5, 2, False), (1, None, True), (3, None, True)],
)
def test_fused_biased_clamped_experts(T: int, split_k: int | None, gemv: bool) -> None:
    E, D, F_, K = 5, 40, 48, 2
    moe = _gpt_oss_moe(E, D, F_, K, seed=T)
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(T + 1))
    weights_TK, experts_TK = _routing(T, E, K, seed=T + 2)
    want = moe.experts(x_TD, weights_TK, experts_TK)
    kw = dict(b_gate_up_EF=moe.b_gate_up, b_down_ED=moe.b_down, split_k=split_k, gemv=gemv)
    act = ("clamped_swiglu", moe.activation.alpha, moe.activation.limit)
    got = fused_moe(x_TD, moe.w_gate_up, moe.w_down, weights_TK, experts_TK, activation=act, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The biases and the activation both change the answer (the test can fail).
    plain = fused_moe(x_TD, moe.w_gate_up, moe.w_down, weights_TK, experts_TK, **kw)
    assert (plain - want).abs().max() > 1e-2

    # Through a slot map with padding rows: the biases follow their expert to its slot.
    slot_E = torch.tensor([3, 6, 0, 5, 1])
    w = [torch.full((7, *t.shape[1:]), float("nan")) for t in (moe.w_gate_up, moe.w_down)]
    b = [torch.full((7, *t.shape[1:]), float("nan")) for t in (moe.b_gate_up, moe.b_down)]
    for dst, src in zip(w + b, (moe.w_gate_up, moe.w_down, moe.b_gate_up, moe.b_down)):
        dst[slot_E] = src
    experts_TK[0, 1] = E  # one assignment routes nowhere
    want = moe.experts(x_TD, weights_TK.masked_fill(experts_TK >= E, 0), experts_TK % E)
    got = fused_moe(
        x_TD,
        *w,
        weights_TK,
        experts_TK,
        expert_slot_E=slot_E,
        b_gate_up_EF=b[0],
        b_down_ED=b[1],
        activation=act,
        split_k=split_k,
        gemv=gemv,
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_linear_partials_with_bias() -> None:
    g = torch.Generator().manual_seed(3)
    x, w, bias = torch.randn(3, 64, generator=g), torch.randn(40, 64, generator=g), torch.randn(40)
    parts = linear_partials(x, w, bias)
    torch.testing.assert_close(parts.sum(0), torch.nn.functional.linear(x, w, bias))


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 5])
def test_gpu_varlen_prefill_window_and_sinks(window: int | None) -> None:
    """FlashAttention's varlen call with the window and the log-sum-exp sinks against the
    explicit softmax, over two chunks of different contexts in a scrambled paged cache."""
    from moeserve.model.layers import varlen_prefill
    from moeserve.model.metadata import PrefillPack

    g = torch.Generator(device="cuda").manual_seed(0)
    h, grp, x, bs, n_blocks = 8, 2, 64, 16, 12
    kw = dict(device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(n_blocks, bs, grp, x, **kw) for _ in range(2))
    sinks = torch.randn(h, device="cuda", generator=g).to(torch.bfloat16)
    perm = torch.randperm(n_blocks, device="cuda", generator=g)
    chunks = [(7, 40, perm[:3]), (20, 20, perm[3:5])]  # (queries, context, blocks)
    q = torch.randn(sum(c[0] for c in chunks), h, x, **kw)
    slots = torch.cat(
        [(b[:, None] * bs + torch.arange(bs, device="cuda")).flatten()[:c] for _, c, b in chunks]
    )
    cu = lambda xs: torch.tensor([0, *xs], device="cuda").cumsum(0).to(torch.int32)  # noqa: E731
    pack = PrefillPack(slots, cu([c[0] for c in chunks]), cu([c[1] for c in chunks]), 20, 40)
    got = varlen_prefill(q, k, v, pack, x**-0.5, window, sinks)
    start = 0
    for n, ctx, blocks in chunks:
        keys = k[blocks].flatten(0, 1)[:ctx].transpose(0, 1).repeat_interleave(h // grp, 0)
        vals = v[blocks].flatten(0, 1)[:ctx].transpose(0, 1).repeat_interleave(h // grp, 0)
        q_pos, k_pos = torch.arange(ctx - n, ctx, device="cuda"), torch.arange(ctx, device="cuda")
        mask = k_pos[None, :] <= q_pos[:, None]
        if window is not None:
            mask &= k_pos[None, :] > q_pos[:, None] - window
        qs = q[start : start + n].transpose(0, 1)[None]
        want = explicit_attention(qs, keys[None], vals[None], mask[None], x**-0.5, sinks)[0]
        torch.testing.assert_close(
            got[start : start + n], want.transpose(0, 1), atol=2e-2, rtol=2e-2
        )
        start += n


@pytest.mark.gpu
def test_gpu_decode_kernel_sinks_bf16() -> None:
    gen = torch.Generator(device="cuda").manual_seed(1)
    case = _make_case(3, 64, 8, 64, 16, [2 * P + 9, 130, 5], torch.bfloat16, "cuda", gen=gen)
    sinks = torch.randn(64, device="cuda", generator=gen).to(torch.bfloat16)
    for window in (None, 128):
        out = paged_decode_attention(
            case["q"],
            case["k"],
            case["v"],
            case["table"],
            case["ctx"],
            0.125,
            window,
            None,
            sinks_H=sinks,
        )
        want = PagedAttention().attend(
            case["q"],
            (case["k_clean"], case["v_clean"]),
            case["meta"],
            LayerMask(0.125, window, sinks_H=sinks),
        )
        torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)
