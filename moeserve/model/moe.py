"""The MoE layer as a pipeline: router -> dispatch -> experts -> combine, plus the shared expert.

    logits_TE = x_TD @ router                     the router's scores, rules as data (router.py)
    routing   = route(logits_TE, spec)            weights_TK, experts_TK; padding routes nowhere
    d         = sort_by_expert(...)               rows grouped by expert, counted (dispatch.py)
    provider.run(d)                               resident experts, or the engine's expert store
    out_TD    = combine(d) + shared(x_TD)

or, for resident experts on the Triton path, the fused kernels (experts.fused_experts), which
route, align, run and combine with no host read.

Shapes: T tokens, D hidden, E experts, F expert intermediate, K top-k.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.config import ModelConfig
from moeserve.model.activation import ExpertActivation
from moeserve.model.backend import ModelBackend
from moeserve.model.dispatch import Dispatch, combine, sort_by_expert
from moeserve.model.experts import (
    ExpertProvider,
    ResidentExperts,
    SlotTable,
    fused_experts,
    fused_router_logits,
    kernel_shared_expert,
    router_logits,
    router_partials,
    silu_mul,
)
from moeserve.model.params import empty_param
from moeserve.model.quant import ExpertFormat, ExpertScales, dense_weight, expert_format
from moeserve.model.router import RouterSpec, route, triton_routable

if TYPE_CHECKING:
    from moeserve.kernels.moe_gemv_plan import SharedExpert
    from moeserve.kernels.norm_rope import RouterRows


def _expert_param(
    fmt: ExpertFormat,
    e: int,
    n: int,
    k: int,
    dtype: torch.dtype,
    home: torch.device,
    pin: bool,
) -> tuple[nn.Parameter, nn.Parameter | None]:
    """A stacked expert weight [E, N, K] as stored, and its scales when quantized."""
    shape, wdt = fmt.weight(n, k, dtype)
    w = empty_param(e, *shape, dtype=wdt, device=home, pin=pin)
    sc = fmt.scale(n, k)
    if sc is None:
        return w, None
    return w, empty_param(e, *sc[0], dtype=sc[1], device=home, pin=pin)


class DenseMLP(nn.Module):
    """SwiGLU MLP with the gate and up projections stored as one [2F, D] matrix (FP8 with
    their scales when `quant` is "fp8", model/quant.py)."""

    def __init__(
        self,
        hidden: int,
        inter: int,
        dtype: torch.dtype,
        device: torch.device,
        quant: str = "",
        backend: ModelBackend | None = None,
    ) -> None:
        super().__init__()
        self.backend = backend or ModelBackend()
        self.w_gate_up, self.w_gate_up_scale = dense_weight(2 * inter, hidden, dtype, device, quant)
        self.w_down, self.w_down_scale = dense_weight(hidden, inter, dtype, device, quant)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        linear = self.backend.linear
        gate_up_TF2 = linear(x_TD, self.w_gate_up, scale=self.w_gate_up_scale)
        if self.backend.fused_elementwise(x_TD) and gate_up_TF2.stride(1) == 1:
            # one launch for the activation (torch's silu and product are two), same roundings
            from moeserve.kernels.fused_moe import silu_mul as kernel

            h = kernel(gate_up_TF2)
        else:
            h = silu_mul(gate_up_TF2)
        return linear(h, self.w_down, scale=self.w_down_scale)


class MoE(nn.Module):
    """Routed experts (stacked per layer) plus the optional shared expert: with a sigmoid gate
    (Qwen2-MoE) or without (DeepSeek, GLM: n_shared_experts of them as one MLP)."""

    def __init__(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        expert_device: torch.device | None = None,
        backend: ModelBackend | None = None,
    ) -> None:
        """Routed experts live on `expert_device` (host memory when offloaded, pinned when a
        GPU computes); everything else on `device`."""
        super().__init__()
        backend = backend or ModelBackend()
        e, f, d = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        home = expert_device or device
        pin = home.type == "cpu" and device.type == "cuda"
        self.spec = RouterSpec.from_config(cfg)
        self.num_experts = e
        self.dtype = dtype  # of the computation (quantized experts are stored otherwise)
        # A float32 router (DeepSeek, GLM) keeps its weight and its GEMM in float32.
        router_dtype = torch.float32 if cfg.router_float32 else dtype
        self.router = empty_param(e, d, dtype=router_dtype, device=device)
        # The correction bias stays float32, as the reference keeps it.
        self.router_bias = (
            empty_param(e, dtype=torch.float32, device=device)
            if self.spec.correction_bias
            else None
        )
        # Quantized experts (model/quant.py) keep their stored values and per-row scales.
        self.format = expert_format(cfg)
        self.w_gate_up, self.w_gate_up_scale = _expert_param(
            self.format, e, 2 * f, d, dtype, home, pin
        )
        self.w_down, self.w_down_scale = _expert_param(self.format, e, d, f, dtype, home, pin)
        # gpt-oss: a bias on the router's logits, and biased experts (which travel with their
        # expert's weights) with the family's activation.
        self.router_logit_bias = (
            empty_param(e, dtype=dtype, device=device) if cfg.router_logit_bias else None
        )
        self.b_gate_up: torch.Tensor | None = None
        self.b_down: torch.Tensor | None = None
        if cfg.expert_bias:
            self.b_gate_up = empty_param(e, 2 * f, dtype=dtype, device=home, pin=pin)
            self.b_down = empty_param(e, d, dtype=dtype, device=home, pin=pin)
        self.activation = ExpertActivation.from_config(cfg)
        # A bound on |input| once the weights are loaded (MoEForCausalLM.bound_moe_inputs):
        # MXFP4 experts then multiply in float16 (kernels.mxfp4.half_products).
        self.input_bound: float | None = None
        self.resident = ResidentExperts(
            self.w_gate_up,
            self.w_down,
            self.b_gate_up,
            self.b_down,
            self.activation,
            ExpertScales.of(self),
        )
        # Batches of at most this many tokens take the fused Triton path when no provider is
        # handed to the forward (0: never).
        self.fused_max_tokens = backend.fused_moe_tokens
        self.count_tokens = backend.count_tokens
        # Tokens routed to each expert since start: counted on the device by the dispatch, read
        # at scrape time.
        self.register_buffer(
            "tokens_per_expert_E",
            torch.zeros(e, dtype=torch.int64, device=device),
            persistent=False,
        )
        self.shared: DenseMLP | None = None
        self.shared_gate: torch.Tensor | None = None
        if cfg.shared_expert_intermediate_size:
            self.shared = DenseMLP(
                d, cfg.shared_expert_intermediate_size, dtype, device, cfg.dense_quant, backend
            )
            if cfg.shared_expert_gate:
                self.shared_gate = empty_param(1, d, dtype=dtype, device=device)

    def expert_tensors(self) -> list[torch.Tensor]:
        """The routed experts' stacked tensors [E, ...]: weights, scales, biases."""
        ts = [self.w_gate_up, self.w_down, self.w_gate_up_scale, self.w_down_scale]
        return [t for t in (*ts, self.b_gate_up, self.b_down) if t is not None]

    def _fused_path(self, t: int, experts: ExpertProvider | SlotTable | None) -> bool:
        return (experts is None and t <= self.fused_max_tokens) or isinstance(experts, SlotTable)

    def router_in_norm(
        self, x_TD: torch.Tensor, experts: ExpertProvider | SlotTable | None = None
    ) -> RouterRows | None:
        """(router weight, logit bias) when forward() over these rows would take the router's
        logits as split-K partials for the routing program (fused_router_logits): the
        residual-add norm before this layer can then compute them (one launch fewer), passed
        back as forward's logits_TE. None: forward computes its own."""
        t = x_TD.shape[0]
        if not self._fused_path(t, experts):
            return None
        if not router_partials(x_TD, self.router, triton_routable(self.spec, t)):
            return None
        return self.router, self.router_logit_bias

    def forward(
        self,
        x_TD: torch.Tensor,
        valid_T: torch.Tensor | None = None,
        residual_TD: torch.Tensor | None = None,
        experts: ExpertProvider | SlotTable | None = None,
        logits_TE: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """valid_T (0/1 per token, or None): padding rows of a CUDA-graph batch route nowhere.
        residual_TD: return residual + the layer's output (on the Triton path added in its last
        kernel, after the shared expert's output). experts: the provider of this
        layer's routed experts (the engine's expert store), or the slots of an expert cache
        the GPU maps itself (the fused path over them); None: resident experts.
        logits_TE: the router's logits of x_TD as the norm kernel computed them (router_in_norm
        said where), else None."""
        t = x_TD.shape[0]
        table = experts if isinstance(experts, SlotTable) else None
        if self._fused_path(t, experts):
            triton_route = triton_routable(self.spec, t)
            if logits_TE is None:
                logits_TE = fused_router_logits(
                    x_TD, self.router, triton_route, self.router_logit_bias
                )
            fused = functools.partial(self._fused, x_TD, logits_TE, triton_route, valid_T)
            if self.shared is None:
                return fused(residual_TD, table)
            shared = self._kernel_shared(t)
            if shared is not None:
                return fused(residual_TD, table, shared)
            # computed apart, added in the routed sum's kernel before the residual
            return fused(residual_TD, table, extra_TD=self.shared_output(x_TD))
        assert not isinstance(experts, SlotTable)
        d = self.route_and_dispatch(x_TD, valid_T)
        (experts or self.resident).run(d)
        out_TD = self.finish(d)
        return out_TD if residual_TD is None else residual_TD + out_TD

    def _fused(
        self,
        x_TD: torch.Tensor,
        logits_TE: torch.Tensor,
        triton_route: bool,
        valid_T: torch.Tensor | None,
        residual_TD: torch.Tensor | None = None,
        table: SlotTable | None = None,
        shared: SharedExpert | None = None,
        extra_TD: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return fused_experts(
            x_TD,
            logits_TE,
            self.spec,
            self.w_gate_up,
            self.w_down,
            triton_route=triton_route,
            bias_E=self.router_bias,
            valid_T=valid_T,
            counter_E=self.tokens_per_expert_E if self.count_tokens else None,
            residual_TD=residual_TD,
            b_gate_up_EF=self.b_gate_up,
            b_down_ED=self.b_down,
            act=self.activation,
            scales=ExpertScales.of(self),
            table=table,
            shared=shared,
            logits_dtype=self.router.dtype,
            extra_TD=extra_TD,
            x_bound=self.input_bound,
        )

    def _kernel_shared(self, t: int) -> SharedExpert | None:
        """The shared expert as the fused kernels take it, where they run it for t tokens
        (experts.kernel_shared_expert); None: the caller adds it."""
        mlp = self.shared
        if mlp is None:
            return None
        # Its rows join the routed experts' launches: stored as they are (FP8 or the model
        # dtype; the loader may keep one float, a checkpoint's modules_to_not_convert) and
        # laid out alike (contiguous).
        tensors = (mlp.w_gate_up, mlp.w_down, mlp.w_gate_up_scale, mlp.w_down_scale)
        kinds = {"fp8" if s is not None else "" for s in tensors[2:]}
        if kinds != {self.format.kind} or not all(w is None or w.is_contiguous() for w in tensors):
            return None
        f = self.w_gate_up.shape[1] // 2
        if not kernel_shared_expert(
            t, self.spec, f, self.format.kind, self.shared_gate is not None
        ):
            return None
        from moeserve.kernels.moe_gemv_plan import SharedExpert

        return SharedExpert(mlp.w_gate_up, mlp.w_down, mlp.w_gate_up_scale, mlp.w_down_scale)

    def select_experts(
        self, x_TD: torch.Tensor, valid_T: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights_TK, experts_TK): the router's choice for x_TD (torch backend)."""
        logits_TE = router_logits(x_TD, self.router, self.router_logit_bias)
        weights_TK, experts_TK, _ = route(
            logits_TE, self.spec, bias_E=self.router_bias, valid_T=valid_T
        )
        return weights_TK, experts_TK

    def route_and_dispatch(self, x_TD: torch.Tensor, valid_T: torch.Tensor | None) -> Dispatch:
        """Router, top-k and dispatch: everything before the experts, graph-safe."""
        weights_TK, experts_TK = self.select_experts(x_TD, valid_T)
        return sort_by_expert(
            x_TD,
            weights_TK,
            experts_TK,
            self.num_experts,
            padded=valid_T is not None,
            counter_E=self.tokens_per_expert_E if self.count_tokens else None,
            scale_input=self.spec.scales_input,
        )

    def finish(self, d: Dispatch) -> torch.Tensor:
        """Everything after the experts: combine, plus the shared expert (graph-safe)."""
        return self.add_shared(d.x_TD, combine(d))

    def add_shared(self, x_TD: torch.Tensor, routed_TD: torch.Tensor) -> torch.Tensor:
        """The routed experts' output plus the shared expert's, when the family has one."""
        if self.shared is None:
            return routed_TD
        return routed_TD + self.shared_output(x_TD)

    def shared_output(self, x_TD: torch.Tensor) -> torch.Tensor:
        """The shared expert's output (times its sigmoid gate, Qwen2-MoE's), model dtype."""
        assert self.shared is not None
        if self.shared_gate is None:
            return self.shared(x_TD)
        gate_T1 = torch.sigmoid(F.linear(x_TD, self.shared_gate))
        return gate_T1 * self.shared(x_TD)

    def experts(
        self,
        x_TD: torch.Tensor,
        weights_TK: torch.Tensor,
        experts_TK: torch.Tensor,
        provider: ExpertProvider | None = None,
    ) -> torch.Tensor:
        """The readable twin of the fused kernels for a given routing (not counted): dispatch,
        each expert once on exactly its rows, weighted combine. [T, D]."""
        d = sort_by_expert(
            x_TD,
            weights_TK,
            experts_TK,
            self.num_experts,
            padded=False,
            counter_E=None,
            scale_input=self.spec.scales_input,
        )
        (provider or self.resident).run(d)
        return combine(d)
