"""Element-wise pieces the fused MoE kernels share: rounding where torch would, the
activation, and the sum over k that weighs, rounds and adds the experts' (split-K) outputs.

Kernels here round after each op exactly where the readable torch path (model/moe.py,
model/activation.py) rounds, so the Triton and torch paths agree to the last bit of the
model dtype wherever their sums agree.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import interpreting, pdl
from moeserve.kernels.pdl import wait_prior


@triton.jit
def rnd(x, like_ptr):
    """x rounded to the tensor's dtype, back in float32 (where a torch op would round)."""
    return x.to(like_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def activate(gate, up, out_ptr, alpha, limit, CLAMPED: tl.constexpr):
    """silu(gate) * up, or gpt-oss's clamped SwiGLU, in out_ptr's dtype; gate and up are
    float32 holding values already rounded to that dtype."""
    if CLAMPED:
        # (up + 1) * gate * sigmoid(alpha * gate), gate clamped above and up on both sides;
        # rounded after each op as the reference's torch ops round.
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        sig = rnd(1.0 / (1.0 + tl.exp(-rnd(gate * alpha, out_ptr))), out_ptr)
        glu = rnd(gate * sig, out_ptr)
        return (rnd(up + 1.0, out_ptr) * glu).to(out_ptr.dtype.element_ty)
    # torch's F.silu(gate) * up rounds twice, after the silu and after the product: so do
    # we, and with torch's formula for silu.
    silu = rnd(gate / (1.0 + tl.exp(-gate)), out_ptr)
    return (silu * up).to(out_ptr.dtype.element_ty)


@triton.jit
def sum_token(
    part_ptr,  # [SPLIT, T*TOP_K (+ T*SHARED), D] float32
    experts_ptr,  # [T, TOP_K]
    weights_ptr,  # [T, TOP_K] float32
    out_ptr,  # [T, D]
    res_ptr,  # [T, D] residual stream (RESIDUAL)
    extra_ptr,  # [T, D] a shared expert's output, in the model dtype (EXTRA)
    bias_ptr,  # [slots, D] (HAS_BIAS)
    slot_ptr,  # [E] expert -> weight index (HAS_SLOT)
    t,  # int64
    T,
    offs,
    ok,
    D,
    num_experts,
    stride_split,
    stride_out,
    stride_res,
    stride_extra,
    stride_bias,
    SPLIT: tl.constexpr,
    SHARED: tl.constexpr,  # a shared expert's partial rows per token, after the routed rows
    TOP_K: tl.constexpr,
    RESIDUAL: tl.constexpr,
    EXTRA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SLOT: tl.constexpr,
    PART_CACHE: tl.constexpr,  # the partials' cache modifier: ".cg" where other programs wrote them
):
    """Token t's output at columns offs: each expert's partials summed over the K splits,
    then (as the unsplit GEMM 2 and the sum after it) the expert output rounded, biased,
    weighed, rounded, the k terms added in float32 and rounded once; then the shared
    expert's and the residual, each add rounded as torch's."""
    total = tl.zeros(offs.shape, dtype=tl.float32)
    for k in range(TOP_K):
        expert = tl.load(experts_ptr + t * TOP_K + k)
        acc = tl.zeros(offs.shape, dtype=tl.float32)
        for s in range(SPLIT):
            row = part_ptr + s * stride_split + (t * TOP_K + k) * D
            acc += tl.load(row + offs, mask=ok, other=0.0, cache_modifier=PART_CACHE)
        w = tl.load(weights_ptr + t * TOP_K + k).to(tl.float32)
        y = rnd(acc, out_ptr)
        if HAS_BIAS:  # the expert's bias on its rounded output, rounded again
            idx = tl.minimum(expert, num_experts - 1)  # a sentinel's term is dropped below
            if HAS_SLOT:
                idx = tl.load(slot_ptr + idx)
            b_row = bias_ptr + idx.to(tl.int64) * stride_bias + offs
            y = rnd(y + tl.load(b_row, mask=ok, other=0.0).to(tl.float32), out_ptr)
        y = (y * w).to(out_ptr.dtype.element_ty)
        total += tl.where(expert < num_experts, y.to(tl.float32), 0.0)  # sentinel: no term
    out = total.to(out_ptr.dtype.element_ty)
    if SHARED > 0:  # routed + shared, the shared expert's output rounded first
        sh = tl.zeros(offs.shape, dtype=tl.float32)
        first = T * TOP_K + t * SHARED
        for s in range(SPLIT):
            for p in range(SHARED):
                row = part_ptr + s * stride_split + (first + p) * D
                sh += tl.load(row + offs, mask=ok, other=0.0, cache_modifier=PART_CACHE)
        out = (out.to(tl.float32) + rnd(sh, out_ptr)).to(out_ptr.dtype.element_ty)
    if EXTRA:  # routed + a shared expert's output computed apart, as the torch add rounds
        ex = tl.load(extra_ptr + t * stride_extra + offs, mask=ok, other=0.0).to(tl.float32)
        out = (out.to(tl.float32) + ex).to(out_ptr.dtype.element_ty)
    if RESIDUAL:  # residual + out, each rounded to the model dtype as the two torch ops
        res = tl.load(res_ptr + t * stride_res + offs, mask=ok, other=0.0).to(tl.float32)
        out = (out.to(tl.float32) + res).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + t * stride_out + offs, out, mask=ok)


@triton.jit
def _sum_split_kernel(
    part_ptr,
    experts_ptr,
    weights_ptr,
    out_ptr,
    res_ptr,
    extra_ptr,
    bias_ptr,
    slot_ptr,
    D,
    num_experts,
    stride_split,
    stride_out,
    stride_res,
    stride_extra,
    stride_bias,
    SPLIT: tl.constexpr,
    SHARED: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    RESIDUAL: tl.constexpr,
    EXTRA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SLOT: tl.constexpr,
):
    wait_prior()
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    sum_token(
        part_ptr, experts_ptr, weights_ptr, out_ptr, res_ptr, extra_ptr, bias_ptr, slot_ptr,
        tl.program_id(0).to(tl.int64), tl.num_programs(0), offs, offs < D, D, num_experts,
        stride_split, stride_out, stride_res, stride_extra, stride_bias,
        SPLIT, SHARED, TOP_K, RESIDUAL, EXTRA, HAS_BIAS, HAS_SLOT, "",
    )  # fmt: skip


# Up to this many tokens GEMM 2 writes float32 rows (one partial when K is not split) and one
# kernel weighs, sums over k and adds the residual: at decode sizes the unsplit path's zero
# fill, sum and residual add are three launches of a few microseconds each, per layer.
SUM_KERNEL_MAX_TOKENS = 64


def sum_over_k(
    part_SRD: torch.Tensor,
    experts_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    out_TD: torch.Tensor,
    residual_TD: torch.Tensor | None,
    b_down_ED: torch.Tensor | None,
    expert_slot_E: torch.Tensor | None,
    num_experts: int,
    shared_rows: int = 0,
    extra_TD: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[t] (+ residual[t]) = sum_k weights[t,k] * round(sum_s part[s, t*K+k] + bias)
    (+ round(sum_s,p part[s, T*K + t*shared_rows + p]), a shared expert's partials, or
    + extra[t], its output computed apart), each addition rounded as torch's."""
    T, D = out_TD.shape
    widest = 1024 if T > 16 else 256
    block_d = 16 if interpreting() else min(widest, max(16, triton.next_power_of_2(D)))
    res = residual_TD if residual_TD is not None else out_TD  # unused pointer when absent
    extra = extra_TD if extra_TD is not None else out_TD
    assert res.stride(1) == 1 and extra.stride(1) == 1
    assert not (shared_rows and extra_TD is not None), "one shared expert, one way in"
    assert b_down_ED is None or b_down_ED.stride(1) == 1
    assert part_SRD.shape[1:] == (T * experts_TK.shape[1] + T * shared_rows, D)
    assert part_SRD.stride(1) == D and part_SRD.stride(2) == 1
    _sum_split_kernel[(T, triton.cdiv(D, block_d))](
        part_SRD,
        experts_TK.contiguous(),
        weights_TK.to(torch.float32).contiguous(),
        out_TD,
        res,
        extra,
        b_down_ED if b_down_ED is not None else out_TD,
        expert_slot_E if expert_slot_E is not None else out_TD,
        D,
        num_experts,
        part_SRD.stride(0),
        out_TD.stride(0),
        res.stride(0),
        extra.stride(0),
        b_down_ED.stride(0) if b_down_ED is not None else 0,
        SPLIT=part_SRD.shape[0],
        SHARED=shared_rows,
        TOP_K=experts_TK.shape[1],
        BLOCK_D=block_d,
        RESIDUAL=residual_TD is not None,
        EXTRA=extra_TD is not None,
        HAS_BIAS=b_down_ED is not None,
        HAS_SLOT=expert_slot_E is not None,
        **pdl.LAUNCH,
    )
    return out_TD
