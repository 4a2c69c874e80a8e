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
