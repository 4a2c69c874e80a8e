"""Prompt log-probs: the log-probability of each prompt token given the tokens before it.

A request with `SamplingParams.prompt_logprobs` adds its prefill chunk's prompt positions to
the step's logits rows (requests without it add nothing, and decode steps never have any):
position p's logits give the log-prob of prompt token p + 1. log_softmax runs in float32 over
the model's whole vocabulary (as the sampled tokens' log-probs), in slices of rows so a long
prompt never holds [rows, vocab] float32 logits at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moeserve.engine.outputs import TokenLogprob

# Rows of float32 logits per slice: about 256 MiB for a 150k vocabulary.
SLICE_ELEMENTS = 1 << 26


@dataclass
class PromptRows:
    """What one step computes for prompt log-probs, and (once executed) its result."""

    spans: list[tuple[int, int, int]] = field(default_factory=list)  # (work index, first, end)
    targets: list[int] = field(default_factory=list)  # prompt token p + 1, spans in order
    n_top: int = 0
    result: torch.Tensor | None = None  # [rows, 2 + 2 * n_top] float64: chosen, rank, top, ids

    def add(self, work_index: int, first: int, end: int, prompt_ids: list[int], n: int) -> None:
        """Positions [first, end) of work item `work_index`, whose prompt is `prompt_ids`."""
        self.spans.append((work_index, first, end))
        self.targets.extend(prompt_ids[first + 1 : end + 1])
        self.n_top = max(self.n_top, n)

    def entries(self, span: int, n: int) -> list[TokenLogprob]:
        """Span `span`'s entries with the top-n alternatives (after `result` reached the host)."""
        assert self.result is not None
        lo = sum(end - first for _, first, end in self.spans[:span])
        _, first, end = self.spans[span]
        rows = self.result[lo : lo + end - first].tolist()
        k = self.n_top
        return [
            TokenLogprob(
                self.targets[lo + j],
                row[0],
                [(int(t), v) for v, t in zip(row[2 : 2 + n], row[2 + k : 2 + k + n], strict=True)],
                int(row[1]),
            )
            for j, row in enumerate(rows)
        ]


def compute(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    hidden_XD: torch.Tensor,
    targets_X: torch.Tensor,
    n_top: int,
    vocab_size: int,
) -> torch.Tensor:
    """logits_of: hidden rows -> their logits (the model's compute_logits).
    [X, 2 + 2 * n_top] float64: per row the target's log-prob, its rank (1 + the tokens with a
    higher log-prob, vLLM's), the top-n log-probs and their token ids (float64 holds the ids
    exactly: one transfer to the host)."""
    step = max(1, SLICE_ELEMENTS // vocab_size)
    parts = []
    for lo in range(0, hidden_XD.shape[0], step):
        logits = logits_of(hidden_XD[lo : lo + step])[:, :vocab_size].float()
        lp = torch.log_softmax(logits, dim=-1)
        chosen = lp.gather(1, targets_X[lo : lo + step, None])
        rank = (lp > chosen).sum(dim=-1, keepdim=True) + 1
        vals, ids = lp.topk(min(n_top, vocab_size), dim=-1)
        parts.append(torch.cat([chosen.double(), rank.double(), vals.double(), ids.double()], 1))
    return torch.cat(parts)
