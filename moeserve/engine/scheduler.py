"""Continuous batching over a paged KV cache: token budget, chunked prefill, preemption. No torch.

Each engine step: `schedule()` picks which sequences run and which token range of each, and
allocates the KV blocks those tokens need; the engine runs the model and samples; `update()`
records the computed tokens and appends the sampled ones (as PENDING while they are still on
the device); `record()` fills each one in and decides, in this one place, whether its
sequence stops (stop token, EOS, max_tokens, the context length), finishing it then. Only
this class changes a sequence's scheduling state.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass, field

from moeserve.engine.block_pool import BlockPool
from moeserve.engine.kv_groups import KVGroups
from moeserve.engine.prefix_cache import PrefixCache
from moeserve.engine.sequence import PENDING, SeqStatus, Sequence


class RequestTooLarge(ValueError):
    """A request that could never run: longer than the context or than the whole KV cache."""


@dataclass(frozen=True)
class ScheduledSeq:
    """Run `seq.token_ids[start:start+num_tokens]` this step; sample a token when `sample`."""

    seq: Sequence
    start: int  # seq.num_computed_tokens when scheduled: position of the first token
    num_tokens: int
    sample: bool  # the step ends at the seq's last known token, so its next token is sampled


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)  # decodes first, then prefills
    preempted: list[Sequence] = field(default_factory=list)  # preempted during this schedule()
    num_batched_tokens: int = 0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    # Prefix cache, over first admissions: prompt tokens looked up and found cached.
    prefix_queries: int = 0
    prefix_hits: int = 0


@dataclass
class SchedulerStats:
    """Plain record for the metrics module."""

    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    kv_usage: float
    num_preemptions_total: int


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _priority_key(seq: Sequence) -> tuple[int, float, int]:
    """Order under the priority policy: lower priority value, then earlier arrival, first."""
    return seq.priority, seq.arrival_time, seq.seq_id


POLICIES = ("fcfs", "priority")


class Scheduler:
    """Continuous-batching scheduler, first come first served or by priority; owns the
    `BlockPool` (see `block_pool`)."""

    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_chunked_prefill: bool = True,
        admission_wait_steps: int = 0,
        kv_groups: KVGroups | None = None,
        enable_prefix_caching: bool = False,
        share_prompts: bool = False,
        policy: str = "fcfs",
    ) -> None:
        """admission_wait_steps > 0: while other sequences run, hold new requests back until
        max_num_seqs // 8 of them can start together or the oldest has waited that many steps
        (a step that admits a prompt beside decodes cannot replay a decode CUDA graph, so a
        trickle of arrivals would make most steps eager ones). kv_groups: with a sliding
        group, each sequence also holds `window_block_ids`, whose blocks are freed as the
        window moves past them (engine/kv_groups.py). enable_prefix_caching: full blocks stay
        cached by content and new sequences start from their longest cached prefix;
        share_prompts: the n sequences of a request compute their prompt once
        (engine/prefix_cache.py). policy "priority" (vLLM's): the waiting queue is ordered by
        (Sequence.priority, arrival), a lower value first; running sequences get their blocks
        in that order, and the one a shortage preempts is the last in it (under "fcfs": the
        newest admitted)."""
        sizes = {
            "num_blocks": num_blocks,
            "block_size": block_size,
            "max_num_seqs": max_num_seqs,
            "max_num_batched_tokens": max_num_batched_tokens,
            "max_model_len": max_model_len,
        }
        for name, value in sizes.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not enable_chunked_prefill and max_num_batched_tokens < max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_model_len "
                f"({max_model_len}) when chunked prefill is disabled, or a long prompt never runs"
            )
        if admission_wait_steps < 0:
            raise ValueError(f"admission_wait_steps must be >= 0, got {admission_wait_steps}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.by_priority = policy == "priority"
        if max_num_batched_tokens < max_num_seqs:
            # Otherwise a full batch of decodes would not fit in one step's budget.
            raise ValueError(
                f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_num_seqs "
                f"({max_num_seqs})"
            )
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill
        self.block_pool = BlockPool(num_blocks)
        self.kv_groups = kv_groups or KVGroups.single(1)
        self._groups = self.kv_groups.num_groups
        self.prefix = PrefixCache(
            self.block_pool, block_size, self.kv_groups, enable_prefix_caching, share_prompts
        )
        self._waiting: deque[Sequence] = deque()
        # Insertion order = admission order; a dict gives O(1) removal and newest-first scans.
        self._running: dict[int, Sequence] = {}
        self._seqs: dict[int, Sequence] = {}  # every unfinished sequence by seq_id
        self._by_request: dict[str, list[Sequence]] = {}
        self._num_preemptions_total = 0
        self.admission_wait_steps = admission_wait_steps
        self._admit_together = max(1, max_num_seqs // 8)
        self._num_schedules = 0
        self._queued_at: dict[int, int] = {}  # seq_id -> schedule() count when it queued

    # ---- requests in and out -------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a fresh WAITING seq; `RequestTooLarge`/`ValueError` if it could never run."""
        if seq.num_prompt_tokens == 0:
            raise ValueError(f"prompt of request {seq.request_id!r} is empty")
        if seq.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {seq.max_tokens}")
        if seq.seq_id in self._seqs:
            raise ValueError(f"seq_id {seq.seq_id} is already scheduled")
        if seq.status is not SeqStatus.WAITING or seq.block_ids or seq.num_computed_tokens:
            raise ValueError(f"seq {seq.seq_id} is not a fresh WAITING sequence")
        total = seq.num_prompt_tokens + seq.max_tokens
        if total > self.max_model_len:
            raise RequestTooLarge(
                f"this model's maximum context length is {self.max_model_len} tokens, but the "
                f"request needs {total} ({seq.num_prompt_tokens} in the prompt + "
                f"{seq.max_tokens} max_tokens)"
            )
        blocks = self.kv_groups.blocks_to_run(total, self.block_size)
        if blocks > self.block_pool.num_blocks:
            raise RequestTooLarge(
                f"prompt + max_tokens = {total} tokens needs {blocks} KV blocks of "
                f"{self.block_size} tokens, the cache has only {self.block_pool.num_blocks}"
            )
        self._seqs[seq.seq_id] = seq
        self._by_request.setdefault(seq.request_id, []).append(seq)
        if self.by_priority:
            bisect.insort(self._waiting, seq, key=_priority_key)
        else:
            self._waiting.append(seq)
        self._queued_at[seq.seq_id] = self._num_schedules

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark `seq` FINISHED and free its blocks now. A second call is a no-op."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is SeqStatus.RUNNING:
            del self._running[seq.seq_id]
        else:
            self._waiting.remove(seq)  # O(waiting), but only on aborts of queued requests
            self._queued_at.pop(seq.seq_id, None)
        self._release(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        del self._seqs[seq.seq_id]
        siblings = self._by_request[seq.request_id]
        siblings.remove(seq)
        if not siblings:
            del self._by_request[seq.request_id]

    def abort_request(self, request_id: str) -> list[Sequence]:
        """Finish every unfinished seq of `request_id` with reason "abort"; return them."""
        seqs = list(self._by_request.get(request_id, ()))
        for seq in seqs:
            self.finish(seq, "abort")
        return seqs

    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def get(self, seq_id: int) -> Sequence | None:
        """The unfinished sequence with this id, or None."""
        return self._seqs.get(seq_id)

    def running(self) -> list[Sequence]:
        """Running sequences, oldest-admitted first (a copy)."""
        return list(self._running.values())

    def waiting(self) -> list[Sequence]:
        """Waiting sequences in admission order (a copy)."""
        return list(self._waiting)

    def stats(self) -> SchedulerStats:
        pool = self.block_pool
        return SchedulerStats(
            num_running=len(self._running),
            num_waiting=len(self._waiting),
            kv_blocks_used=pool.num_used,
            kv_blocks_total=pool.num_blocks,
            kv_usage=pool.usage,
            num_preemptions_total=self._num_preemptions_total,
        )

    # ---- one step --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Pick this step's work: running decodes, then running prefills, then admissions."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        done: set[int] = set()  # seq_ids scheduled this step: never preempted, never twice
        # Under async scheduling a seq's last token may still be on the device when this runs:
        # one that reached max_tokens or max_model_len with it only awaits the engine's finish.
        running = [s for s in self._running.values() if not self._complete(s)]
        if self.by_priority:  # the first in priority order get their blocks first
            running.sort(key=_priority_key)
        decodes = [s for s in running if s.num_tokens - s.num_computed_tokens == 1]
        prefills = [s for s in running if s.num_tokens - s.num_computed_tokens > 1]
        assert len(decodes) + len(prefills) == len(running), "a running seq has nothing to run"

        for seq in decodes:
            if seq.status is not SeqStatus.RUNNING:  # preempted as a victim earlier this step
                continue
            # No budget check: max_num_batched_tokens >= max_num_seqs >= number of decodes.
            if not self._make_room(seq, 1, done, out):
                self._preempt(seq, out)  # nobody else to evict: it recomputes later
                continue
            self._emit(seq, 1, done, out)
            out.num_decode_tokens += 1
            budget -= 1

        for seq in prefills:
            if seq.status is not SeqStatus.RUNNING:
                continue
            if budget == 0:
                break
            remaining = seq.num_tokens - seq.num_computed_tokens
            chunk = min(remaining, budget)
            if not self.enable_chunked_prefill and chunk < remaining:
                continue
            need = 1 if self.enable_chunked_prefill else chunk
            if not self._make_room(seq, need, done, out):
                continue  # it keeps its blocks and simply waits for a later step
            chunk = min(chunk, self._capacity(seq))
            self._emit(seq, chunk, done, out)
            out.num_prefill_tokens += chunk
            budget -= chunk

        # Admissions never preempt, and a step that had to preempt is short of blocks: admitting
        # now would only be evicted again (and could readmit a seq preempted this very step).
        self._num_schedules += 1
        admit = not out.preempted and bool(self._waiting) and self._admit_now(out)
        i = 0  # strict FCFS: if a seq can't go, nobody behind it does (deferred ones aside)
        while admit and i < len(self._waiting) and budget > 0:
            if len(self._running) >= self.max_num_seqs:
                break
            seq = self._waiting[i]
            if self.prefix.defer(seq, self._by_request[seq.request_id]):
                i += 1  # a sibling still computing the prompt this one will share
                continue
            hit = self.prefix.hit(seq, self._by_request[seq.request_id])
            start = hit.num_blocks * self.block_size
            todo = seq.num_tokens - start  # a preempted seq recomputes prompt + outputs
            chunk = min(todo, budget)
            new = self._groups * (_cdiv(start + chunk, self.block_size) - hit.num_blocks)
            if (not self.enable_chunked_prefill and chunk < todo) or (
                new + hit.cost > self.block_pool.num_free
            ):
                break
            del self._waiting[i]
            self._queued_at.pop(seq.seq_id, None)
            seq.status = SeqStatus.RUNNING
            self._running[seq.seq_id] = seq
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            queries, hits = self.prefix.start(seq, hit)
            out.prefix_queries += queries
            out.prefix_hits += hits
            self._emit(seq, chunk, done, out)
            out.num_prefill_tokens += chunk
            budget -= chunk

        out.num_batched_tokens = self.max_num_batched_tokens - budget
        return out

    def update(self, out: SchedulerOutput, sampled: dict[int, int]) -> None:
        """Record that `out` ran: advance computed tokens, append sampled tokens (seq_id -> id).

        Call once per `schedule()`, before finishing anything sampled this step. Sequences
        finished since `schedule()` (e.g. aborted) are skipped. Every still-RUNNING entry with
        `sample=True` must have a token in `sampled`.
        """
        for s in out.scheduled:
            seq = s.seq
            if seq.status is not SeqStatus.RUNNING:
                continue
            assert seq.num_computed_tokens == s.start, f"seq {seq.seq_id} updated twice"
            seq.num_computed_tokens += s.num_tokens
            self.prefix.register(seq)  # before the window releases any of its blocks
            if self._groups > 1:
                self._slide_window(seq)
            if s.sample:
                tok = sampled.get(seq.seq_id)
                assert tok is not None, f"no sampled token for seq {seq.seq_id}"
                seq.append_token(tok)
                if seq.first_token_time is None:
                    seq.first_token_time = time.monotonic()

    def record(
        self, seq: Sequence, index: int, token: int, eos_token_ids: frozenset[int]
    ) -> tuple[str | None, int | None]:
        """Fill in output `index` of `seq` (appended by update()) with its sampled token and
        decide whether the sequence stops there: ("stop", token) at a stop token or EOS
        (unless ignore_eos), ("length", None) at max_tokens or the context length, else
        (None, None). A stopped sequence is finished (its blocks freed) now."""
        if seq.output_ids[index] == PENDING:
            seq.set_output(index, token)
        params = seq.params
        reason: str | None = None
        stop_token: int | None = None
        if token in params.stop_token_ids or (token in eos_token_ids and not params.ignore_eos):
            reason, stop_token = "stop", token
        elif index + 1 >= seq.max_tokens or seq.num_prompt_tokens + index + 1 >= self.max_model_len:
            reason = "length"
        if reason is not None:
            self.finish(seq, reason)
        return reason, stop_token

    def _admit_now(self, out: SchedulerOutput) -> bool:
        """Whether this step may start waiting requests (see admission_wait_steps); once one
        starts, the step has a prefill and the rest may follow."""
        if not self.admission_wait_steps or not out.scheduled:
            return True  # nothing else runs this step: waiting gains nothing
        if any(s.num_tokens != 1 for s in out.scheduled):
            return True  # a prefill runs anyway: the step is eager already
        head = self._waiting[0]
        if self.prefix.joins_running(self._by_request[head.request_id]):
            return True  # a sibling joining its running request: the request started already
        if self._num_schedules - self._queued_at.get(head.seq_id, 0) > self.admission_wait_steps:
            return True
        free = self.max_num_seqs - len(self._running)
        return min(free, len(self._waiting)) >= self._admit_together

    def _complete(self, seq: Sequence) -> bool:
        return seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len

    def _capacity(self, seq: Sequence) -> int:
        """Tokens `seq` could add now using its own blocks' slack plus every free block (each
        new block of positions takes one block in every KV group)."""
        blocks = len(seq.block_ids) + self.block_pool.num_free // self._groups
        return blocks * self.block_size - seq.num_computed_tokens

    def _make_room(self, seq: Sequence, n: int, done: set[int], out: SchedulerOutput) -> bool:
        """Preempt newest-admitted unscheduled others until `seq` can add `n` tokens (by
        priority: the last in priority order, which may be `seq` itself: then False)."""
        while self._capacity(seq) < n:
            if self.by_priority:
                candidates = (v for v in self._running.values() if v.seq_id not in done)
                victim = max(candidates, key=_priority_key, default=None)
                if victim is seq:
                    return False
            else:
                victim = next(
                    (
                        v
                        for v in reversed(self._running.values())
                        if v is not seq and v.seq_id not in done
                    ),
                    None,
                )
            if victim is None:
                return False
            self._preempt(victim, out)
        return True

    def _emit(self, seq: Sequence, n: int, done: set[int], out: SchedulerOutput) -> None:
        start = seq.num_computed_tokens
        extra = _cdiv(start + n, self.block_size) - len(seq.block_ids)
        if extra > 0:
            seq.block_ids.extend(self.block_pool.allocate(extra))
            if self._groups > 1:
                seq.window_block_ids.extend(self.block_pool.allocate(extra))
        done.add(seq.seq_id)
        out.scheduled.append(ScheduledSeq(seq, start, n, start + n == seq.num_tokens))

    def _release(self, seq: Sequence) -> None:
        self.prefix.register(seq)  # tokens known since its last update
        # Tail blocks first: they are evicted first (a chain's head serves more prompts).
        # A new list, not clear(): a runner still holding the old list keeps a consistent view.
        self.block_pool.free(reversed(seq.block_ids))
        seq.block_ids = []
        seq.num_registered_blocks = 0
        if self._groups > 1:
            self.block_pool.free(reversed(seq.window_block_ids[seq.window_released :]))
            seq.window_block_ids = []
            seq.window_released = 0

    def _slide_window(self, seq: Sequence) -> None:
        """Free the sliding group's blocks that no later step of `seq` reads. A step still
        queued on the device may read them, but whatever is written there next is queued
        after it on the same stream."""
        live = self.kv_groups.first_live_block(seq.num_computed_tokens, self.block_size)
        live = min(live, self.prefix.window_hold(seq, self._by_request[seq.request_id], live))
        if live > seq.window_released:
            ids = seq.window_block_ids
            self.block_pool.free(ids[seq.window_released : live])
            ids[seq.window_released : live] = [0] * (live - seq.window_released)
            seq.window_released = live

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Recompute preemption: drop its KV, keep its outputs, requeue it at the front."""
        del self._running[seq.seq_id]
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self._num_preemptions_total += 1
        out.preempted.append(seq)
        self._queued_at[seq.seq_id] = -self.admission_wait_steps - 1  # back as soon as it fits
        if self.by_priority:  # its place by priority, ahead of later arrivals of its level
            bisect.insort(self._waiting, seq, key=_priority_key)
            return
        # The front of the queue holds the preempted seqs in arrival order; insert among them.
        key = (seq.arrival_time, seq.seq_id)
        i = 0
        for w in self._waiting:
            if w.num_preemptions == 0 or (w.arrival_time, w.seq_id) > key:
                break
            i += 1
        self._waiting.insert(i, seq)
