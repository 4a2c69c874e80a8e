"""The KV-cache block allocator: hands out block ids, no torch.

A block is `block_size` token slots of K/V in every layer; the runner owns the tensors, this
pool only decides which sequence owns which block id. Allocation and freeing are O(1) per
block (a FIFO free list plus an ownership bitmap), never a scan of the pool.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class NoFreeBlocks(RuntimeError):
    """Raised by `BlockPool.allocate` when fewer blocks are free than asked for.

    Callers are expected to check `num_free` first, so this signals a caller bug or a race.
    """


class BlockPool:
    """Owns block ids `0..num_blocks-1`; each is either free or allocated to exactly one owner."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self._num_blocks = num_blocks
        # FIFO reuse spreads writes over the whole cache and makes use-after-free bugs show up
        # later rather than being masked by the same block coming straight back.
        self._free: deque[int] = deque(range(num_blocks))
        self._allocated = bytearray(num_blocks)  # 1 = allocated; catches double frees in O(1)

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self._num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks allocated, in [0, 1]."""
        return self.num_used / self._num_blocks

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks (all or nothing); raise `NoFreeBlocks` if fewer are free."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > len(self._free):
            raise NoFreeBlocks(f"asked for {n} KV blocks, only {len(self._free)} free")
        popleft = self._free.popleft
        out = [popleft() for _ in range(n)]
        for b in out:
            self._allocated[b] = 1
        return out

    def free(self, block_ids: Iterable[int]) -> None:
        """Return blocks to the pool. Freeing a block that is not allocated is a bug: assert."""
        for b in block_ids:
            assert 0 <= b < self._num_blocks, f"block id {b} out of range"
            assert self._allocated[b], f"block {b} freed twice or never allocated"
            self._allocated[b] = 0
            self._free.append(b)
