"""Structured outputs in the engine: every output of a random-weight model, sampled at
temperature 1 over several seeds, matches its JSON schema, regex, choice list or grammar (the
token mask guarantees it, not the model); a grammar row leaves the other rows of its batch
untouched; preemption, async scheduling and n > 1 keep the guarantee. The HTTP fields are
tests/test_structured_server.py's."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import jsonschema
import pydantic
import pytest
import torch

from moeserve import LLM, SamplingParams
from moeserve.assets import demo_model_path
from moeserve.engine import structured
from moeserve.engine.outputs import CompletionOutput
from moeserve.engine.sampler import GrammarMask, Sampler, apply_grammar
from moeserve.sampling_params import StructuredOutput
from tests.checkpoints import make_checkpoint

SEEDS = range(4)
PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ck") / "qwen2"
    return make_checkpoint(path, "qwen2_moe", tokenizer=True, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def llm(ckpt: Path) -> LLM:
    return LLM(ckpt, progress=False, block_size=4)


class Address(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    city: str = pydantic.Field(max_length=12)
    zip: str = pydantic.Field(pattern=r"^[0-9]{5}$")


class Person(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    name: str = pydantic.Field(max_length=10)
    age: int = pydantic.Field(ge=0, le=130)
    role: Literal["admin", "user", "guest"]
    address: Address
    scores: list[float] = pydantic.Field(max_length=3)


def _obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    required = list(props) if required is None else required
    return {
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": False,
    }


SHORT = {"type": "string", "maxLength": 8}
SCHEMAS: dict[str, dict[str, Any]] = {
    "nested": _obj(
        {
            "id": {"type": "integer", "minimum": 0, "maximum": 999},
            "owner": _obj({"name": SHORT, "meta": _obj({"ok": {"type": "boolean"}})}),
            "note": SHORT,
        },
        required=["id", "owner"],
    ),
    "array_bounds": _obj(
        {"items": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4}}
    ),
    "enum": _obj(
        {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"enum": [1, 2, 3, None]},
            "kind": {"const": "shirt"},
        }
    ),
    "pattern": _obj(
        {
            "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
            "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{1,3}$"},
        }
    ),
    "number_bounds": _obj(
        {
            "i": {"type": "integer", "minimum": -5, "maximum": 5},
            "x": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "y": {"type": "number", "minimum": 10, "exclusiveMaximum": 20},
        }
    ),
    "any_of": _obj(
        {
            "value": {
                "anyOf": [
                    {"type": "integer", "minimum": 100},
                    _obj({"tag": SHORT}),
                    {"type": "null"},
                ]
            }
        }
    ),
    "function_parameters": {  # an OpenAI strict function-calling "parameters" schema
        "type": "object",
        "properties": {
            "location": {"type": "string", "maxLength": 16, "description": "City, country"},
            "unit": {"type": ["string", "null"], "enum": ["celsius", "fahrenheit", None]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["location", "unit", "days"],
        "additionalProperties": False,
    },
    "pydantic": Person.model_json_schema(),
}


REGEX = r"[a-z]{2,6}-[0-9]{1,3}( [A-Z][a-z]{1,8})?"
CHOICES = ["yes", "no", "maybe so", "The answer is 42."]
LARK = 'start: expr\nexpr: NUM | "(" expr OP expr ")"\nOP: "+" | "*"\nNUM: /[1-9]/'
CASES: dict[str, tuple[StructuredOutput, int]] = {  # name -> (constraint, max_tokens)
    **{
        name: (StructuredOutput("json_schema", json.dumps(schema)), 256)
        for name, schema in SCHEMAS.items()
    },
    "json_object": (StructuredOutput("json_object"), 64),
    "regex": (StructuredOutput("regex", REGEX), 64),
    "choice": (StructuredOutput("choice", json.dumps(CHOICES)), 64),
    "lark": (StructuredOutput("lark", LARK), 128),
}


@pytest.fixture(scope="module")
def outputs(llm: LLM) -> dict[str, list[CompletionOutput]]:
    """Every case, several seeds each, sampled at temperature 1 in ONE batch: the rows hold
    different grammars side by side."""
    names = [name for name in CASES for _ in SEEDS]
    names += ["json_object"] * 8  # most random objects run past max_tokens: give more tries
    params = [
        SamplingParams(
            max_tokens=CASES[name][1], temperature=1.0, seed=s, structured=CASES[name][0]
        )
        for s, name in enumerate(names)
    ]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]
    result: dict[str, list[CompletionOutput]] = {name: [] for name in CASES}
    for name, out in zip(names, llm.generate(prompts, params), strict=True):
        result[name].append(out.outputs[0])
    return result


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_output_validates_against_its_schema(
    outputs: dict[str, list[CompletionOutput]], name: str
) -> None:
    schema = SCHEMAS[name]
    for o in outputs[name]:
        assert o.finish_reason == "stop", (o.finish_reason, o.text)
        jsonschema.validate(json.loads(o.text), schema)
        if name == "pydantic":
            Person.model_validate_json(o.text)


def test_json_object_gives_an_object(outputs: dict[str, list[CompletionOutput]]) -> None:
    finished = [o for o in outputs["json_object"] if o.finish_reason == "stop"]
    assert finished, "no output completed within max_tokens"
    for o in finished:
        assert isinstance(json.loads(o.text), dict), o.text
    for o in outputs["json_object"]:  # cut by max_tokens: the start of an object
        assert o.text.startswith("{")


def test_regex_choice_and_grammar(outputs: dict[str, list[CompletionOutput]]) -> None:
    for o in outputs["regex"]:
        assert o.finish_reason == "stop"
        assert re.fullmatch(REGEX, o.text), o.text
    assert {o.text for o in outputs["choice"]} <= set(CHOICES)
    for o in outputs["lark"]:
        assert o.finish_reason == "stop"
        assert re.fullmatch(r"[()1-9+*]+", o.text), o.text
        assert eval(o.text) > 0  # noqa: S307 - digits, parentheses and + * only (checked above)


def test_structured_output_is_validated() -> None:
    with pytest.raises(ValueError, match="structured.kind.*'yaml'"):
        StructuredOutput("yaml", "")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutput("json_schema", "{")
    with pytest.raises(ValueError, match="non-empty JSON list of strings"):
        StructuredOutput("choice", "[]")
    with pytest.raises(ValueError, match="must be empty"):
        StructuredOutput("json_object", "{}")
    with pytest.raises(ValueError, match="must hold the regex"):
        StructuredOutput("regex", "")
    with pytest.raises(ValueError, match="structured must be a StructuredOutput"):
        SamplingParams(structured="json")  # type: ignore[arg-type]
    with pytest.raises(structured.GrammarError, match="invalid regex"):
        structured.check(StructuredOutput("regex", "[a-"))
    with pytest.raises(structured.GrammarError, match="invalid JSON schema"):
        structured.check(StructuredOutput("json_schema", '{"type": "objekt"}'))


def test_a_bad_grammar_is_refused_at_admission(llm: LLM) -> None:
    params = SamplingParams(structured=StructuredOutput("lark", "start: undefined_rule"))
    with pytest.raises(ValueError, match="invalid grammar"):
        llm.generate([[5, 6]], params)
    assert not llm.engine.has_unfinished()


def test_grammar_rows_leave_the_other_rows_unchanged(ckpt: Path) -> None:
    schema = StructuredOutput("json_schema", json.dumps(SCHEMAS["enum"]))
    plain = [
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=3, logprobs=2),
        SamplingParams(max_tokens=8, temperature=1.0, seed=5, repetition_penalty=1.3),
    ]
    grammar = [
        SamplingParams(max_tokens=64, temperature=1.0, seed=1, structured=schema),
        SamplingParams(max_tokens=64, temperature=0.0, structured=schema, logprobs=1),
    ]
    for async_scheduling in (False, True):
        llm = LLM(ckpt, progress=False, block_size=4, async_scheduling=async_scheduling)
        want = llm.generate(PROMPTS[:3], plain)
        mixed = llm.generate(PROMPTS[:3] + PROMPTS[2:4], plain + grammar)
        for w, m in zip(want, mixed[:3]):
            assert m.outputs[0].token_ids == w.outputs[0].token_ids
            # Same tokens and candidates; the values to float32 rounding (a batch of another
            # size may take another CPU matmul blocking, which sums in another order).
            got, exp = m.outputs[0].logprobs or [], w.outputs[0].logprobs or []
            assert [(g.token_id, [i for i, _ in g.top]) for g in got] == [
                (e.token_id, [i for i, _ in e.top]) for e in exp
            ]
            for g, e in zip(got, exp):
                assert g.logprob == pytest.approx(e.logprob, rel=1e-5, abs=1e-6)
                assert [v for _, v in g.top] == pytest.approx([v for _, v in e.top], rel=1e-5)
        for m in mixed[3:]:
            assert m.outputs[0].finish_reason == "stop"
            jsonschema.validate(json.loads(m.outputs[0].text), SCHEMAS["enum"])


def test_grammar_rows_survive_preemption_and_n(ckpt: Path) -> None:
    from moeserve.engine.runner import kv_bytes_per_block

    schema = SCHEMAS["nested"]
    so = StructuredOutput("json_schema", json.dumps(schema))
    params = [SamplingParams(max_tokens=120, temperature=1.0, seed=s, structured=so) for s in SEEDS]
    params.append(SamplingParams(max_tokens=120, n=3, temperature=1.0, seed=9, structured=so))
    prompts = [PROMPTS[s % len(PROMPTS)] * 3 for s in range(len(params))]
    roomy = LLM(ckpt, progress=False, block_size=4)
    want = roomy.generate(prompts, params)
    e = roomy.engine
    tight = 40 * kv_bytes_per_block(e.model_config, 4, e.executor.model.dtype)
    llm = LLM(ckpt, progress=False, block_size=4, kv_cache_memory=tight, max_model_len=140)
    got = llm.generate(prompts, params)
    assert llm.engine.scheduler.stats().num_preemptions_total > 0
    for w, g in zip(want, got):
        for wo, go in zip(w.outputs, g.outputs, strict=True):
            assert go.token_ids == wo.token_ids
            assert go.finish_reason == "stop"
            jsonschema.validate(json.loads(go.text), schema)
    assert len({o.text for o in got[-1].outputs}) > 1  # n samples, each its own matcher


def test_eos_only_where_the_grammar_may_end(llm: LLM) -> None:
    g = llm.engine.grammars
    assert g is not None
    eos = 2
    seq = g.matcher(StructuredOutput("regex", "ab+"))
    tok = g.tokenizer

    def allowed() -> set[int]:
        mask = g.mask([(0, seq)], pin=False)
        assert mask is not None
        bits = mask.bits_GW[0]
        return {t for t in range(tok.vocab_size) if (int(bits[t // 32]) >> (t % 32)) & 1}

    assert eos not in allowed()
    for t in tok.tokenize_str("a"):
        assert not seq.ends_after(t)
    assert eos not in allowed()  # "a" alone does not match ab+
    [b] = tok.tokenize_str("b")
    assert not seq.ends_after(b)
    assert eos in allowed() and b in allowed()  # "ab" may end, or go on
    done = g.matcher(StructuredOutput("choice", '["ab"]'))
    assert all(not done.ends_after(t) for t in tok.tokenize_str("a"))
    assert done.ends_after(b)  # complete: the engine ends it without waiting for EOS


def test_compiled_grammars_are_cached_and_bounded(
    llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = llm.engine.grammars
    assert g is not None
    monkeypatch.setattr(structured, "CACHE_SIZE", 2)
    g._compiled.clear()
    a, b, c = (StructuredOutput("regex", f"x{i}+") for i in range(3))
    g.matcher(a)
    first = g._compiled[("regex", "x0+")]
    g.matcher(a)
    assert g._compiled[("regex", "x0+")] is first and g.num_compiled == 1
    g.matcher(b)
    g.matcher(a)  # a is now the most recent: c evicts b
    g.matcher(c)
    assert list(g._compiled) == [("regex", "x0+"), ("regex", "x2+")]


def test_sampler_masks_only_the_grammar_rows() -> None:
    torch.manual_seed(0)
    B, V = 4, 70  # the mask covers 64 tokens: 64..69 are never allowed in a grammar row
    logits = torch.randn(B, V)
    allowed = torch.zeros(2, 64, dtype=torch.bool)
    allowed[0, [3, 17, 40]] = True
    allowed[1, [0, 63]] = True
    words = (allowed.view(2, 2, 32).long() << torch.arange(32)).sum(-1)
    bits = words.to(torch.int64).where(words < 2**31, words - 2**32).to(torch.int32)
    mask = GrammarMask([1, 3], bits)
    out = apply_grammar(logits, mask)
    assert torch.equal(out[[0, 2]], logits[[0, 2]])
    for g, row in enumerate([1, 3]):
        ok = torch.nonzero(out[row] > float("-inf")).flatten().tolist()
        assert ok == torch.nonzero(allowed[g]).flatten().tolist()
    rows = [
        type("Row", (), {"params": p, "prompt_ids": [1], "output_ids": []})()
        for p in (
            SamplingParams(temperature=0.0),
            SamplingParams(temperature=0.0),
            SamplingParams(temperature=1.0, seed=1),
            SamplingParams(temperature=1.0, seed=2),
        )
    ]
    sampler = Sampler(V)
    for _ in range(20):
        tokens = sampler.sample(logits, rows, mask).token_ids
        assert tokens[1] in (3, 17, 40) and tokens[3] in (0, 63)
        assert tokens[0] == int(logits[0].argmax())


def test_demo_model_word_level_vocabulary() -> None:
    """The packaged demo model's tokenizer (a word-level vocabulary llguidance cannot read
    from tokenizer.json) goes through the token-bytes path."""
    llm = LLM(demo_model_path(), progress=False)
    pattern = "[a-f]{3} [0-9]{2}"
    params = [
        SamplingParams(
            max_tokens=20, temperature=1.0, seed=s, structured=StructuredOutput("regex", pattern)
        )
        for s in SEEDS
    ]
    for out in llm.generate([[1, 19, 20]] * len(params), params):
        assert out.outputs[0].finish_reason == "stop"
        assert re.fullmatch(pattern, out.outputs[0].text), out.outputs[0].text
    # Its vocabulary has no brace: a JSON object cannot even start. Refused, not an empty stop.
    bad = SamplingParams(max_tokens=8, structured=StructuredOutput("json_object", ""))
    with pytest.raises(ValueError, match="vocabulary cannot write any text this JSON object"):
        llm.generate([[1, 19, 20]], bad)
