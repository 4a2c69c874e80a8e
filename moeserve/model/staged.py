"""The decoder's forward cut at every layer handed an expert provider, for piecewise CUDA graphs.

With experts offloaded, a step must read each layer's routing on the host (to fetch missed
experts), so one graph cannot cover the forward. The stages between those reads can: stage 0
embeds and runs up to the first cut layer's dispatch; `run_experts(j)` runs that layer's
provider eagerly (host read, cache fetches, CPU experts); stage j+1 combines its output and
runs on to the next cut layer's dispatch; the last stage ends with the logits. No stage reads
the device from the host, so each can be captured; what a stage hands the next (residual
stream, dispatch) lives in tensors the stage allocated, which graph replays rewrite in place.

Shapes: T tokens, D hidden, V vocab.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from moeserve.model.attention import KVCache
from moeserve.model.decoder import MoEForCausalLM
from moeserve.model.dispatch import Dispatch
from moeserve.model.experts import ExpertProvider
from moeserve.model.metadata import AttentionMetadata
from moeserve.model.moe import MoE
from moeserve.model.rotary import CosSin


class StagedForward:
    """One forward over fixed input tensors, run as `num_stages` stages with eager expert
    steps between them: for j in range(num_stages): stage(j); then run_experts(j) unless j is
    the last. `logits_TV` holds the float32 logits of every row after the last stage.

    experts: layer index -> the provider of that layer's routed experts; the forward is cut at
    each of those layers (the others run their resident experts inside the stages)."""

    def __init__(
        self,
        model: MoEForCausalLM,
        input_ids_T: torch.Tensor,
        positions_T: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[KVCache],
        experts: Mapping[int, ExpertProvider],
    ) -> None:
        self.model, self.meta, self.kv_caches = model, meta, kv_caches
        self.input_ids_T, self.positions_T = input_ids_T, positions_T
        self.cuts = [i for i, _ in model.moe_layers() if i in experts]
        self.providers = [experts[i] for i in self.cuts]
        self.num_stages = len(self.cuts) + 1
        self._cos_sin: CosSin | None = None
        self._x_TD: torch.Tensor | None = None  # residual stream at the latest cut
        # Per cut: its dispatch, which the eager expert step of a replay reads and writes
        # (held, so its memory stays its own).
        self._dispatched: list[Dispatch | None] = [None] * len(self.cuts)
        self.logits_TV: torch.Tensor | None = None

    def _moe(self, j: int) -> MoE:
        mlp = self.model.layers[self.cuts[j]].mlp
        assert isinstance(mlp, MoE)
        return mlp

    @torch.inference_mode()
    def stage(self, j: int) -> None:
        m, meta, kv = self.model, self.meta, self.kv_caches
        if j == 0:
            x_TD = F.embedding(self.input_ids_T, m.embed_tokens)
            self._cos_sin = m.rotary.cos_sin(self.positions_T, m.dtype)
            start = 0
        else:
            carried = self._dispatched[j - 1]
            assert self._x_TD is not None and carried is not None
            x_TD = self._x_TD + self._moe(j - 1).finish(carried)
            start = self.cuts[j - 1] + 1
        assert self._cos_sin is not None
        last = j == len(self.cuts)
        stop = len(m.layers) if last else self.cuts[j]
        for i in range(start, stop):
            x_TD = m.layers[i](x_TD, self._cos_sin, kv[i], meta)
        if last:
            self.logits_TV = m.compute_logits(x_TD)
            return
        # its provider, so the norm leaves the router to route_and_dispatch
        self._x_TD, h_TD, _ = m.layers[stop].attention_block(
            x_TD, self._cos_sin, kv[stop], meta, self.providers[j]
        )
        self._dispatched[j] = self._moe(j).route_and_dispatch(h_TD, meta.valid_T)

    @torch.inference_mode()
    def run_experts(self, j: int) -> None:
        """Cut j's routed experts, eagerly (its provider may read the routing on the host)."""
        carried = self._dispatched[j]
        assert carried is not None, "stage j runs before its experts"
        self.providers[j].run(carried)

    def run(self) -> torch.Tensor:
        """Every stage eagerly, in order; returns the logits."""
        for j in range(self.num_stages):
            self.stage(j)
            if j < len(self.cuts):
                self.run_experts(j)
        assert self.logits_TV is not None
        return self.logits_TV
