"""Prefix caching (engine/prefix_cache.py, block_pool.py) and n>1 prompt sharing.

The scheduler tests drive it with a fake model that "writes" into each KV slot the identity of
the tokens up to that position; every step checks that what a sequence reads from its blocks
(all earlier positions in the full group, the window's in the sliding group) is its own
prefix's, and that every block's reference count is exactly the number of tables holding it.
The engine and the server with it: tests/test_prefix_cache_engine.py.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pytest

from moeserve.engine.block_pool import BlockPool, NoFreeBlocks
from moeserve.engine.kv_groups import KVGroups
from moeserve.engine.prefix_cache import block_hash, extend_hashes
from moeserve.engine.scheduler import Scheduler, SchedulerOutput
from moeserve.engine.sequence import PENDING, SeqStatus, Sequence

BS = 4
_ids = itertools.count()


# ---- hashes and the pool ---------------------------------------------------------------------
def test_block_hash_chains_over_the_whole_prefix() -> None:
    a, b = block_hash(b"", [1, 2, 3, 4]), block_hash(b"", [1, 2, 3, 5])
    assert a != b and a == block_hash(b"", [1, 2, 3, 4]) and len(a) == 16
    assert block_hash(a, [9, 9, 9, 9]) != block_hash(b, [9, 9, 9, 9])  # same block, other parent
    s = Sequence(0, "r", list(range(10)), 4)
    assert extend_hashes(s, 5, BS) == 2  # only full blocks
    t = Sequence(1, "t", list(range(8)) + [77], 4)
    assert extend_hashes(t, 2, BS) == 2 and t.block_hashes == s.block_hashes
    u = Sequence(2, "u", list(range(7)), 4)
    u.append_token(PENDING)  # a token still on the device: its block is not hashed yet
    assert extend_hashes(u, 2, BS) == 1
    u.set_output(0, 7)
    assert extend_hashes(u, 2, BS) == 2 and u.block_hashes == s.block_hashes


def test_pool_refcounts_cache_and_lru_eviction() -> None:
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert pool.register(a[0], "x") and pool.register(a[1], "y")
    assert not pool.register(a[2], "x")  # another block holds x: the first one stays
    assert not pool.register(a[0], "z")  # a block's hash never changes
    pool.touch([a[0]])  # shared by a second sequence
    pool.free(reversed(a))  # tail first: a[1] (y) becomes the least recently used cached one
    assert (pool.ref_count(a[0]), pool.num_free, pool.num_used, pool.num_cached) == (1, 3, 1, 2)
    assert pool.lookup("x") == a[0] and pool.lookup("y") == a[1]
    pool.free([a[0]])
    assert pool.num_free == 4 and pool.usage == 0.0
    # Never-hashed blocks go first, then cached ones least recently used first.
    first = pool.allocate(2)
    assert set(first) == {a[2], 3} and pool.num_cached == 2
    assert pool.allocate(1) == [a[1]] and pool.lookup("y") is None and pool.lookup("x") == a[0]
    pool.touch([a[0]])  # a hit takes a cached block out of the eviction order
    assert pool.num_free == 0 and pool.ref_count(a[0]) == 1
    with pytest.raises(NoFreeBlocks):
        pool.allocate(1)
    with pytest.raises(AssertionError, match="freed twice"):
        pool.free([a[1], a[1]])


# ---- the scheduler with a fake model ---------------------------------------------------------
@dataclass
class FakeModel:
    """What each KV slot holds: the prefix (as a tuple) whose last token was written there."""

    sched: Scheduler
    kv: dict[int, dict[int, tuple[int, ...]]]
    prefill_tokens: int = 0
    preempted: int = 0
    hits: int = 0

    @classmethod
    def of(cls, sched: Scheduler) -> FakeModel:
        return cls(sched, {})

    def run(self, out: SchedulerOutput) -> None:
        window = self.sched.kv_groups.window
        for x in out.scheduled:
            seq, ids = x.seq, x.seq.token_ids
            tables = [(seq.block_ids, 0)]
            if window is not None:
                tables.append((seq.window_block_ids, max(0, x.start - window + 1)))
            for table, lo in tables:
                for p in range(lo, x.start):  # everything this step reads is this prefix's
                    got = self.kv.get(table[p // BS], {}).get(p % BS)
                    assert got == tuple(ids[: p + 1]), (seq.seq_id, p)
                for p in range(x.start, x.start + x.num_tokens):
                    self.kv.setdefault(table[p // BS], {})[p % BS] = tuple(ids[: p + 1])
        self.prefill_tokens += out.num_prefill_tokens
        self.preempted += len(out.preempted)
        self.hits += out.prefix_hits


def check_refcounts(sched: Scheduler) -> None:
    held: dict[int, int] = {}
    for s in sched.running() + sched.waiting():
        for b in s.block_ids + s.window_block_ids[s.window_released :]:
            held[b] = held.get(b, 0) + 1
    pool = sched.block_pool
    for b in range(pool.num_blocks):
        assert pool.ref_count(b) == held.get(b, 0), b
    assert pool.num_used == len(held)


def drive(sched: Scheduler, model: FakeModel, steps: int = 5000, abort_at: dict | None = None):
    n = 0
    while sched.has_unfinished():
        n += 1
        assert n < steps, "no progress"
        out = sched.schedule()
        check_refcounts(sched)
        model.run(out)
        sched.update(out, {x.seq.seq_id: 5 + n % 7 for x in out.scheduled if x.sample})
        for x in out.scheduled:
            s = x.seq
            if s.status is SeqStatus.RUNNING and s.num_output_tokens >= s.max_tokens:
                sched.finish(s, "length")
        for rid in (abort_at or {}).get(n, ()):
            sched.abort_request(rid)
        check_refcounts(sched)
    pool = sched.block_pool
    assert pool.num_used == 0 and all(pool.ref_count(b) == 0 for b in range(pool.num_blocks))


def make(groups: KVGroups | None = None, caching: bool = True, **kw: object) -> Scheduler:
    args: dict = dict(
        num_blocks=64,
        block_size=BS,
        max_num_seqs=8,
        max_num_batched_tokens=32,
        max_model_len=128,
        kv_groups=groups,
        enable_prefix_caching=caching,
        share_prompts=True,
    )
    args.update(kw)
    return Scheduler(**args)


def seq(prompt: list[int], max_tokens: int = 3, rid: str | None = None, params=None) -> Sequence:
    sid = next(_ids)
    return Sequence(sid, rid or f"r{sid}", prompt, max_tokens, params, arrival_time=float(sid))


def test_second_prompt_reuses_the_first_ones_blocks() -> None:
    sched = make()
    model = FakeModel.of(sched)
    base = list(range(100, 118))  # 18 tokens: 4 full blocks
    sched.add(a := seq(base + [1, 2]))
    drive(sched, model)
    assert a.num_cached_tokens == 0 and sched.block_pool.num_cached == 5  # 20 tokens + output
    sched.add(b := seq(base + [3]))
    out = sched.schedule()
    assert b.num_cached_tokens == 16 and out.num_prefill_tokens == 3
    assert (out.prefix_queries, out.prefix_hits) == (19, 16)
    pool = sched.block_pool
    assert b.block_ids[:4] == [pool.lookup((0, h)) for h in a.block_hashes[:4]]
    model.run(out)
    sched.update(out, {b.seq_id: 9})
    drive(sched, model)
    # A prompt wholly cached still computes its last token (block-aligned: the last block).
    sched.add(c := seq(base[:16]))
    out = sched.schedule()
    assert c.num_cached_tokens == 12 and out.num_prefill_tokens == 4
    model.run(out)
    sched.update(out, {c.seq_id: 9})
    drive(sched, model)


def test_a_salt_shares_blocks_only_with_its_own_salt() -> None:
    """cache_salt: the chain's root, so a prompt cached under one salt (or none) is a miss
    under another, and a hit under the same."""
    sched = make()
    model = FakeModel.of(sched)
    base = list(range(200, 218))  # 4 full blocks

    def run(salt: str | None) -> int:
        sched.add(s := seq(base + [1]))
        s.cache_salt = salt
        drive(sched, model)
        assert s.num_cached_tokens is not None
        return s.num_cached_tokens

    assert run("tenant-a") == 0
    assert run("tenant-b") == 0 and run(None) == 0
    assert run("tenant-a") == 16 and run("tenant-b") == 16 and run(None) == 16


def test_prompt_logprobs_sequences_compute_everything() -> None:
    @dataclass
    class Params:
        prompt_logprobs: int | None = 0

    sched = make()
    model = FakeModel.of(sched)
    base = list(range(50, 70))
    sched.add(seq(base))
    drive(sched, model)
    sched.add(p := seq(base, params=Params()))
    out = sched.schedule()
    assert p.num_cached_tokens == 0 and out.num_prefill_tokens == 20
    assert (out.prefix_queries, out.prefix_hits) == (0, 0)
    model.run(out)
    sched.update(out, {p.seq_id: 1})
    drive(sched, model)


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("window", [None, 6])
def test_n_siblings_compute_the_prompt_once(caching: bool, window: int | None) -> None:
    groups = KVGroups(window, (0, 0), 1) if window else None
    sched = make(groups, caching, max_num_batched_tokens=12)
    model = FakeModel.of(sched)
    prompt = list(range(200, 222))  # 22 tokens: 5 full blocks, chunked over two steps
    sibs = [seq(prompt, 4, "req") for _ in range(3)]
    for s in sibs:
        sched.add(s)
    drive(sched, model)
    # The first computes 22; each sibling only what follows the 20 shared tokens.
    assert model.prefill_tokens == 22 + 2 * 2
    assert [s.num_cached_tokens for s in sibs] == [0, 20, 20]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("window", [None, 5, 9])
def test_soak_shared_prefixes_preemption_and_aborts(seed: int, window: int | None) -> None:
    """Random prompts from a few shared stems, n>1 requests, a pool too small for them all,
    aborts (some mid-prefill): every read sees its own prefix, ref counts stay exact, and
    afterwards every block is free or cached with ref count 0."""
    rng = random.Random(seed)
    groups = KVGroups(window, (0, 0), 1) if window else None
    sched = make(groups, num_blocks=22, max_num_batched_tokens=10, max_num_seqs=6)
    model = FakeModel.of(sched)
    stems = [[rng.randrange(1000) for _ in range(rng.randrange(4, 30))] for _ in range(3)]
    rids = []
    for r in range(14):
        prompt = rng.choice(stems)[: rng.randrange(1, 30)] + [rng.randrange(1000)]
        rid = f"s{seed}-{r}"
        rids.append(rid)
        for _ in range(rng.choice((1, 1, 2, 3))):
            sched.add(seq(prompt, rng.randrange(1, 20), rid))
    aborts = {rng.randrange(1, 20): [rng.choice(rids)] for _ in range(3)}
    drive(sched, model, abort_at=aborts)
    assert sched.block_pool.num_cached > 0 and model.hits > 0 and model.preempted > 0
