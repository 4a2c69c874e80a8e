"""`moeserve bench throughput` on the packaged demo model: the run's figures add up, greedy
tokens agree with the transformers peer, and flags that cannot work end with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeserve.bench.floors import model_work
from moeserve.cli import main
from moeserve.config import ModelConfig

SMALL = ["--device", "cpu", "--max-num-seqs", "4", "--num-prompts", "4", "--input-len", "8"]


def test_throughput_on_the_demo_model_against_transformers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run.json"
    argv = ["bench", "throughput", *SMALL, "--output-len", "4", "--peer", "--result-json", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    rec = json.loads(out.read_text())
    ms = rec["moeserve"]
    assert ms["output_tokens"] == 4 * 4  # EOS ignored: every request its --output-len
    assert ms["steps"] == sum(n for n, _ in ms["step_kinds"].values()) >= 4
    assert ms["tokens_per_s"] == pytest.approx(ms["output_tokens"] / ms["seconds"])
    [(name, peer)] = rec["peers"].items()
    assert name == "transformers, batches of 4" and peer["output_tokens"] == 16
    assert peer["identical_first_tokens"] == 4  # float32, the same weights: the same tokens
    assert rec["dtype"] == "float32" and "floor" not in rec
    assert "moeserve" in table and "vs peer" in table and f"result: {out}" in table


def test_throughput_on_a_synthetic_shape_with_dummy_weights(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["bench", "throughput", *SMALL, "--output-len", "uniform:2:6", "--synthetic", "tiny"]
    assert main(argv) == 0
    assert "tiny (float32)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--floor"], "--floor prices the run at a GPU's measured rates: it needs CUDA"),
        (["--output-len", "300"], "more than the context of 256"),
        (["--synthetic", "tiny", "--model", "x"], "give --model or --synthetic, not both"),
    ],
)
def test_throughput_refuses_what_cannot_run(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "throughput", *SMALL, *extra]) == 2
    assert message in capsys.readouterr().err


def test_floor_work_of_a_mixtral_layer() -> None:
    """The bytes and FLOPs a step is priced at, by hand for one Mixtral-shaped layer."""
    cfg = ModelConfig(
        model_type="mixtral",
        vocab_size=1000,
        hidden_size=64,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        max_position_embeddings=128,
        rope_theta=1e4,
        num_experts=8,
        top_k=2,
        moe_intermediate_size=32,
        sparse_layers=(True,),
        layer_windows=(None,),
    )
    work = model_work(cfg, element_size=2)
    attention = 2 * 64 * 64 + 2 * 64 * 32  # q and o, k and v
    assert work.expert == 3 * 64 * 32
    assert work.dense == attention + 8 * 64 + 1000 * 64  # + router + lm_head
    assert work.experts_touched(1) == pytest.approx(2)
    assert work.experts_touched(1000) == pytest.approx(8)
    assert work.step_bytes(1) == 2 * (work.dense + 2 * work.expert)
    assert work.step_bytes(1, context_tokens=10) == work.step_bytes(1) + 2 * 10 * 2 * 32
    active = attention + 8 * 64 + 2 * work.expert
    assert work.step_flops(5, sampled=1) == 2 * (5 * active + 1000 * 64)


def test_synthetic_tokenizer_gives_every_id_text() -> None:
    """A random model samples from all its rows: each must decode to text, or streams would
    hold back their chunks (and HTTP benchmarks report TTFT and ITL many times too high)."""
    from moeserve.bench.synthetic import synthetic_model
    from moeserve.tokenizer import Tokenizer

    path = synthetic_model("tiny", tokenizer=True)
    tok = Tokenizer.from_dir(path)
    assert tok.vocab_size == 1024
    padded = range(45, 1024)  # past the demo's own 45 ids
    assert all(tok.decode([i], skip_special_tokens=True) for i in padded)
    from moeserve.assets import demo_model_path

    assert tok.encode("47+85") == Tokenizer.from_dir(demo_model_path()).encode("47+85")
