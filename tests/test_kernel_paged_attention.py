"""The Triton paged decode-attention kernel against the readable path (model/attention.py).

On CPU the kernel runs under Triton's interpreter (conftest sets TRITON_INTERPRET), in float32
with tiny shapes: indexing, masking, windows, GQA and the split-K merge must match to ~1e-5.
gpu-marked tests run bf16 at Mixtral-like shapes on CUDA and capture the kernel in a CUDA graph.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from moeserve.kernels import paged_attention as pa_module  # noqa: E402
from moeserve.kernels.paged_attention import PARTITION_SIZE, paged_decode_attention  # noqa: E402
from moeserve.model.attention import LayerMask, PagedAttention  # noqa: E402
from moeserve.model.metadata import AttentionMetadata  # noqa: E402

P = PARTITION_SIZE


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None,
    decode_kernel: bool = False,
) -> torch.Tensor:
    """The paged backend's attention (readable decodes, or the Triton decode kernel)."""
    return PagedAttention(decode_kernel=decode_kernel).attend(
        q, (k, v), meta, LayerMask(scale, window)
    )


def _make_case(
    batch: int,
    heads: int,
    groups: int,
    head_dim: int,
    block: int,
    ctxs: list[int],
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    table_dtype: torch.dtype = torch.int64,
    ctx_dtype: torch.dtype = torch.int64,
    extra_cols: int = 2,
    gen: torch.Generator | None = None,  # on `device`
) -> dict:
    """Random q and a paged cache in shuffled blocks, poisoned wherever the kernel must not look.

    Blocks no sequence uses and the slots past each context are NaN; table entries past each
    sequence's used blocks are garbage (huge, negative, or pointing at a NaN block). The
    readable path gets a clean copy (NaN -> 0, garbage -> 0): its gather reads whole blocks.
    """
    assert len(ctxs) == batch
    used = [(c + block - 1) // block for c in ctxs]
    width = max(used) + extra_cols
    spare = 3
    n_blocks = sum(used) + spare
    kw = {"dtype": dtype, "device": device, "generator": gen}
    k = torch.randn(n_blocks, block, groups, head_dim, **kw)
    v = torch.randn(n_blocks, block, groups, head_dim, **kw)
    q = torch.randn(batch, heads, head_dim, **kw)

    perm = torch.randperm(n_blocks, generator=gen, device=device).tolist()
    poison = perm[:spare]
    k[poison] = float("nan")
    v[poison] = float("nan")
    huge = 2**31 - 1 if table_dtype == torch.int32 else 2**40
    garbage = [huge, -7, poison[0], n_blocks]
    table = torch.zeros(batch, width, dtype=torch.int64)
    clean_table = torch.zeros(batch, width, dtype=torch.int64)
    nxt = spare
    for b, (c, u) in enumerate(zip(ctxs, used)):
        ids = perm[nxt : nxt + u]
        nxt += u
        table[b, :u] = torch.tensor(ids)
        clean_table[b, :u] = torch.tensor(ids)
        for j in range(u, width):
            table[b, j] = garbage[(b + j) % len(garbage)]
        tail = c - (u - 1) * block  # slots of the last block past the context
        k[ids[-1], tail:] = float("nan")
        v[ids[-1], tail:] = float("nan")

    ctx_t = torch.tensor(ctxs)
    meta = AttentionMetadata(
        query_lens=[1] * batch,
        context_lens=list(ctxs),
        num_decodes=batch,
        block_tables_BM=clean_table.to(device),
        context_lens_B=ctx_t.to(device),
        slot_mapping_T=torch.zeros(batch, dtype=torch.int64, device=device),
    )
    return {
        "q": q,
        "k": k,
        "v": v,
        "k_clean": torch.nan_to_num(k, nan=0.0),
        "v_clean": torch.nan_to_num(v, nan=0.0),
        "table": table.to(table_dtype).to(device),
        "ctx": ctx_t.to(ctx_dtype).to(device),
        "meta": meta,
    }


def _run_kernel(case: dict, scale: float, window: int | None) -> torch.Tensor:
    out = torch.full_like(case["q"], float("nan"))  # poisoned: every element must be written
    got = paged_decode_attention(
        case["q"], case["k"], case["v"], case["table"], case["ctx"], scale, window, out_BHX=out
    )
    assert got is out
    return out


def _run_readable(case: dict, scale: float, window: int | None) -> torch.Tensor:
    return paged_attention(case["q"], case["k_clean"], case["v_clean"], case["meta"], scale, window)


# (batch, heads, kv heads, head dim, block size, context lengths, window)
CPU_CASES = [
    pytest.param(1, 4, 2, 16, 8, [1], None, id="b1-ctx1"),
    pytest.param(4, 4, 2, 24, 8, [1, 7, 8, 9], None, id="S-1,S,S+1-x24"),
    pytest.param(3, 4, 4, 32, 16, [15, 16, 17], None, id="mha"),
    pytest.param(1, 8, 1, 16, 16, [P + 1], None, id="mqa-b1-two-parts"),
    pytest.param(3, 4, 2, 24, 16, [2 * P + 37, P, 5], None, id="three-parts-mixed"),
    pytest.param(2, 4, 2, 80, 32, [P - 1, 2 * P], None, id="x80-part-edges"),
    pytest.param(2, 2, 1, 16, 256, [600, 3], None, id="S256"),
    pytest.param(1, 2, 1, 136, 8, [P + 5], None, id="x136-half-tile"),
    pytest.param(3, 4, 2, 24, 8, [600, 40, 1], 100, id="window-skips-part"),
    pytest.param(2, 4, 2, 24, 16, [2 * P + 10, 90], P, id="window-spans-parts"),
    pytest.param(2, 4, 2, 16, 8, [30, 3], 1000, id="window-past-start"),
    pytest.param(2, 4, 2, 16, 8, [30, 3], 1, id="window-1"),
]


@pytest.mark.parametrize("batch,heads,groups,head_dim,block,ctxs,window", CPU_CASES)
def test_matches_readable_path(batch, heads, groups, head_dim, block, ctxs, window):
    gen = torch.Generator().manual_seed(sum(ctxs) + head_dim)
    case = _make_case(batch, heads, groups, head_dim, block, ctxs, gen=gen)
    scale = head_dim**-0.5
    torch.testing.assert_close(
        _run_kernel(case, scale, window), _run_readable(case, scale, window), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize(
    "kw", [{}, {"sinks": True}, {"chunk": 40}], ids=["plain", "sinks", "chunk"]
)
@pytest.mark.parametrize("batch,heads,groups,head_dim,block,ctxs,window", CPU_CASES)
def test_merge_in_the_last_program(
    monkeypatch, batch, heads, groups, head_dim, block, ctxs, window, kw
):
    """MERGE_IN_LAST: the last of each (sequence, kv head)'s programs merges the partials
    (one partial at a time) instead of the merge kernel (in chunks): the same output up to
    the float sums' order, sinks and attention chunks included; the counters left zero."""
    from moeserve.kernels import arrivals

    gen = torch.Generator().manual_seed(sum(ctxs) + head_dim + len(kw))
    case = _make_case(batch, heads, groups, head_dim, block, ctxs, gen=gen)
    extra = {"chunk": kw.get("chunk")}
    if kw.get("sinks"):
        extra["sinks_H"] = torch.randn(heads, generator=gen)
    args = (case["q"], case["k"], case["v"], case["table"], case["ctx"], head_dim**-0.5, window)
    monkeypatch.setattr(pa_module, "MERGE_IN_LAST", 0)
    want = paged_decode_attention(*args, **extra)
    monkeypatch.setattr(pa_module, "MERGE_IN_LAST", 1)
    got = paged_decode_attention(*args, out_BHX=torch.full_like(want, float("nan")), **extra)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert not arrivals._COUNTERS.get(torch.device("cpu"), torch.zeros(1)).any()


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize(
    "batch,heads,groups,head_dim,block,ctxs,window",
    [
        (1, 8, 2, 16, 8, [1], None),
        (3, 4, 2, 32, 16, [2 * P + 37, P, 5], None),
        (3, 4, 1, 16, 8, [600, 40, 2], 100),
        (2, 2, 2, 64, 256, [600, 3], None),
    ],
)
def test_rope_in_the_decode_equals_the_rotary_kernel_first(
    monkeypatch, batch, heads, groups, head_dim, block, ctxs, window, norm
):
    """rope=RopeFromQKV: the partition programs rotate their queries from the qkv partials
    and the one holding the newest position writes its key and value first: the same
    attention and the same cache as norm_rope.rotary_from_partials followed by the decode
    (per-head q/k norms or not, several splits, windows, a table read at positions)."""
    _check_rope_in_decode(batch, heads, groups, head_dim, block, ctxs, window, norm, "cpu")


def _check_rope_in_decode(
    batch: int,
    heads: int,
    groups: int,
    x: int,
    block: int,
    ctxs: list[int],
    window: int | None,
    norm: bool,
    device: str,
    dtype: torch.dtype = torch.float32,
    tol: float = 1e-5,
) -> None:
    from moeserve.kernels.norm_rope import rotary_from_partials
    from moeserve.kernels.paged_attention import RopeFromQKV

    gen = torch.Generator(device=device).manual_seed(sum(ctxs) + x + norm)
    case = _make_case(batch, heads, groups, x, block, ctxs, dtype, device, gen=gen)
    kw = dict(generator=gen, device=device)
    qkv = torch.randn(3, batch, (heads + 2 * groups) * x, **kw)  # three K splits
    table = torch.randn(4096, 2 * x, **kw).to(dtype)
    cos, sin = table[:, :x], table[:, x:]
    pos = case["ctx"] - 1
    blocks = case["table"].gather(1, (pos // block)[:, None])[:, 0]
    slots = blocks * block + pos % block
    qk_norm = None
    if norm:
        qk_norm = (
            (torch.rand(x, **kw) + 0.5).to(dtype),
            (torch.rand(x, **kw) + 0.5).to(dtype),
            1e-6,
        )
    k_ref, v_ref = case["k"].clone(), case["v"].clone()
    q = rotary_from_partials(
        qkv, heads, groups, cos, sin, (k_ref, v_ref, slots), dtype, pos, qk_norm
    )
    args = (case["table"], case["ctx"], x**-0.5, window)
    want = paged_decode_attention(q, k_ref, v_ref, *args)
    k, v = case["k"].clone(), case["v"].clone()
    out = torch.full((batch, heads, x), float("nan"), dtype=dtype, device=device)
    rope = RopeFromQKV(qkv, cos, sin, pos, slots, qk_norm)
    got = paged_decode_attention(out, k, v, *args, out_BHX=out, rope=rope)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    # A norm's sum in another order may move a bf16 key by an ulp; values are exact.
    k_tol = 1e-6 if dtype == torch.float32 else tol
    torch.testing.assert_close(k, k_ref, atol=k_tol, rtol=k_tol, equal_nan=True)
    assert torch.equal(v.nan_to_num(7.0), v_ref.nan_to_num(7.0))


@pytest.mark.gpu
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("batch,ctxs", [(1, [300]), (1, [2048]), (5, [2000, 70, 1, 513, 64])])
def test_cuda_rope_in_the_decode(batch, ctxs, norm):
    """The same at Qwen3-30B-A3B's heads (32 q, 4 kv, 128 wide) in bf16."""
    _check_rope_in_decode(batch, 32, 4, 128, 16, ctxs, None, norm, "cuda", torch.bfloat16, 2e-2)


@pytest.mark.parametrize("table_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("ctx_dtype", [torch.int32, torch.int64])
def test_index_dtypes(table_dtype, ctx_dtype):
    gen = torch.Generator().manual_seed(7)
    case = _make_case(
        2, 4, 2, 16, 16, [P + 20, 33], table_dtype=table_dtype, ctx_dtype=ctx_dtype, gen=gen
    )
    torch.testing.assert_close(
        _run_kernel(case, 0.25, None), _run_readable(case, 0.25, None), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("max_programs", [1, 2, 5])
@pytest.mark.parametrize("window", [None, P + 30])
def test_programs_take_interleaved_partitions(monkeypatch, max_programs, window):
    """Fewer programs than partitions (the cap MAX_PROGRAMS // (B * G)): each walks partitions
    j, j + J, ...; with J == 1 one program walks them all and the merge is skipped."""
    monkeypatch.setattr(pa_module, "MAX_PROGRAMS", max_programs)
    gen = torch.Generator().manual_seed(max_programs)
    case = _make_case(1, 2, 1, 16, 16, [5 * P + 11], extra_cols=2 * P // 16, gen=gen)
    torch.testing.assert_close(
        _run_kernel(case, 0.3, window), _run_readable(case, 0.3, window), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("sms", [1, 10**6], ids=["wide-partitions", "small-partitions"])
def test_both_partitionings(monkeypatch, sms):
    """A launch of fewer (sequence, kv head) pairs than SMs cuts contexts into SMALL_PARTITION
    positions, a larger one into PARTITION_SIZE (what this machine's SM count picks is
    replaced here): the same attention either way, windows included."""
    monkeypatch.setattr(pa_module, "num_sms", lambda: sms)
    gen = torch.Generator().manual_seed(11)
    case = _make_case(3, 4, 2, 16, 16, [2 * P + 9, 70, 1], extra_cols=P // 16, gen=gen)
    for window in (None, 100):
        torch.testing.assert_close(
            _run_kernel(case, 0.3, window), _run_readable(case, 0.3, window), atol=1e-5, rtol=1e-5
        )


def test_short_contexts_in_a_wide_table():
    """A table wide enough for many partitions while every context fits the first: the other
    partitions exit early and the merge sees only one."""
    gen = torch.Generator().manual_seed(3)
    case = _make_case(2, 4, 2, 16, 8, [5, 12], extra_cols=3 * P // 8, gen=gen)
    torch.testing.assert_close(
        _run_kernel(case, 0.3, None), _run_readable(case, 0.3, None), atol=1e-5, rtol=1e-5
    )


def test_strided_views_in_and_out():
    """q as a slice of a fused qkv row and out as rows of a larger [T, H, X] buffer."""
    gen = torch.Generator().manual_seed(5)
    batch, heads, groups, x = 3, 4, 2, 24
    case = _make_case(batch, heads, groups, x, 8, [9, P + 3, 1], gen=gen)
    qkv = torch.randn(batch + 2, (heads + 2 * groups) * x, generator=gen)
    qkv[:batch, : heads * x] = case["q"].reshape(batch, -1)
    q_view = qkv[:, : heads * x].view(batch + 2, heads, x)[:batch]
    out_all = torch.full((batch + 2, heads, x), float("nan"))
    paged_decode_attention(
        q_view, case["k"], case["v"], case["table"], case["ctx"], 0.2, None, out_BHX=out_all[:batch]
    )
    torch.testing.assert_close(
        out_all[:batch], _run_readable(case, 0.2, None), atol=1e-5, rtol=1e-5
    )
    assert out_all[batch:].isnan().all()  # nothing written past the batch
    # Without out_BHX: a fresh tensor in q's dtype and shape.
    got = paged_decode_attention(q_view, case["k"], case["v"], case["table"], case["ctx"], 0.2)
    assert got.shape == (batch, heads, x) and got.dtype == torch.float32
    torch.testing.assert_close(got, out_all[:batch], atol=0.0, rtol=0.0)


# ---------------------------------------------------------------- CUDA (gpu-marked) tests


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def _random_ctxs(batch: int, max_ctx: int, gen: torch.Generator) -> list[int]:
    ctxs = torch.randint(1, max_ctx + 1, (batch,), generator=gen, device=gen.device).tolist()
    ctxs[0] = max_ctx  # the longest context always present: all partitions in play
    return ctxs


@pytest.mark.gpu
@pytest.mark.parametrize(
    "batch,max_ctx,window,dtype",
    [
        (1, 4096, None, torch.bfloat16),
        (1, 300, None, torch.bfloat16),
        (7, 4000, None, torch.bfloat16),
        (64, 4096, None, torch.bfloat16),
        (7, 4096, 1000, torch.bfloat16),
        (7, 3000, None, torch.float16),
    ],
)
@pytest.mark.parametrize("merge_in_last", [0, 1])
def test_cuda_mixtral_shapes(monkeypatch, batch, max_ctx, window, dtype, merge_in_last):
    monkeypatch.setattr(pa_module, "MERGE_IN_LAST", merge_in_last)
    heads, groups, x, block = 32, 8, 128, 16
    scale = x**-0.5
    gen = torch.Generator(device="cuda").manual_seed(batch * 10_000 + max_ctx)
    for _ in range(3):  # fresh random data for each check
        ctxs = _random_ctxs(batch, max_ctx, gen)
        case = _make_case(batch, heads, groups, x, block, ctxs, dtype, "cuda", gen=gen)
        kernel = _run_kernel(case, scale, window)
        readable = _run_readable(case, scale, window)
        exact = dict(case, **{key: case[key].double() for key in ("q", "k_clean", "v_clean")})
        ref = _run_readable(exact, scale, window)  # float64 from the same low-precision inputs
        err_kernel, err_readable = _rel_err(kernel, ref), _rel_err(readable, ref)
        # Both paths see identical (exact) low-precision inputs and accumulate in float32, so
        # their errors come from rounding the output to its dtype (relative ~u/sqrt(3), with
        # u = 2^-8 for bf16) plus, in the kernel, rounding the probabilities to that dtype
        # before the P @ V product (as flash attention does): an independent error of the same
        # size (each output is a weighted mean of V rows, each weight off by at most u
        # relative). So the kernel's error should be about sqrt(2) times the readable path's;
        # more than twice it, or above 1e-2 (a wrong index lands near 1), is a bug.
        assert err_kernel <= 2.0 * err_readable, (err_kernel, err_readable)
        assert err_kernel < 1e-2, (err_kernel, err_readable)


@pytest.mark.gpu
@pytest.mark.parametrize("merge_in_last", [0, 1])
def test_cuda_graph_replay_after_inputs_change(monkeypatch, merge_in_last):
    """Replays equal eager runs bit for bit (with MERGE_IN_LAST, 20 of them: a program that
    merged before every partial was in would differ)."""
    monkeypatch.setattr(pa_module, "MERGE_IN_LAST", merge_in_last)
    heads, groups, x, block, batch, max_ctx = 32, 8, 128, 16, 5, 2048
    scale = x**-0.5
    gen = torch.Generator(device="cuda").manual_seed(11)
    width = max_ctx // block
    n_blocks = batch * width + 8

    def fill(q, k, v, table, ctx) -> None:
        """New contents for the captured buffers, in place: all of them change."""
        for t in (q, k, v):
            t.copy_(torch.randn(t.shape, generator=gen, device="cuda"))
        ctxs = _random_ctxs(batch, max_ctx, gen)
        ctx.copy_(torch.tensor(ctxs, dtype=ctx.dtype))
        perm = torch.randperm(n_blocks, generator=gen, device="cuda")[: batch * width]
        table.copy_(perm.view(batch, width).to(table.dtype))

    kw = {"dtype": torch.bfloat16, "device": "cuda"}
    q = torch.empty(batch, heads, x, **kw)
    k = torch.empty(n_blocks, block, groups, x, **kw)
    v = torch.empty_like(k)
    table = torch.empty(batch, width, dtype=torch.int32, device="cuda")
    ctx = torch.empty(batch, dtype=torch.int32, device="cuda")
    out = torch.empty(batch, heads, x, **kw)
    fill(q, k, v, table, ctx)

    side = torch.cuda.Stream()  # warm up (compile) off the capture stream, as torch advises
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        paged_decode_attention(q, k, v, table, ctx, scale, out_BHX=out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(q, k, v, table, ctx, scale, out_BHX=out)

    for _ in range(20 if merge_in_last else 3):
        fill(q, k, v, table, ctx)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        eager = paged_decode_attention(q, k, v, table, ctx, scale)
        torch.testing.assert_close(out, eager, atol=0.0, rtol=0.0)  # same kernels, same inputs
        meta = AttentionMetadata(
            [1] * batch, ctx.tolist(), batch, table.long(), ctx.long(), ctx.long()
        )
        readable = paged_attention(q, k, v, meta, scale, None)
        torch.testing.assert_close(out, readable, atol=2e-2, rtol=2e-2)


def _mixed_step(
    dec_ctxs: list[int],
    prefills: list[tuple[int, int]],
    heads: int,
    groups: int,
    x: int,
    block: int,
    dtype: torch.dtype,
    device: str,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, list[list[int]]]:
    """q and a paged cache in shuffled blocks for decodes beside prefill chunks (n new tokens
    at the end of a ctx-token context each), with the readable path's metadata."""
    query_lens = [1] * len(dec_ctxs) + [n for n, _ in prefills]
    ctxs = dec_ctxs + [c for _, c in prefills]
    used = [-(-c // block) for c in ctxs]
    n_blocks = sum(used) + 2
    perm = torch.randperm(n_blocks, generator=gen, device=device).tolist()
    tables, nxt = [], 0
    for u in used:
        tables.append(perm[nxt : nxt + u])
        nxt += u
    width = max(used)
    kw = {"dtype": dtype, "device": device, "generator": gen}
    k = torch.randn(n_blocks, block, groups, x, **kw)
    v = torch.randn(n_blocks, block, groups, x, **kw)
    q = torch.randn(sum(query_lens), heads, x, **kw)
    meta = AttentionMetadata(
        query_lens=query_lens,
        context_lens=ctxs,
        num_decodes=len(dec_ctxs),
        block_tables_BM=torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device),
        context_lens_B=torch.tensor(ctxs, device=device),
        slot_mapping_T=torch.zeros(len(q), dtype=torch.int64, device=device),
    )
    return q, k, v, meta, tables


def test_prefill_pack_lays_out_each_context():
    """The varlen call's slots are each prefill's context positions 0..ctx-1, end to end."""
    from moeserve.engine.runner import Runner

    block = 4
    tables = [[7, 2, 9], [5], [1, 8, 3, 6]]
    query_lens, ctxs = [3, 2, 16], [10, 2, 13]
    runner = SimpleNamespace(block_size=block, device=torch.device("cpu"))
    pack = Runner._pack_prefills(runner, query_lens, ctxs, tables)  # type: ignore[arg-type]
    want = [t[p // block] * block + p % block for t, c in zip(tables, ctxs) for p in range(c)]
    assert pack.slots_C.tolist() == want
    assert pack.cu_q_P1.tolist() == [0, 3, 5, 21] and pack.cu_k_P1.tolist() == [0, 10, 12, 25]
    assert pack.cu_q_P1.dtype == pack.cu_k_P1.dtype == torch.int32
    assert (pack.max_q, pack.max_k) == (16, 13)


@pytest.mark.gpu
@pytest.mark.parametrize("decodes", [0, 3])
def test_cuda_varlen_prefill_matches_one_sdpa_per_chunk(decodes):
    """One flash-attention call over every prefill chunk (whole prompts and later chunks,
    whose causal mask aligns to the context's end) against the per-chunk SDPA loop."""
    from moeserve.engine.runner import Runner
    from moeserve.model.layers import attention_backends, varlen_prefill_supported

    heads, groups, x, block = 32, 8, 128, 16
    assert varlen_prefill_supported(torch.device("cuda"), torch.bfloat16, x)
    gen = torch.Generator(device="cuda").manual_seed(decodes)
    prefills = [(128, 128), (37, 293), (1000, 1000), (200, 4096), (2, 2)]
    q, k, v, meta, tables = _mixed_step(
        [300, 17, 4000][:decodes], prefills, heads, groups, x, block, torch.bfloat16, "cuda", gen
    )
    scale = x**-0.5
    with attention_backends():
        loop = paged_attention(q, k, v, meta, scale, None, decode_kernel=True)
    runner = SimpleNamespace(block_size=block, device=torch.device("cuda"))
    meta.prefill_pack = Runner._pack_prefills(
        runner, meta.query_lens[decodes:], meta.context_lens[decodes:], tables[decodes:]
    )  # type: ignore[arg-type]
    packed = paged_attention(q, k, v, meta, scale, None, decode_kernel=True)
    exact = paged_attention(
        q.double(),
        k.double(),
        v.double(),
        dataclasses.replace(meta, prefill_pack=None),
        scale,
        None,
    )
    err_loop, err_packed = _rel_err(loop, exact), _rel_err(packed, exact)
    assert err_packed < 1e-2 and err_packed <= 2.0 * err_loop, (err_packed, err_loop)
    # A window wider than every context changes nothing; a narrower one takes the loop.
    assert torch.equal(paged_attention(q, k, v, meta, scale, 5000, decode_kernel=True), packed)
    with attention_backends():
        narrow = paged_attention(q, k, v, meta, scale, 64, decode_kernel=True)
    assert _rel_err(narrow, packed) > 0.1
