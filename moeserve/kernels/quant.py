"""Quantized expert weights: the storage formats, their torch reference and test quantizers.

A weight that is [.., N, K] in real values (N output rows, K the reduced dim) is stored as a
pair (w, s) with one scale per output row and group of K elements:

    "fp8":    w float8_e4m3fn [.., N, K], s float32 [.., N, ceil(K / 128)]
              real[n, k] = float(w[n, k]) * s[n, k // 128]   (the last group may be partial)
    "mxfp4":  w uint8 [.., N, K / 2], s uint8 (E8M0) [.., N, K / 32]
              element k is the low nibble of byte k // 2 when k is even, the high one when odd;
              real[n, k] = E2M1[nibble] * 2 ** (s[n, k // 32] - 127)
    "":       plain weights in the model dtype

The Triton kernels (moe_gemm, moe_gemv) dequantize in registers; this module is their readable
twin and imports no Triton, so the CPU model path can use it too.
"""

from __future__ import annotations

import torch

QUANT_FORMATS = ("", "fp8", "mxfp4")
FP8_GROUP = 128
MXFP4_GROUP = 32
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
# E2M1 codes 0..15: sign bit 3, exponent bits 2..1, mantissa bit 0 (the OCP MX table).
E2M1_VALUES = (
    0.0,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    4.0,
    6.0,
    -0.0,
    -0.5,
    -1.0,
    -1.5,
    -2.0,
    -3.0,
    -4.0,
    -6.0,
)
# Round-to-nearest boundaries between the non-negative E2M1 magnitudes (codes 0..7).
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def group_size(quant: str) -> int:
    """K elements that share one scale."""
    return {"fp8": FP8_GROUP, "mxfp4": MXFP4_GROUP}[quant]


def real_k(w: torch.Tensor, quant: str) -> int:
    """The reduced dim K of a stored weight (mxfp4 packs two elements per byte)."""
    return w.shape[-1] * 2 if quant == "mxfp4" else w.shape[-1]


def quantized_bytes(w: torch.Tensor, s: torch.Tensor | None) -> int:
    """Bytes a GEMM streams for one stored weight: the packed values and their scales."""
    return w.numel() * w.element_size() + (0 if s is None else s.numel() * s.element_size())


def dequantize(
    w: torch.Tensor, s: torch.Tensor | None, quant: str, dtype: torch.dtype
) -> torch.Tensor:
    """The real values [.., N, K] of a stored weight, in `dtype` (computed in float32)."""
    if quant == "":
        return w.to(dtype)
    assert s is not None, f"{quant} weights need their scales"
    if quant == "fp8":
        K = w.shape[-1]
        assert s.shape[-1] == -(-K // FP8_GROUP), (w.shape, s.shape)
        scale = s.float().repeat_interleave(FP8_GROUP, dim=-1)[..., :K]
        return (w.float() * scale).to(dtype)
    if quant == "mxfp4":
        assert w.dtype == torch.uint8 and s.shape[-1] * MXFP4_GROUP == 2 * w.shape[-1]
        table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=w.device)
        codes = torch.stack([w & 0xF, w >> 4], dim=-1).flatten(-2)  # even k = low nibble
        scale = torch.exp2(s.float() - 127.0).repeat_interleave(MXFP4_GROUP, dim=-1)
        return (table[codes.long()] * scale).to(dtype)
    raise ValueError(f"unknown weight quantization {quant!r}; known: {QUANT_FORMATS}")


def quantize_fp8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn [.., N, K], float32 scales [.., N, ceil(K/128)]), scale = group amax / 448
    (1 for an all-zero group, so nothing divides by zero)."""
    *lead, K = w.shape
    G = -(-K // FP8_GROUP)
    padded = torch.nn.functional.pad(w.float(), (0, G * FP8_GROUP - K))
    groups = padded.view(*lead, G, FP8_GROUP)
    amax = groups.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (groups / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(*lead, G * FP8_GROUP)[..., :K].contiguous(), scale


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 [.., N, K/2], E8M0 uint8 [.., N, K/32]) with the OCP MX scheme OpenAI's and
    transformers' quantizers use: the group's scale is 2 ** (floor(log2(amax)) - 2) (E2M1's
    largest exponent is 2), clamped to E8M0's range; elements round to the nearest E2M1 value
    and saturate at +-6."""
    *lead, K = w.shape
    assert K % MXFP4_GROUP == 0, f"mxfp4 needs K a multiple of {MXFP4_GROUP}, got {K}"
    groups = w.float().view(*lead, K // MXFP4_GROUP, MXFP4_GROUP)
    amax = groups.abs().amax(dim=-1)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.full_like(amax, -127.0))
    exp = exp.clamp(-127, 127)
    scaled = groups / torch.exp2(exp)[..., None]
    mids = torch.tensor(_E2M1_MIDPOINTS, device=w.device)
    magnitude = torch.bucketize(scaled.abs(), mids)  # code 0..7; 7 (6.0) for anything above 5
    codes = (magnitude + 8 * (scaled < 0).long()).to(torch.uint8).view(*lead, K)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.contiguous(), (exp + 127).to(torch.uint8)
