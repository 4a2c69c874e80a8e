"""What a step's executor reads of each scheduled sequence (shared by runner and CUDA graphs)."""

from __future__ import annotations

from typing import Protocol


class ScheduledTokens(Protocol):
    """The part of a sequence record a step reads: its tokens and its KV blocks."""

    token_ids: list[int]
    block_ids: list[int]
    window_block_ids: list[int]  # the sliding layers' table (read with a sliding KV group)


class Work(Protocol):
    """One sequence's share of a step (the scheduler's ScheduledSeq satisfies this)."""

    seq: ScheduledTokens
    start: int
    num_tokens: int
    sample: bool


# A chunk of at most this many tokens (a prefix-cache hit's remainder, the tail of a chunked
# prompt) may run as decode rows in a captured graph (as_decode_rows).
DECODE_ROWS_MAX_TOKENS = 64


class Row:
    """One token of a step as a decode row: position `start` of `seq`."""

    __slots__ = ("seq", "start", "num_tokens", "sample")

    def __init__(self, seq: ScheduledTokens, start: int, sample: bool) -> None:
        self.seq, self.start, self.num_tokens, self.sample = seq, start, 1, sample


def as_decode_rows(
    work: list[Work] | tuple[Work, ...], max_rows: int
) -> tuple[list[Row], list[int]] | None:
    """A step whose chunks are all short, as one decode row per token, and each row's index
    into `work`; None when it has a longer chunk or more than max_rows tokens.

    Row j of a chunk attends over positions 0..start+j, the earlier rows of its own chunk
    included: every layer stores the step's keys and values before it attends (the decode
    graphs' kernels as the eager path), so this is the chunk's causal attention. Only a
    chunk's last row samples, as the chunk would. Short prefills then replay a captured graph
    instead of running eagerly, which at batch sizes this small is host-bound (a 48-layer
    eager step costs tens of milliseconds whatever its token count)."""
    if sum(w.num_tokens for w in work) > max_rows:
        return None
    if any(w.num_tokens > DECODE_ROWS_MAX_TOKENS for w in work):
        return None
    rows: list[Row] = []
    owner: list[int] = []
    for i, w in enumerate(work):
        last = w.start + w.num_tokens - 1
        for p in range(w.start, last + 1):
            rows.append(Row(w.seq, p, w.sample and p == last))
            owner.append(i)
    return rows, owner
