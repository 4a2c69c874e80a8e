"""Sampler and SamplingParams: semantics against hand computations and statistics (CPU)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

from moeserve.engine.sampler import Sampler, apply_penalties
from moeserve.sampling_params import SamplingParams, StructuredOutput


@dataclass
class Row:
    params: SamplingParams
    prompt_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)


def random_logits(B: int, V: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


def draw(sampler: Sampler, logits_V: torch.Tensor, params: SamplingParams, n: int) -> list[int]:
    """n independent draws for one distribution, as one batch of n identical rows."""
    out = sampler.sample(logits_V.expand(n, -1), [Row(params) for _ in range(n)])
    return out.token_ids


def test_greedy_is_argmax_and_top_k_1_is_greedy() -> None:
    logits = random_logits(8, 50)
    expected = logits.argmax(-1).tolist()
    sampler = Sampler(50, seed=0)
    assert sampler.sample(logits, [Row(SamplingParams(temperature=0))] * 8).token_ids == expected
    top1 = [Row(SamplingParams(temperature=1.3, top_k=1)) for _ in range(8)]
    assert sampler.sample(logits, top1).token_ids == expected


def test_greedy_in_a_mixed_batch_and_other_dtypes() -> None:
    logits = random_logits(4, 40).to(torch.bfloat16)
    rows = [Row(SamplingParams(temperature=0 if i % 2 else 1.0, logprobs=1)) for i in range(4)]
    out = Sampler(40, seed=1).sample(logits, rows)
    expected = logits.float().argmax(-1).tolist()
    assert [out.token_ids[i] for i in (1, 3)] == [expected[1], expected[3]]
    assert logits.dtype == torch.bfloat16  # input untouched


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    V = 64
    target = random_logits(1, V, seed=3)[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    alone = Sampler(V).sample(target[None], [Row(seeded, output_ids=[5, 6])]).token_ids[0]
    for position in range(4):
        logits = random_logits(4, V, seed=10 + position)
        logits[position] = target
        rows = [Row(SamplingParams(temperature=0.7, seed=None)) for _ in range(4)]
        rows[position] = Row(seeded, prompt_ids=[1, 2], output_ids=[7, 8])
        out = Sampler(V).sample(logits, rows)
        assert out.token_ids[position] == alone


def test_different_seeds_and_steps_differ() -> None:
    V = 100
    logits = torch.zeros(V)  # uniform: any two streams of draws should differ quickly
    sampler = Sampler(V)

    def stream(seed: int) -> list[int]:
        rows = [Row(SamplingParams(seed=seed), output_ids=[0] * step) for step in range(30)]
        return sampler.sample(logits.expand(30, -1), rows).token_ids

    assert stream(1) == stream(1)
    assert stream(1) != stream(2)
    assert len(set(stream(1))) > 10  # the step changes the draw too


def test_filters_never_emit_a_filtered_token() -> None:
    probs = torch.tensor([0.30, 0.25, 0.20, 0.12, 0.08, 0.05])
    logits = probs.log()
    sampler = Sampler(6, seed=0)
    cases = [
        (SamplingParams(top_k=3), {0, 1, 2}),
        (SamplingParams(top_p=0.5), {0, 1}),  # 0.30 < 0.5, then 0.55 >= 0.5 stops
        (SamplingParams(top_p=0.76), {0, 1, 2, 3}),
        (SamplingParams(min_p=0.5), {0, 1, 2}),  # p >= 0.15
        # top_p acts on the renormalised top 4: mass above token 3 is 0.75/0.87 = 0.86 > 0.8.
        (SamplingParams(top_k=4, top_p=0.8), {0, 1, 2}),
        (SamplingParams(top_k=5, min_p=0.3, temperature=0.5), {0, 1, 2}),
    ]
    for params, allowed in cases:
        seen = set(draw(sampler, logits, params, 3000))
        assert seen == allowed, params
    # Seeded rows: one draw per output position, through the per-row generators.
    seeded = [Row(SamplingParams(top_k=2, seed=9), output_ids=[0] * i) for i in range(300)]
    assert set(sampler.sample(logits.expand(300, -1), seeded).token_ids) == {0, 1}


def test_frequencies_match_softmax() -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    n = 40000
    tokens = torch.tensor(draw(Sampler(6, seed=42), logits, SamplingParams(), n))
    counts = torch.bincount(tokens, minlength=6).double()
    expected = torch.softmax(logits.double(), -1) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 30.0  # 5 degrees of freedom: p < 1e-5 of a false alarm


def test_temperature_sharpens() -> None:
    logits = torch.tensor([1.0, 0.0])
    tokens = draw(Sampler(2, seed=5), logits, SamplingParams(temperature=0.25), 20000)
    p0 = 1 - sum(tokens) / len(tokens)
    assert abs(p0 - 1 / (1 + math.exp(-4))) < 0.01


def test_penalties_match_hand_computation() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    params = SamplingParams(
        temperature=0,
        repetition_penalty=2.0,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        logprobs=0,
    )
    row = Row(params, prompt_ids=[0, 1], output_ids=[3, 3, 4])
    expected = logits[0].tolist()
    for tok in {0, 1, 3, 4}:  # repetition: prompt + output
        expected[tok] = expected[tok] / 2 if expected[tok] > 0 else expected[tok] * 2
    expected[3] -= 0.25 * 2 + 0.5  # output counts: 3 twice, 4 once
    expected[4] -= 0.25 * 1 + 0.5
    assert expected == [1.0, -2.0, 0.5, 0.5, -4.75, 1.0]
    assert apply_penalties(logits, [row])[0].tolist() == expected
    before = logits.clone()
    out = Sampler(6).sample(logits, [row])
    assert torch.equal(logits, before)  # the caller's logits are not edited
    assert out.token_ids == [max(range(6), key=lambda i: (expected[i], -i))]  # 0 (first max)
    # Logprobs stay those of the raw logits.
    assert out.logprobs[0] == pytest.approx(torch.log_softmax(logits[0], -1)[0].item())


def test_penalties_change_the_greedy_choice() -> None:
    logits = torch.tensor([[5.0, 4.0, 0.0]])
    assert Sampler(3).sample(logits, [Row(SamplingParams(temperature=0))]).token_ids == [0]
    penalised = Row(SamplingParams(temperature=0, frequency_penalty=2.0), output_ids=[0])
    assert Sampler(3).sample(logits, [penalised]).token_ids == [1]


def test_logit_bias_moves_greedy_and_random_rows_only_where_asked() -> None:
    """+100 forces a token and -100 bans one, in greedy and random rows, after the grammar (a
    masked token stays masked) and before the penalties; logprobs stay the raw ones; a row
    without a bias in the same batch is untouched."""
    from moeserve.engine.sampler import GrammarMask, apply_logit_bias

    V = 8
    logits = random_logits(4, V, seed=11)
    top = logits.argmax(-1).tolist()
    forced = (top[0] + 1) % V
    rows = [
        Row(SamplingParams(temperature=0, logit_bias={forced: 100})),
        Row(SamplingParams(temperature=0, logit_bias={top[1]: -100, V + 3: 5.0})),
        Row(SamplingParams(temperature=0)),
        Row(SamplingParams(temperature=1.0, logit_bias={2: 100.0}, logprobs=1)),
    ]
    sampler = Sampler(V, seed=0)
    for _ in range(20):
        out = sampler.sample(logits, rows)
        assert out.token_ids[0] == forced
        assert out.token_ids[1] == logits[1].topk(2).indices[1].item()  # the runner-up
        assert out.token_ids[2] == top[2]
        assert out.token_ids[3] == 2
    assert out.logprobs[3] == pytest.approx(torch.log_softmax(logits[3], -1)[2].item())
    # Greedy rows alone (the argmax fast path) see their bias too.
    assert sampler.sample(logits[:3], rows[:3]).token_ids[:2] == out.token_ids[:2]
    # A bias is added to the logit (not set), and sums with a second row's own bias.
    params = [SamplingParams(logit_bias={1: 2.5}), SamplingParams(logit_bias={1: -1.0, 4: 3.0})]
    want = logits[:2].clone()
    want[0, 1] += 2.5
    want[1, 1] -= 1.0
    want[1, 4] += 3.0
    assert torch.equal(apply_logit_bias(logits[:2], params), want)
    # The grammar runs first: its -inf stays, however large the bias.
    bits = torch.tensor([[0b1111_1011]], dtype=torch.int32)  # token 2 not allowed
    masked = Row(SamplingParams(temperature=0, logit_bias={2: 100.0}))
    out = sampler.sample(logits[3:4], [masked], grammar=GrammarMask([0], bits))
    assert out.token_ids[0] != 2
    # Penalties after the bias: a forced token that repeats is still forced.
    penal = Row(SamplingParams(temperature=0, logit_bias={5: 100.0}, presence_penalty=2.0), [], [5])
    assert sampler.sample(logits[:1], [penal]).token_ids == [5]


def test_allowed_token_ids_limit_what_a_row_may_pick() -> None:
    """Only the allowed tokens survive, in greedy (alone: not the argmax fast path) and
    random rows; the other rows of the batch keep every token; logprobs stay raw."""
    V = 10
    logits = random_logits(3, V, seed=4)
    best = logits.argmax(-1).tolist()
    allowed = sorted({(best[0] + 3) % V, (best[0] + 5) % V})
    rows = [
        Row(SamplingParams(temperature=0, allowed_token_ids=allowed)),
        Row(SamplingParams(temperature=0)),
        Row(SamplingParams(temperature=1.5, allowed_token_ids=[7, 2], logprobs=0)),
    ]
    sampler = Sampler(V, seed=0)
    greedy = max(allowed, key=lambda t: logits[0, t].item())
    assert sampler.sample(logits[:2], rows[:2]).token_ids == [greedy, best[1]]
    seen = set()
    for _ in range(200):
        out = sampler.sample(logits, rows)
        assert out.token_ids[:2] == [greedy, best[1]]
        seen.add(out.token_ids[2])
    assert seen == {2, 7}
    raw = torch.log_softmax(logits[2], -1)[out.token_ids[2]].item()
    assert out.logprobs[2] == pytest.approx(raw)


def test_rows_short_of_min_tokens_cannot_end() -> None:
    """Until a row has min_tokens outputs its stop tokens and EOS are at -inf, a +100 bias
    included (ignore_eos: EOS ends nothing, so stays allowed); from then on they may win.
    Greedy rows alone take this path too (not the argmax fast path)."""
    V, eos, stop = 6, 5, 4
    logits = torch.zeros(1, V)
    params = SamplingParams(
        temperature=0, min_tokens=3, stop_token_ids=[stop], logit_bias={eos: 100.0, stop: 50.0}
    )
    sampler = Sampler(V)
    ends = frozenset({eos})
    for produced, want in ((0, 0), (2, 0), (3, eos)):
        row = Row(params, output_ids=[1] * produced)
        assert sampler.sample(logits, [row], eos_token_ids=ends).token_ids == [want]
    no_eos = Row(SamplingParams(temperature=0, min_tokens=3, ignore_eos=True, logit_bias={eos: 9}))
    assert sampler.sample(logits, [no_eos], eos_token_ids=ends).token_ids == [eos]
    for temperature in (0.0, 1.0):  # a random row, and a logprobs batch
        short = SamplingParams(temperature=temperature, min_tokens=2, logit_bias={eos: 100.0})
        rows = [Row(short), Row(SamplingParams(temperature=0, logprobs=1))]
        out = sampler.sample(logits.expand(2, -1), rows, eos_token_ids=ends)
        assert out.token_ids[0] != eos


def test_bad_words_ban_the_token_that_would_complete_one() -> None:
    """A one-token bad word is never picked; a longer one's last token only where the output
    ends with the rest of it (a +100 bias included); other rows are untouched. Greedy rows
    alone take this path too."""
    V = 8
    logits = torch.zeros(1, V)
    words = [[3], [1, 2, 5], [6, 7]]
    params = SamplingParams(temperature=0, logit_bias={3: 100.0, 5: 90.0, 7: 80.0})
    params = SamplingParams(**{**params.__dict__, "bad_words_token_ids": words})
    assert params.changes_logits
    sampler = Sampler(V)
    for output, want in (([], 5), ([1], 5), ([1, 2], 7), ([0, 6], 5), ([1, 2, 6], 5)):
        row = Row(params, output_ids=output)
        got = sampler.sample(logits, [row]).token_ids[0]
        assert got != 3 and got == want, (output, got)
    row = Row(params, output_ids=[9, 1, 2])
    other = Row(SamplingParams(temperature=0, logit_bias={3: 100.0}))
    assert sampler.sample(logits.expand(2, -1), [row, other]).token_ids == [7, 3]


def test_logprobs_are_raw_log_softmax_sorted() -> None:
    logits = random_logits(3, 30, seed=7)
    rows = [
        Row(SamplingParams(temperature=0.5, logprobs=5, repetition_penalty=1.5), [1], [2]),
        Row(SamplingParams(temperature=0)),
        Row(SamplingParams(temperature=0, logprobs=0)),
    ]
    out = Sampler(30, seed=0).sample(logits, rows)
    ref = torch.log_softmax(logits.float(), -1)
    assert out.logprobs[1] is None and out.top_logprobs[1] is None
    assert out.top_logprobs[2] == []
    assert out.logprobs[2] == pytest.approx(ref[2].max().item())
    assert out.logprobs[0] == pytest.approx(ref[0, out.token_ids[0]].item())
    top = out.top_logprobs[0]
    assert top is not None and len(top) == 5
    assert [t for t, _ in top] == ref[0].topk(5).indices.tolist()
    assert [v for _, v in top] == pytest.approx(ref[0].topk(5).values.tolist())
    assert all(a[1] >= b[1] for a, b in zip(top, top[1:], strict=False))


def test_padding_columns_are_never_sampled() -> None:
    vocab, padded = 10, 16
    logits = torch.full((4, padded), -5.0)
    logits[:, vocab:] = 50.0  # the padding looks best: must still never be chosen
    rows = [
        Row(SamplingParams(temperature=0)),
        Row(SamplingParams(temperature=1.0)),
        Row(SamplingParams(temperature=2.0, seed=3)),
        Row(SamplingParams(temperature=0, logprobs=20)),
    ]
    sampler = Sampler(vocab, seed=0)
    for _ in range(50):
        out = sampler.sample(logits, rows)
        assert all(t < vocab for t in out.token_ids)
    assert all(t < vocab for t, _ in out.top_logprobs[3] or [])
    assert len(out.top_logprobs[3] or []) == vocab  # asked 20, only 10 real tokens


def test_empty_batch_and_shape_check() -> None:
    assert Sampler(5).sample(torch.zeros(0, 5), []).token_ids == []
    with pytest.raises(ValueError, match="rows"):
        Sampler(5).sample(torch.zeros(2, 5), [Row(SamplingParams())])


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({"n": 0}, "n"),
        ({"n": 129}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.1}, "min_p"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"stop": ["x" * 257]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"logprobs": 21}, "logprobs"),
        ({"seed": 1.5}, "seed"),
        ({"temperature": float("nan")}, "temperature"),
        ({"logit_bias": {5: 100.5}}, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"logit_bias": {True: 1.0}}, "logit_bias"),
        ({"logit_bias": {5: float("inf")}}, "logit_bias"),
        ({"logit_bias": {i: 1.0 for i in range(1025)}}, "logit_bias"),
        ({"logit_bias": [5]}, "logit_bias"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [-1]}, "allowed_token_ids"),
        ({"allowed_token_ids": list(range(16385))}, "allowed_token_ids"),
        ({"allowed_token_ids": (1, 2)}, "allowed_token_ids"),
        (
            {"allowed_token_ids": [1], "structured": StructuredOutput("regex", "a")},
            "allowed_token_ids",
        ),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 17}, "min_tokens"),  # more than max_tokens (16)
        ({"min_tokens": 2, "structured": StructuredOutput("regex", "a+")}, "min_tokens"),
        ({"bad_words": "x"}, "bad_words"),
        ({"bad_words": [" "]}, "bad_words"),
        ({"bad_words": [3]}, "bad_words"),
        ({"bad_words": ["w"] * 257}, "bad_words"),
        ({"bad_words": ["w" * 257]}, "bad_words"),
    ],
)
def test_sampling_params_validation_names_the_field(kwargs: dict, field_name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field_name}\b"):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_and_conveniences() -> None:
    params = SamplingParams(stop="###", temperature=1e-6, top_k=-1)
    assert params.stop == ["###"] and params.greedy and not params.has_penalties
    assert not SamplingParams().greedy
    assert SamplingParams(top_k=0).top_k_enabled is False


@pytest.mark.gpu
def test_cuda_bf16_seeded_rows_and_padding() -> None:
    device = torch.device("cuda")
    vocab, padded = 1000, 1024
    logits = random_logits(6, padded, seed=11).to(device=device, dtype=torch.bfloat16)
    logits[:, vocab:] = 100.0
    seeded = SamplingParams(temperature=0.8, top_k=50, top_p=0.95, seed=77, logprobs=3)
    sampler = Sampler(vocab)
    alone = sampler.sample(logits[2:3], [Row(seeded)]).token_ids[0]
    for position in range(6):
        batch = logits.clone()
        batch[position] = logits[2]
        rows = [Row(SamplingParams(temperature=1.0, repetition_penalty=1.2), [1], [2])] * 6
        rows = rows[:position] + [Row(seeded)] + rows[position + 1 :]
        out = sampler.sample(batch, rows)
        assert out.token_ids[position] == alone
        assert all(t < vocab for t in out.token_ids)
    greedy = sampler.sample(logits, [Row(SamplingParams(temperature=0))] * 6).token_ids
    assert greedy == logits[:, :vocab].float().argmax(-1).tolist()


def test_extreme_top_k_and_top_p_stay_valid() -> None:
    """A top_k far above the vocabulary means 'off'; a top_p that underflows keeps the best."""
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [0.5, 0.1, 4.0, 0.2]])
    rows = [
        Row(SamplingParams(temperature=1.0, top_k=2**62)),
        Row(SamplingParams(temperature=1.0, top_p=1e-300)),
    ]
    for _ in range(20):
        out = Sampler(vocab_size=4).sample(logits, rows)
        assert 0 <= out.token_ids[0] < 4
        assert out.token_ids[1] == 2
