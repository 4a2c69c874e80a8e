"""The expert cache run by the GPU itself (engine/device_cache.py, kernels/expert_fetch.py).

On the CPU the kernels run under Triton's interpreter (tests/conftest.py) and "host memory"
and "device" are both host memory: that checks the miss finding, the staging copies, the LRU
admission, the counters, and the hand-over between the device's maps and the host caches.
The gpu-marked test decodes through the CUDA graphs that hold it.
"""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from moeserve import LLM, SamplingParams  # noqa: E402
from moeserve.config import ConfigError, OffloadConfig  # noqa: E402
from moeserve.engine.device_cache import graph_fetch_batch  # noqa: E402
from moeserve.engine.expert_store import ExpertStore  # noqa: E402
from tests.checkpoints import make_checkpoint  # noqa: E402
from tests.test_offload_fused import _moe  # noqa: E402

E = 8


class ReferenceLRU:
    """The device cache's rules in plain Python: per call, the needed experts are stamped;
    each miss (ascending) takes the slot of the least recently used resident the call does not
    need (ties to the lowest id), if there is one."""

    def __init__(self, residents: list[int]) -> None:
        self.stamp = {e: 0 for e in residents}
        self.clock = 0
        self.hits = self.misses = self.evictions = 0

    def call(self, needed: set[int]) -> None:
        self.clock += 1
        missed = sorted(e for e in needed if e not in self.stamp)
        self.hits += len(needed) - len(missed)
        self.misses += len(missed)
        for e in needed & set(self.stamp):
            self.stamp[e] = self.clock
        for e in missed:
            free = [r for r in self.stamp if r not in needed]
            if free:
                victim = min(free, key=lambda r: (self.stamp[r], r))
                del self.stamp[victim]
                self.stamp[e] = self.clock
                self.evictions += 1


def _device_store(kind: str = "", slots: int = 3, batch: int = 2, layers: int = 1):
    """Offloaded layers and their store with a device cache (as the engine builds it)."""
    moes = [_moe(seed=i, kind=kind) for i in range(layers)]
    model = SimpleNamespace(device=torch.device("cpu"), moe_layers=lambda: list(enumerate(moes)))
    config = OffloadConfig(mode="fetch")
    return moes, ExpertStore(model, config, slots, fused=True, graph_batch=batch)


def _resident(moe, x_TD: torch.Tensor) -> torch.Tensor:
    """The layer's output with every expert read from its home (the readable twin)."""
    weights, experts = moe.select_experts(x_TD)
    return moe.experts(x_TD, weights, experts)


def _check_pool(store: ExpertStore) -> None:
    """Every resident expert's slot holds its bytes; layers' slots and staging are disjoint."""
    seen: set[int] = set()
    for layer in store.layers:
        owned = [s for s in layer.slot_of if s >= 0]
        assert len(owned) == store.slots and not seen & set(owned)
        seen |= set(owned)
        for e, s in enumerate(layer.slot_of):
            if s >= 0:
                for pool, host in zip(store.pool, layer._host_tensors()):
                    assert torch.equal(pool[s], host[e])
    staging = store.device_cache.staging_M.tolist()
    assert not seen & set(staging) and len(set(staging)) == len(staging)


@pytest.mark.parametrize("kind", ["", "fp8", "mxfp4"])
def test_interpreted_in_graph_calls_match_resident_and_lru(kind: str) -> None:
    """Calls through the device cache give the resident output; its counters and maps follow
    the LRU rules above, call after call."""
    moes, store = _device_store(kind)
    moe, table = moes[0], store.device_cache.tables[0]
    ref = ReferenceLRU(list(range(store.slots)))
    g = torch.Generator().manual_seed(0)
    d = moe.w_down.shape[1]
    store.device_cache.before_replay()
    for step in range(8):
        # Small inputs: no routing weight underflows to 0, where the routers' ties may differ.
        x = 0.1 * torch.randn(1 + step % 2, d, generator=g)
        _, experts = moe.select_experts(x)
        want = _resident(moe, x)
        got = moe(x, experts=table)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        ref.call(set(experts.flatten().tolist()))
    store.device_cache.after_replay()
    (st,) = store.stats()
    assert (st.hits, st.misses, st.evictions) == (ref.hits, ref.misses, ref.evictions)
    assert st.misses > 0 and st.bytes_copied == st.misses * store.layers[0].expert_bytes
    slot_E = store.device_cache.slot_LE[0].tolist()
    assert {e for e, s in enumerate(slot_E) if s >= 0} == set(ref.stamp)
    store.device_cache.pull()
    _check_pool(store)


def test_interpreted_shared_expert_beside_the_device_cache() -> None:
    """A DeepSeek-style shared expert (resident) with the routed experts behind the device
    cache: at one token it runs in the same kernels and the sum adds it."""
    from moeserve.model.moe import DenseMLP

    moes, store = _device_store()
    moe, table = moes[0], store.device_cache.tables[0]
    d = moe.w_down.shape[1]
    moe.shared = DenseMLP(d, 24, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for w in (moe.shared.w_gate_up, moe.shared.w_down):
            w.copy_(torch.randn(w.shape, generator=g) / w.shape[1] ** 0.5)
    assert moe._kernel_shared(1) is not None
    store.device_cache.before_replay()
    for _ in range(3):
        x, res = 0.1 * torch.randn(1, d, generator=g), torch.randn(1, d, generator=g)
        want = res + (_resident(moe, x) + moe.shared(x))
        got = moe(x, residual_TD=res, experts=table)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    store.device_cache.after_replay()


def test_interpreted_padding_rows_need_nothing() -> None:
    """A call of padding rows only (the graphs' warm-up) stages and admits nothing."""
    moes, store = _device_store()
    dc = store.device_cache
    dc.before_replay()
    before = dc.slot_LE.clone()
    moes[0](torch.randn(2, moes[0].w_down.shape[1]), torch.zeros(2), experts=dc.tables[0])
    assert torch.equal(dc.slot_LE, before) and dc.counters() == [[0, 0, 0]]


def test_interpreted_device_and_host_caches_hand_over() -> None:
    """Eager steps (the host caches) and in-graph calls alternate: each sees the other's
    admissions, outputs stay exact, no slot is lost or shared."""
    moes, store = _device_store(slots=2, layers=2)
    dc = store.device_cache
    rng = random.Random(1)
    d = moes[0].w_down.shape[1]
    g = torch.Generator().manual_seed(2)
    for _step in range(10):
        in_graph = rng.random() < 0.6
        x = torch.randn(1 if in_graph else 3, d, generator=g)
        for i, moe in enumerate(moes):
            want = _resident(moe, x)
            if in_graph:
                dc.before_replay()
                got = moe(x, experts=dc.tables[i])
                dc.after_replay()
            else:
                got = moe(x, experts=store.layers[i])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        dc.pull()
        _check_pool(store)
    assert all(s.misses > 0 for s in store.stats())


def test_graph_batch_follows_what_the_path_needs() -> None:
    small, large = 4 << 20, 168 << 20  # FP8 Qwen3-30B-A3B's and FP8 Mixtral-8x7B's experts
    default = OffloadConfig()
    assert graph_fetch_batch(default, True, True, 64, small) == 4
    assert graph_fetch_batch(default, True, True, 2, small) == 2
    assert graph_fetch_batch(default, True, True, 64, large) == 0
    assert graph_fetch_batch(default, False, True, 64, small) == 0  # unset: no error
    assert graph_fetch_batch(default, True, False, 64, small) == 0
    assert graph_fetch_batch(OffloadConfig(prefetch=True), True, True, 64, small) == 0
    four = OffloadConfig(graph_batch=4)
    assert graph_fetch_batch(four, True, True, 64, large) == 4  # asked for: large experts too
    assert graph_fetch_batch(four, True, True, 2, small) == 2
    assert graph_fetch_batch(OffloadConfig(graph_batch=0), True, True, 64, small) == 0
    assert graph_fetch_batch(OffloadConfig(graph_batch=16), True, True, 64, small) == 16
    for config, flag in (
        (OffloadConfig(graph_batch=2, mode="cpu"), "--offload-mode"),
        (OffloadConfig(graph_batch=2, policy="lfu"), "--expert-cache-policy"),
        (OffloadConfig(graph_batch=2, prefetch=True), "--prefetch"),
    ):
        with pytest.raises(ConfigError, match=f"--expert-cache-graph-batch 2 needs.*{flag}"):
            graph_fetch_batch(config, True, True, 64, small)
    with pytest.raises(ConfigError, match="decode CUDA graphs"):
        graph_fetch_batch(OffloadConfig(graph_batch=1), False, True, 64, small)
    with pytest.raises(ConfigError, match="expert_cache_graph_batch must be >= 0"):
        OffloadConfig(graph_batch=-1)


def test_cpu_engine_refuses_an_explicit_graph_batch(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "m", "mixtral", num_local_experts=E)
    with pytest.raises(ConfigError, match="decode CUDA graphs"):
        LLM(ckpt, progress=False, expert_cache_slots=2, expert_cache_graph_batch=2)


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_gpu_in_graph_offload_matches_eager(tmp_path: Path, quantization: str | None) -> None:
    """Decode through graphs that fetch their own experts equals eager offloaded decode
    (float32 tokens and log-probs); batches past the in-graph size replay per-stage graphs;
    the counters see the GPU's misses."""
    ckpt = make_checkpoint(tmp_path / "m", "qwen3_moe", num_experts=16, num_experts_per_tok=4)
    kw = dict(
        progress=False,
        device="cuda",
        kv_cache_memory=2**28,
        expert_cache_slots=5,
        offload_mode="fetch",
        max_num_seqs=8,
        quantization=quantization,
    )
    prompts = [[5 + i, 9, 40 + 3 * i, 7, 11][: 2 + i % 4] for i in range(6)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=1)
    ref = LLM(ckpt, enforce_eager=True, **kw).generate(prompts, params)
    llm = LLM(ckpt, expert_cache_graph_batch=2, **kw)
    graphs = llm.engine.executor.runner.graphs
    assert graphs is not None and graphs.device_cache is not None
    assert graphs.staged == {s for s in graphs.sizes if s > 2}
    for batch in (1, 2, 6):  # one and two rows in one graph; six in the staged graphs
        outs = llm.generate(prompts[:batch], params)
        for a, b in zip(outs, ref):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                assert abs(x.logprob - y.logprob) < 1e-3
    stats = llm.engine.expert_cache_stats()
    assert sum(s.misses for s in stats) > 0 and sum(s.evictions for s in stats) > 0
    assert graphs.device_cache.counters() and any(c[1] for c in graphs.device_cache.counters())
