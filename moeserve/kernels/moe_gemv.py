"""The fused MoE's two projections for a few tokens, shaped as GEMVs: one program per (output
tile, assignment), no expert sorting, no padded rows.

At batch 1 a step's expert weights are a few small matrices (Qwen3-30B-A3B: 8 of 768 x 2048);
the grouped GEMM's 16-row blocks for one row each and its K splits (moe_gemm.py) left its
grid short and uneven, reading weights at about half the copy bandwidth. Here every program
streams BLOCK_N whole weight rows (K contiguous) against one activation row, so the grid is
assignments x N / BLOCK_N programs of equal work, and GEMM 1 applies the activation to its
gate and up rows where it has them (no silu_mul launch, no [R, 2F] intermediate).

Rounding follows the grouped path: GEMM 1's products are rounded to the model dtype, its bias
added and rounded, then the activation as kernels.fused_moe's silu_mul; GEMM 2 writes float32
rows that the sum over k rounds, weighs and adds (moe_epilogue's sum_token: in the sum
kernel, or in the down GEMV's last program of each column tile, gemv_down's sum_into). Sentinel
assignments (expert >= num_experts) are skipped; the sum drops their rows. An ungated shared
expert (SharedExpert) is more programs after the routed rows of both launches (gate/up: F of
its outputs each; down: one piece of its K each), whose partials the sum adds: at one token
that saves DeepSeek-V2-Lite two launches a layer against its own pair of GEMVs.

Quantized weights (kernels.quant) are read a tile of whole scale groups at a time: each
group's dot with the activations is summed in float32 and multiplied by the group's scale
once, so a weight costs its conversion and one multiply-add. MXFP4 tiles are 4-byte words
against the activations of the same 8 k, both in one register layout (mxfp4.x_pairs,
mxfp4_word_dot): the activations never pass through shared memory.

Shapes: R = T*K assignments, E experts (or cache slots), F intermediate, D hidden.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from moeserve.kernels import arrivals, interpreting, pdl
from moeserve.kernels.moe_epilogue import activate, rnd, sum_token
from moeserve.kernels.moe_gemv_plan import SharedExpert, gemv_config
from moeserve.kernels.moe_quant import QUANT_CODES, quant_code, quant_tile, x_tile
from moeserve.kernels.mxfp4 import (
    half_products,
    mxfp4_group_dot,
    mxfp4_word_dot,
    packed_decode,
    pairs_aligned,
    x_group,
    x_pairs,
    x_scale,
)
from moeserve.kernels.pdl import wait_prior
from moeserve.kernels.quant import real_k


@triton.jit
def _row_expert(experts_ptr, slot_ptr, r, num_experts, HAS_SLOT: tl.constexpr):
    """Assignment r's weight index (its expert, or that expert's slot); -1 for a sentinel."""
    e = tl.load(experts_ptr + r).to(tl.int64)
    idx = e
    if HAS_SLOT:
        idx = tl.load(slot_ptr + tl.minimum(e, num_experts - 1)).to(tl.int64)
    return tl.where(e < num_experts, idx, -1)


@triton.jit
def _gate_up_act_kernel(
    x_ptr,  # [T, K]
    w_ptr,  # [slots, 2F, K]: gate rows then up rows
    h_ptr,  # [R, F] model dtype
    experts_ptr,  # [R]
    slot_ptr,  # [E] expert -> weight index (HAS_SLOT)
    bias_ptr,  # [slots, 2F] (HAS_BIAS)
    s_ptr,  # [slots, 2F, ceil(K/GROUP)] weight scales (QUANT)
    sw_ptr,  # [2S, K] the shared expert's gate rows then up rows (SHARED)
    ss_ptr,  # [2S, ceil(K/GROUP)] their scales (SHARED and QUANT)
    hs_ptr,  # [T, S] the shared expert's activations (SHARED)
    F,
    K,
    S,
    R,
    num_experts,
    stride_x,
    stride_we,
    stride_wn: tl.constexpr,
    stride_h,
    stride_bias,
    stride_se,
    stride_sn: tl.constexpr,
    stride_sk,
    alpha,
    limit,
    x_scale,  # mxfp4 HALF: the activations' power-of-two scale (mxfp4.x_scale)
    ROWS_PER_X: tl.constexpr,  # top_k: assignment r reads token r // top_k
    SHARED: tl.constexpr,  # shared-expert programs per token (F of its S rows each), or 0
    HAS_SLOT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CLAMPED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    QUANT: tl.constexpr,  # moe_quant.QUANT_CODES
    GROUP: tl.constexpr,
    LOOP_STAGES: tl.constexpr,  # K tiles in flight (the loop's software pipeline)
    PACKED: tl.constexpr,  # mxfp4: mxfp4.e2m1x4_as_fp16's packed decode
    EVEN_N: tl.constexpr,  # mxfp4: BLOCK_N divides the output rows (none masked)
    HALF: tl.constexpr,  # mxfp4: float16 products, a scale group a thread (mxfp4.half_products)
):
    # LATE: the down GEMV after this kernel reads the routing before its own wait.
    wait_prior(LATE=True)
    r = tl.program_id(1).to(tl.int64)
    local_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    # A routed assignment: rows [0, F) of its expert's gate (up: F on) into row r of h.
    expert = _row_expert(experts_ptr, slot_ptr, tl.minimum(r, R - 1), num_experts, HAS_SLOT)
    x_row = x_ptr + (r // ROWS_PER_X) * stride_x
    w_e = w_ptr + expert * stride_we
    s_e = s_ptr + expert * stride_se
    h_out = h_ptr + r * stride_h + local_n
    offs_n = local_n
    n_ok = local_n < F
    up = F
    if SHARED > 0:  # a shared-expert program: its rows [c*F, c*F + F) for token t
        sh = r >= R
        t = (r - R) // SHARED
        first = tl.where(sh, ((r - R) % SHARED) * F, 0).to(tl.int32)
        x_row = tl.where(sh, x_ptr + t * stride_x, x_row)
        w_e = tl.where(sh, sw_ptr, w_e)  # the same strides as the routed weights
        s_e = tl.where(sh, ss_ptr, s_e)
        h_out = tl.where(sh, hs_ptr + t * S + first + local_n, h_out)
        offs_n = first + local_n
        n_ok = (local_n < F) & (offs_n < tl.where(sh, S, F))
        up = tl.where(sh, S, F)
        expert = tl.where(sh, 0, expert)
    if expert < 0:  # a sentinel: the sum over k drops its row
        return
    offs_k = tl.arange(0, BLOCK_K)
    if QUANT == 0:
        n = offs_n[:, None]
        acc_g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=LOOP_STAGES):
            kk = k0 + offs_k
            k_ok = kk < K
            x = tl.load(x_row + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            m = n_ok[:, None] & k_ok[None, :]
            w_gate = tl.load(w_e + n * stride_wn + kk[None, :], mask=m, other=0.0)
            w_up = tl.load(w_e + (n + up) * stride_wn + kk[None, :], mask=m, other=0.0)
            acc_g += w_gate.to(tl.float32) * x
            acc_u += w_up.to(tl.float32) * x
        gate = rnd(tl.sum(acc_g, axis=1), h_ptr)
        upv = rnd(tl.sum(acc_u, axis=1), h_ptr)
    elif QUANT == 1:
        G: tl.constexpr = BLOCK_K // GROUP
        acc_g = tl.zeros((BLOCK_N, G), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N, G), dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=LOOP_STAGES):
            x = x_tile(x_row, k0, K, GROUP, G)
            acc_g += quant_tile(
                w_e, s_e, offs_n, n_ok, x, k0, K, stride_wn, stride_sn, stride_sk, GROUP, G
            )
            acc_u += quant_tile(
                w_e, s_e, offs_n + up, n_ok, x, k0, K, stride_wn, stride_sn, stride_sk, GROUP, G
            )
        gate = rnd(tl.sum(acc_g, axis=1), h_ptr)
        upv = rnd(tl.sum(acc_u, axis=1), h_ptr)
    else:
        GW: tl.constexpr = BLOCK_K // (32 if HALF else 8)
        acc_g = tl.zeros((BLOCK_N, GW), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N, GW), dtype=tl.float32)
        row0 = tl.program_id(0) * BLOCK_N  # no shared expert takes mxfp4
        for k0 in tl.range(0, K, BLOCK_K, num_stages=LOOP_STAGES):
            if HALF:
                x0e, x0o, x1e, x1o, x2e, x2o, x3e, x3o = x_group(x_row, k0, K, GW, x_scale)
                acc_g += mxfp4_group_dot(
                    w_e, s_e, row0, F, x0e, x0o, x1e, x1o, x2e, x2o, x3e, x3o, k0, K,
                    stride_wn, stride_sn, stride_sk, BLOCK_N, GROUP, GW, EVEN_N,
                )  # fmt: skip
                acc_u += mxfp4_group_dot(
                    w_e, s_e, row0 + F, 2 * F, x0e, x0o, x1e, x1o, x2e, x2o, x3e, x3o, k0, K,
                    stride_wn, stride_sn, stride_sk, BLOCK_N, GROUP, GW, EVEN_N,
                )  # fmt: skip
            else:
                xe, xo = x_pairs(x_row, k0, K, GW)
                acc_g += mxfp4_word_dot(
                    w_e, s_e, row0, F, xe, xo, k0, K,
                    stride_wn, stride_sn, stride_sk, BLOCK_N, GROUP, GW, PACKED, EVEN_N,
                )  # fmt: skip
                acc_u += mxfp4_word_dot(
                    w_e, s_e, row0 + F, 2 * F, xe, xo, k0, K,
                    stride_wn, stride_sn, stride_sk, BLOCK_N, GROUP, GW, PACKED, EVEN_N,
                )  # fmt: skip
        unscale = 1.0 / x_scale  # a power of two: exact
        gate = rnd(tl.sum(acc_g, axis=1) * unscale, h_ptr)
        upv = rnd(tl.sum(acc_u, axis=1) * unscale, h_ptr)
    if HAS_BIAS:  # routed experts only (the caller keeps biased experts from a shared one)
        b_row = bias_ptr + expert * stride_bias + offs_n
        gate = rnd(gate + tl.load(b_row, mask=n_ok, other=0.0).to(tl.float32), h_ptr)
        upv = rnd(upv + tl.load(b_row + F, mask=n_ok, other=0.0).to(tl.float32), h_ptr)
    h = activate(gate, upv, h_ptr, alpha, limit, CLAMPED)
    tl.store(h_out, h, mask=n_ok)


@triton.jit
def _down_kernel(
    h_ptr,  # [R, K] (K = F)
    w_ptr,  # [slots, N, K] (N = D)
    out_ptr,  # [SPLIT, R + T*SHARED, N] float32: each K split's partial sums
    experts_ptr,
    slot_ptr,
    s_ptr,  # [slots, N, ceil(K/GROUP)] weight scales (QUANT)
    hs_ptr,  # [T, S] the shared expert's activations (SHARED)
    sw_ptr,  # [N, S] its down projection (SHARED)
    ss_ptr,  # [N, ceil(S/GROUP)] its scales (SHARED and QUANT)
    N,
    K,
    S,
    PIECE,  # the shared expert's K per program (a multiple of GROUP)
    R,
    num_experts,
    stride_h,
    stride_we,
    stride_wn: tl.constexpr,
    stride_out,
    stride_split,
    stride_se,
    stride_sn: tl.constexpr,
    stride_sk,
    stride_ssn,
    x_scale,  # mxfp4 HALF: the activations' power-of-two scale (mxfp4.x_scale)
    # The sum over k in the last program of each column tile (SUM; moe_epilogue.sum_token):
    count_ptr,  # [column tiles] int32 arrivals, zero between launches
    weights_ptr,  # [T, TOP_K] float32 routing weights
    final_ptr,  # [T, N] the layer's output
    res_ptr,  # [T, N] residual (RESIDUAL)
    extra_ptr,  # [T, N] a shared expert's output computed apart (EXTRA)
    bias_ptr,  # [slots, N] down biases (HAS_BIAS)
    T,
    stride_final,
    stride_res,
    stride_extra,
    stride_bias,
    SHARED: tl.constexpr,  # shared-expert rows per token (PIECE of its S columns each), or 0
    HAS_SLOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    QUANT: tl.constexpr,
    GROUP: tl.constexpr,
    LOOP_STAGES: tl.constexpr,
    PACKED: tl.constexpr,
    EVEN_N: tl.constexpr,
    HALF: tl.constexpr,
    SUM: tl.constexpr,
    SPLIT: tl.constexpr,  # K splits (the grid's third axis), for SUM
    TOP_K: tl.constexpr,
    RESIDUAL: tl.constexpr,
    EXTRA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    # Before the wait: this kernel always follows the gate/up GEMV, whose programs waited for
    # every kernel before it, so the routing, an expert cache's slot map and its copied
    # weights are final; only h, gate/up's output, is not. The expert and (plain weights) the
    # first K tile load here, overlapping gate/up's last programs.
    r = tl.program_id(1).to(tl.int64)
    expert = _row_expert(experts_ptr, slot_ptr, tl.minimum(r, R - 1), num_experts, HAS_SLOT)
    h_row = h_ptr + r * stride_h
    w_e = w_ptr + expert * stride_we
    s_e = s_ptr + expert * stride_se
    k_len = K
    wn = stride_wn
    sn = stride_sn
    if SHARED > 0:  # a shared-expert program: its columns [p*PIECE, p*PIECE + PIECE), token t
        sh = r >= R
        t = (r - R) // SHARED
        first = tl.where(sh, ((r - R) % SHARED) * PIECE, 0).to(tl.int32)
        h_row = tl.where(sh, hs_ptr + t * S + first, h_row)
        w_e = tl.where(sh, sw_ptr + first, w_e)
        s_e = tl.where(sh, ss_ptr + (first // GROUP) * stride_sk, s_e)
        k_len = tl.where(sh, tl.minimum(S - first, PIECE), K)
        wn = tl.where(sh, S, stride_wn)
        sn = tl.where(sh, stride_ssn, stride_sn)
        expert = tl.where(sh, 0, expert)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    # This program's K range: whole tiles, the splits as even as the tiles allow.
    per_split = tl.cdiv(tl.cdiv(k_len, BLOCK_K), tl.num_programs(2)) * BLOCK_K
    k_first = tl.program_id(2) * per_split
    k_end = tl.minimum(k_first + per_split, k_len)
    if QUANT == 0:
        w_rows = w_e + offs_n[:, None] * wn
        kk = k_first + offs_k
        k_ok = kk < k_end
        m = (n_ok & (offs_n * 0 + expert >= 0))[:, None] & k_ok[None, :]
        w_first = tl.load(w_rows + kk[None, :], mask=m, other=0.0)
    wait_prior()
    if expert >= 0:  # a sentinel's row: no partial (the sum over k drops its term)
        if QUANT == 0:
            h = tl.load(h_row + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            acc = w_first.to(tl.float32) * h
            for k0 in tl.range(k_first + BLOCK_K, k_end, BLOCK_K, num_stages=LOOP_STAGES):
                kk = k0 + offs_k
                k_ok = kk < k_end
                h = tl.load(h_row + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
                m = n_ok[:, None] & k_ok[None, :]
                w = tl.load(w_rows + kk[None, :], mask=m, other=0.0)
                acc += w.to(tl.float32) * h
        elif QUANT == 1:
            G: tl.constexpr = BLOCK_K // GROUP
            acc = tl.zeros((BLOCK_N, G), dtype=tl.float32)
            for k0 in tl.range(k_first, k_end, BLOCK_K, num_stages=LOOP_STAGES):
                h = x_tile(h_row, k0, k_len, GROUP, G)
                acc += quant_tile(w_e, s_e, offs_n, n_ok, h, k0, k_len, wn, sn, stride_sk, GROUP, G)
        else:
            GW: tl.constexpr = BLOCK_K // (32 if HALF else 8)
            acc = tl.zeros((BLOCK_N, GW), dtype=tl.float32)
            for k0 in tl.range(k_first, k_end, BLOCK_K, num_stages=LOOP_STAGES):
                if HALF:
                    x0e, x0o, x1e, x1o, x2e, x2o, x3e, x3o = x_group(h_row, k0, k_len, GW, x_scale)
                    acc += mxfp4_group_dot(
                        w_e, s_e, tl.program_id(0) * BLOCK_N, N,
                        x0e, x0o, x1e, x1o, x2e, x2o, x3e, x3o, k0, k_len,
                        stride_wn, stride_sn, stride_sk, BLOCK_N, GROUP, GW, EVEN_N,
                    )  # fmt: skip
                else:
                    he, ho = x_pairs(h_row, k0, k_len, GW)
                    acc += mxfp4_word_dot(
                        w_e, s_e, tl.program_id(0) * BLOCK_N, N, he, ho, k0, k_len,
                        stride_wn, stride_sn, stride_sk, BLOCK_N, GROUP, GW, PACKED, EVEN_N,
                    )  # fmt: skip
            acc = acc * (1.0 / x_scale)  # a power of two: exact
        out_row = out_ptr + tl.program_id(2) * stride_split + r * stride_out
        tl.store(out_row + offs_n, tl.sum(acc, axis=1), mask=n_ok)
    if SUM:
        # The tile's last program to finish adds up all its partials, in the sum kernel's
        # order (exact as it): one launch fewer. The barrier puts every thread's stores
        # before the count; the count is acquire-release at GPU scope.
        tl.debug_barrier()
        tile = tl.program_id(0)
        done = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if done == tl.num_programs(1) * tl.num_programs(2) - 1:
            tl.store(count_ptr + tile, 0)  # zero for the next launch, which waits for this one
            for tok in range(T):
                sum_token(
                    out_ptr, experts_ptr, weights_ptr, final_ptr, res_ptr, extra_ptr,
                    bias_ptr, slot_ptr, tok, T, offs_n, n_ok, N, num_experts, stride_split,
                    stride_final, stride_res, stride_extra, stride_bias,
                    SPLIT, SHARED, TOP_K, RESIDUAL, EXTRA, HAS_BIAS, HAS_SLOT, ".cg",
                )  # fmt: skip


def gemv_gate_up_act(
    x_TD: torch.Tensor,
    w_gate_up_EF2D: torch.Tensor,
    experts_R: torch.Tensor,
    top_k: int,
    num_experts: int,
    *,
    expert_slot_E: torch.Tensor | None = None,
    bias_EF2: torch.Tensor | None = None,
    activation: tuple[str, float, float],
    cfg: dict[str, int] | None = None,
    w_scale: torch.Tensor | None = None,
    quant: str = "",
    shared: SharedExpert | None = None,
    x_bound: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """act(x[r // top_k] @ w_gate_up[e_r].T + b[e_r]) for every assignment r: [R, F]; with a
    shared expert also silu(gate) * up of its [T, S] in the same launch (else None).
    quant, w_scale: the weights' storage format (kernels.quant). x_bound: a bound on |x|
    that the caller knows (mxfp4 then multiplies in float16: mxfp4.half_products)."""
    R = experts_R.numel()
    T = x_TD.shape[0]
    F2, D = w_gate_up_EF2D.shape[1], real_k(w_gate_up_EF2D, quant)
    F = F2 // 2
    code, group = quant_code(quant)
    assert (w_scale is None) == (quant == ""), "quantized weights need their scales"
    alloc = torch.zeros if interpreting() else torch.empty  # sentinel rows stay unwritten
    h_RF = alloc(R, F, dtype=x_TD.dtype, device=x_TD.device)
    assert x_TD.stride(1) == 1 and w_gate_up_EF2D.stride(2) == 1
    half = False
    if code == QUANT_CODES["mxfp4"]:
        x_TD = pairs_aligned(x_TD)
        half = half_products(x_bound)
    assert bias_EF2 is None or bias_EF2.stride(1) == 1
    cfg = cfg or gemv_config(F, D, quant, half=half)
    kind, alpha, limit = activation
    h_TS, shared_rows, S = None, 0, 0
    sw = ss = h_RF  # unused pointers without a shared expert
    if shared is not None:
        assert shared.quant == quant and bias_EF2 is None and kind == "silu"
        sw, ss, S = shared.w_gate_up_FD, shared.gate_up_scale, shared.width
        # One set of strides for both: the shared rows index the routed weights' layout.
        assert sw.stride() == w_gate_up_EF2D.stride()[1:]
        assert ss is None or ss.stride() == w_scale.stride()[1:]
        ss = ss if ss is not None else h_RF
        h_TS = torch.empty(T, S, dtype=x_TD.dtype, device=x_TD.device)
        shared_rows = shared.up_rows(F)
    if R:
        _gate_up_act_kernel[(triton.cdiv(F, cfg["BLOCK_N"]), R + T * shared_rows)](
            x_TD,
            w_gate_up_EF2D,
            h_RF,
            experts_R,
            expert_slot_E if expert_slot_E is not None else h_RF,  # unused pointers
            bias_EF2 if bias_EF2 is not None else h_RF,
            w_scale if w_scale is not None else h_RF,
            sw,
            ss,
            h_TS if h_TS is not None else h_RF,
            F,
            D,
            S,
            R,
            num_experts,
            x_TD.stride(0),
            w_gate_up_EF2D.stride(0),
            w_gate_up_EF2D.stride(1),
            h_RF.stride(0),
            bias_EF2.stride(0) if bias_EF2 is not None else 0,
            *(w_scale.stride() if w_scale is not None else (0, 0, 0)),
            float(alpha),
            float(limit),
            x_scale(x_bound) if half else 1.0,
            ROWS_PER_X=top_k,
            SHARED=shared_rows,
            HAS_SLOT=expert_slot_E is not None,
            HAS_BIAS=bias_EF2 is not None,
            CLAMPED=kind == "clamped_swiglu",
            BLOCK_N=cfg["BLOCK_N"],
            BLOCK_K=cfg["BLOCK_K"],
            QUANT=code,
            GROUP=group,
            LOOP_STAGES=cfg.get("loop_stages", 1),
            PACKED=packed_decode(),
            HALF=half,
            EVEN_N=F % cfg["BLOCK_N"] == 0,
            num_warps=cfg["num_warps"],
            **pdl.LAUNCH,
        )
    return h_RF, h_TS


class DownSum(NamedTuple):
    """The sum over k (moe_epilogue.sum_over_k's inputs) for gemv_down to run in the last
    program of each column tile."""

    weights_TK: torch.Tensor  # float32
    out_TD: torch.Tensor
    residual_TD: torch.Tensor | None = None
    b_down_ED: torch.Tensor | None = None
    extra_TD: torch.Tensor | None = None


def gemv_down(
    h_RF: torch.Tensor,
    w_down_EDF: torch.Tensor,
    out_SRD: torch.Tensor,
    experts_R: torch.Tensor,
    num_experts: int,
    *,
    expert_slot_E: torch.Tensor | None = None,
    cfg: dict[str, int] | None = None,
    w_scale: torch.Tensor | None = None,
    quant: str = "",
    shared: tuple[SharedExpert, torch.Tensor] | None = None,
    x_bound: float | None = None,
    sum_into: DownSum | None = None,
) -> bool:
    """out_SRD[s, r] = h[r, K split s] @ w_down[e_r, :, K split s].T in float32, for the
    S = out_SRD.shape[0] splits of K (unrounded partials: the sum over k adds and rounds).
    shared (the expert, its activations h_TS): rows R + t*n + p of out_SRD hold the partials
    of its piece p for token t (n = its down_rows). x_bound: a bound on |h| (as in
    gemv_gate_up_act; cfg, when given, gemv_config's for the same half_products).
    sum_into: also run the sum over k of these partials into sum_into.out_TD (the last
    program of each column tile does, once the others' partials are in); returns whether
    it did (not under a graph capture that found no counters: the caller sums)."""
    R = experts_R.numel()
    D, F = w_down_EDF.shape[1], real_k(w_down_EDF, quant)
    code, group = quant_code(quant)
    assert (w_scale is None) == (quant == ""), "quantized weights need their scales"
    assert out_SRD.dtype == torch.float32 and out_SRD.stride(2) == 1
    assert h_RF.stride(1) == 1 and w_down_EDF.stride(2) == 1
    half = False
    if code == QUANT_CODES["mxfp4"]:
        h_RF = pairs_aligned(h_RF)
        half = half_products(x_bound)
    cfg = cfg or gemv_config(D, F, quant, half=half)
    shared_rows, S, piece, ssn = 0, 0, 0, 0
    hs = sw = ss = out_SRD  # unused pointers without a shared expert
    if shared is not None:
        expert, hs = shared
        assert expert.quant == quant and hs.is_contiguous()
        sw, ss, S, piece = expert.w_down_DF, expert.down_scale, expert.width, expert.piece(F)
        assert sw.is_contiguous() and (ss is None or ss.stride(1) == w_scale.stride(2))
        ssn = ss.stride(0) if ss is not None else 0
        ss = ss if ss is not None else out_SRD
        shared_rows = expert.down_rows(F)
        assert out_SRD.shape[1] == R + hs.shape[0] * shared_rows
    tiles = triton.cdiv(D, cfg["BLOCK_N"])
    counts = arrivals.counters(out_SRD.device, tiles) if sum_into is not None and R else None
    fin = res = extra = bias = out_SRD  # unused pointers without the sum
    weights = None
    if counts is not None:
        assert out_SRD.stride(1) == D
        fin, weights = sum_into.out_TD, sum_into.weights_TK
        assert weights.dtype == torch.float32 and weights.is_contiguous()
        assert experts_R.is_contiguous() and fin.stride(1) == 1
        res = sum_into.residual_TD if sum_into.residual_TD is not None else fin
        extra = sum_into.extra_TD if sum_into.extra_TD is not None else fin
        bias = sum_into.b_down_ED if sum_into.b_down_ED is not None else fin
        assert res.stride(1) == 1 and extra.stride(1) == 1 and bias.stride(-1) == 1
    if R:
        _down_kernel[(tiles, out_SRD.shape[1], out_SRD.shape[0])](
            h_RF,
            w_down_EDF,
            out_SRD,
            experts_R,
            expert_slot_E if expert_slot_E is not None else out_SRD,  # unused pointers
            w_scale if w_scale is not None else out_SRD,
            hs,
            sw,
            ss,
            D,
            F,
            S,
            piece,
            R,
            num_experts,
            h_RF.stride(0),
            w_down_EDF.stride(0),
            w_down_EDF.stride(1),
            out_SRD.stride(1),
            out_SRD.stride(0),
            *(w_scale.stride() if w_scale is not None else (0, 0, 0)),
            ssn,
            x_scale(x_bound) if half else 1.0,
            counts if counts is not None else out_SRD,
            weights if weights is not None else out_SRD,
            fin,
            res,
            extra,
            bias,
            fin.shape[0] if counts is not None else 0,
            fin.stride(0),
            res.stride(0),
            extra.stride(0),
            bias.stride(0),
            SHARED=shared_rows,
            HAS_SLOT=expert_slot_E is not None,
            BLOCK_N=cfg["BLOCK_N"],
            BLOCK_K=cfg["BLOCK_K"],
            QUANT=code,
            GROUP=group,
            LOOP_STAGES=cfg.get("loop_stages", 1),
            PACKED=packed_decode(),
            HALF=half,
            EVEN_N=D % cfg["BLOCK_N"] == 0,
            SUM=counts is not None,
            SPLIT=out_SRD.shape[0],
            TOP_K=R // fin.shape[0] if counts is not None else 1,
            RESIDUAL=counts is not None and sum_into.residual_TD is not None,
            EXTRA=counts is not None and sum_into.extra_TD is not None,
            HAS_BIAS=counts is not None and sum_into.b_down_ED is not None,
            num_warps=cfg["num_warps"],
            **pdl.LAUNCH,
        )
    return counts is not None
