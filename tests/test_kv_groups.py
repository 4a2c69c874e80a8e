"""KV groups (engine/kv_groups.py): sliding-window layers keep only their window's blocks.

The scheduler is driven by a fake model over random workloads with a small pool: every step
checks that each block has one owner, that the pool's count is exactly what the sequences
hold (full tables plus the live part of the window tables), that no block a step reads was
released, and that preemption, finishing and aborts leak nothing.
"""

from __future__ import annotations

import itertools
import random

import pytest

from moeserve.config import ModelConfig
from moeserve.engine.kv_groups import KVGroups
from moeserve.engine.scheduler import RequestTooLarge, Scheduler
from moeserve.engine.sequence import SeqStatus, Sequence

_ids = itertools.count()
BS = 4


def _cfg(windows: tuple[int | None, ...]) -> ModelConfig:
    return ModelConfig(
        model_type="gpt_oss",
        vocab_size=32,
        hidden_size=8,
        num_layers=len(windows),
        num_heads=1,
        num_kv_heads=1,
        head_dim=8,
        rms_norm_eps=1e-5,
        max_position_embeddings=64,
        rope_theta=1e4,
        layer_windows=windows,
    )


def test_groups_of_a_model() -> None:
    g = KVGroups.for_model(_cfg((128, None, 128, None, 128, None)))
    assert (g.window, g.num_tensors, g.tensor_of_layer) == (128, 3, (0, 0, 1, 1, 2, 2))
    g = KVGroups.for_model(_cfg((4, None, 4)))
    assert (g.window, g.num_tensors, g.tensor_of_layer) == (4, 2, (0, 0, 1))
    # One kind of layer (or two different windows): one group, a tensor per layer.
    for windows in ((None, None), (9, 9), (4, 8, None)):
        g = KVGroups.for_model(_cfg(windows))
        assert g.window is None and g.tensor_of_layer == tuple(range(len(windows)))
    # A token at a time: every full block, and at most cdiv(window, S) + 1 live window blocks.
    assert KVGroups(6, (), 1).blocks_to_run(100, BS) == 25 + 3
    assert KVGroups(6, (), 1).blocks_to_run(5, BS) == 2 + 2


def _check(sched: Scheduler, window: int, reading: dict[int, tuple[int, int]]) -> None:
    """Ownership and counts; `reading`: seq_id -> (start, end) of the step just scheduled."""
    seqs = sched.running() + sched.waiting()
    owned = []
    for s in seqs:
        assert len(s.window_block_ids) == len(s.block_ids)
        live = s.window_block_ids[s.window_released :]
        owned += s.block_ids + live
        if s.seq_id in reading:  # every window block this step reads is still held
            start, _ = reading[s.seq_id]
            assert s.window_released <= max(0, start - window + 1) // BS
        if s.status is SeqStatus.WAITING:
            assert not s.block_ids and not s.window_block_ids and s.window_released == 0
        else:  # held window blocks stay bounded by the window (plus a step's chunk)
            assert len(live) <= -(-(window + sched.max_num_batched_tokens) // BS) + 1
    assert len(owned) == len(set(owned)) == sched.block_pool.num_used, "block owned twice/leaked"


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("window", "num_blocks"), [(4, 24), (6, 40), (9, 30)])
def test_window_blocks_are_released_and_never_leak(seed: int, window: int, num_blocks: int):
    rng = random.Random(seed)
    groups = KVGroups(window, (0, 0), 1)
    sched = Scheduler(
        num_blocks=num_blocks,
        block_size=BS,
        max_num_seqs=6,
        max_num_batched_tokens=12,
        max_model_len=64,
        kv_groups=groups,
    )
    seqs = []
    for _ in range(12):
        sid = next(_ids)
        prompt = list(range(rng.randrange(1, 30)))
        seqs.append(Sequence(sid, f"r{sid}", prompt, rng.randrange(1, 30), arrival_time=sid))
        sched.add(seqs[-1])
    victim = seqs[5]
    steps = preempted = 0
    while sched.has_unfinished():
        steps += 1
        assert steps < 5000
        out = sched.schedule()
        preempted += len(out.preempted)
        _check(
            sched, window, {x.seq.seq_id: (x.start, x.start + x.num_tokens) for x in out.scheduled}
        )
        sched.update(out, {x.seq.seq_id: 7 for x in out.scheduled if x.sample})
        for x in out.scheduled:
            s = x.seq
            assert s.window_released == groups.first_live_block(s.num_computed_tokens, BS)
            if s.status is SeqStatus.RUNNING and s.num_output_tokens >= s.max_tokens:
                sched.finish(s, "length")
        if steps == 12 and not victim.is_finished:
            sched.abort_request(victim.request_id)
        _check(sched, window, {})
    assert preempted > 0, "the pool should be too small for every sequence at once"
    assert sched.block_pool.num_used == 0
    assert all(s.num_output_tokens == s.max_tokens for s in seqs if s is not victim)


def test_long_sequences_cost_full_blocks_only() -> None:
    """A 200-token sequence runs in a pool far smaller than two tables of it."""
    groups = KVGroups(8, (0, 0), 1)
    need = groups.blocks_to_run(200, BS)
    assert need == 50 + 3
    sched = Scheduler(
        num_blocks=need,
        block_size=BS,
        max_num_seqs=1,
        max_num_batched_tokens=16,
        max_model_len=256,
        kv_groups=groups,
    )
    seq = Sequence(next(_ids), "long", list(range(150)), 50)
    sched.add(seq)
    while not seq.is_finished:
        out = sched.schedule()
        assert out.scheduled and not out.preempted
        sched.update(out, {seq.seq_id: 1} if out.scheduled[0].sample else {})
        if seq.num_output_tokens >= seq.max_tokens:
            sched.finish(seq, "length")
    assert sched.block_pool.num_used == 0
    with pytest.raises(RequestTooLarge):
        sched.add(Sequence(next(_ids), "longer", list(range(200)), 10))


def _fake_varlen(q_QHX, k_cache, v_cache, pack, scale, window=None, sinks_H=None):
    """FlashAttention's varlen call as the runner relies on it (causal aligned to each
    context's end, window_size_left = window - 1), on the CPU."""
    import torch

    from moeserve.model.layers import explicit_attention

    g, x = k_cache.shape[2:]
    k_CGX, v_CGX = (c.view(-1, g, x)[pack.slots_C] for c in (k_cache, v_cache))
    h = q_QHX.shape[1]
    sinks = sinks_H if sinks_H is not None else torch.full((h,), float("-inf"))
    out = []
    cu_q, cu_k = pack.cu_q_P1.tolist(), pack.cu_k_P1.tolist()
    for i in range(len(cu_q) - 1):
        q = q_QHX[cu_q[i] : cu_q[i + 1]]
        k, v = (a[cu_k[i] : cu_k[i + 1]].repeat_interleave(h // g, 1) for a in (k_CGX, v_CGX))
        n, c = q.shape[0], k.shape[0]
        q_pos, k_pos = torch.arange(c - n, c), torch.arange(c)
        mask = k_pos[None, :] <= q_pos[:, None]
        if window is not None:
            mask &= k_pos[None, :] > q_pos[:, None] - window
        qs, ks, vs = (a.transpose(0, 1)[None] for a in (q, k, v))
        out.append(explicit_attention(qs, ks, vs, mask[None], scale, sinks)[0].transpose(0, 1))
    return torch.cat(out)


def test_packed_prefill_gathers_the_window_only(tmp_path, monkeypatch) -> None:
    """The sliding group's varlen pack starts each context where its chunk's window does
    (the released blocks before it never gathered) and attends as the unpacked path does."""
    import torch

    import moeserve.model.attention as attention
    from moeserve.engine.runner import Runner
    from moeserve.engine.scheduler import ScheduledSeq
    from moeserve.model.loader import load_model
    from tests.checkpoints import make_checkpoint

    _, model = load_model(make_checkpoint(tmp_path / "g", "gpt_oss"), progress=False)
    groups = KVGroups.for_model(model.cfg)
    runner = Runner(model, num_blocks=16, block_size=BS, kv_groups=groups)
    seq = Sequence(next(_ids), "r", list(range(30, 43)), 4)
    seq.block_ids, seq.window_block_ids = [9, 3, 12, 6], [4, 14, 1, 10]
    runner.execute([ScheduledSeq(seq, 0, 8, False)])
    seq.window_block_ids[0] = 0  # released: the next chunk's window starts at position 5
    monkeypatch.setattr(attention, "varlen_prefill", _fake_varlen)
    chunk = [ScheduledSeq(seq, 8, 5, True)]
    want, _ = runner.execute(chunk)
    runner.pack_prefills = True
    pack = runner.prepare(chunk).meta.window.prefill_pack
    w = seq.window_block_ids
    assert pack.slots_C.tolist() == [w[p // BS] * BS + p % BS for p in range(5, 13)]
    assert pack.cu_k_P1.tolist() == [0, 8] and pack.max_k == 8
    got, _ = runner.execute(chunk)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
