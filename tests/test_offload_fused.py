"""Offloaded experts through the fused Triton kernels (model/experts.SlotExperts) against the
eager path (torch, one expert at a time) and against resident experts.

On the CPU the kernels run under Triton's interpreter (tests/conftest.py), float32 and tiny
shapes: that checks the slot map, the sentinel rows and which rows each call writes. The
gpu-marked tests compare offloaded and resident decode on the device.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from moeserve import LLM, SamplingParams  # noqa: E402
from moeserve.config import ModelConfig, OffloadConfig  # noqa: E402
from moeserve.engine.expert_store import CostModel, ExpertStore  # noqa: E402
from moeserve.kernels.quant import quantize_fp8_rows, quantize_mxfp4  # noqa: E402
from moeserve.model.backend import ModelBackend  # noqa: E402
from moeserve.model.dispatch import Dispatch  # noqa: E402
from moeserve.model.experts import SlotExperts  # noqa: E402
from moeserve.model.moe import MoE  # noqa: E402
from tests.checkpoints import make_checkpoint  # noqa: E402

E = 8
# (D, F) per format: fp8's groups of 128 end part-way (160, 96); mxfp4 needs multiples of 32.
SHAPES = {"": (48, 40), "fp8": (160, 96), "mxfp4": (64, 96)}
CASES = {
    "float32": dict(kind=""),
    "float32-gpt-oss": dict(kind="", bias=True, act="clamped_swiglu"),
    "fp8": dict(kind="fp8"),
    "mxfp4-gpt-oss": dict(kind="mxfp4", bias=True, act="clamped_swiglu"),
    "llama4-scaled-input": dict(kind="", top_k=1, scales_input=True),
}
# Misses alternate between the CPU and the copy engine (deterministic, unlike a measured model).
ALTERNATE = CostModel(expert_bytes=1, copy_bytes_per_s=1.0, cpu_fixed_s=0.5, cpu_per_token_s=0.0)


def _moe(
    seed: int,
    kind: str = "",
    bias: bool = False,
    act: str = "silu",
    top_k: int = 2,
    scales_input: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    offloaded: bool = True,
) -> MoE:
    d, f = SHAPES[kind]
    cfg = ModelConfig(
        model_type="mixtral",
        vocab_size=32,
        hidden_size=d,
        num_layers=1,
        num_heads=1,
        num_kv_heads=1,
        head_dim=d,
        rms_norm_eps=1e-5,
        max_position_embeddings=64,
        rope_theta=1e4,
        num_experts=E,
        top_k=top_k,
        moe_intermediate_size=f,
        router_scales_input=scales_input,
        expert_bias=bias,
        expert_activation=act,
        expert_quant=kind,
    )
    # Offloaded: experts in host memory (pinned for a GPU), everything else on the device.
    home = torch.device("cpu") if offloaded else None
    backend = ModelBackend(triton=device == "cuda")
    moe = MoE(cfg, dtype, torch.device(device), expert_device=home, backend=backend)
    g = torch.Generator().manual_seed(seed)
    moe.router.copy_(torch.randn(E, d, generator=g))
    for w, s, (n, k) in (
        (moe.w_gate_up, moe.w_gate_up_scale, (2 * f, d)),
        (moe.w_down, moe.w_down_scale, (d, f)),
    ):
        real = torch.randn(E, n, k, generator=g) / k**0.5
        if kind:
            q, sc = quantize_fp8_rows(real) if kind == "fp8" else quantize_mxfp4(real)
            w.copy_(q)
            s.copy_(sc)
        else:
            w.copy_(real)
    if bias:
        moe.b_gate_up.copy_(torch.randn(E, 2 * f, generator=g) * 0.3)
        moe.b_down.copy_(torch.randn(E, d, generator=g) * 0.3)
    return moe


def _store(moes: list[MoE], mode: str, slots: int, fused: bool, device: str) -> ExpertStore:
    model = SimpleNamespace(device=torch.device(device), moe_layers=lambda: list(enumerate(moes)))
    store = ExpertStore(model, OffloadConfig(mode=mode, prefetch=True), slots, fused=fused)
    if mode == "auto":
        store.cost = ALTERNATE
    return store


def _dispatch(moe: MoE, x_TD: torch.Tensor) -> Dispatch:
    d = moe.route_and_dispatch(x_TD, None)
    d.y_RD.fill_(float("nan"))  # a row no call writes shows
    return d


def _fresh(d: Dispatch) -> Dispatch:
    return Dispatch(d.x_TD, d.weights_R, d.token_R, d.counts_E, d.x_RD, torch.full_like(d.y_RD, 7))


def _traffic(store: ExpertStore) -> list[tuple[int, ...]]:
    return [
        (s.hits, s.misses, s.evictions, s.bytes_copied, s.cpu_experts, s.prefetches_issued)
        for s in store.stats()
    ]


@pytest.mark.parametrize("mode", ["fetch", "cpu", "auto"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_interpreted_fused_slots_fill_rows_as_eager(case: str, mode: str) -> None:
    """Two layers with prefetch, 5 slots of 8 experts: batches of 1 to 6 tokens hit, miss and
    evict; every row of the fused store equals the eager store's and the resident experts'."""
    moes = [_moe(seed, **CASES[case]) for seed in (1, 2)]
    fused, eager = (_store(moes, mode, 5, f, "cpu") for f in (True, False))
    assert all(layer.fused is not None for layer in fused.layers)
    assert all(layer.fused is None for layer in eager.layers)
    g = torch.Generator().manual_seed(3)
    for t in (2, 6, 1, 4, 3):
        x_TD = torch.randn(t, moes[0].w_down.shape[1], generator=g)
        for moe, lf, le in zip(moes, fused.layers, eager.layers):
            d = _dispatch(moe, x_TD)
            want, ref = _fresh(d), _fresh(d)
            lf.run(d)
            le.run(want)
            moe.resident.run(ref)
            torch.testing.assert_close(d.y_RD, want.y_RD, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(d.y_RD, ref.y_RD, atol=2e-5, rtol=1e-5)
    assert _traffic(fused) == _traffic(eager)
    stats = fused.stats()
    assert sum(s.hits for s in stats) > 0 and sum(s.misses for s in stats) > 0
    if mode != "cpu":
        assert sum(s.evictions for s in stats) > 0
    if mode != "fetch":
        assert sum(s.cpu_experts for s in stats) > 0


def test_interpreted_slot_call_keeps_other_rows() -> None:
    """A call for some experts writes exactly their rows, through the slot map it is given."""
    moe = _moe(4, kind="fp8")
    slots = [t[[5, 2, 7]].clone() for t in moe.expert_tensors()]  # experts 5, 2, 7 in slots 0-2
    run = SlotExperts(slots, "fp8", moe.activation)
    x_TD = torch.randn(6, moe.w_down.shape[1], generator=torch.Generator().manual_seed(5))
    d = _dispatch(moe, x_TD)
    ref = _fresh(d)
    moe.resident.run(ref)
    counts = d.counts_E.tolist()
    ends = torch.tensor(counts).cumsum(0).tolist()
    chosen = [e for e in (2, 5, 7) if counts[e]]
    assert chosen
    run.run(d, counts, {e: [5, 2, 7].index(e) for e in chosen})
    mine = torch.zeros(d.y_RD.shape[0], dtype=torch.bool)
    for e in chosen:
        mine[ends[e] - counts[e] : ends[e]] = True
    torch.testing.assert_close(d.y_RD[mine], ref.y_RD[mine], atol=2e-5, rtol=1e-5)
    assert d.y_RD[~mine].isnan().all()


PROMPTS = [[5, 9, 40, 7], [6, 9, 43], [7, 9, 46, 7, 11]]
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(
        tmp_path_factory.mktemp("ck") / "mixtral",
        "mixtral",
        tokenizer=True,
        num_local_experts=8,
        num_hidden_layers=2,
    )


def _outputs(outs) -> list[tuple[list[int], list[float]]]:
    return [(o.outputs[0].token_ids, [lp.logprob for lp in o.outputs[0].logprobs]) for o in outs]


def _assert_same(got: list, want: list, tol: float) -> None:
    for (tok_g, lp_g), (tok_w, lp_w) in zip(got, want, strict=True):
        assert tok_g == tok_w
        assert max(abs(a - b) for a, b in zip(lp_g, lp_w, strict=True)) <= tol


@pytest.mark.parametrize("mode", ["fetch", "auto"])
def test_interpreted_offloaded_generation_matches_resident(
    ckpt: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    kw = dict(progress=False, device="cpu", max_num_batched_tokens=8, max_num_seqs=3)
    want = _outputs(LLM(ckpt, kernels="torch", **kw).generate(PROMPTS, GREEDY))
    calls = []
    real = SlotExperts.run

    def counted(self: SlotExperts, d: Dispatch, counts: list[int], slot_of: dict) -> None:
        calls.append(len(slot_of))
        real(self, d, counts, slot_of)

    monkeypatch.setattr(SlotExperts, "run", counted)
    llm = LLM(
        ckpt,
        kernels="triton",
        expert_cache_slots=2,
        offload_mode=mode,
        prefetch=True,
        expert_cache_kernels="fused",
        **kw,
    )
    assert llm.engine.executor.expert_store.fused
    _assert_same(_outputs(llm.generate(PROMPTS, GREEDY)), want, 1e-4)
    assert calls and max(calls) > 1  # several experts in one launch sequence
    stats = llm.engine.expert_cache_stats()
    assert all(s.misses > 0 and s.evictions > 0 for s in stats)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["", "fp8", "mxfp4"])
def test_gpu_offloaded_fused_layer_matches_resident(kind: str) -> None:
    """bf16 on the device: an MoE layer with its experts behind the fused store (3 slots of
    8) against the same layer with every expert resident (the fused path's own routing and
    sum over k): a bf16 tolerance, as the offloaded rows round before their weighted sum."""
    bias, act = (True, "clamped_swiglu") if kind == "mxfp4" else (False, "silu")
    tol = 6e-2 if kind else 3e-2
    # FP8 at 64 tokens: the resident layer's grouped GEMMs take fp8 activations (32-row
    # blocks) where the offloaded calls' smaller blocks keep them bf16; this comparison
    # failed there on the H200 (2026-12-04), so FP8 compares at sizes where both are
    # weight-only (the CPU tests check the FP8 slots against the eager store exactly).
    sizes = (1, 4, 1, 2) if kind == "fp8" else (1, 4, 1, 64, 2)
    kw = dict(kind=kind, bias=bias, act=act, dtype=torch.bfloat16, device="cuda")
    moes = [_moe(s, **kw) for s in (1, 2)]
    resident = [_moe(s, offloaded=False, **kw) for s in (1, 2)]
    for mode in ("fetch", "auto"):
        store = _store(moes, mode, 3, True, "cuda")
        g = torch.Generator().manual_seed(3)
        for t in sizes:
            x_TD = torch.randn(t, moes[0].w_down.shape[1], generator=g).to("cuda", torch.bfloat16)
            for layer, moe, ref in zip(store.layers, moes, resident):
                got = moe(x_TD, experts=layer)
                torch.testing.assert_close(got, ref(x_TD), atol=tol, rtol=tol)
        torch.cuda.synchronize()
        stats = store.stats()
        assert sum(s.misses for s in stats) > 0 and sum(s.evictions for s in stats) > 0


@pytest.mark.gpu
def test_gpu_offloaded_fused_decode_matches_resident(ckpt: Path) -> None:
    """Offloaded decode (fused kernels over 2 slots of 8, prefetch on) against every expert
    resident (fused kernels over the resident weights): float32, same tokens and log-probs."""
    kw = dict(progress=False, device="cuda", kv_cache_memory=2**28)
    prompts = PROMPTS * 3
    want = _outputs(LLM(ckpt, **kw).generate(prompts, GREEDY))
    for mode in ("fetch", "auto"):
        llm = LLM(
            ckpt,
            expert_cache_slots=2,
            offload_mode=mode,
            prefetch=True,
            expert_cache_kernels="fused",
            **kw,
        )
        assert llm.engine.executor.kernels == "triton" and llm.engine.executor.expert_store.fused
        _assert_same(_outputs(llm.generate(prompts, GREEDY)), want, 1e-3)
        assert all(s.misses > 0 for s in llm.engine.expert_cache_stats())


def test_cache_kernels_follow_the_engine_kernels(ckpt: Path) -> None:
    """auto (the default) takes the fused kernels where the engine runs the Triton kernels and
    the eager path with torch's; eager is kept when asked for; a bad value is named, and so is
    fused without the Triton kernels (refused, not ignored)."""
    from moeserve.config import ConfigError, OffloadConfig

    assert OffloadConfig().kernels == "auto"
    kw = dict(device="cpu", expert_cache_slots=2, progress=False)
    fused = {
        (kernels, choice): LLM(
            ckpt, kernels=kernels, expert_cache_kernels=choice, **kw
        ).engine.executor.expert_store.fused
        for kernels, choice in (("triton", "auto"), ("torch", "auto"), ("triton", "eager"))
    }
    assert fused == {("triton", "auto"): True, ("torch", "auto"): False, ("triton", "eager"): False}
    with pytest.raises(ConfigError, match="expert_cache_kernels must be auto, eager or fused"):
        OffloadConfig(kernels="triton")
    with pytest.raises(ConfigError, match="--expert-cache-kernels fused runs the Triton"):
        LLM(ckpt, kernels="torch", expert_cache_kernels="fused", **kw)
