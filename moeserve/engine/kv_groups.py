"""KV-cache groups: full-attention layers and sliding-window layers keep separate block tables.

A model that alternates sliding-window and full layers (gpt-oss: windows of 128 on every other
layer) needs, per sequence, every position's K/V in its full layers but only the last `window`
positions' in its sliding layers. Each sequence therefore holds two block tables over the one
block pool: `block_ids` (the full layers') and `window_block_ids` (the sliding layers'), the
latter's blocks going back to the pool as the window moves past them. A long context then costs
memory on the full layers only.

The two groups share the pool's block ids and the KV tensors (vLLM's hybrid allocator does the
same): layer i uses tensor `tensor_of_layer[i]`, its rank within its group, so the j-th full
layer and the j-th sliding layer share tensor j, and a block id (owned by one group of one
sequence at a time) holds one group's K/V. A block is then `num_tensors` layers' K/V, not
`num_layers`' (half, for gpt-oss). Models with one kind of layer keep one group and one tensor
per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeserve.config import ModelConfig


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class KVGroups:
    window: int | None  # the sliding group's window; None: one group (every layer full)
    tensor_of_layer: tuple[int, ...]
    num_tensors: int

    @classmethod
    def single(cls, num_layers: int) -> KVGroups:
        return cls(None, tuple(range(num_layers)), num_layers)

    @classmethod
    def for_model(cls, cfg: ModelConfig) -> KVGroups:
        """Two groups when the layers mix full attention and one sliding window, else one."""
        windows = set(cfg.layer_windows or (None,))
        if len(windows) != 2 or None not in windows:
            return cls.single(cfg.num_layers)
        (window,) = windows - {None}
        assert window is not None
        rank = {None: 0, window: 0}
        tensors = []
        for w in cfg.layer_windows:
            tensors.append(rank[w])
            rank[w] += 1
        return cls(window, tuple(tensors), max(rank.values()))

    @property
    def num_groups(self) -> int:
        return 1 if self.window is None else 2

    def first_live_block(self, num_computed: int, block_size: int) -> int:
        """The first sliding-group block a step after `num_computed` tokens still reads: its
        first query (position num_computed) sees keys from num_computed - window + 1 on."""
        assert self.window is not None
        return max(0, num_computed - self.window + 1) // block_size

    def blocks_to_run(self, num_tokens: int, block_size: int) -> int:
        """The fewest free blocks a sequence of num_tokens needs to run to its end, a token
        at a time: all of its full-group blocks and the sliding group's live ones."""
        full = _cdiv(num_tokens, block_size)
        if self.window is None:
            return full
        return full + min(full, _cdiv(self.window, block_size) + 1)
