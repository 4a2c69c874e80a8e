"""The MLA attention layer (model/mla.py) against transformers' DeepseekV2Attention and
DeepseekV3Attention with random weights, through our paged latent cache, in float32: prefill in
chunks over a scrambled block table, then decode steps batched beside another sequence's
prefill chunk, by the readable path and by the Triton kernel (interpreted on CPU)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from moeserve.config import ModelConfig
from moeserve.engine.runner import allocate_kv_cache, kv_bytes_per_block
from moeserve.model import backend as backend_module
from moeserve.model.backend import ModelBackend
from moeserve.model.families import TRANSFORMS, _common
from moeserve.model.families_mla import mla_fields, plan_mla_attention
from moeserve.model.metadata import AttentionMetadata
from moeserve.model.mla import LatentAttention, MLAttention, mla_softmax_scale
from moeserve.model.rotary import Rotary

TOL = 1e-5
BLOCK = 4
YARN = dict(
    rope_type="yarn",
    rope_theta=10000.0,
    factor=4.0,
    original_max_position_embeddings=32,
    beta_fast=32,
    beta_slow=1,
    mscale=0.707,
    mscale_all_dim=0.707,
)
YARN_V3 = {**YARN, "mscale": 1.0, "mscale_all_dim": 0.8}
BASE = dict(
    hidden_size=40,
    num_attention_heads=5,
    num_key_value_heads=5,
    kv_lora_rank=24,
    qk_nope_head_dim=12,
    qk_rope_head_dim=8,
    v_head_dim=10,
    max_position_embeddings=128,
    vocab_size=64,
)

CASES: dict[str, dict[str, Any]] = {
    "v2-plain-q": dict(version=2, q_lora_rank=None),
    "v2-lora-q-yarn": dict(version=2, q_lora_rank=16, rope_parameters=YARN),
    "v3-lora-q-yarn": dict(version=3, q_lora_rank=16, rope_parameters=YARN_V3),
    "v3-no-interleave-bias": dict(
        version=3, q_lora_rank=None, rope_interleave=False, attention_bias=True
    ),
    "v3-lora-q-bias": dict(version=3, q_lora_rank=16, attention_bias=True),
}


def _reference(case: dict[str, Any]) -> tuple[Any, Any, ModelConfig]:
    import transformers.models.deepseek_v2.modeling_deepseek_v2 as v2
    import transformers.models.deepseek_v3.modeling_deepseek_v3 as v3

    kw = dict(case)
    mod = v2 if kw.pop("version") == 2 else v3
    prefix = "DeepseekV2" if mod is v2 else "DeepseekV3"
    cfg = getattr(mod, f"{prefix}Config")(**BASE, **kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    attn = getattr(mod, f"{prefix}Attention")(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for p in attn.parameters():
            if p.ndim == 1:  # norms at 1 and biases at 0 would hide mistakes
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3)
    rotary = getattr(mod, f"{prefix}RotaryEmbedding")(cfg)
    raw = {**cfg.to_dict(), "model_type": cfg.model_type}
    ours = ModelConfig(**{**_common(raw, 1e4), **mla_fields(raw, always_interleaved=mod is v2)})
    return attn, rotary, ours


def _ours(cfg: ModelConfig, ref: Any, decode_kernel: bool, fused: bool = False) -> MLAttention:
    backend = ModelBackend(triton=True) if fused else None
    layer = MLAttention(
        cfg, 0, torch.float32, torch.device("cpu"), backend, LatentAttention(decode_kernel)
    )
    # The loader's plan for this layer (with its row transforms: interleaved rope folded).
    plan: dict[str, tuple] = {}
    plan_mla_attention(plan, cfg, "l", "d")
    ours = dict(layer.named_parameters())
    theirs = dict(ref.named_parameters())
    assert {plan[f"l.self_attn.{n}"][0].removeprefix("d.attn.") for n in theirs} == set(ours)
    with torch.no_grad():
        for n, p in theirs.items():
            dst, index, *transform = plan[f"l.self_attn.{n}"]
            for t in transform:
                p = TRANSFORMS[t](p)
            target = ours[dst.removeprefix("d.attn.")]
            (target[index] if index else target).copy_(p)
    return layer


def _reference_out(attn: Any, rotary: Any, x_LD: torch.Tensor) -> torch.Tensor:
    n = x_LD.shape[0]
    pos = torch.arange(n)[None]
    mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        emb = rotary(x_LD[None], pos)
        return attn(x_LD[None], position_embeddings=emb, attention_mask=mask)[0][0]


def _meta(steps: list[tuple[int, int, list[int]]]) -> AttentionMetadata:
    """steps: per sequence (start, new tokens, block table), decodes first."""
    slots, tables = [], []
    for start, n, blocks in steps:
        slots += [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, start + n)]
        tables.append(blocks)
    width = max(len(t) for t in tables)
    return AttentionMetadata(
        query_lens=[n for _, n, _ in steps],
        context_lens=[s + n for s, n, _ in steps],
        num_decodes=sum(1 for _, n, _ in steps if n == 1),
        block_tables_BM=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        context_lens_B=torch.tensor([s + n for s, n, _ in steps]),
        slot_mapping_T=torch.tensor(slots),
    )


@pytest.mark.parametrize(
    ("decode_kernel", "fused", "partials"),
    [(False, False, False), (True, False, False), (True, True, False), (True, True, True)],
    ids=["torch", "triton-interpreted", "triton-fused-norm-rope", "triton-split-k-partials"],
)
@pytest.mark.parametrize("case", sorted(CASES))
def test_mla_layer_matches_transformers(
    case: str, decode_kernel: bool, fused: bool, partials: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunked prefills, decodes beside them and decode-only steps. `partials`: the layer
    returns split-K partials of its output (as the decoder layer asks on the Triton path),
    and decode-only steps of a plain q take the projection's partials straight into the
    kernel that writes the queries and cache rows (mla_rows.decode_inputs)."""
    if decode_kernel:
        pytest.importorskip("triton")
    if fused:  # every batch takes the norm and rotary kernels (on CUDA: graph-captured ones)
        monkeypatch.setattr(backend_module, "FUSED_ELEMENTWISE_MIN_TOKENS", 1)
    ref, ref_rotary, cfg = _reference(CASES[case])
    layer = _ours(cfg, ref, decode_kernel, fused)
    inputs_calls = []
    if partials:
        from moeserve.kernels import mla_rows

        kernel = mla_rows.decode_inputs
        monkeypatch.setattr(
            mla_rows, "decode_inputs", lambda *a: inputs_calls.append(1) or kernel(*a)
        )
    rotary = Rotary(cfg, torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(3)
    a_len, b_len, decodes = 13, 9, 6
    x_a = torch.randn(a_len + decodes, cfg.hidden_size, generator=gen)
    x_b = torch.randn(b_len, cfg.hidden_size, generator=gen)
    want_a, want_b = _reference_out(ref, ref_rotary, x_a), _reference_out(ref, ref_rotary, x_b)

    (cache,) = kv = allocate_kv_cache(cfg, 32, BLOCK, torch.float32, torch.device("cpu"))[0]
    # Stale rows nobody wrote this time must never count (the readable decode reads whole
    # blocks and masks them; NaN would leak through its zero weights, so finite garbage).
    cache.copy_(1e3 * torch.randn(cache.shape, generator=torch.Generator().manual_seed(5)))
    blocks_a, blocks_b = [9, 2, 17, 5, 30, 11], [4, 21, 0]
    got_a = []

    def step(rows: list[tuple[torch.Tensor, int, int, list[int]]]) -> list[torch.Tensor]:
        meta = _meta([(s, n, blocks) for _, s, n, blocks in rows])
        x = torch.cat([x_[s : s + n] for x_, s, n, _ in rows])
        pos = torch.cat([torch.arange(s, s + n) for _, s, n, _ in rows])
        with torch.no_grad():
            out = layer(x, rotary.cos_sin(pos, torch.float32), kv, meta, partials_out=partials)
        if out.dim() == 3:  # partials (a layer with an output bias returns its output)
            out = out.sum(0).to(x.dtype)
        return list(out.split([n for _, _, n, _ in rows]))

    for start in range(0, a_len, 5):  # prefill of A in chunks
        got_a += step([(x_a, start, min(5, a_len - start), blocks_a)])
    got_b = []
    for i in range(decodes):  # A decodes beside B's prefill chunks
        b_start = 3 * i
        rows = [(x_a, a_len + i, 1, blocks_a)]
        if b_start < b_len:
            rows.append((x_b, b_start, min(3, b_len - b_start), blocks_b))
        out = step(rows)
        got_a.append(out[0])
        got_b += out[1:]
    assert (torch.cat(got_a) - want_a).abs().max().item() <= TOL
    assert (torch.cat(got_b) - want_b).abs().max().item() <= TOL
    # The three decode-only steps of a plain q without biases took the partials kernel.
    plain = CASES[case]["q_lora_rank"] is None and not CASES[case].get("attention_bias")
    assert len(inputs_calls) == (3 if partials and plain else 0)


def test_softmax_scale_follows_yarn_mscale_all_dim() -> None:
    *_, cfg = _reference(CASES["v3-lora-q-yarn"])
    mscale = 0.1 * 0.8 * math.log(4.0) + 1.0
    assert mla_softmax_scale(cfg) == pytest.approx((12 + 8) ** -0.5 * mscale**2)
    *_, plain = _reference(CASES["v2-plain-q"])
    assert mla_softmax_scale(plain) == pytest.approx(20**-0.5)


def test_latent_cache_layout_and_bytes() -> None:
    """DeepSeek-V2-Lite's shape: (512 + 64) values a layer and token, 27 layers, bf16."""
    *_, cfg = _reference(CASES["v2-plain-q"])
    lite = ModelConfig(**{**cfg.__dict__, "kv_lora_rank": 512, "head_dim": 64, "num_layers": 27})
    assert lite.kv_cache_shape == (1, 1, 576)
    assert kv_bytes_per_block(lite, 1, torch.bfloat16) == 576 * 27 * 2  # 31 KB, not 276 KB
    assert kv_bytes_per_block(lite, 16, torch.bfloat16) == 16 * 576 * 27 * 2
    caches = allocate_kv_cache(cfg, 7, BLOCK, torch.float32, torch.device("cpu"))
    assert len(caches) == cfg.num_layers
    assert all(len(c) == 1 and c[0].shape == (7, BLOCK, 1, 24 + 8) for c in caches)
