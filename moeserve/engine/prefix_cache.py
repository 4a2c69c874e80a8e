"""Automatic prefix caching: full KV blocks found again by a hash of everything before them.

Block j of a sequence is identified by a hash chained over block j-1's hash and block j's
token ids, so equal hashes mean equal tokens from position 0 on, hence equal K/V (the key adds
the KV group: a block id holds one group's K/V). The pool (block_pool.py) keeps a freed
hashed block cached until it must be evicted (LRU); a new sequence takes every cached block of
its longest cached prefix and computes the rest, always at least its last token (whose logits
it samples from), so a shared block is never written again.

With a sliding-window group (kv_groups.py) a hit of k blocks needs the full group's blocks
0..k-1 and the sliding group's blocks that the first computed query still sees (from
`first_live_block(k * block_size)` on); the ones before it are released at once.

The n sequences of a request share their prompt the same way: siblings wait until one of them
has computed the prompt's full blocks, then take those blocks from it (`donors`) and compute
only the last, partial block themselves (at most block_size tokens) — with prefix caching off
too. No torch.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field

from moeserve.engine.block_pool import BlockPool
from moeserve.engine.kv_groups import KVGroups
from moeserve.engine.sequence import PENDING, SeqStatus, Sequence

_ROOT = b"moeserve-prefix-cache-v1"
FULL, SLIDING = 0, 1  # the KV group in a block's key


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """The chained hash of one full block (128 bits: collisions are not a practical risk)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


def chain_root(salt: str | None) -> bytes:
    """The parent of a sequence's first block: a salt (EngineRequest.cache_salt) changes every
    hash of the chain, so only sequences of the same salt share blocks."""
    if salt is None:
        return _ROOT
    return hashlib.blake2b(_ROOT + salt.encode(), digest_size=16).digest()


def extend_hashes(seq: Sequence, num_blocks: int, block_size: int) -> int:
    """Hash `seq`'s full blocks up to `num_blocks` (stopping at a token still on the device);
    returns how many of the first `num_blocks` are hashed."""
    hashes, ids, bs = seq.block_hashes, seq.token_ids, block_size
    parent = hashes[-1] if hashes else chain_root(seq.cache_salt)
    for j in range(len(hashes), min(num_blocks, seq.num_tokens // bs)):
        tokens = ids[j * bs : (j + 1) * bs]
        if PENDING in tokens:
            break
        parent = block_hash(parent, tokens)
        hashes.append(parent)
    return min(num_blocks, len(hashes))


def takes_hits(seq: Sequence) -> bool:
    """Prompt log-probs need every prompt position's logits: such a sequence computes all."""
    return getattr(seq.params, "prompt_logprobs", None) is None


@dataclass(frozen=True)
class Hit:
    """Blocks a sequence can start from: `full` (blocks 0..k-1) and, with a sliding group,
    `window` (its blocks `live`..k-1). `cost`: how many of them are cached, not in use (taking
    them takes them from the pool's free count)."""

    full: list[int] = field(default_factory=list)
    window: list[int] = field(default_factory=list)
    live: int = 0
    cost: int = 0

    @property
    def num_blocks(self) -> int:
        return len(self.full)


NO_HIT = Hit()


class PrefixCache:
    """Finds, takes and registers a sequence's cached blocks in one `BlockPool`."""

    def __init__(
        self, pool: BlockPool, block_size: int, groups: KVGroups, enabled: bool, share: bool
    ) -> None:
        """enabled: prefix caching; share: siblings (the n sequences of one request) take the
        prompt blocks one of them computed, caching or not."""
        self.pool, self.block_size, self.groups = pool, block_size, groups
        self.enabled, self.share = enabled, share
        self.windowed = groups.window is not None

    # ---- the scheduler's questions ------------------------------------------------------------
    def hit(self, seq: Sequence, siblings: list[Sequence]) -> Hit:
        """The cached blocks, or a running sibling's prompt blocks, `seq` can start from."""
        if not takes_hits(seq):
            return NO_HIT
        donors = []
        if self.share:
            donors = [s for s in siblings if s is not seq and s.status is SeqStatus.RUNNING]
        if not donors and not self.enabled:
            return NO_HIT
        return self.find(seq, donors)

    def start(self, seq: Sequence, hit: Hit) -> tuple[int, int]:
        """Take `hit` for `seq`; returns the (queries, hits) its first start adds to the
        counters (prompt tokens looked up and found)."""
        self.take(seq, hit)
        if seq.num_cached_tokens is not None:  # a preempted seq's restart: counted already
            return 0, 0
        seq.num_cached_tokens = hit.num_blocks * self.block_size
        if not self.enabled or not takes_hits(seq):
            return 0, 0
        return seq.num_tokens, seq.num_cached_tokens

    def defer(self, seq: Sequence, siblings: list[Sequence]) -> bool:
        """Whether a fresh `seq` should wait for a running sibling still computing the prompt
        blocks it would share (admitting it now would compute them twice)."""
        if not self.share or seq.num_preemptions or not takes_hits(seq):
            return False
        shared = (seq.num_prompt_tokens - 1) // self.block_size * self.block_size
        return shared > 0 and any(
            s is not seq and s.status is SeqStatus.RUNNING and s.num_computed_tokens < shared
            for s in siblings
        )

    def joins_running(self, siblings: list[Sequence]) -> bool:
        """Whether these siblings' request already runs (a waiting one need not wait to start
        together with other requests)."""
        return self.share and any(s.status is SeqStatus.RUNNING for s in siblings)

    def window_hold(self, seq: Sequence, siblings: list[Sequence], live: int) -> int:
        """The first sliding-group block `seq` may release (`live` by its window) while a fresh
        sibling waits to share its prompt: the sibling starts at the prompt's last full block
        and reads the window before it, which nobody else keeps without prefix caching."""
        if not self.share or not any(
            s is not seq and s.status is SeqStatus.WAITING and not s.num_preemptions
            for s in siblings
        ):
            return live
        shared = (seq.num_prompt_tokens - 1) // self.block_size * self.block_size
        return min(live, self.groups.first_live_block(shared, self.block_size))

    # ---- blocks -----------------------------------------------------------------------------

    def find(self, seq: Sequence, donors: list[Sequence]) -> Hit:
        """The longest prefix of `seq` whose blocks are cached, or held by a donor (a running
        sibling with the same prompt) that has computed them."""
        bs, pool = self.block_size, self.pool
        limit = (seq.num_tokens - 1) // bs  # the last token is always computed
        hashed = extend_hashes(seq, limit, bs) if self.enabled else 0
        shared = seq.num_prompt_tokens // bs  # donors hold the same tokens up to here
        full: list[int] = []
        window: list[int | None] = []
        for j in range(limit):
            b = w = None
            if j < hashed:
                b = pool.lookup((FULL, seq.block_hashes[j]))
                w = pool.lookup((SLIDING, seq.block_hashes[j])) if self.windowed else None
            for d in donors if j < shared else ():
                if (j + 1) * bs > d.num_computed_tokens:
                    continue
                b = d.block_ids[j] if b is None else b
                if self.windowed and w is None and j >= d.window_released:
                    w = d.window_block_ids[j]
            if b is None:
                break
            full.append(b)
            window.append(w)
        k, live = len(full), 0
        if self.windowed:
            k, live = self._window_fit(window)
        held = full[:k] + [w for w in window[live:k] if w is not None]
        cost = sum(1 for b in held if pool.ref_count(b) == 0)
        return Hit(full[:k], [w for w in window[live:k] if w is not None], live, cost)

    def _window_fit(self, window: list[int | None]) -> tuple[int, int]:
        """The most blocks k whose sliding-group blocks live(k)..k-1 are all present."""
        runs, run = [], 0
        for w in window:
            run = run + 1 if w is not None else 0
            runs.append(run)
        for k in range(len(window), 0, -1):
            live = self.groups.first_live_block(k * self.block_size, self.block_size)
            if runs[k - 1] >= k - live:
                return k, live
        return 0, 0

    def take(self, seq: Sequence, hit: Hit) -> None:
        """Start `seq` (holding no blocks) from `hit`: its blocks referenced, its tokens
        computed."""
        assert not seq.block_ids and not seq.num_computed_tokens
        self.pool.touch(hit.full)
        self.pool.touch(hit.window)
        seq.block_ids = list(hit.full)
        if self.windowed:
            seq.window_block_ids = [0] * hit.live + list(hit.window)
            seq.window_released = hit.live
        seq.num_computed_tokens = hit.num_blocks * self.block_size
        seq.num_registered_blocks = hit.num_blocks

    def register(self, seq: Sequence) -> None:
        """Offer `seq`'s computed full blocks to the cache (call after its computed count
        grows, before the window releases blocks, and before its blocks are freed)."""
        if not self.enabled:
            return
        n = extend_hashes(seq, seq.num_computed_tokens // self.block_size, self.block_size)
        for j in range(seq.num_registered_blocks, n):
            key = seq.block_hashes[j]
            self.pool.register(seq.block_ids[j], (FULL, key))
            if self.windowed and j >= seq.window_released:
                self.pool.register(seq.window_block_ids[j], (SLIDING, key))
        seq.num_registered_blocks = max(n, seq.num_registered_blocks)
