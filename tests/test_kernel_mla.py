"""The Triton MLA decode kernel against the readable absorbed path (model/mla.py LatentAttention).

On CPU the kernel runs under Triton's interpreter (conftest sets TRITON_INTERPRET), in float32
with tiny shapes: indexing, masking, head blocks and the split-K merge must match to ~1e-5.
gpu-marked tests run bf16 at DeepSeek-V2-Lite / V3 shapes on CUDA and replay a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from moeserve.kernels import mla_attention as mla_module  # noqa: E402
from moeserve.kernels.mla_attention import PARTITION_SIZE as P  # noqa: E402
from moeserve.kernels.mla_attention import mla_decode_attention  # noqa: E402
from moeserve.model.metadata import AttentionMetadata  # noqa: E402
from moeserve.model.mla import LatentAttention  # noqa: E402


def _make_case(
    heads: int,
    latent: int,
    rope: int,
    block: int,
    ctxs: list[int],
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    extra_cols: int = 2,
    seed: int = 0,
) -> dict:
    """Random queries and a latent cache in shuffled blocks, NaN wherever the kernel must not
    look (spare blocks, slots past each context); table entries past each sequence's blocks are
    garbage. The readable path gets a clean copy (its gather reads whole blocks)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    batch, y = len(ctxs), latent + rope
    used = [-(-c // block) for c in ctxs]
    width = max(used) + extra_cols
    spare = 3
    n_blocks = sum(used) + spare
    kw = {"dtype": dtype, "device": device, "generator": gen}
    cache = torch.randn(n_blocks, block, 1, y, **kw)
    q = torch.randn(batch, heads, y, **kw)
    perm = torch.randperm(n_blocks, generator=gen, device=device).tolist()
    cache[perm[:spare]] = float("nan")
    table = torch.zeros(batch, width, dtype=torch.int64)
    clean = torch.zeros(batch, width, dtype=torch.int64)
    garbage = [2**40, -7, perm[0], n_blocks]
    nxt = spare
    for b, (c, u) in enumerate(zip(ctxs, used)):
        ids = perm[nxt : nxt + u]
        nxt += u
        table[b, :u] = clean[b, :u] = torch.tensor(ids)
        for j in range(u, width):
            table[b, j] = garbage[(b + j) % len(garbage)]
        cache[ids[-1], c - (u - 1) * block :] = float("nan")
    ctx = torch.tensor(ctxs, device=device)
    meta = AttentionMetadata(
        query_lens=[1] * batch,
        context_lens=list(ctxs),
        num_decodes=batch,
        block_tables_BM=clean.to(device),
        context_lens_B=ctx,
        slot_mapping_T=torch.zeros(batch, dtype=torch.int64, device=device),
    )
    clean = cache.nan_to_num(0.0)
    return dict(
        q=q, cache=cache, clean=clean, table=table.to(device), ctx=ctx, meta=meta, latent=latent
    )


def _kernel(case: dict, scale: float) -> torch.Tensor:
    b, h, _ = case["q"].shape
    out = case["q"].new_full((b, h, case["latent"]), float("nan"))  # all must be written
    got = mla_decode_attention(
        case["q"], case["cache"], case["table"], case["ctx"], scale, case["latent"], out_BHC=out
    )
    assert got is out
    # The rope part given apart (strided views of one tensor, as model/mla.py passes them).
    c = case["latent"]
    apart = mla_decode_attention(
        case["q"][..., :c],
        case["cache"],
        case["table"],
        case["ctx"],
        scale,
        c,
        q_rope_BHR=case["q"][..., c:],
    )
    assert torch.equal(apart, out)
    return out


def _readable(case: dict, scale: float, heads_at_once: int | None = None) -> torch.Tensor:
    """heads_at_once: the heads attend in groups of this many (each head is independent), so
    the reference's expanded keys fit an 80 GB card at V3's 128 heads in float64."""
    c = case["latent"]
    q = case["q"]
    step = heads_at_once or q.shape[1]
    return torch.cat(
        [
            LatentAttention().decode(
                q[:, i : i + step, :c], q[:, i : i + step, c:], case["clean"], case["meta"], scale
            )
            for i in range(0, q.shape[1], step)
        ],
        dim=1,
    )


# (heads, latent, rope, block size, context lengths)
CPU_CASES = [
    pytest.param(4, 32, 8, 8, [1], id="ctx1"),
    pytest.param(5, 24, 8, 4, [3, 4, 5, 17], id="block-edges-odd-latent"),
    pytest.param(20, 32, 16, 16, [P + 1, 9], id="two-head-blocks-two-parts"),
    pytest.param(3, 16, 8, 16, [2 * P + 37, P, 5], id="three-parts-mixed"),
    pytest.param(2, 64, 8, 256, [600, 3], id="S256"),
]


@pytest.mark.parametrize("heads,latent,rope,block,ctxs", CPU_CASES)
def test_matches_readable_path(heads, latent, rope, block, ctxs):
    case = _make_case(heads, latent, rope, block, ctxs, seed=sum(ctxs))
    scale = 0.7 / (latent + rope) ** 0.5
    torch.testing.assert_close(_kernel(case, scale), _readable(case, scale), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cap", ["MAX_PROGRAMS", "MAX_PARTS"])
@pytest.mark.parametrize("max_programs", [1, 3])
def test_programs_take_interleaved_partitions(monkeypatch, max_programs, cap):
    """Fewer programs than partitions: program j walks j, j + J, ...; J == 1 skips the merge."""
    monkeypatch.setattr(mla_module, cap, max_programs)
    case = _make_case(4, 16, 8, 16, [4 * P + 11], extra_cols=P // 16, seed=max_programs)
    torch.testing.assert_close(_kernel(case, 0.3), _readable(case, 0.3), atol=1e-5, rtol=1e-5)


def test_refuses_mismatched_shapes():
    case = _make_case(4, 16, 8, 8, [5])
    with pytest.raises(ValueError, match="cache"):
        mla_decode_attention(case["q"], case["cache"][..., :-1], case["table"], case["ctx"], 1, 16)
    with pytest.raises(ValueError, match="block size"):
        mla_decode_attention(case["q"], case["cache"][:, :6], case["table"], case["ctx"], 1, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [16, 128])  # V2-Lite, V3
@pytest.mark.parametrize("batch,max_ctx", [(1, 4096), (7, 3000), (64, 1024)])
def test_cuda_deepseek_shapes(heads, batch, max_ctx):
    gen = torch.Generator().manual_seed(batch + max_ctx)
    ctxs = torch.randint(1, max_ctx + 1, (batch,), generator=gen).tolist()
    ctxs[0] = max_ctx
    case = _make_case(heads, 512, 64, 16, ctxs, torch.bfloat16, "cuda", seed=batch)
    scale = 192**-0.5
    exact = dict(case, q=case["q"].double(), clean=case["clean"].double())
    ref = _readable(exact, scale, heads_at_once=16)
    err_kernel = ((_kernel(case, scale).double() - ref).norm() / ref.norm()).item()
    err_readable = ((_readable(case, scale, 16).double() - ref).norm() / ref.norm()).item()
    # As in test_kernel_paged_attention: the kernel also rounds probabilities to bf16.
    assert err_kernel <= 2.0 * err_readable + 1e-3, (err_kernel, err_readable)
    assert err_kernel < 1e-2


@pytest.mark.gpu
def test_cuda_graph_replay_after_inputs_change():
    heads, batch, max_ctx, block = 16, 5, 2048, 16
    case = _make_case(heads, 512, 64, block, [max_ctx] * batch, torch.bfloat16, "cuda")
    q, cache, table, ctx = case["q"], case["cache"].nan_to_num(0.0), case["table"], case["ctx"]
    out = q.new_empty(batch, heads, 512)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        mla_decode_attention(q, cache, table, ctx, 0.1, 512, out_BHC=out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mla_decode_attention(q, cache, table, ctx, 0.1, 512, out_BHC=out)
    gen = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(3):
        q.copy_(torch.randn(q.shape, generator=gen, device="cuda"))
        ctx.copy_(torch.randint(1, max_ctx + 1, (batch,), generator=gen, device="cuda"))
        out.fill_(float("nan"))
        graph.replay()
        eager = mla_decode_attention(q, cache, table, ctx, 0.1, 512)
        torch.testing.assert_close(out, eager, atol=0.0, rtol=0.0)


def test_write_latent_rows_as_norm_cat_and_index_copy() -> None:
    """One launch per step for the cache rows: the normalised latent and the rope key at
    each token's slot, as the readable path's RMSNorm, concatenation and index copy."""
    from moeserve.kernels.mla_rows import write_latent_rows
    from moeserve.model.layers import rms_norm

    g = torch.Generator().manual_seed(7)
    t, c, r, n, s = 5, 24, 8, 4, 4
    kv_TY = torch.randn(t, c + r + 3, generator=g)[:, : c + r]  # strided rows, as a view
    weight_C = torch.randn(c, generator=g)
    slots_T = torch.tensor([3, 14, 0, 9, 6])
    cache = torch.full((n, s, 1, c + r), float("nan"))
    write_latent_rows(kv_TY, weight_C, 1e-6, cache, slots_T)
    want = torch.full_like(cache, float("nan")).view(-1, c + r)
    rows = torch.cat((rms_norm(kv_TY[:, :c], weight_C, 1e-6), kv_TY[:, c:]), dim=-1)
    want.index_copy_(0, slots_T, rows)
    torch.testing.assert_close(cache.view(-1, c + r), want, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_decode_inputs_from_partials() -> None:
    """A decode step's MLA inputs in one launch from the projection's split-K partials, for
    several tokens at once: the absorbed queries (q_nope @ kv_b's key half), the rotated rope
    queries, and each token's cache row, as the readable path computes them from the summed
    projection."""
    from moeserve.kernels.mla_rows import decode_inputs
    from moeserve.model.layers import rms_norm
    from moeserve.model.rotary import apply_rotary

    g = torch.Generator().manual_seed(8)
    t, h, p, w, c, r, n, s, split = 3, 4, 16, 12, 40, 8, 4, 4, 3
    qkv_STN = torch.randn(split, t, h * (p + r) + c + r, generator=g)
    kv_b = torch.randn(h, p + w, c, generator=g)
    norm_C = torch.randn(c, generator=g)
    cos_PR, sin_PR = torch.randn(20, r, generator=g), torch.randn(20, r, generator=g)
    pos_T, slots_T = torch.tensor([17, 3, 9]), torch.tensor([14, 0, 9])
    cache = torch.full((n, s, 1, c + r), float("nan"))
    q_lat, q_rope = decode_inputs(
        qkv_STN, kv_b[:, :p], norm_C, 1e-6, cos_PR, sin_PR, pos_T, cache, slots_T
    )
    qkv = qkv_STN.sum(0)
    q_THX, kv_TY = qkv[:, : h * (p + r)].view(t, h, p + r), qkv[:, h * (p + r) :]
    cos, sin = cos_PR[pos_T], sin_PR[pos_T]
    want_lat = torch.einsum("thp,hpc->thc", q_THX[..., :p], kv_b[:, :p])
    torch.testing.assert_close(q_lat, want_lat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q_rope, apply_rotary(q_THX[..., p:], cos, sin), rtol=1e-6, atol=1e-6)
    rows = torch.cat(
        (rms_norm(kv_TY[:, :c], norm_C, 1e-6), apply_rotary(kv_TY[:, None, c:], cos, sin)[:, 0]), -1
    )
    want = torch.full_like(cache, float("nan")).view(-1, c + r)
    want.index_copy_(0, slots_T, rows)
    torch.testing.assert_close(cache.view(-1, c + r), want, rtol=1e-5, atol=1e-5, equal_nan=True)
    # cos/sin as each token's rows (no table for the dtype): the same results
    again = torch.full_like(cache, float("nan"))
    q_lat2, q_rope2 = decode_inputs(
        qkv_STN, kv_b[:, :p], norm_C, 1e-6, cos, sin, None, again, slots_T
    )
    assert torch.equal(q_lat2, q_lat) and torch.equal(q_rope2, q_rope)
    assert torch.equal(again.nan_to_num(), cache.nan_to_num())


def test_value_heads_as_the_bmm() -> None:
    """A few decode rows' latent outputs through kv_b's value half (a strided view, as the
    layer takes it), as the readable path's bmm."""
    from moeserve.kernels.mla_rows import value_heads

    g = torch.Generator().manual_seed(9)
    t, h, p, w, c = 3, 4, 16, 20, 40
    kv_b = torch.randn(h, p + w, c, generator=g)
    o_lat = torch.randn(t, h, c, generator=g)
    want = torch.bmm(o_lat.transpose(0, 1), kv_b[:, p:].transpose(1, 2)).transpose(0, 1)
    torch.testing.assert_close(value_heads(o_lat, kv_b[:, p:]), want, rtol=1e-5, atol=1e-5)
