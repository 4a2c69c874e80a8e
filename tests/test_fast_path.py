"""The engine on its fast path (Triton kernels, CUDA graphs) gives the readable path's outputs.

On a CPU the kernels run under Triton's interpreter (tests/conftest.py), which checks how the
engine drives them; the gpu-marked tests check CUDA graphs and bf16 on the device.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeserve import LLM, SamplingParams
from moeserve.config import ConfigError
from moeserve.engine.cuda_graphs import capture_sizes
from moeserve.engine.placement import resolve_device, resolve_kernels
from tests.checkpoints import make_checkpoint

pytest.importorskip("triton")

# Mixed prompt lengths and max_tokens: batches shrink as requests finish, so decode steps run
# at many sizes (padded to the captured graphs on the GPU) beside prefill chunks.
PROMPTS = [[5 + i, 9, 40 + 3 * i, 7, 11, 13, 17, 19, 23][: 2 + i % 8] for i in range(7)]


def _params(i: int, logprobs: int | None = 2) -> SamplingParams:
    return SamplingParams(
        max_tokens=3 + 2 * (i % 4), temperature=0.0, ignore_eos=True, logprobs=logprobs
    )


def _run(llm: LLM, n: int = len(PROMPTS)) -> list[tuple[list[int], list[float]]]:
    outs = llm.generate(PROMPTS[:n], [_params(i) for i in range(n)])
    return [
        (o.outputs[0].token_ids, [lp.logprob for lp in o.outputs[0].logprobs or []]) for o in outs
    ]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(
        tmp_path_factory.mktemp("fast") / "mixtral",
        "mixtral",
        num_local_experts=8,
        num_hidden_layers=2,
    )


def _assert_same(got: list, want: list, tol: float) -> None:
    for (tok_g, lp_g), (tok_w, lp_w) in zip(got, want, strict=True):
        assert tok_g == tok_w
        assert max(abs(a - b) for a, b in zip(lp_g, lp_w, strict=True)) <= tol


def test_interpreted_kernels_match_readable_path(ckpt: Path) -> None:
    """Fused MoE for small batches, the paged decode kernel, chunked prefill around them."""
    kw = dict(progress=False, device="cpu", max_num_batched_tokens=12, max_num_seqs=5)
    ref = LLM(ckpt, kernels="torch", **kw)
    fast = LLM(ckpt, kernels="triton", **kw)
    assert (
        fast.engine.executor.kernels == "triton" and fast.engine.executor.runner.graphs is None
    )  # no CUDA
    _assert_same(_run(fast), _run(ref), 1e-4)
    assert torch.equal(fast.engine.expert_token_counts(), ref.engine.expert_token_counts())


@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("mixtral", {"sliding_window": 5}),  # windowed decode kernel and prefill chunks
        ("qwen2_moe", {}),  # shared expert with its gate, a dense layer, no renormalisation
        ("qwen3_moe", {}),  # per-head q/k norms, head_dim != hidden / heads
        ("olmoe", {"clip_qkv": 0.5}),  # full q/k norms, clipped qkv
    ],
)
def test_interpreted_kernels_every_family(tmp_path: Path, family: str, overrides: dict) -> None:
    path = make_checkpoint(tmp_path / family, family, num_hidden_layers=2, **overrides)
    _assert_same(_run_four(path, "triton"), _run_four(path, "torch"), 1e-4)


def _run_four(path: Path, kernels: str) -> list[tuple[list[int], list[float]]]:
    """The first four prompts on the CPU, four sequences at a time."""
    kw = dict(progress=False, device="cpu", max_num_batched_tokens=12, max_num_seqs=4)
    return _run(LLM(path, kernels=kernels, **kw), 4)


# No shared expert / shared, qkv bias / per-head q/k norms / the router's logit bias, sinks.
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss"])
def test_interpreted_captured_step_path(
    tmp_path: Path, family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a captured decode step runs, forced at every step: split-K partials of qkv (added
    by the rotary kernel, which reads cos/sin from the table by position, and norms Qwen3's q
    and k heads) and of the output projection (by the residual-add norm, which also runs the
    router on its output: one float32 partial, added by the routing program)."""
    import moeserve.kernels.linear as linear
    import moeserve.kernels.norm_rope as norm_rope
    import moeserve.model.backend as backend

    layers = {"num_hidden_layers": 2} if family != "gpt_oss" else {}  # gpt-oss: its 3 types
    path = make_checkpoint(tmp_path / family, family, **layers)
    kw = dict(progress=False, device="cpu", max_num_batched_tokens=12, max_num_seqs=4)
    prompts, params = PROMPTS[:4], [_params(i) for i in range(4)]
    calls: list[tuple[int, int]] = []
    real = linear.linear_partials

    def counted(x: torch.Tensor, w: torch.Tensor, *rest: torch.Tensor | None) -> torch.Tensor:
        calls.append((x.shape[0], w.shape[0]))
        return real(x, w, *rest)

    routers: list[tuple[int, int]] = []
    real_norm = norm_rope.add_rms_norm

    def norm_counted(*args: object) -> tuple:
        out = real_norm(*args)  # type: ignore[arg-type]
        if len(args) > 4 and args[4] is not None:
            routers.append(out[2].shape[1:])
        return out

    llms: list[LLM] = []

    def run(kernels: str) -> list[tuple[list[int], list[float]]]:
        llms.append(LLM(path, kernels=kernels, **kw))
        outs = llms[-1].generate(prompts, params)
        return [
            (o.outputs[0].token_ids, [lp.logprob for lp in o.outputs[0].logprobs or []])
            for o in outs
        ]

    want = run("torch")
    monkeypatch.setattr(backend, "FUSED_ELEMENTWISE_MIN_TOKENS", 1)
    monkeypatch.setattr(linear, "linear_partials", counted)
    monkeypatch.setattr(norm_rope, "add_rms_norm", norm_counted)
    _assert_same(run("triton"), want, 1e-4)
    assert max(t for t, _ in calls) <= linear.MAX_ROWS
    cfg = llms[0].engine.model_config
    assert routers and {e for _, e in routers} == {cfg.num_experts}
    assert max(t for t, _ in routers) <= linear.MAX_ROWS
    # The output projection; qkv at decode steps (a bias rides in its first partial) unless
    # full-width q/k norms or clipping sit between it and the rotary. Not the router.
    want_n = {cfg.hidden_size}
    if cfg.qk_norm in ("none", "head") and cfg.clip_qkv is None:
        want_n.add(cfg.q_size + 2 * cfg.kv_size)
    assert {n for _, n in calls} == want_n


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_interpreted_rope_in_the_decode_kernel(
    tmp_path: Path, family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """paged_attention.ROPE_IN_DECODE: the captured step's decode kernel rotates its queries
    from the qkv partials and writes the new keys and values itself (Qwen3's per-head q/k
    norms; gpt-oss's sinks and sliding windows): the readable path's outputs."""
    import moeserve.kernels.paged_attention as pa
    import moeserve.model.backend as backend
    from moeserve.model.attention import PagedAttention

    layers = {"num_hidden_layers": 2} if family != "gpt_oss" else {}
    path = make_checkpoint(tmp_path / family, family, **layers)
    want = _run_four(path, "torch")
    rotated: list[int] = []
    real = PagedAttention.attend_rotating

    def counted(self: PagedAttention, *args: object) -> torch.Tensor | None:
        out = real(self, *args)  # type: ignore[arg-type]
        rotated.append(out is not None)
        return out

    monkeypatch.setattr(backend, "FUSED_ELEMENTWISE_MIN_TOKENS", 1)
    monkeypatch.setattr(pa, "ROPE_IN_DECODE", 1)
    monkeypatch.setattr(PagedAttention, "attend_rotating", counted)
    _assert_same(_run_four(path, "triton"), want, 1e-4)
    assert rotated and all(rotated)


def test_kernel_choice_is_validated() -> None:
    with pytest.raises(ConfigError, match="kernels must be one of"):
        resolve_kernels("cuda", torch.device("cpu"))
    assert resolve_kernels("auto", torch.device("cpu")) == "torch"
    assert resolve_kernels("torch", torch.device("cuda")) == "torch"


def test_device_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("gpu", "cuda:x", "cuda:-1"):
        with pytest.raises(ConfigError, match=f"device '{bad}' is not a device"):
            resolve_device(bad)
    assert resolve_device("cpu") == torch.device("cpu")
    # A machine with two GPUs, the second current: a bare "cuda" means it, as in torch.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_device(None) == resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match=r"'cuda:2': only 2 CUDA device\(s\) visible"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="'cuda:0': no CUDA device"):
        resolve_device("cuda:0")
    assert resolve_device(None) == torch.device("cpu")


def test_capture_sizes_cover_every_batch() -> None:
    for n in (1, 3, 64, 100, 600):
        sizes = capture_sizes(n)
        assert sizes[-1] == n and sizes == sorted(set(sizes))
        assert all(any(s >= b for s in sizes) for b in range(1, n + 1))


@pytest.mark.gpu
def test_gpu_graphs_match_readable_path(ckpt: Path) -> None:
    """float32 on the device: CUDA-graph decode (padded batches) = the readable eager path."""
    kw = dict(
        progress=False,
        device="cuda",
        max_num_batched_tokens=16,
        max_num_seqs=8,
        kv_cache_memory=2**28,
    )
    ref = LLM(ckpt, kernels="torch", **kw)
    fast = LLM(ckpt, **kw)
    assert (
        fast.engine.executor.kernels == "triton" and fast.engine.executor.runner.graphs is not None
    )
    _assert_same(_run(fast), _run(ref), 1e-3)
    # Padding rows route nowhere: the counters hold exactly the real tokens.
    tokens = sum(len(p) + _params(i).max_tokens - 1 for i, p in enumerate(PROMPTS))
    counts = fast.engine.expert_token_counts()
    assert counts.sum(dim=1).tolist() == [tokens * 2] * counts.shape[0]
    assert torch.equal(counts, ref.engine.expert_token_counts())


@pytest.mark.gpu
def test_gpu_bf16_graphs_match_eager_kernels(ckpt: Path) -> None:
    """bf16: graphs replay exactly the kernels the eager fast path runs."""
    kw = dict(
        progress=False, device="cuda", dtype="bfloat16", max_num_seqs=16, kv_cache_memory=2**28
    )
    eager = LLM(ckpt, enforce_eager=True, **kw)
    graphs = LLM(ckpt, **kw)
    assert (
        eager.engine.executor.runner.graphs is None
        and graphs.engine.executor.runner.graphs is not None
    )
    # Padded graph batches may make cuBLAS pick other GEMM kernels than the eager batch of
    # the real size: same tokens, log-probabilities within bf16 rounding.
    _assert_same(_run(graphs), _run(eager), 5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("offloaded", [False, True], ids=["resident", "offloaded"])
def test_gpu_async_scheduling_feeds_graphs_the_tokens_sync_reads(
    ckpt: Path, offloaded: bool
) -> None:
    """A decode graph queued before the last step's tokens reach the host reads them on the
    device: exactly the tokens and logprobs of the synchronous engine, stops and seeded
    sampling included, with every block freed."""
    kw = dict(
        progress=False,
        device="cuda",
        dtype="bfloat16",
        max_num_seqs=8,
        max_num_batched_tokens=16,
        kv_cache_memory=2**28,
    )
    if offloaded:
        kw |= dict(expert_cache_slots=3, offload_mode="fetch")
    sync = LLM(ckpt, async_scheduling=False, **kw)
    [probe] = sync.generate([PROMPTS[0]], _params(3, None))
    stop = probe.outputs[0].token_ids[4]
    params = [_params(i) for i in range(len(PROMPTS))]
    params[0] = SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop])
    params[2] = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=7, logprobs=1)

    def run(llm: LLM) -> list:
        outs = llm.generate(PROMPTS, params)
        return [
            (
                o.outputs[0].token_ids,
                [lp.logprob for lp in o.outputs[0].logprobs or []],
                o.outputs[0].finish_reason,
            )
            for o in outs
        ]

    lag = LLM(ckpt, async_scheduling=True, **kw)
    assert lag.engine.executor.runner.graphs is not None
    assert run(lag) == run(sync)
    assert lag.engine.scheduler.stats().kv_blocks_used == 0


def test_warm_up_runs_every_power_of_two_and_leaves_no_trace(ckpt: Path) -> None:
    llm = LLM(
        ckpt,
        progress=False,
        device="cpu",
        kernels="torch",
        max_num_batched_tokens=40,
        max_num_seqs=8,
    )
    eng = llm.engine
    before = _run(llm)
    eng.executor.reset_expert_counts()
    sizes: list[int] = []
    mixed: list[int] = []
    real, real_mixed = eng.executor.runner.scratch_prefill, eng.executor.runner.scratch_mixed
    eng.executor.runner.scratch_prefill = lambda n: (sizes.append(n), real(n))[1]  # type: ignore[method-assign]
    eng.executor.runner.scratch_mixed = lambda n: (mixed.append(n), real_mixed(n))[1]  # type: ignore[method-assign]
    eng.executor.runner.warm_up(40)
    assert sizes == [1, 2, 4, 8, 16, 32]  # each power of two up to the step budget
    assert mixed == [1, 2, 4, 8, 16, 32]  # and beside a decode (eager decode kernels)
    assert int(eng.expert_token_counts().sum()) == 0  # the warm-up is not traffic
    assert _run(llm) == before  # nothing it wrote into free blocks leaks into requests


def test_warm_up_steps_past_max_model_len_split_into_sequences(ckpt: Path) -> None:
    """A step budget above max_model_len warms up as several sequences, none of them past the
    model's positions (the cos/sin table has no row beyond them: an index error before)."""
    llm = LLM(
        ckpt,
        progress=False,
        device="cpu",
        kernels="torch",
        max_model_len=24,
        max_num_batched_tokens=64,
        max_num_seqs=8,
    )
    runner = llm.engine.executor.runner
    work = runner._scratch_prefills(64, 1)
    assert [w.num_tokens for w in work] == [24, 24, 16]
    blocks = [b for w in work for b in w.seq.block_ids]
    assert blocks == list(range(1, 1 + len(blocks)))  # consecutive, none shared
    runner.warm_up(64)  # 64-token steps run, each sequence within 24 positions


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("offloaded", [False, True], ids=["resident", "offloaded"])
def test_gpu_second_device(ckpt: Path, offloaded: bool) -> None:
    """An engine on cuda:1 (graphs, Triton, async scheduling, the expert cache's copy stream)
    gives cuda:0's outputs, puts nothing on cuda:0, leaves the caller's current device alone,
    and steps from a thread whose current device is cuda:0 (the server's engine thread)."""
    import threading

    kw = dict(
        progress=False,
        dtype="bfloat16",
        max_num_seqs=8,
        max_num_batched_tokens=16,
        kv_cache_memory=2**28,
    )
    if offloaded:
        kw |= dict(expert_cache_slots=3, offload_mode="fetch")
    want = _run(LLM(ckpt, device="cuda:0", **kw))
    torch.cuda.synchronize(0)
    on_first = torch.cuda.memory_allocated(0)
    second = LLM(ckpt, device="cuda:1", **kw)
    assert torch.cuda.current_device() == 0
    assert (
        second.engine.executor.runner.graphs is not None
        and second.engine.executor.model.device.index == 1
    )
    got: list = []
    worker = threading.Thread(target=lambda: got.append(_run(second)))
    worker.start()
    worker.join(timeout=300)
    assert got, "the generation on cuda:1 failed (see the thread's traceback)"
    _assert_same(got[0], want, 5e-2)
    assert torch.cuda.memory_allocated(0) == on_first
    assert second.engine.scheduler.stats().kv_blocks_used == 0
