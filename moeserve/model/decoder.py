"""One decoder for every supported family; the differences are data in ModelConfig.

Shapes: T tokens in the flat batch, X selected rows, D hidden, V vocab, L sparse layers,
E experts.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.config import ModelConfig
from moeserve.model.attention import Attention, AttentionBackend, KVCache, PagedAttention
from moeserve.model.backend import (
    ModelBackend,
    fused_add_rms_norm,
    fused_rms_norm,
    split_k_rows,
)
from moeserve.model.experts import ExpertProvider, SlotTable
from moeserve.model.layers import rms_norm
from moeserve.model.metadata import AttentionMetadata
from moeserve.model.mla import LatentAttention, MLAttention
from moeserve.model.moe import DenseMLP, MoE
from moeserve.model.params import empty_param
from moeserve.model.rotary import CosSin, Rotary

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DecoderLayer(nn.Module):
    """Pre-norm attention, then the MoE layer (or a dense MLP), each with a residual add."""

    def __init__(
        self,
        cfg: ModelConfig,
        layer: int,
        dtype: torch.dtype,
        device: torch.device,
        expert_device: torch.device | None,
        backend: ModelBackend,
        attention: AttentionBackend | LatentAttention,
    ) -> None:
        super().__init__()
        self.eps = cfg.rms_norm_eps
        self.backend = backend
        self.input_norm = empty_param(cfg.hidden_size, dtype=dtype, device=device)
        self.post_norm = empty_param(cfg.hidden_size, dtype=dtype, device=device)
        self.attn: Attention | MLAttention
        if isinstance(attention, LatentAttention):
            self.attn = MLAttention(cfg, layer, dtype, device, backend, attention)
        else:
            self.attn = Attention(cfg, layer, dtype, device, backend, attention)
        self.mlp: MoE | DenseMLP
        if cfg.sparse_layers[layer]:
            self.mlp = MoE(cfg, dtype, device, expert_device, backend)
        else:
            self.mlp = DenseMLP(
                cfg.hidden_size,
                cfg.dense_intermediate_size,
                dtype,
                device,
                cfg.dense_quant,
                backend,
            )

    def attention_block(
        self,
        x_TD: torch.Tensor,
        cos_sin: CosSin,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        experts: ExpertProvider | SlotTable | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The residual stream after attention, its post-attention norm (the MLP's input) and,
        where the norm kernel computed them, the MoE router's logits of it (else None)."""
        if not self.backend.fused_elementwise(x_TD):
            attn_TD = self.attn(rms_norm(x_TD, self.input_norm, self.eps), cos_sin, kv_cache, meta)
            x_TD = x_TD + attn_TD
            return x_TD, rms_norm(x_TD, self.post_norm, self.eps), None
        # A few rows (a captured decode step): the projections return split-K partials, which
        # the residual-add norm (and the rotary kernel, for qkv) add up themselves; the norm
        # kernel also runs the MoE's router on its output when the MoE would take partials.
        attn_TD = self.attn(
            x_TD,
            cos_sin,
            kv_cache,
            meta,
            partials_out=split_k_rows(x_TD),
            input_norm=(self.input_norm, self.eps),
        )
        router = self.mlp.router_in_norm(x_TD, experts) if isinstance(self.mlp, MoE) else None
        return fused_add_rms_norm(x_TD, attn_TD, self.post_norm, self.eps, router)

    def forward(
        self,
        x_TD: torch.Tensor,
        cos_sin: CosSin,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        experts: ExpertProvider | SlotTable | None = None,
    ) -> torch.Tensor:
        """experts: the provider of this layer's routed experts, or the slots of an expert
        cache the GPU maps itself (None: resident)."""
        x_TD, h_TD, logits_TE = self.attention_block(x_TD, cos_sin, kv_cache, meta, experts)
        if isinstance(self.mlp, MoE):  # the residual add happens inside (fused when it can)
            return self.mlp(
                h_TD, meta.valid_T, residual_TD=x_TD, experts=experts, logits_TE=logits_TE
            )
        return x_TD + self.mlp(h_TD)


class MoEForCausalLM(nn.Module):
    """The model over one flat batch of tokens and a paged KV cache.

    Parameters are allocated uninitialised on `device`; the loader fills them. `backend`
    says how it computes (Triton kernels or the readable path), chosen once here; its
    attention backend follows from it and the device.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        expert_device: torch.device | None = None,
        backend: ModelBackend | None = None,
    ) -> None:
        super().__init__()
        backend = backend or ModelBackend()
        self.cfg = cfg
        self.dtype = dtype
        self.device = device
        self.backend = backend
        # The one choice of attention: latent (MLA) for DeepSeek-style configs, else paged.
        attention_cls = LatentAttention if cfg.mla else PagedAttention
        self.attention: AttentionBackend | LatentAttention = attention_cls.for_model(
            cfg, dtype, device, backend
        )
        self.embed_tokens = empty_param(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, dtype, device, expert_device, backend, self.attention)
            for i in range(cfg.num_layers)
        )
        self.norm = empty_param(cfg.hidden_size, dtype=dtype, device=device)
        if not cfg.tie_word_embeddings:
            self.lm_head = empty_param(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.rotary = Rotary(cfg, device, dtype)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens if self.cfg.tie_word_embeddings else self.lm_head

    def moe_layers(self) -> list[tuple[int, MoE]]:
        return [(i, l.mlp) for i, l in enumerate(self.layers) if isinstance(l.mlp, MoE)]

    def weight_bytes(self) -> dict[tuple[str, str, str], int]:
        """Bytes of the weights as stored, by (part, format, location): part "experts" (the
        routed experts) or "dense"; format fp8 / mxfp4 for quantized weights (their scales
        included), else the dtype; location "device" or "host"."""
        experts = {id(t) for _, moe in self.moe_layers() for t in moe.expert_tensors()}
        params = dict(self.named_parameters())
        fp8 = {n for n, p in params.items() if p.dtype == torch.float8_e4m3fn}
        out: dict[tuple[str, str, str], int] = {}
        for name, p in params.items():
            part = "experts" if id(p) in experts else "dense"
            if part == "experts":
                fmt = self.cfg.expert_quant
            else:
                fmt = "fp8" if name in fp8 or name.removesuffix("_scale") in fp8 else ""
            where = "host" if p.device.type == "cpu" and self.device.type != "cpu" else "device"
            key = (part, fmt or str(self.dtype).removeprefix("torch."), where)
            out[key] = out.get(key, 0) + p.numel() * p.element_size()
        return out

    @torch.inference_mode()
    def forward(
        self,
        input_ids_T: torch.Tensor,
        positions_T: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[KVCache],
        experts: Mapping[int, ExpertProvider | SlotTable] | None = None,
    ) -> torch.Tensor:
        """Hidden states [T, D] before the final norm, for every token of the batch.

        experts: layer index -> the provider of that layer's routed experts (the engine's
        expert store, when offloading) or its SlotTable; layers without one run their
        resident experts."""
        x_TD = F.embedding(input_ids_T, self.embed_tokens)
        cos_sin = self.rotary.cos_sin(positions_T, self.dtype)
        if not experts:
            for layer, kv in zip(self.layers, kv_caches):
                x_TD = layer(x_TD, cos_sin, kv, meta)
            return x_TD
        for i, (layer, kv) in enumerate(zip(self.layers, kv_caches)):
            x_TD = layer(x_TD, cos_sin, kv, meta, experts.get(i))
        return x_TD

    @torch.inference_mode()
    def compute_logits(self, hidden_XD: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """Logits [X, V] for the selected rows of forward()'s output: float32, or with
        float32=False the model dtype they are computed in (a decode graph leaves the cast,
        a kernel of its own, to the sampler, which only needs it off the greedy path)."""
        norm = fused_rms_norm if self.backend.fused_elementwise(hidden_XD) else rms_norm
        h = norm(hidden_XD, self.norm, self.cfg.rms_norm_eps)
        logits = F.linear(h, self.lm_head_weight)
        return logits.float() if float32 else logits

    def bound_moe_inputs(self) -> None:
        """Give each MoE layer a bound on its input, the post-attention RMSNorm's output:
        |x_k| * rsqrt(mean(x**2)) <= sqrt(D), times max|weight|, with 2% for the roundings.
        Call once the weights are loaded."""
        root_d = self.cfg.hidden_size**0.5
        for layer in self.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.input_bound = float(layer.post_norm.abs().max()) * root_d * 1.02

    def reset_expert_counts(self) -> None:
        for _, moe in self.moe_layers():
            moe.tokens_per_expert_E.zero_()

    def tokens_per_expert(self) -> torch.Tensor:
        """[L, E] token assignments per expert of each sparse layer since start (a device copy,
        no sync)."""
        return torch.stack([m.tokens_per_expert_E for _, m in self.moe_layers()])

    @contextmanager
    def expert_counts_excluded(self) -> Iterator[None]:
        """Run scratch work (warm-ups, memory probes) whose routed tokens are not traffic: the
        counters hold afterwards what they held before."""
        saved_LE = self.tokens_per_expert()
        try:
            yield
        finally:
            for saved_E, (_, moe) in zip(saved_LE, self.moe_layers()):
                moe.tokens_per_expert_E.copy_(saved_E)
