"""gpt-oss end to end on CPU: its config and weight layout, its expert activation against
transformers', and identical greedy output (and log-probs) under batching, chunked prefill,
preemption, the Triton kernels (interpreter) and every expert-offload mode. Fidelity against
transformers is tests/test_fidelity.py's "gpt_oss" case; the kernels' additions are
tests/test_gpt_oss_kernels.py's.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from moeserve import LLM, SamplingParams
from moeserve.model.activation import ExpertActivation
from moeserve.model.families import TRANSFORMS, parse_config, weight_plan
from moeserve.model.loader import inspect_checkpoint
from tests.checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "gpt_oss", "gpt_oss", tokenizer=True)


def test_config_and_plan(ckpt: Path) -> None:
    cfg = inspect_checkpoint(ckpt).config
    assert cfg.layer_windows == (4, None, 4)
    assert cfg.attention_sinks and cfg.o_bias and cfg.qkv_bias and cfg.expert_bias
    assert cfg.router_logit_bias and cfg.norm_topk_prob
    raw = json.loads((ckpt / "config.json").read_text())
    # 0.1 (tests/checkpoints.py) where transformers reads it, its fixed 7.0 where not
    assert raw["swiglu_limit"] in (0.1, 7.0)
    assert (cfg.expert_activation, cfg.swiglu_alpha, cfg.swiglu_limit) == (
        "clamped_swiglu",
        1.702,
        raw["swiglu_limit"],
    )
    assert cfg.rope_params["rope_type"] == "yarn" and cfg.rope_params["truncate"] is False
    plan = weight_plan(cfg)
    assert plan["model.layers.1.mlp.experts.gate_up_proj"][2] == "deinterleave_transpose"
    assert plan["model.layers.1.self_attn.sinks"] == ("layers.1.attn.sinks", ())

    # The hub's spelling: rope_scaling beside a top-level rope_theta, no layer_types.
    raw = json.loads((ckpt / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = rope
    del raw["layer_types"]
    hub = parse_config(raw)
    assert hub.layer_windows == (4, None, 4)  # sliding first, alternating
    assert hub.rope_theta == 150000.0 and hub.rope_params == cfg.rope_params


def test_moe_inputs_bounded_after_load(ckpt: Path) -> None:
    """Each MoE layer learns a bound on its input (the MXFP4 GEMVs' float16 products need
    one): max|post-norm weight| * sqrt(D) with 2% to spare, which the norm's output of the
    most lopsided row (all of its mass on one element) reaches within 2%."""
    from moeserve.model.layers import rms_norm
    from moeserve.model.loader import load_model
    from moeserve.model.moe import MoE

    _, model = load_model(ckpt, dtype="bfloat16")
    d = model.cfg.hidden_size
    moe_layers = [layer for layer in model.layers if isinstance(layer.mlp, MoE)]
    assert moe_layers
    for layer in moe_layers:
        norm = layer.post_norm.detach()
        bound = layer.mlp.input_bound
        assert bound == pytest.approx(float(norm.abs().max()) * d**0.5 * 1.02)
        k = int(norm.abs().argmax())
        spike = torch.zeros(3, d, dtype=torch.bfloat16)
        spike[0, k] = 3e4
        spike[1, k] = -1e-3
        spike[2] = torch.randn(d) * 100
        out = rms_norm(spike, norm, model.cfg.rms_norm_eps).abs().max(dim=-1).values
        assert (out <= bound).all() and out[0] >= bound / 1.02 / 1.02, (out, bound)


def test_mxfp4_config_plans_blocks_and_scales(ckpt: Path, tmp_path: Path) -> None:
    """An MXFP4 config.json: experts stored as E2M1 blocks and E8M0 scales (loading them
    against transformers: tests/test_quant_checkpoints.py)."""
    (tmp_path / "m").mkdir()
    raw = json.loads((ckpt / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "mxfp4"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    cfg = inspect_checkpoint(tmp_path / "m", need_weights=False).config
    assert cfg.expert_quant == "mxfp4"
    plan = weight_plan(cfg)
    experts = "model.layers.0.mlp.experts"
    assert plan[f"{experts}.gate_up_proj_blocks"][1:] == ((), "mxfp4_rows")
    assert plan[f"{experts}.down_proj_scales"][0] == "layers.0.mlp.w_down_scale"
    assert f"{experts}.gate_up_proj" not in plan


def test_layout_transforms_and_activation_match_transformers() -> None:
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    e, d, f = 3, 8, 5
    ref = GptOssExperts(GptOssConfig(num_local_experts=e, hidden_size=d, intermediate_size=f))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 3)  # past the clamp limit of 7
    x = torch.randn(4, d, generator=g) * 3
    want = ref._apply_gate(x @ ref.gate_up_proj[1] + ref.gate_up_proj_bias[1])
    w_FD = TRANSFORMS["deinterleave_transpose"](ref.gate_up_proj.data)[1]  # [2F, D]
    b_F = TRANSFORMS["deinterleave"](ref.gate_up_proj_bias.data)[1]
    act = ExpertActivation("clamped_swiglu", ref.alpha, ref.limit)
    torch.testing.assert_close(act(x @ w_FD.T + b_F), want)
    meta = TRANSFORMS["deinterleave_transpose"](torch.empty(e, d, 2 * f, device="meta"))
    assert meta.shape == (e, 2 * f, d)


def _requests(n: int = 8, seed: int = 0) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(4, 120) for _ in range(rng.randrange(3, 20))] for _ in range(n)]
    params = [
        SamplingParams(
            max_tokens=rng.randrange(8, 16), temperature=0.0, ignore_eos=True, logprobs=1
        )
        for _ in range(n)
    ]
    return prompts, params


def _outputs(outs) -> list[tuple[list[int], list[float]]]:
    return [(o.outputs[0].token_ids, [lp.logprob for lp in o.outputs[0].logprobs]) for o in outs]


@pytest.fixture(scope="module")
def alone(ckpt: Path) -> list[tuple[list[int], list[float]]]:
    prompts, params = _requests()
    llm = LLM(ckpt, progress=False, block_size=4)
    return [_outputs(llm.generate([p], [sp]))[0] for p, sp in zip(prompts, params)]


def _same(got, want) -> None:
    assert [t for t, _ in got] == [t for t, _ in want]
    diff = max(abs(a - b) for (_, la), (_, lb) in zip(got, want) for a, b in zip(la, lb))
    assert diff <= 1e-4


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(dict(max_num_seqs=16), id="batched"),
        pytest.param(dict(max_num_batched_tokens=5, max_num_seqs=4), id="chunked"),
        # 20 blocks of 4 tokens: far less than 8 sequences of up to 35 tokens need at once.
        pytest.param(dict(max_model_len=40, num_blocks=20), id="preempted"),
        pytest.param(dict(expert_cache_slots=2, offload_mode="fetch"), id="offload-fetch"),
        pytest.param(dict(expert_cache_slots=1, offload_mode="cpu"), id="offload-cpu"),
        pytest.param(dict(expert_cache_slots=3, offload_mode="auto", prefetch=True), id="auto"),
    ],
)
def test_identical_greedy_output(ckpt: Path, alone, options: dict) -> None:
    prompts, params = _requests()
    options = dict(options)
    num_blocks = options.pop("num_blocks", None)
    if num_blocks is not None:
        from moeserve.engine.runner import kv_bytes_per_block

        probe = LLM(ckpt, progress=False, block_size=4)
        ex = probe.engine.executor
        per_block = kv_bytes_per_block(ex.model_config, 4, ex.model.dtype, ex.kv_groups)
        options["kv_cache_memory"] = num_blocks * per_block
    llm = LLM(ckpt, progress=False, block_size=4, **options)
    _same(_outputs(llm.generate(prompts, params)), alone)
    stats = llm.engine.scheduler.stats()
    if num_blocks is not None:
        assert stats.num_preemptions_total > 0
    assert stats.kv_blocks_used == 0


def test_engine_matches_transformers(ckpt: Path) -> None:
    """The engine (sliding layers in their own KV group, their blocks released as the window
    moves on) generates what transformers does, two prompts at once, prefill chunked by 5."""
    from tests.checkpoints import load_reference

    llm = LLM(ckpt, progress=False, block_size=4, max_num_batched_tokens=5, max_num_seqs=2)
    ex = llm.engine.executor
    assert ex.kv_groups.window == 4 and ex.kv_groups.num_tensors == 2
    k0, k1 = ex.runner.kv_caches[0][0], ex.runner.kv_caches[1][0]
    assert k0.data_ptr() == k1.data_ptr()  # the first sliding and first full layer share
    prompts = [list(range(20, 33)), [5, 9, 77, 3, 61, 40, 8, 15, 90, 2, 33]]
    sp = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=1)
    got = _outputs(llm.generate(prompts, sp))
    ref = load_reference(ckpt)
    for prompt, (tokens, logprobs) in zip(prompts, got):
        with torch.no_grad():
            gen = ref.generate(
                torch.tensor([prompt]),
                max_new_tokens=16,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
        assert gen.sequences[0, len(prompt) :].tolist() == tokens
        ref_lp = torch.log_softmax(torch.stack([x[0].float() for x in gen.logits]), -1)
        want = ref_lp[torch.arange(16), torch.tensor(tokens)]
        assert (torch.tensor(logprobs) - want).abs().max() <= 1e-4


def test_triton_kernels_match(ckpt: Path) -> None:
    """The fused MoE (bias + clamped SwiGLU), the decode kernel (sinks + window), the split-K
    projections with biases and the routing program, under the interpreter (slow: one short
    request, its prompt past the window, two prefill chunks)."""
    pytest.importorskip("triton")
    prompt = [[7, 19, 3, 88, 41, 5, 60, 12, 9]]
    sp = [SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=1)]
    want = _outputs(LLM(ckpt, progress=False, block_size=4).generate(prompt, sp))
    llm = LLM(
        ckpt,
        progress=False,
        block_size=4,
        kernels="triton",
        max_num_batched_tokens=5,
        max_num_seqs=4,
    )
    assert llm.engine.executor.model.backend.triton
    _same(_outputs(llm.generate(prompt, sp)), want)


@pytest.mark.gpu
def test_gpu_decode_graphs_match_eager(ckpt: Path) -> None:
    """Captured decode steps (sliding layers' own block tables as static graph inputs, the
    decode kernel's sinks and window) against eager steps on the same device."""
    prompts, params = _requests()
    kw = dict(progress=False, block_size=4, device="cuda", kernels="triton", max_num_seqs=8)
    kw |= dict(kv_cache_memory=64 << 20)  # two engines at once: neither takes the whole GPU
    graphs = LLM(ckpt, **kw)
    assert graphs.engine.executor.graphs and graphs.engine.executor.kv_groups.window == 4
    eager = LLM(ckpt, enforce_eager=True, **kw)
    _same(_outputs(graphs.generate(prompts, params)), _outputs(eager.generate(prompts, params)))
