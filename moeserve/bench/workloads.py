"""What the load test sends: random prompts, a JSONL file, or the demo model's tasks.

Every workload is an endless iterator of RequestSpec (a file is replayed from its start when
it runs out); the run's --num-requests / --duration bound how many are taken. Lengths come
from a distribution spec: `128` (fixed), `uniform:64:192`, `normal:128:32`,
`lognormal:128:0.5` (median, sigma) or `exponential:128` (mean); draws are rounded and
clipped to >= 1. fit_random_lengths fits the random workload to the server's context.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

# Common English words: most BPE vocabularies hold each (with its leading space) as one token,
# so without a tokenizer a prompt of N words is close to N tokens. The report uses the
# server's own prompt_tokens count either way.
_WORD_TEXT = """
    the of and to in is was for on that with as by at from his it an were are which this be or has
    had first one their its new after who they two her she been other when time there all during
    into school year city more most only over also some world would where later up such used many
    can state about national out known university united then made south game these group under
    north season film team may series early both three well music river house water light small
    great long place public history church people life war work name part day line land area
    number home family power story
"""
_WORDS = tuple(_WORD_TEXT.split())


class Conversation(Protocol):
    """What the load test needs of a conversation (conversations.Conversation)."""

    async def ready(self, turn: int) -> list[dict[str, Any]]: ...

    def answer(self, turn: int, text: str) -> None: ...

    def settle(self, turn: int) -> None: ...


@dataclass(frozen=True)
class RequestSpec:
    """One request: a completion prompt or chat messages, and its max_tokens."""

    endpoint: str  # "completions" or "chat"
    max_tokens: int
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    input_len: int | None = None  # the intended prompt length in tokens, when known
    answer: str | None = None  # the expected reply (demo tasks), to report accuracy
    extra: dict[str, Any] = field(default_factory=dict)  # more body fields from a JSONL line
    # A turn of a conversation (conversations.py): its messages are built when it is sent,
    # from the earlier turns' answers.
    conversation: Conversation | None = None
    turn: int = 0


_KINDS = {"uniform": 2, "normal": 2, "lognormal": 2, "exponential": 1}  # kind: its arity


def _parse_length(spec: str) -> tuple[str, list[float]]:
    """("fixed", [N]) or (kind, params); ValueError naming what is wrong."""
    name, _, rest = spec.strip().partition(":")
    try:
        if not rest:
            fixed = int(name)
            if fixed < 1:
                raise ValueError
            return "fixed", [float(fixed)]
        params = [float(x) for x in rest.split(":")]
    except ValueError:
        raise ValueError(f"length {spec!r}: expected N or KIND:PARAMS, N >= 1") from None
    if name not in _KINDS:
        raise ValueError(f"length {spec!r}: kind must be one of {', '.join(_KINDS)}")
    if len(params) != _KINDS[name] or any(p < 0 for p in params):
        raise ValueError(f"length {spec!r}: {name} takes {_KINDS[name]} non-negative numbers")
    return name, params


def length_sampler(spec: str, rng: random.Random) -> Callable[[], int]:
    """A function drawing lengths from `spec` (see the module docstring); ValueError if bad."""
    name, params = _parse_length(spec)
    if name == "fixed":
        fixed = int(params[0])
        return lambda: fixed
    draws: dict[str, Callable[[], float]] = {
        "uniform": lambda: rng.uniform(params[0], params[1]),
        "normal": lambda: rng.gauss(params[0], params[1]),
        "lognormal": lambda: rng.lognormvariate(math.log(max(params[0], 1e-9)), params[1]),
        "exponential": lambda: rng.expovariate(1.0 / max(params[0], 1e-9)),
    }
    draw = draws[name]
    return lambda: max(1, round(draw()))


def length_ceiling(spec: str) -> int:
    """The length a context must hold for `spec`: its largest draw (N, uniform's upper end);
    for the kinds without one (normal, lognormal, exponential) their mean or median, so that
    about half the draws or more fit. ValueError if `spec` is bad."""
    name, params = _parse_length(spec)
    return max(1, round(max(params) if name == "uniform" else params[0]))


class _Tokenizer:
    """Exact-length random prompts from a tokenizer.json (a file or a model directory)."""

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer

        p = Path(path)
        p = p / "tokenizer.json" if p.is_dir() else p
        if not p.is_file():
            raise ValueError(f"--tokenizer {path}: no tokenizer.json there")
        self.tok = Tokenizer.from_file(str(p))
        special = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        self.ids = [i for i in range(self.tok.get_vocab_size()) if i not in special]

    def prompt(self, n: int, rng: random.Random) -> str:
        # Random ids decode to text that may re-encode to a different count (merges across
        # the joins): trim or pad on the re-encoded ids until it is exactly n, a few rounds.
        ids = rng.choices(self.ids, k=n)
        for _ in range(4):
            text = self.tok.decode(ids)
            ids = self.tok.encode(text, add_special_tokens=False).ids
            if len(ids) == n:
                break
            ids = ids[:n] + rng.choices(self.ids, k=max(0, n - len(ids)))
        return self.tok.decode(ids)


def random_workload(
    input_len: str,
    output_len: str,
    *,
    seed: int = 0,
    tokenizer: str | None = None,
    max_prompt_chars: int | None = None,
) -> Iterator[RequestSpec]:
    """Completion prompts of random words (or random tokens of `tokenizer`). Prompts of
    words longer than `max_prompt_chars` are cut to it: at most that many tokens whatever
    the server's tokenizer (none takes more than one per ASCII character)."""
    rng = random.Random(seed)
    draw_in, draw_out = length_sampler(input_len, rng), length_sampler(output_len, rng)
    tok = _Tokenizer(tokenizer) if tokenizer else None
    while True:
        n = draw_in()
        if tok:
            text = tok.prompt(n, rng)
        else:
            text = " ".join(rng.choices(_WORDS, k=n))
            if max_prompt_chars is not None and len(text) > max_prompt_chars:
                text = text[: max(1, max_prompt_chars)].rstrip()
        yield RequestSpec("completions", draw_out(), prompt=text, input_len=n)


DEFAULT_INPUT_LEN = 128  # --input-len when not given
DEFAULT_OUTPUT_LEN = 64  # --output-len when not given
# Context kept free when the defaults are fitted: for the BOS (or EOS) a server adds to a prompt.
SPECIAL_TOKENS_ROOM = 2
# Tokens a random word and its space may take: one per character on a character-level
# vocabulary (the demo model's), 5.1 on average over _WORDS; 15% more, so that the cut of a
# fitted prompt to its characters' budget (a prompt of long words) seldom happens.
FIT_TOKENS_PER_WORD = 1.15 * sum(len(w) + 1 for w in _WORDS) / len(_WORDS)


@dataclass(frozen=True)
class RandomLengths:
    """The random workload's lengths, fitted to a server's context."""

    input_len: str
    output_len: str
    max_prompt_chars: int | None = None  # random_workload cuts prompts of words to this
    note: str | None = None  # what the fit changed, and why: for stderr


def _asked(flag: str, spec: str, ceiling: int) -> str:
    kind, _ = _parse_length(spec)
    if kind == "fixed":
        return f"{flag} {spec}"
    return f"{flag} {spec} ({'up to' if kind == 'uniform' else 'about'} {ceiling})"


def _words_hint(n: int, room: int, exact: bool) -> str | None:
    """A warning when prompts of `n` random words might not fit in `room` tokens."""
    if exact or n * FIT_TOKENS_PER_WORD <= room:
        return None
    return (
        f"without --tokenizer a prompt of {n} random words may take up to "
        f"~{round(n * FIT_TOKENS_PER_WORD)} tokens (one per character on a "
        f"character-level vocabulary), more than the {room} the context leaves it; "
        "pass --tokenizer for exact prompt lengths"
    )


def fit_random_lengths(
    input_len: str | None, output_len: str | None, max_model_len: int | None, *, exact: bool
) -> RandomLengths:
    """The random workload's lengths for a server whose context is `max_model_len` tokens
    (None: not known, the lengths stay as they are). `input_len` / `output_len` are the
    flags as given, None when not given: those not given are scaled down until prompt and
    output fit; those given must fit as they are, or ValueError names them. Without a
    tokenizer (`exact` False) the prompts are words, whose tokens are not known here: a
    fitted prompt of N words counts as FIT_TOKENS_PER_WORD * N tokens, and is cut to the
    characters the context has room for (tokenizers make at most one token of a character:
    byte-level BPE, SentencePiece, the demo model's character vocabulary)."""
    in_spec = input_len or str(DEFAULT_INPUT_LEN)
    out_spec = output_len or str(DEFAULT_OUTPUT_LEN)
    in_max, out_max = length_ceiling(in_spec), length_ceiling(out_spec)  # also: bad specs
    if max_model_len is None:
        return RandomLengths(in_spec, out_spec)
    ctx = max_model_len
    where = f"the server's context of {ctx} tokens (max_model_len in /v1/models)"
    if input_len and output_len:
        if in_max + out_max > ctx:
            raise ValueError(
                f"the requested lengths do not fit {where}: "
                f"{_asked('--input-len', input_len, in_max)} + "
                f"{_asked('--output-len', output_len, out_max)} = {in_max + out_max} tokens; "
                "lower --input-len or --output-len"
            )
        return RandomLengths(in_spec, out_spec, note=_words_hint(in_max, ctx - out_max, exact))
    room = ctx - SPECIAL_TOKENS_ROOM  # for the prompt and the output
    if input_len:  # only --output-len is the default: it gets what the prompt leaves
        n_out = min(DEFAULT_OUTPUT_LEN, room - in_max)
        if n_out < 1:
            raise ValueError(
                f"the requested length does not fit {where}: "
                f"{_asked('--input-len', input_len, in_max)} leaves no room for the output "
                f"({SPECIAL_TOKENS_ROOM} tokens are kept for special tokens); lower --input-len"
            )
        notes = [_words_hint(in_max, room - n_out, exact)]
        if n_out < DEFAULT_OUTPUT_LEN:
            notes.insert(
                0,
                f"the default --output-len {DEFAULT_OUTPUT_LEN} does not fit {where} "
                f"beside {_asked('--input-len', input_len, in_max)}: using "
                f"--output-len {n_out}",
            )
        note = "; ".join(n for n in notes if n) or None
        return RandomLengths(in_spec, str(n_out), note=note)
    per_word = 1.0 if exact else FIT_TOKENS_PER_WORD
    if output_len:  # only --input-len is the default: the prompt gets what the output leaves
        n_out = out_max
        n_in = min(DEFAULT_INPUT_LEN, math.floor((room - n_out) / per_word))
        if n_in < 1:
            raise ValueError(
                f"the requested length does not fit {where}: "
                f"{_asked('--output-len', output_len, out_max)} leaves no room for a prompt "
                f"({SPECIAL_TOKENS_ROOM} tokens are kept for special tokens); "
                "lower --output-len"
            )
        what = (
            f"the default --input-len {DEFAULT_INPUT_LEN} does not fit {where} beside "
            f"{_asked('--output-len', output_len, out_max)}"
        )
        using, changed = f"--input-len {n_in}", n_in < DEFAULT_INPUT_LEN
    else:  # both are the defaults: scaled down together
        if room < 2:
            raise ValueError(f"{where} has no room for a random prompt and its output")
        scale = min(1.0, room / (DEFAULT_INPUT_LEN * per_word + DEFAULT_OUTPUT_LEN))
        n_in = max(1, math.floor(DEFAULT_INPUT_LEN * scale))
        n_out = max(1, math.floor(DEFAULT_OUTPUT_LEN * scale))
        out_spec = str(n_out)
        what = (
            f"the default --input-len {DEFAULT_INPUT_LEN} --output-len "
            f"{DEFAULT_OUTPUT_LEN} do not fit {where}"
        )
        using = f"--input-len {n_in} --output-len {n_out}"
        changed = scale < 1.0
    max_chars = None if exact else room - n_out
    note = None
    if changed and exact:
        note = f"{what}: using {using}"
    elif changed:
        note = (
            f"{what}, as without --tokenizer a prompt of {DEFAULT_INPUT_LEN} random words "
            f"may take up to ~{round(DEFAULT_INPUT_LEN * per_word)} tokens (one per "
            f"character on a character-level vocabulary): using {using}, each prompt cut "
            f"to at most {max_chars} characters, so at most {max_chars} tokens whatever "
            "the tokenizer (--tokenizer gives exact lengths)"
        )
    return RandomLengths(str(n_in), out_spec, max_chars, note)


def jsonl_workload(path: str, output_len: str, *, seed: int = 0) -> Iterator[RequestSpec]:
    """Requests from a JSONL file, one object a line: `prompt` (a string, completions) or
    `messages` (chat), optional `max_tokens` (else drawn from `output_len`), and any other
    body fields (temperature, stop, ...) passed through. Replayed from the start at its end."""
    draw_out = length_sampler(output_len, random.Random(seed))
    specs: list[tuple[str, dict[str, Any]]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e})") from None
            if not isinstance(obj, dict) or ("prompt" in obj) == ("messages" in obj):
                raise ValueError(f"{where}: need an object with `prompt` or `messages`")
            if "prompt" in obj and not (isinstance(obj["prompt"], str) and obj["prompt"]):
                raise ValueError(f"{where}: `prompt` must be a non-empty string")
            if "messages" in obj and not (isinstance(obj["messages"], list) and obj["messages"]):
                raise ValueError(f"{where}: `messages` must be a non-empty list")
            mt = obj.get("max_tokens")
            if mt is not None and not (isinstance(mt, int) and mt >= 1):
                raise ValueError(f"{where}: `max_tokens` must be an integer >= 1")
            specs.append((where, obj))
    if not specs:
        raise ValueError(f"{path}: no requests in the file")
    while True:
        for _, obj in specs:
            body = dict(obj)
            prompt, messages = body.pop("prompt", None), body.pop("messages", None)
            max_tokens = body.pop("max_tokens", None) or draw_out()
            yield RequestSpec(
                "chat" if messages is not None else "completions",
                max_tokens,
                prompt=prompt,
                messages=messages,
                extra=body,
            )


def demo_workload(
    max_tokens: int = 16, *, seed: int = 0, tasks: list[str] | None = None
) -> Iterator[RequestSpec]:
    """Chat questions of the demo model's tasks (moeserve.demo_tasks), tasks taken in turn;
    each carries its answer, so the report can say how many replies were right."""
    try:  # lazily: only this workload needs it, and it ships with the demo model
        from moeserve import demo_tasks
    except ImportError as e:
        raise ValueError(f"the demo workload needs moeserve.demo_tasks ({e})") from None
    names = list(tasks or demo_tasks.TASKS)
    unknown = sorted(set(names) - set(demo_tasks.TASKS))
    if unknown:
        raise ValueError(f"unknown demo task(s) {unknown}; known: {list(demo_tasks.TASKS)}")
    rng = random.Random(seed)
    i = 0
    while True:
        ex = demo_tasks.sample(names[i % len(names)], rng)
        i += 1
        yield RequestSpec(
            "chat",
            max_tokens,
            messages=[{"role": "user", "content": ex.question}],
            answer=ex.answer,
        )
