"""The verifiable tasks the packaged demo model (moeserve/assets/demo-moe) was trained on.

Each task turns a random draw into a short question and its one right answer; `solve`
recomputes the answer from the question alone, so any reply can be checked. The training
script, the tests and the heatmap script share this module, so they agree on the formats.

    add      "47+85"             -> "132"      two numbers in 0..99
    sub      "85-47"             -> "38"       a - b with 0 <= b <= a <= 99, a quarter close
    reverse  "reverse kqzd"      -> "dzqk"     3..6 lowercase letters
    sort     "sort 5193"         -> "1359"     3..6 digits, ascending

The user message is the question; the assistant message is the answer, nothing else.
A fixed sixteenth of all questions (by a hash, `is_held_out`) is reserved for evaluation:
training skips them and `held_out` draws from them only, so evaluation never sees a
training question.
"""

from __future__ import annotations

import random
import string
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

TASKS: tuple[str, ...] = ("add", "sub", "reverse", "sort")
HELD_OUT_SEED = 20_240_917
HELD_OUT_PER_TASK = 200
HELD_OUT_BUCKETS = 16  # 1/16 of each task's questions are never trained on
MAX_DIGITS = 2  # operands of add/sub: 0..99
LETTERS = string.ascii_lowercase


@dataclass(frozen=True)
class Example:
    """One question of `task` and its exact expected answer."""

    task: str
    question: str
    answer: str


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = _operand(rng), _operand(rng)
    return f"{a}+{b}", str(a + b)


def _sub(rng: random.Random) -> tuple[str, str]:
    a, b = _operand(rng), _operand(rng)
    if rng.random() < 0.25:
        # Close operands ("43-38"): a one-digit result from two-digit numbers, with or without
        # a borrow. Independent draws make this rare (~5%), too rare to be learned.
        b = max(0, a - rng.randint(0, 9))
    a, b = max(a, b), min(a, b)  # non-negative results: no sign to learn
    return f"{a}-{b}", str(a - b)


def _operand(rng: random.Random) -> int:
    # Uniform over the digit count first, so 1- and 2-digit operands are not swamped by the
    # 900 three-digit ones (the model must handle every length).
    digits = rng.randint(1, MAX_DIGITS)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choices(LETTERS, k=rng.randint(3, 6)))
    return f"reverse {word}", word[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    digits = "".join(rng.choices(string.digits, k=rng.randint(3, 6)))
    return f"sort {digits}", "".join(sorted(digits))


_GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add,
    "sub": _sub,
    "reverse": _reverse,
    "sort": _sort,
}


def sample(task: str, rng: random.Random) -> Example:
    """A fresh random example of `task` (KeyError for an unknown task)."""
    question, answer = _GENERATORS[task](rng)
    return Example(task, question, answer)


def solve(question: str) -> str:
    """The right answer to any question in the formats above; ValueError for other text."""
    q = question.strip()
    if q.startswith("reverse "):
        return q[len("reverse ") :][::-1]
    if q.startswith("sort "):
        return "".join(sorted(q[len("sort ") :]))
    for op, fn in (("+", int.__add__), ("-", int.__sub__)):
        a, sep, b = q.partition(op)
        if sep and a.isdigit() and b.isdigit():
            return str(fn(int(a), int(b)))
    raise ValueError(f"not a demo task question: {question!r}")


def task_of(question: str) -> str:
    """The task a question belongs to (ValueError for other text)."""
    solve(question)
    for task in ("reverse", "sort"):
        if question.startswith(task + " "):
            return task
    return "add" if "+" in question else "sub"


def is_held_out(question: str) -> bool:
    """Whether `question` is reserved for evaluation (training skips these): one in
    HELD_OUT_BUCKETS by CRC-32, so every part of a task keeps most of its questions for
    training. One-digit arithmetic ("2+4") is never held out: its 155 questions are a finite
    table to learn, not a rule to generalise, and a demo's first questions must be right."""
    if len(question) == 3 and question[1] in "+-":
        return False
    return zlib.crc32(question.encode()) % HELD_OUT_BUCKETS == 0


@lru_cache(maxsize=4)
def held_out(
    per_task: int = HELD_OUT_PER_TASK, seed: int = HELD_OUT_SEED
) -> dict[str, tuple[Example, ...]]:
    """`per_task` distinct held-out examples per task, drawn with the task's own distribution
    from its held-out questions; the same on every call and machine."""
    rng = random.Random(seed)
    out: dict[str, tuple[Example, ...]] = {}
    for task in TASKS:
        seen: dict[str, Example] = {}
        while len(seen) < per_task:
            ex = sample(task, rng)
            if is_held_out(ex.question):
                seen.setdefault(ex.question, ex)
        out[task] = tuple(seen.values())
    return out
