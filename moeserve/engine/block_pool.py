"""The KV-cache block allocator: hands out block ids, counts references, keeps freed full
blocks cached by content hash. No torch.

A block is `block_size` token slots of K/V in every layer; the runner owns the tensors, this
pool only decides which sequences reference which block id. A block is free (never hashed, or
evicted), cached (ref count 0 but still hashed: a later prompt with the same prefix reuses its
K/V), or in use (ref count > 0; several sequences may share a hashed block). Allocation takes
never-hashed free blocks first, then evicts cached ones least-recently-used; every operation
is O(1) per block (a FIFO deque, an OrderedDict, arrays), never a scan of the pool.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable


class NoFreeBlocks(RuntimeError):
    """Raised by `BlockPool.allocate` when fewer blocks are free than asked for.

    Callers are expected to check `num_free` first, so this signals a caller bug or a race.
    """


class BlockPool:
    """Owns block ids `0..num_blocks-1` with their reference counts and content hashes."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self._num_blocks = num_blocks
        # FIFO reuse spreads writes over the whole cache and makes use-after-free bugs show up
        # later rather than being masked by the same block coming straight back.
        self._free: deque[int] = deque(range(num_blocks))
        # Ref-count-0 blocks that still hold hashed K/V, least recently freed first.
        self._cached: OrderedDict[int, None] = OrderedDict()
        self._ref = [0] * num_blocks
        self._hash: list[Hashable | None] = [None] * num_blocks
        self._by_hash: dict[Hashable, int] = {}

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free(self) -> int:
        """Blocks `allocate` can hand out: never-hashed free ones plus evictable cached ones."""
        return len(self._free) + len(self._cached)

    @property
    def num_used(self) -> int:
        return self._num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks with a content hash (in use or not)."""
        return len(self._by_hash)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by a sequence, in [0, 1]."""
        return self.num_used / self._num_blocks

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def hash_of(self, block: int) -> Hashable | None:
        return self._hash[block]

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks (all or nothing), evicting cached ones LRU when the never-hashed
        ones run out; raise `NoFreeBlocks` if fewer are free."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > self.num_free:
            raise NoFreeBlocks(f"asked for {n} KV blocks, only {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._cached.popitem(last=False)
                del self._by_hash[self._hash[b]]
                self._hash[b] = None
            self._ref[b] = 1
            out.append(b)
        return out

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference to each block; one that reaches 0 is cached if hashed, else free.
        Order matters for eviction: the blocks given first are evicted first. Freeing a block
        nobody references is a bug: assert."""
        for b in block_ids:
            assert 0 <= b < self._num_blocks, f"block id {b} out of range"
            assert self._ref[b] > 0, f"block {b} freed twice or never allocated"
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if self._hash[b] is not None:
                    self._cached[b] = None
                else:
                    self._free.append(b)

    def lookup(self, key: Hashable) -> int | None:
        """The block holding the K/V of `key`, in use or cached, or None."""
        return self._by_hash.get(key)

    def touch(self, block_ids: Iterable[int]) -> None:
        """Add a reference to each block (a cache hit or a shared block); a cached one leaves
        the eviction order."""
        for b in block_ids:
            if self._ref[b] == 0:
                assert self._hash[b] is not None, f"block {b} is free, not cached"
                del self._cached[b]
            self._ref[b] += 1

    def register(self, block: int, key: Hashable) -> bool:
        """Record that `block` (in use, full, its K/V written or queued) holds `key`'s K/V.
        False when it already has a hash or another block holds `key` (both then stay)."""
        assert self._ref[block] > 0, f"block {block} is not in use"
        if self._hash[block] is not None or key in self._by_hash:
            return False
        self._hash[block] = key
        self._by_hash[key] = block
        return True
