"""Which batches take the MoE GEMVs (kernels.moe_gemv), their tiles and K splits, and how an
ungated shared expert's rows join their launches: the decisions, apart from the kernels.
Measurements behind each table: benchmarks/RESULTS.md (kernel_bench.py --gemv --sweep).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from moeserve.kernels import interpreting, k_splits
from moeserve.kernels.quant import group_size

# Up to this many tokens, and for bf16 experts up to this intermediate width, the fused MoE
# takes these kernels (kernels.fused_moe). Beyond that many tokens the experts repeat across
# tokens, and the grouped GEMM reads each expert's weights once for all its rows where these
# read them once per row; for very wide bf16 experts the grouped GEMM's K splits stream as fast.
# Batch-1 decode, GEMVs vs grouped GEMMs in the same run (benchmarks/RESULTS.md): Qwen3-30B-A3B
# (F 768) 1.12x and Mixtral (F 14336) 0.97x (H200, 2026-12-04); gpt-oss-20b (F 2880) 0.94x
# then, 1.05x since (H100, 2026-12-07).
# Quantized experts take them at any width: the grouped GEMM dequantizes every weight before
# its dot, these scale each group's dot once (fp8 Mixtral layer 117 vs 224 us).
GEMV_MAX_TOKENS = 1
GEMV_MAX_INTERMEDIATE = 4096

# Up to this many tokens, an unsplit down GEMV's last program of each column tile runs the
# sum over k (moe_gemv.gemv_down's sum_into), one token after another, in place of the sum
# kernel; 0: the sum kernel always (A/B: `gpu_speed.py --set
# moe_gemv_plan.SUM_IN_DOWN_MAX_TOKENS=0`). Batch 1 on an H100 (benchmarks/RESULTS.md):
# Qwen3-30B-A3B, unsplit, 1.015x; DeepSeek-V2-Lite in 2 splits 1.00x and gpt-oss-20b in 3
# 0.98x, hence unsplit only.
SUM_IN_DOWN_MAX_TOKENS = 1


def sums_in_down(num_tokens: int, splits: int) -> bool:
    return num_tokens <= SUM_IN_DOWN_MAX_TOKENS and splits == 1


def takes_gemv(num_tokens: int, intermediate: int, quant: str = "") -> bool:
    return num_tokens <= GEMV_MAX_TOKENS and (bool(quant) or intermediate <= GEMV_MAX_INTERMEDIATE)


def gemv_config(
    N: int, K: int, quant: str = "", rows: int = 0, half: bool = False
) -> dict[str, int]:
    """BLOCK_N output rows per program, BLOCK_K columns per K tile, warps, and for the down
    projection of `rows` assignments SPLIT_K, the K splits that fill the SMs (gate/up does
    not split: its activation needs whole sums). Quantized weights: K tiles of whole scale
    groups (fp8 128, mxfp4 32 elements).

    From kernel_bench --gemv --sweep on an H200 (benchmarks/RESULTS.md), Mixtral's and
    gpt-oss's and Qwen3's experts at one token: the down projection splits K until each SM
    has about 8 programs (more or fewer cost up to 5%; mxfp4 16). mxfp4 decodes nibbles in
    the ALUs, one word a thread and row: its gate/up programs take 4 rows of 512 columns over
    2 warps, its down 8 rows of 1024 over 4 warps in K tiles of 3 or more (unsplit for
    gpt-oss-120b), loads unpipelined (H100, gpt-oss-120b); bf16 and fp8 gate/up read 16 rows of
    256 columns over 4 warps with 3 (fp8: 4) K tiles in flight; bf16's down 32 rows of 128
    columns over 8 warps, fp8's 32 rows of 1024 over 4 with one tile in flight. Depth and
    tile go together: 3 tiles in flight at 32 x 256 over 8 warps took Mixtral's fp8 gate/up
    421 us, against 63 at the shipped tile."""
    if interpreting():  # every program runs in Python: few, small ones
        return dict(BLOCK_N=16, BLOCK_K=group_size(quant) if quant else 16, num_warps=4, SPLIT_K=1)
    down = rows > 0
    kind = "mxfp4-group" if quant == "mxfp4" and half else quant
    block_n, block_k, warps, stages = _GEMV_TILES[kind, down]
    block_k = max(min(block_k, triton.next_power_of_2(K)), group_size(quant) if quant else 16)
    cfg = dict(BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, SPLIT_K=1, loop_stages=stages)
    if down:
        programs = rows * triton.cdiv(N, block_n)
        min_tiles, per_sm = _DOWN_SPLITS.get(quant, _DOWN_SPLITS[""])
        cfg["SPLIT_K"] = k_splits(programs, triton.cdiv(K, block_k), min_tiles, 8, per_sm=per_sm)
    return cfg


# (quant, down projection) -> (BLOCK_N, BLOCK_K, num_warps, loop_stages), gemv_config's
# measurements. loop_stages: K tiles whose loads are in flight at once. These loops have no
# dot, so the kernel's num_stages does not pipeline them; without tl.range's num_stages a
# program waits out a full memory latency per K tile.
_GEMV_TILES: dict[tuple[str, bool], tuple[int, int, int, int]] = {
    ("", False): (16, 256, 4, 3),
    ("", True): (32, 128, 8, 3),
    ("fp8", False): (16, 256, 4, 4),
    ("fp8", True): (32, 1024, 4, 1),
    ("mxfp4", False): (4, 512, 2, 1),
    ("mxfp4", True): (8, 1024, 4, 1),
    # a scale group a thread (mxfp4.mxfp4_group_dot): 1024 columns a warp
    ("mxfp4-group", False): (4, 1024, 1, 1),
    ("mxfp4-group", True): (8, 1024, 1, 1),
}


# The fewest K tiles a split of the down GEMV streams, and the programs it aims for per SM.
# gpt-oss-120b's MXFP4 down (K 2880: 3 word tiles of 1024) takes 14.1 us unsplit, 15.0 in 2
# splits, 16.6 in 3 (H100, 2026-12-06).
_DOWN_SPLITS: dict[str, tuple[int, int]] = {"": (4, 8), "mxfp4": (3, 16)}


class SharedExpert(NamedTuple):
    """An ungated shared expert (DeepSeek, GLM: n_shared_experts of them as one MLP) as the
    GEMVs run it beside the routed experts: gate/up [2S, D] (gate rows first), down [D, S],
    the model dtype or fp8 with the [N, groups of K] scales of a dense linear (model/quant.py).
    Its programs are extra rows of the routed launches: gate/up rows of F outputs each (the
    routed width), down rows of `piece` columns of K each."""

    w_gate_up_FD: torch.Tensor
    w_down_DF: torch.Tensor
    gate_up_scale: torch.Tensor | None = None
    down_scale: torch.Tensor | None = None

    @property
    def quant(self) -> str:
        """Its storage: "fp8" with scales (both projections, as the caller checks), else ""."""
        return "fp8" if self.gate_up_scale is not None else ""

    @property
    def width(self) -> int:
        return self.w_down_DF.shape[1]

    def up_rows(self, F: int) -> int:
        """Gate/up programs' rows per token: F of its S outputs each."""
        return triton.cdiv(self.width, F)

    def piece(self, F: int) -> int:
        """Down programs' K columns: F, whole scale groups when quantized."""
        g = group_size(self.quant) if self.quant else 1
        return triton.cdiv(F, g) * g

    def down_rows(self, F: int) -> int:
        return triton.cdiv(self.width, self.piece(F))
