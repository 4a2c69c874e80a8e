"""The plain records under the scheduler: BlockPool accounting and Sequence token lists."""

from __future__ import annotations

import random

import pytest

from moeserve.engine.block_pool import BlockPool, NoFreeBlocks
from moeserve.engine.sequence import SeqStatus, Sequence


def test_allocate_and_free_account_exactly() -> None:
    pool = BlockPool(8)
    assert (pool.num_blocks, pool.num_free, pool.num_used, pool.usage) == (8, 8, 0, 0.0)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert len(a) == 3 and len(b) == 5
    assert sorted(a + b) == list(range(8))
    assert (pool.num_free, pool.num_used, pool.usage) == (0, 8, 1.0)
    pool.free(a)
    assert (pool.num_free, pool.num_used) == (3, 5)
    assert pool.usage == pytest.approx(5 / 8)
    assert pool.allocate(0) == []


def test_allocate_too_many_raises_and_changes_nothing() -> None:
    pool = BlockPool(4)
    pool.allocate(3)
    with pytest.raises(NoFreeBlocks, match="asked for 2"):
        pool.allocate(2)
    assert pool.num_free == 1
    assert isinstance(NoFreeBlocks("x"), RuntimeError)


def test_double_free_and_foreign_ids_are_assertions() -> None:
    pool = BlockPool(4)
    ids = pool.allocate(2)
    pool.free(ids)
    with pytest.raises(AssertionError, match="freed twice"):
        pool.free(ids[:1])
    with pytest.raises(AssertionError, match="out of range"):
        pool.free([4])
    with pytest.raises(AssertionError):
        pool.free([-1])
    assert pool.num_free == 4


def test_invalid_sizes() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0)
    with pytest.raises(ValueError):
        BlockPool(2).allocate(-1)


def test_random_churn_never_hands_out_a_block_twice() -> None:
    rng = random.Random(1234)
    pool = BlockPool(64)
    owned: list[list[int]] = []
    for _ in range(2000):
        if owned and (rng.random() < 0.45 or pool.num_free == 0):
            pool.free(owned.pop(rng.randrange(len(owned))))
        else:
            n = rng.randint(1, max(1, min(6, pool.num_free)))
            if n <= pool.num_free:
                owned.append(pool.allocate(n))
        flat = [b for ids in owned for b in ids]
        assert len(flat) == len(set(flat)) == pool.num_used
    for ids in owned:
        pool.free(ids)
    assert pool.num_free == 64


def test_sequence_tokens() -> None:
    s = Sequence(1, "r", [5, 6, 7], max_tokens=4)
    assert (s.num_prompt_tokens, s.num_output_tokens, s.num_tokens) == (3, 0, 3)
    s.append_token(9)
    s.append_token(10)
    assert s.token_ids == [5, 6, 7, 9, 10] and s.output_ids == [9, 10] and s.num_tokens == 5
    assert s.prompt_ids == [5, 6, 7] and not s.is_finished and s.status is SeqStatus.WAITING
