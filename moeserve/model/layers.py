"""RMSNorm, rotary embedding and attention over the paged KV cache.

Shapes: T tokens in the flat batch, B sequences, D hidden, H heads, G kv heads, X head dim,
N blocks in the pool, S slots per block (block size), M max blocks per sequence.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from moeserve.config import ModelConfig

# The SDPA backends eager steps may use: not cuDNN's, which PyTorch prefers on Hopper. It
# builds an execution plan for every new pair of query and key lengths, compiling it with
# NVRTC (tens of ms), and a server's prompts and prefill chunks keep bringing new pairs: on an
# H200 at 64 streams its mixed steps took 47 ms against 17 (benchmarks/RESULTS.md).
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_backends() -> AbstractContextManager[None]:
    """Scope a step's attention calls to SDPA_BACKENDS (one switch per step, not per call)."""
    return sdpa_kernel(SDPA_BACKENDS)


@dataclass
class PrefillPack:
    """A step's prefill chunks laid out for one varlen flash-attention call: the cache slots
    of each chunk's whole context end to end, and cumulative query and key lengths."""

    slots_C: torch.Tensor  # int64 [sum of contexts]
    cu_q_P1: torch.Tensor  # int32 [prefills + 1]
    cu_k_P1: torch.Tensor  # int32 [prefills + 1]
    max_q: int
    max_k: int


def varlen_prefill_supported(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether prefills can run as one flash-attention call (PyTorch's FlashAttention-2:
    CUDA sm80+, half precision, head dim a multiple of 8 up to 256)."""
    return (
        device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and head_dim % 8 == 0
        and head_dim <= 256
        and torch.backends.cuda.is_flash_attention_available()
        and torch.cuda.get_device_capability(device) >= (8, 0)
    )


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
    # Set where varlen_prefill_supported: the prefills then take one call, not one each.
    prefill_pack: PrefillPack | None = None

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as the reference computes it: statistics in float32, scale in the input dtype."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


class Rotary:
    """Rotary position embedding (rotate-half layout) with the default/linear/yarn/llama3 rules."""

    # Positions up to this many get a precomputed cos/sin table: one gather per step instead
    # of ~7 elementwise kernels (a 32k-position table of 128-wide heads is 16 MB in bf16).
    TABLE_MAX_POSITIONS = 131072

    def __init__(
        self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype | None = None
    ) -> None:
        dim = cfg.head_dim
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


def write_kv(
    k_cache_NSGX: torch.Tensor,
    v_cache_NSGX: torch.Tensor,
    k_TGX: torch.Tensor,
    v_TGX: torch.Tensor,
    slot_mapping_T: torch.Tensor,
) -> None:
    """Store this step's keys and values into their slots of the paged cache."""
    g, x = k_TGX.shape[1:]
    k_cache_NSGX.view(-1, g, x).index_copy_(0, slot_mapping_T, k_TGX)
    v_cache_NSGX.view(-1, g, x).index_copy_(0, slot_mapping_T, v_TGX)


def _gather(cache_NSGX: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """The cache rows of the given blocks, flattened to one position axis."""
    out = cache_NSGX[blocks]
    return out.reshape(*blocks.shape[:-1], -1, *cache_NSGX.shape[2:])


def paged_attention(
    q_THX: torch.Tensor,
    k_cache_NSGX: torch.Tensor,
    v_cache_NSGX: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None,
    decode_kernel: bool = False,
) -> torch.Tensor:
    """Causal attention of the new tokens over everything cached for their sequence.

    Decodes are one batched call: the Triton paged kernel when `decode_kernel` (no host
    reads: CUDA-graph safe), else the readable gather + SDPA with a padding mask. Prefill
    chunks are one varlen flash-attention call when the metadata packs them (`prefill_pack`,
    no sliding window inside the contexts), else one SDPA each over its own context.
    Returns [T, H, X].
    """
    nd = meta.num_decodes
    pack = meta.prefill_pack
    varlen = pack is not None and (window is None or window >= pack.max_k)
    if varlen and nd == 0:
        return _varlen_prefill(q_THX, k_cache_NSGX, v_cache_NSGX, pack, scale)
    out_THX = torch.empty_like(q_THX)
    if nd and decode_kernel:
        from moeserve.kernels.paged_attention import paged_decode_attention

        paged_decode_attention(
            q_THX[:nd], k_cache_NSGX, v_cache_NSGX, meta.block_tables_BM[:nd],
            meta.context_lens_B[:nd], scale, window, out_BHX=out_THX[:nd],
        )  # fmt: skip
    elif nd:
        q = q_THX[:nd]
        out_THX[:nd] = _decode_attention(q, k_cache_NSGX, v_cache_NSGX, meta, scale, window)
    if varlen:
        out_THX[nd:] = _varlen_prefill(q_THX[nd:], k_cache_NSGX, v_cache_NSGX, pack, scale)
        return out_THX
    start = nd
    for b in range(nd, len(meta.query_lens)):
        n, ctx = meta.query_lens[b], meta.context_lens[b]
        o_HQX = _prefill_attention(
            q_THX[start : start + n], k_cache_NSGX, v_cache_NSGX, meta.block_tables_BM[b], ctx,
            scale, window,
        )  # fmt: skip
        out_THX[start : start + n] = o_HQX.transpose(0, 1)
        start += n
    return out_THX


def _varlen_prefill(
    q_QHX: torch.Tensor,
    k_cache_NSGX: torch.Tensor,
    v_cache_NSGX: torch.Tensor,
    pack: PrefillPack | None,
    scale: float,
) -> torch.Tensor:
    """Every prefill chunk (the last n of its ctx positions) over its cached context, in one
    flash-attention call: causal, aligned to each context's end; GQA as is. [Q, H, X]."""
    assert pack is not None
    g, x = k_cache_NSGX.shape[2:]
    k_CGX = k_cache_NSGX.view(-1, g, x).index_select(0, pack.slots_C)
    v_CGX = v_cache_NSGX.view(-1, g, x).index_select(0, pack.slots_C)
    return torch.ops.aten._flash_attention_forward(
        q_QHX, k_CGX, v_CGX, pack.cu_q_P1, pack.cu_k_P1, pack.max_q, pack.max_k, 0.0, True,
        False, scale=scale,
    )[0]  # fmt: skip


def _decode_attention(
    q_BHX: torch.Tensor,
    k_cache_NSGX: torch.Tensor,
    v_cache_NSGX: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    nd = q_BHX.shape[0]
    max_ctx = max(meta.context_lens[:nd])
    s = k_cache_NSGX.shape[1]
    blocks_BM = meta.block_tables_BM[:nd, : (max_ctx + s - 1) // s]
    k_BCGX, v_BCGX = _gather(k_cache_NSGX, blocks_BM), _gather(v_cache_NSGX, blocks_BM)
    ctx_B = meta.context_lens_B[:nd]
    key_pos = torch.arange(k_BCGX.shape[1], device=q_BHX.device)
    mask_BC = key_pos[None, :] < ctx_B[:, None]
    if window is not None:
        mask_BC &= key_pos[None, :] > (ctx_B[:, None] - 1 - window)
    o = F.scaled_dot_product_attention(
        q_BHX.unsqueeze(2),  # B H 1 X
        k_BCGX.transpose(1, 2),
        v_BCGX.transpose(1, 2),
        attn_mask=mask_BC[:, None, None, :],
        scale=scale,
        enable_gqa=q_BHX.shape[1] != k_cache_NSGX.shape[2],
    )
    return o.squeeze(2)


def _prefill_attention(
    q_QHX: torch.Tensor,
    k_cache_NSGX: torch.Tensor,
    v_cache_NSGX: torch.Tensor,
    blocks_M: torch.Tensor,
    ctx: int,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """One chunk of n queries (the last n of ctx positions) over its cached context: [H, n, X].

    Without a sliding window the causal mask is implicit (lower-right aligned), which lets
    SDPA pick its flash / memory-efficient kernels instead of materialising scores.
    """
    n = q_QHX.shape[0]
    s = k_cache_NSGX.shape[1]
    blocks = blocks_M[: (ctx + s - 1) // s]
    k_CGX = _gather(k_cache_NSGX, blocks)[:ctx]
    v_CGX = _gather(v_cache_NSGX, blocks)[:ctx]
    heads, groups = q_QHX.shape[1], k_CGX.shape[1]
    if heads != groups:  # expanded here: every SDPA backend takes equal head counts
        k_CGX = k_CGX.repeat_interleave(heads // groups, dim=1)
        v_CGX = v_CGX.repeat_interleave(heads // groups, dim=1)
    q, k, v = (a.transpose(0, 1).unsqueeze(0) for a in (q_QHX, k_CGX, v_CGX))
    if window is not None and window < ctx:
        q_pos = torch.arange(ctx - n, ctx, device=q_QHX.device)
        key_pos = torch.arange(ctx, device=q_QHX.device)
        mask = (key_pos[None, :] <= q_pos[:, None]) & (key_pos[None, :] > (q_pos[:, None] - window))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)[0]
    if n == ctx:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)[0]
    if q.is_cuda:  # the bias lets SDPA pick a fused kernel, where there is one to pick
        # Imported here: torch.nn.attention.bias imports torch._dynamo, which imports Triton.
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(n, ctx)
    else:  # the mask CausalBias materialises off CUDA
        mask = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril(ctx - n)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)[0]
