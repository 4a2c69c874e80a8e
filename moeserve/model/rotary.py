"""Rotary position embedding (rotate-half layout) with the default/linear/yarn/llama3 rules.

Shapes: T tokens, H heads, X head dim, P positions.
"""

from __future__ import annotations

import math

import torch

from moeserve.config import ModelConfig


class Rotary:
    """Rotary position embedding (rotate-half layout) with the default/linear/yarn/llama3 rules."""

    # Positions up to this many get a precomputed cos/sin table: one gather per step instead
    # of ~7 elementwise kernels (a 32k-position table of 128-wide heads is 16 MB in bf16).
    TABLE_MAX_POSITIONS = 131072

    def __init__(
        self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype | None = None
    ) -> None:
        dim = cfg.rotary_width  # partial rotary (GLM): only the first `dim` of each head
        p = cfg.rope_params
        base = cfg.rope_theta
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        self.scale = 1.0
        kind = p.get("rope_type", "default")
        if kind == "linear":
            inv_freq = inv_freq / p["factor"]
        elif kind == "llama3":
            inv_freq = _llama3(inv_freq, p)
        elif kind == "yarn":
            inv_freq, self.scale = _yarn(dim, base, p, cfg.max_position_embeddings)
        self.inv_freq = inv_freq.to(device)
        self.dim = dim
        self._table: torch.Tensor | None = None  # [P, 2X]: cos then sin, in `dtype`
        n = cfg.max_position_embeddings
        if dtype is not None and n <= self.TABLE_MAX_POSITIONS:
            positions = torch.arange(n, device=device)
            self._table = torch.cat(self._compute(positions, dtype), dim=-1)

    def _compute(self, positions_T: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        freqs_TX = positions_T.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs_TX, freqs_TX), dim=-1)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)

    def cos_sin(self, positions_T: torch.Tensor, dtype: torch.dtype) -> CosSin:
        return CosSin(self, positions_T, dtype)

    def rows(self, positions_T: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """cos, sin [T, X] (views of one gather when the table covers the model's positions;
        the same values either way: the table is this formula at every position)."""
        table = self.table(dtype)
        if table is None:
            return self._compute(positions_T, dtype)
        rows = table[positions_T]
        return rows[:, : self.dim], rows[:, self.dim :]

    def table(self, dtype: torch.dtype) -> torch.Tensor | None:
        table = self._table
        return table if table is not None and table.dtype == dtype else None


class CosSin:
    """A batch's rotary cos and sin. The readable path asks for the [T, X] rows (`pair`,
    computed once); a kernel may instead read the table rows itself (`for_kernel`), so a decode
    step launches no gather at all."""

    def __init__(self, rotary: Rotary, positions_T: torch.Tensor, dtype: torch.dtype) -> None:
        self.rotary, self.positions_T, self.dtype = rotary, positions_T, dtype
        self._pair: tuple[torch.Tensor, ...] | None = None

    def pair(self) -> tuple[torch.Tensor, ...]:
        if self._pair is None:
            self._pair = self.rotary.rows(self.positions_T, self.dtype)
        return self._pair

    def for_kernel(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(cos, sin, positions): whole tables [P, X] read at positions, or (with no table for
        this dtype) the rows [T, X] and None."""
        table = self.rotary.table(self.dtype)
        if table is None:
            cos, sin = self.pair()
            return cos, sin, None
        x = self.rotary.dim
        return table[:, :x], table[:, x:], self.positions_T


def apply_rotary(x_THX: torch.Tensor, cos_TX: torch.Tensor, sin_TX: torch.Tensor) -> torch.Tensor:
    """x rotated (rotate-half layout); with cos/sin narrower than the head (partial rotary),
    only its first cos_TX.shape[-1] entries, the rest passed through."""
    rot = cos_TX.shape[-1]
    if rot < x_THX.shape[-1]:
        return torch.cat((apply_rotary(x_THX[..., :rot], cos_TX, sin_TX), x_THX[..., rot:]), -1)
    half = x_THX.shape[-1] // 2
    rotated = torch.cat((-x_THX[..., half:], x_THX[..., :half]), dim=-1)
    return x_THX * cos_TX[:, None, :] + rotated * sin_TX[:, None, :]


def _llama3(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor, low, high = p["factor"], p.get("low_freq_factor", 1.0), p.get("high_freq_factor", 4.0)
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(dim: int, base: float, p: dict, max_pos: int) -> tuple[torch.Tensor, float]:
    factor = p["factor"]
    orig = p.get("original_max_position_embeddings") or max_pos

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = p.get("attention_factor")
    if attn is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (
        1.0 / pos_freqs
    ) * extrapolation
    return inv_freq, float(attn)
