"""One generated sequence: its tokens, its place in the KV cache and its scheduling state.

Plain Python, no torch. Only the scheduler changes `status`, `num_computed_tokens`, `block_ids`
and `num_preemptions`; the engine reads them and appends nothing itself (it hands sampled tokens
to `Scheduler.update`).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

# The token of a sequence whose sampling is still running on the device (async scheduling):
# the next step reads it from the device, and the engine fills it in when the step resolves.
PENDING = -1


class SeqStatus(enum.Enum):
    """Lifecycle: WAITING -> RUNNING (-> WAITING again when preempted) -> FINISHED."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A prompt plus the tokens generated for it so far.

    `eq=False` keeps identity semantics (and hashability): two sequences with equal fields are
    still two requests. `token_ids` is prompt + outputs; positions `[0, num_computed_tokens)`
    have their K/V in the cache blocks `block_ids` (block i holds positions
    `[i*block_size, (i+1)*block_size)`).
    """

    seq_id: int
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    params: Any = None
    arrival_time: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    # The sliding-window layers' own block table when the KV cache keeps them apart
    # (engine/kv_groups.py): as block_ids, but its first `window_released` entries went back to
    # the pool as the window moved past them (they hold 0, a block id nobody reads there).
    window_block_ids: list[int] = field(default_factory=list)
    window_released: int = 0
    finish_reason: str | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    # Prefix caching (engine/prefix_cache.py): the chained hash of each full block of known
    # tokens (a pure function of the tokens, kept across preemption), how many of the blocks
    # held now were offered to the cache, and the tokens the first admission found cached.
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0
    num_cached_tokens: int | None = None
    cache_salt: str | None = None  # the hashes' salt (EngineRequest.cache_salt)
    priority: int = 0  # under the priority policy: lower runs first (EngineRequest.priority)
    # prompt + outputs kept as one list so `token_ids` is O(1) per access and
    # `append_token` O(1) per step, instead of a concatenation every time.
    _all_ids: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.prompt_ids = list(self.prompt_ids)
        self.output_ids = list(self.output_ids)
        self._all_ids = self.prompt_ids + self.output_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens."""
        return len(self._all_ids)

    @property
    def token_ids(self) -> list[int]:
        """Prompt + outputs as one list. Read-only view: do not mutate it."""
        return self._all_ids

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        """Append one generated token, or PENDING (called by the scheduler's `update`)."""
        self.output_ids.append(token_id)
        self._all_ids.append(token_id)

    def set_output(self, index: int, token_id: int) -> None:
        """Fill in output `index`, appended as PENDING when its step was launched."""
        assert self.output_ids[index] == PENDING, f"output {index} of seq {self.seq_id} is known"
        self.output_ids[index] = token_id
        self._all_ids[self.num_prompt_tokens + index] = token_id
