"""Llama 4 beyond tests/test_fidelity.py's cases: the config parser, a multimodal `llama4`
checkpoint's text model, the MoE layer against transformers' own, chunked attention in the
Triton decode kernel, the Triton path, and identical greedy outputs under batching, chunked
prefill and every offload mode."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from moeserve import LLM, SamplingParams
from moeserve.config import ConfigError, ModelConfig
from moeserve.model.families import parse_config
from moeserve.model.moe import MoE
from tests import test_fidelity as fidelity
from tests.checkpoints import FAMILIES, SMALL, make_checkpoint

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=2)
# Longer than the checkpoints' attention chunk (4), of mixed lengths.
PROMPTS = [[(5 * i + 3 * j) % 100 + 3 for j in range(3 + (5 * i) % 11)] for i in range(8)]


def _raw(**overrides: Any) -> dict[str, Any]:
    import transformers as tf

    cfg = tf.Llama4TextConfig(**{**SMALL, **FAMILIES["llama4_text"], **overrides})
    return cfg.to_dict()


def test_config_parses_every_llama4_rule() -> None:
    cfg = parse_config(_raw())
    assert cfg.sparse_layers == (False, True, False, True)
    assert cfg.dense_intermediate_size == 40 and cfg.moe_intermediate_size == 48
    assert cfg.shared_expert_intermediate_size == 48 and not cfg.shared_expert_gate
    assert cfg.scoring_func == "sigmoid" and cfg.router_scales_input and not cfg.norm_topk_prob
    assert cfg.nope_layers == (False, True, False, True)
    assert cfg.layer_chunks == (4, None, 4, None)
    assert cfg.qk_norm == "l2" and cfg.attn_temperature == (3.0, 0.5)
    assert cfg.rope_params["rope_type"] == "llama3"
    # Hub-style: no layer_types, no moe_layers; the defaults transformers derives.
    raw = _raw(interleave_moe_layer_step=1, no_rope_layers=None, attn_temperature_tuning=False)
    for key in ("layer_types", "moe_layers", "no_rope_layers"):
        raw.pop(key)
    cfg = parse_config(raw)
    assert all(cfg.sparse_layers) and cfg.dense_intermediate_size == 0
    assert cfg.nope_layers == (False, False, False, True)  # every 4th layer (interval 4)
    assert cfg.layer_chunks == (4, 4, 4, None) and cfg.attn_temperature is None
    # Scout's hub config.json spells the tuning flag as a number.
    assert parse_config({**raw, "attn_temperature_tuning": 4}).attn_temperature == (3.0, 0.5)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(attention_bias=True), "attention_bias"),
        (dict(layer_types=["full_attention"] * 3), "layer_types"),
        (dict(layer_types=["sliding_attention"] * 4), "layer_types"),
        (dict(attention_chunk_size=None), "attention_chunk_size"),
        (dict(moe_layers=[1, 7]), "moe_layers"),
        (dict(no_rope_layers=[1, 0]), "no_rope_layers"),
        (dict(floor_scale=0), "floor_scale"),
    ],
)
def test_config_errors_name_the_field(overrides: dict[str, Any], field: str) -> None:
    raw = _raw()
    raw.update(overrides)
    if field == "attention_chunk_size":  # layer_types still say chunked
        raw["layer_types"] = ["chunked_attention", "full_attention"] * 2
    with pytest.raises(ConfigError, match=field):
        parse_config(raw)


def test_multimodal_checkpoint_runs_its_text_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Llama4ForConditionalGeneration checkpoint (vision tower and projector ignored, with
    one log line) gives exactly what its text model saved alone gives, and transformers'."""
    import transformers as tf

    text = {**SMALL, **FAMILIES["llama4_text"]}
    vision = tf.Llama4VisionConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=28,
        patch_size=14,
        vision_output_dim=16,
        projector_input_dim=16,
        projector_output_dim=16,
    )
    torch.manual_seed(0)
    model = tf.Llama4ForConditionalGeneration(
        tf.Llama4Config(vision_config=vision.to_dict(), text_config=text)
    )
    with torch.no_grad():
        for p in model.language_model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "mm")
    model.language_model.save_pretrained(tmp_path / "text")
    prompt = torch.randint(2, 120, (13,), generator=torch.Generator().manual_seed(1)).tolist()
    with caplog.at_level(logging.INFO, logger="moeserve.model.loader"):
        mm = fidelity.ours(tmp_path / "mm", prompt, chunk=5)
    assert "vision_model." in caplog.text and "multi_modal_projector." in caplog.text
    alone = fidelity.ours(tmp_path / "text", prompt, chunk=5)
    assert all(torch.equal(a, b) for a, b in zip(mm, alone))
    ref_prompt, ref_decode, ref_tokens = fidelity.reference(tmp_path / "text", prompt)
    assert (mm[0] - ref_prompt).abs().max().item() <= fidelity.TOL
    assert mm[2].tolist() == ref_tokens[: fidelity.DECODE_STEPS].tolist()
    assert (mm[1] - ref_decode).abs().max().item() <= fidelity.TOL


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("path", ["readable", "fused"])
def test_moe_layer_matches_transformers(top_k: int, path: str) -> None:
    """Sigmoid weights on the experts' input, the ungated shared expert: our MoE layer (the
    dispatch path, or the Triton GEMMs under the interpreter) against Llama4TextMoe."""
    import transformers as tf
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    if path == "fused":
        pytest.importorskip("triton")
    raw = _raw(num_experts_per_tok=top_k)
    torch.manual_seed(0)
    ref = Llama4TextMoe(tf.Llama4TextConfig(**{**SMALL, **FAMILIES["llama4_text"]}))
    ref.top_k = ref.router.top_k = top_k
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.3)
    cfg: ModelConfig = parse_config(raw)
    from moeserve.model.backend import ModelBackend

    ours = MoE(cfg, torch.float32, torch.device("cpu"), backend=ModelBackend(path == "fused"))
    with torch.no_grad():
        ours.router.copy_(ref.router.weight)
        ours.w_gate_up.copy_(ref.experts.gate_up_proj.transpose(1, 2))
        ours.w_down.copy_(ref.experts.down_proj.transpose(1, 2))
        sh = ref.shared_expert
        assert ours.shared is not None and ours.shared_gate is None
        ours.shared.w_gate_up.copy_(torch.cat([sh.gate_proj.weight, sh.up_proj.weight]))
        ours.shared.w_down.copy_(sh.down_proj.weight)
        x = torch.randn(9, cfg.hidden_size)
        want = ref(x)[0]
        got = ours(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert int(ours.tokens_per_expert_E.sum()) == 9 * top_k


def test_decode_kernel_honours_attention_chunks() -> None:
    """The Triton paged decode kernel (interpreted) and the readable path against attention
    computed directly, with chunks inside one partition, across partitions, of 1, and past
    every context, with and without a window beside them."""
    pytest.importorskip("triton")
    from moeserve.kernels.paged_attention import PARTITION_SIZE as P
    from moeserve.kernels.paged_attention import paged_decode_attention
    from moeserve.model.attention import LayerMask, PagedAttention
    from tests.test_kernel_paged_attention import _make_case

    ctxs = [2 * P + 37, P + 1, 40, 5, 1]
    gen = torch.Generator().manual_seed(3)
    case = _make_case(len(ctxs), 4, 2, 16, 8, ctxs, gen=gen)
    scale = 16**-0.5
    for chunk, window in [(4, None), (P + 20, None), (1, None), (10 * P, None), (30, 9)]:
        out = torch.full_like(case["q"], float("nan"))
        paged_decode_attention(
            case["q"],
            case["k"],
            case["v"],
            case["table"],
            case["ctx"],
            scale,
            window,
            out_BHX=out,
            chunk=chunk,
        )
        readable = PagedAttention().attend(
            case["q"],
            (case["k_clean"], case["v_clean"]),
            case["meta"],
            LayerMask(scale, window, chunk),
        )
        direct = _direct_decode(case, scale, window, chunk)
        torch.testing.assert_close(out, direct, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(readable, direct, atol=1e-5, rtol=1e-5)


def _direct_decode(case: dict, scale: float, window: int | None, chunk: int) -> torch.Tensor:
    """Each sequence's keys in position order, sliced to what its last position sees."""
    k_cache, v_cache, table = case["k_clean"], case["v_clean"], case["meta"].block_tables_BM
    s = k_cache.shape[1]
    out = []
    for b, ctx in enumerate(case["meta"].context_lens):
        pos = torch.arange(ctx)
        k = k_cache[table[b, pos // s], pos % s]  # [ctx, G, X]
        v = v_cache[table[b, pos // s], pos % s]
        lo = (ctx - 1) // chunk * chunk
        if window is not None:
            lo = max(lo, ctx - window)
        q = case["q"][b]  # [H, X]
        rep = q.shape[0] // k.shape[1]
        k, v = k[lo:].repeat_interleave(rep, 1), v[lo:].repeat_interleave(rep, 1)
        p = torch.softmax(torch.einsum("hx,chx->hc", q, k) * scale, dim=-1)
        out.append(torch.einsum("hc,chx->hx", p, v))
    return torch.stack(out)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(
        tmp_path_factory.mktemp("llama4") / "llama4", "llama4_text", tokenizer=True
    )


def _outputs(llm: LLM, prompts: list[list[int]] = PROMPTS) -> list[tuple[list[int], list[float]]]:
    return [
        (o.outputs[0].token_ids, [lp.logprob for lp in o.outputs[0].logprobs])
        for o in llm.generate(prompts, GREEDY)
    ]


@pytest.fixture(scope="module")
def reference(ckpt: Path) -> list[tuple[list[int], list[float]]]:
    """Each prompt alone (one sequence at a time), prefilled whole."""
    return _outputs(LLM(ckpt, progress=False, max_num_seqs=1))


def _close(got: list, want: list, tol: float = 1e-5) -> None:
    for (tok_g, lp_g), (tok_w, lp_w) in zip(got, want, strict=True):
        assert tok_g == tok_w
        assert max(abs(a - b) for a, b in zip(lp_g, lp_w, strict=True)) <= tol


def test_batched_and_chunked_prefill_match_one_at_a_time(ckpt: Path, reference) -> None:
    _close(_outputs(LLM(ckpt, progress=False, max_num_seqs=8)), reference)
    chunked = LLM(ckpt, progress=False, max_num_seqs=3, max_num_batched_tokens=5)
    _close(_outputs(chunked), reference)


@pytest.mark.parametrize(("mode", "slots"), [("fetch", 1), ("cpu", 2), ("auto", 3)])
def test_offloaded_experts_match_resident(ckpt: Path, reference, mode: str, slots: int) -> None:
    resident = _outputs(LLM(ckpt, progress=False))
    _close(resident, reference)
    llm = LLM(ckpt, progress=False, expert_cache_slots=slots, offload_mode=mode, prefetch=True)
    assert _outputs(llm) == resident
    stats = llm.engine.expert_cache_stats()
    assert len(stats) == 2 and all(s.misses > 0 for s in stats)  # two MoE layers of four


@pytest.mark.parametrize("captured", [False, True])
def test_triton_path_matches_readable(
    ckpt: Path, reference, captured: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interpreted kernels: the fused MoE GEMMs with scaled inputs, the chunked decode kernel;
    `captured` forces what a captured decode step runs (the norm and rotary kernels, split-K
    partials) at every step."""
    pytest.importorskip("triton")
    import moeserve.model.backend as backend

    if captured:
        monkeypatch.setattr(backend, "FUSED_ELEMENTWISE_MIN_TOKENS", 1)
    llm = LLM(ckpt, progress=False, kernels="triton", max_num_seqs=2, max_num_batched_tokens=8)
    # The interpreter is slow: two prompts (8 and 12 tokens, chunked), 5 tokens each.
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=2)
    got = [
        (o.outputs[0].token_ids, [lp.logprob for lp in o.outputs[0].logprobs])
        for o in llm.generate([PROMPTS[1], PROMPTS[4]], params)
    ]
    want = [(toks[:5], lps[:5]) for toks, lps in (reference[1], reference[4])]
    _close(got, want, 1e-4)
