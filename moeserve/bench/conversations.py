"""Workloads that share prompt prefixes: what a server's prefix cache is for.

shared-prefix: G long system prompts ("prefixes"), each request one of them (request i the
  prefix i % G) followed by a distinct user turn; nothing else is shared.
multi-turn: N conversations in parallel, each of T turns; every request carries the whole
  conversation so far (earlier user turns and the server's own answers to them) and a new
  user turn, after a prefix all conversations share. A conversation's turn is sent once the
  previous turn's answer has arrived; a conversation that ended is followed by a new one
  with the same prefix, so the stream never runs dry.

Both are chat requests. The prefix opens the first user message, not a system message: every
chat template takes that, while some (Mixtral's, the demo model's) refuse a system role.
Requests are dealt round-robin: request i is turn (i // N) % T of the conversation in slot
i % N, so with --max-concurrency C <= N each turn's predecessor is usually done by the time
it is due. --request-timeout counts from a turn's arrival, its wait included. Lengths are
words (about a token each on BPE vocabularies, a token a character on the demo model's) or,
with a tokenizer, exact tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from moeserve.bench.workloads import (
    _WORDS,
    DEFAULT_OUTPUT_LEN,
    FIT_TOKENS_PER_WORD,
    RequestSpec,
    _Tokenizer,
    length_ceiling,
    length_sampler,
)

SEPARATOR = "\n\n"  # between the shared prefix and the first user turn
DEFAULT_TURN_LEN = "32"  # --input-len of these workloads: one user turn
DEFAULT_PREFIX_LEN = 512
TEMPLATE_TOKENS = 8  # a chat template's tokens around each message, roughly


class TurnFailed(Exception):
    """An earlier turn of the conversation got no answer: this one cannot be sent."""


@dataclass(eq=False)
class Conversation:
    """One conversation's user turns and the answers that arrive for them. Each turn's spec
    refers to it; loadtest sends turn t only after `answer(t - 1)` or `settle(t - 1)`."""

    prefix: str
    turns: list[str]
    answers: list[str | None] = field(default_factory=list)
    _done: list[asyncio.Event] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.answers = [None] * len(self.turns)
        self._done = [asyncio.Event() for _ in self.turns]

    def messages(self, turn: int) -> list[dict[str, Any]]:
        """The request body's messages for `turn`: every earlier turn with its answer."""
        out: list[dict[str, Any]] = []
        for k in range(turn + 1):
            text = self.turns[k]
            if k == 0 and self.prefix:
                text = self.prefix + SEPARATOR + text
            out.append({"role": "user", "content": text})
            if k < turn:
                out.append({"role": "assistant", "content": self.answers[k] or ""})
        return out

    async def ready(self, turn: int) -> list[dict[str, Any]]:
        """Wait for the previous turn's answer, then `messages(turn)`; TurnFailed when it
        failed (or was cancelled)."""
        if turn > 0:
            await self._done[turn - 1].wait()
            if self.answers[turn - 1] is None:
                raise TurnFailed(f"turn {turn - 1} of the conversation failed")
        return self.messages(turn)

    def answer(self, turn: int, text: str) -> None:
        self.answers[turn] = text
        self._done[turn].set()

    def settle(self, turn: int) -> None:
        """The turn is over whatever happened: a turn without an answer has failed."""
        self._done[turn].set()


def _texts(tokenizer: str | None) -> Any:
    """A function (n, rng) -> text of n words, or of n tokens of `tokenizer`."""
    if tokenizer:
        return _Tokenizer(tokenizer).prompt
    return lambda n, rng: " ".join(rng.choices(_WORDS, k=n))


def conversation_workload(
    input_len: str,
    output_len: str,
    *,
    prefix_len: int,
    num_prefixes: int = 1,
    num_conversations: int = 1,
    num_turns: int = 1,
    seed: int = 0,
    tokenizer: str | None = None,
) -> Iterator[RequestSpec]:
    """Chat requests of `num_conversations` conversations of `num_turns` turns each, dealt
    round-robin; conversation k opens with prefix k % num_prefixes (of `prefix_len` words or
    tokens). shared-prefix is one conversation of one turn at a time over G prefixes;
    multi-turn is N conversations of T turns over one prefix. ValueError for bad sizes."""
    if prefix_len < 0 or min(num_prefixes, num_conversations, num_turns) < 1:
        raise ValueError(
            "--prefix-len must be >= 0, and --num-prefixes, --num-conversations and "
            "--num-turns >= 1"
        )
    rng = random.Random(seed)
    draw_in, draw_out = length_sampler(input_len, rng), length_sampler(output_len, rng)
    text = _texts(tokenizer)
    prefixes = [text(prefix_len, rng) if prefix_len else "" for _ in range(num_prefixes)]
    slots: list[Conversation | None] = [None] * num_conversations
    next_turn = [0] * num_conversations
    started = 0
    for i in itertools.count():
        s = i % num_conversations
        if slots[s] is None or next_turn[s] == num_turns:
            turns = [text(draw_in(), rng) for _ in range(num_turns)]
            slots[s] = Conversation(prefixes[started % num_prefixes], turns)
            next_turn[s] = 0
            started += 1
        conv, turn = slots[s], next_turn[s]
        next_turn[s] += 1
        yield RequestSpec("chat", draw_out(), conversation=conv, turn=turn)


def add_conversation_args(g: argparse._ArgumentGroup) -> None:
    """The flags of the shared-prefix and multi-turn workloads."""
    g.add_argument(
        "--prefix-len",
        type=int,
        default=DEFAULT_PREFIX_LEN,
        help="shared-prefix / multi-turn: words (tokens with --tokenizer) of the shared "
        "prefix; --input-len is then one user turn's (default %(default)s; "
        f"--input-len {DEFAULT_TURN_LEN})",
    )
    g.add_argument(
        "--num-prefixes",
        type=int,
        default=1,
        help="shared-prefix: distinct prefixes, request i uses prefix i %% G (default 1)",
    )
    g.add_argument(
        "--num-conversations",
        type=int,
        default=8,
        help="multi-turn: conversations in parallel (default %(default)s)",
    )
    g.add_argument(
        "--num-turns",
        type=int,
        default=4,
        help="multi-turn: turns of a conversation; each request carries the earlier turns "
        "and their answers (default %(default)s)",
    )


def conversation_factory(
    args: argparse.Namespace, max_model_len: int | None
) -> tuple[Callable[[], Iterator[RequestSpec]], str, str | None]:
    """The workload of the flags (a picklable factory), its name, and a note when its last
    turns may not fit a context of `max_model_len` tokens. ValueError for bad flags."""
    multi = args.workload == "multi-turn"
    conversations, turns = (args.num_conversations, args.num_turns) if multi else (1, 1)
    prefixes = 1 if multi else args.num_prefixes
    in_len, out_len = args.input_len or DEFAULT_TURN_LEN, args.output_len or str(DEFAULT_OUTPUT_LEN)
    # A conversation's turns must all go to one client process: request i goes to the
    # process of stream i % C (processes.py), and is conversation i % N's.
    cycle = args.max_concurrency or args.client_processes
    if multi and args.client_processes > 1 and conversations % cycle:
        raise ValueError(
            f"--workload multi-turn with --client-processes {args.client_processes}: "
            f"--num-conversations must be a multiple of {cycle} (--max-concurrency, or "
            "--client-processes without it), so that each conversation stays in one process"
        )
    make = partial(
        conversation_workload,
        in_len,
        out_len,
        prefix_len=args.prefix_len,
        num_prefixes=prefixes,
        num_conversations=conversations,
        num_turns=turns,
        seed=args.seed,
        tokenizer=args.tokenizer,
    )
    next(make())  # bad sizes or lengths: ValueError now
    if multi:
        name = f"multi-turn(prefix={args.prefix_len}, conversations={conversations}, "
        name += f"turns={turns}, in={in_len}, out={out_len})"
    else:
        name = f"shared-prefix(prefix={args.prefix_len}, prefixes={prefixes}, "
        name += f"in={in_len}, out={out_len})"
    note = None
    per = 1.0 if args.tokenizer else FIT_TOKENS_PER_WORD
    words = args.prefix_len + turns * length_ceiling(in_len)
    need = round(words * per) + turns * (length_ceiling(out_len) + TEMPLATE_TOKENS)
    if max_model_len is not None and need > max_model_len:
        note = (
            f"the last turn may need about {need} tokens (prefix, {turns} turn(s) and their "
            f"answers), more than the server's context of {max_model_len}: such requests "
            "fail; lower --prefix-len, --input-len, --output-len or --num-turns"
        )
    return make, name, note
