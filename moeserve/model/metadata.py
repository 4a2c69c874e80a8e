"""What the engine hands the model with each step's flat batch: where every sequence's tokens
and K/V live.

Shapes: T tokens in the flat batch, B sequences, M max blocks per sequence, P prefill chunks,
C the prefills' context positions end to end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrefillPack:
    """A step's prefill chunks laid out for one varlen flash-attention call: the cache slots
    of each chunk's whole context end to end, and cumulative query and key lengths."""

    slots_C: torch.Tensor  # int64 [sum of contexts]
    cu_q_P1: torch.Tensor  # int32 [prefills + 1]
    cu_k_P1: torch.Tensor  # int32 [prefills + 1]
    max_q: int
    max_k: int


@dataclass
class AttentionMetadata:
    """How the flat batch splits into sequences and where their K/V live.

    Sequences with exactly one new token (decodes) come first, then the prefill chunks.
    Host lists serve the Python-side loop over prefills; device tensors serve the kernels.
    """

    query_lens: list[int]  # new tokens per sequence
    context_lens: list[int]  # tokens in the cache per sequence after this step
    num_decodes: int  # the first num_decodes sequences bring one token each
    block_tables_BM: torch.Tensor  # int64, padded with 0
    context_lens_B: torch.Tensor  # int64
    slot_mapping_T: torch.Tensor  # int64: flat slot (block * S + offset) for each new token
    # CUDA-graph batches are padded to a captured size: 1 for real tokens, 0 for padding
    # (padding rows route to no expert and are not counted). None: every token is real.
    valid_T: torch.Tensor | None = None
    # Set where the attention backend packs prefills: they then take one call, not one each.
    prefill_pack: PrefillPack | None = None
    # The sliding-window layers' own block tables, slots and pack when the engine's KV cache
    # keeps those layers apart (engine/kv_groups.py); None: every layer reads this metadata.
    window: AttentionMetadata | None = None

    def for_window(self, window: int | None) -> AttentionMetadata:
        """The metadata a layer with this sliding window (None: full attention) reads."""
        return self.window if window is not None and self.window is not None else self

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes
