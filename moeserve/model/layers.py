"""The readable layers: RMSNorm, the paged KV cache's writes and attention over it with SDPA
(and with FlashAttention's varlen call for packed prefills). The attention backends
(model/attention.py) pick between these and the Triton kernels.

Shapes: T tokens in the flat batch, B sequences, H heads, G kv heads, X head dim, N blocks in
the pool, S slots per block (block size), M max blocks per sequence, Q a chunk's queries, C its
context positions.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from moeserve.model.metadata import AttentionMetadata, PrefillPack

# The SDPA backends eager steps may use: not cuDNN's, which PyTorch prefers on Hopper. It
# builds an execution plan for every new pair of query and key lengths, compiling it with
# NVRTC (tens of ms), and a server's prompts and prefill chunks keep bringing new pairs
# (benchmarks/RESULTS.md).
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_backends() -> AbstractContextManager[None]:
    """Scope a step's attention calls to SDPA_BACKENDS (one switch per step, not per call)."""
    return sdpa_kernel(SDPA_BACKENDS)


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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as the reference computes it: statistics in float32, scale in the input dtype."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without a weight (Llama 4's q/k norm): float32 statistics, input dtype out."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def first_visible_key(
    pos: torch.Tensor, window: int | None, chunk: int | None
) -> torch.Tensor | None:
    """The first key position a query at `pos` may see (None: 0): the sliding window's
    start and/or its attention chunk's start."""
    lo = None
    if window is not None:
        lo = pos - (window - 1)
    if chunk is not None:
        start = torch.div(pos, chunk, rounding_mode="floor") * chunk
        lo = start if lo is None else torch.maximum(lo, start)
    return lo


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


def varlen_prefill(
    q_QHX: torch.Tensor,
    k_cache_NSGX: torch.Tensor,
    v_cache_NSGX: torch.Tensor,
    pack: PrefillPack,
    scale: float,
) -> torch.Tensor:
    """Every prefill chunk (the last n of its ctx positions) over its cached context, in one
    flash-attention call: causal, aligned to each context's end; GQA as is. [Q, H, X]."""
    g, x = k_cache_NSGX.shape[2:]
    k_CGX = k_cache_NSGX.view(-1, g, x).index_select(0, pack.slots_C)
    v_CGX = v_cache_NSGX.view(-1, g, x).index_select(0, pack.slots_C)
    return torch.ops.aten._flash_attention_forward(
        q_QHX,
        k_CGX,
        v_CGX,
        pack.cu_q_P1,
        pack.cu_k_P1,
        pack.max_q,
        pack.max_k,
        0.0,
        True,
        False,
        scale=scale,
    )[0]


def sdpa_decode(
    q_BHX: torch.Tensor,
    k_cache_NSGX: torch.Tensor,
    v_cache_NSGX: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None,
    chunk: int | None = None,
) -> torch.Tensor:
    """One new token per sequence (the first B of the batch) over its cached context, as one
    SDPA call over the gathered blocks with a padding (and window / chunk) mask: [B, H, X]."""
    nd = q_BHX.shape[0]
    max_ctx = max(meta.context_lens[:nd])
    s = k_cache_NSGX.shape[1]
    blocks_BM = meta.block_tables_BM[:nd, : (max_ctx + s - 1) // s]
    k_BCGX, v_BCGX = _gather(k_cache_NSGX, blocks_BM), _gather(v_cache_NSGX, blocks_BM)
    ctx_B = meta.context_lens_B[:nd]
    key_pos = torch.arange(k_BCGX.shape[1], device=q_BHX.device)
    mask_BC = key_pos[None, :] < ctx_B[:, None]
    lo_B = first_visible_key(ctx_B - 1, window, chunk)
    if lo_B is not None:
        mask_BC &= key_pos[None, :] >= lo_B[:, None]
    o = F.scaled_dot_product_attention(
        q_BHX.unsqueeze(2),  # B H 1 X
        k_BCGX.transpose(1, 2),
        v_BCGX.transpose(1, 2),
        attn_mask=mask_BC[:, None, None, :],
        scale=scale,
        enable_gqa=q_BHX.shape[1] != k_cache_NSGX.shape[2],
    )
    return o.squeeze(2)


def sdpa_prefill(
    q_QHX: torch.Tensor,
    k_cache_NSGX: torch.Tensor,
    v_cache_NSGX: torch.Tensor,
    blocks_M: torch.Tensor,
    ctx: int,
    scale: float,
    window: int | None,
    chunk: int | None = None,
) -> torch.Tensor:
    """One chunk of n queries (the last n of ctx positions) over its cached context: [H, n, X].
    chunk: attention chunks (Llama 4) of that many positions, counted from position 0.

    Without a sliding window or attention chunks inside the context the causal mask is
    implicit (lower-right aligned), which lets SDPA pick its flash / memory-efficient
    kernels instead of materialising scores.
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
    if (window is not None and window < ctx) or (chunk is not None and chunk < ctx):
        q_pos = torch.arange(ctx - n, ctx, device=q_QHX.device)
        key_pos = torch.arange(ctx, device=q_QHX.device)
        lo = first_visible_key(q_pos, window, chunk)
        assert lo is not None
        mask = (key_pos[None, :] <= q_pos[:, None]) & (key_pos[None, :] >= lo[:, None])
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
