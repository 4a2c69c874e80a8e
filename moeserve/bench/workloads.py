"""What the load test sends: random prompts, a JSONL file, or the demo model's tasks.

Every workload is an endless iterator of RequestSpec (a file is replayed from its start when
it runs out); the run's --num-requests / --duration bound how many are taken. Lengths come
from a distribution spec: `128` (fixed), `uniform:64:192`, `normal:128:32`,
`lognormal:128:0.5` (median, sigma) or `exponential:128` (mean); draws are rounded and
clipped to >= 1.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Common English words: most BPE vocabularies hold each (with its leading space) as one token,
# so without a tokenizer a prompt of N words is close to N tokens. The report uses the
# server's own prompt_tokens count either way.
_WORDS = (
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at",
    "from", "his", "it", "an", "were", "are", "which", "this", "be", "or", "has", "had", "first",
    "one", "their", "its", "new", "after", "who", "they", "two", "her", "she", "been", "other",
    "when", "time", "there", "all", "during", "into", "school", "year", "city", "more", "most",
    "only", "over", "also", "some", "world", "would", "where", "later", "up", "such", "used",
    "many", "can", "state", "about", "national", "out", "known", "university", "united", "then",
    "made", "south", "game", "these", "group", "under", "north", "season", "film", "team", "may",
    "series", "early", "both", "three", "well", "music", "river", "house", "water", "light",
    "small", "great", "long", "place", "public", "history", "church", "people", "life", "war",
    "work", "name", "part", "day", "line", "land", "area", "number", "home", "family", "power",
    "story",
)


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


def length_sampler(spec: str, rng: random.Random) -> Callable[[], int]:
    """A function drawing lengths from `spec` (see the module docstring); ValueError if bad."""
    name, _, rest = spec.strip().partition(":")
    try:
        if not rest:
            fixed = int(name)
            if fixed < 1:
                raise ValueError
            return lambda: fixed
        params = [float(x) for x in rest.split(":")]
    except ValueError:
        raise ValueError(f"length {spec!r}: expected N or KIND:PARAMS, N >= 1") from None
    draws: dict[str, tuple[int, Callable[[], float]]] = {
        "uniform": (2, lambda: rng.uniform(params[0], params[1])),
        "normal": (2, lambda: rng.gauss(params[0], params[1])),
        "lognormal": (2, lambda: rng.lognormvariate(math.log(max(params[0], 1e-9)), params[1])),
        "exponential": (1, lambda: rng.expovariate(1.0 / max(params[0], 1e-9))),
    }
    if name not in draws:
        raise ValueError(f"length {spec!r}: kind must be one of {', '.join(draws)}")
    arity, draw = draws[name]
    if len(params) != arity or any(p < 0 for p in params):
        raise ValueError(f"length {spec!r}: {name} takes {arity} non-negative numbers")
    return lambda: max(1, round(draw()))


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
    input_len: str, output_len: str, *, seed: int = 0, tokenizer: str | None = None
) -> Iterator[RequestSpec]:
    """Completion prompts of random words (or random tokens of `tokenizer`)."""
    rng = random.Random(seed)
    draw_in, draw_out = length_sampler(input_len, rng), length_sampler(output_len, rng)
    tok = _Tokenizer(tokenizer) if tokenizer else None
    while True:
        n = draw_in()
        text = tok.prompt(n, rng) if tok else " ".join(rng.choices(_WORDS, k=n))
        yield RequestSpec("completions", draw_out(), prompt=text, input_len=n)


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
                "chat" if messages is not None else "completions", max_tokens,
                prompt=prompt, messages=messages, extra=body,
            )  # fmt: skip


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
            "chat", max_tokens, messages=[{"role": "user", "content": ex.question}],
            answer=ex.answer,
        )  # fmt: skip
