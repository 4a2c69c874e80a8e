"""Scheduler driven by a fake model; every step checks budget, caps, block ownership, order."""

from __future__ import annotations

import itertools
import random

import pytest

from moeserve.engine.scheduler import RequestTooLarge, Scheduler, SchedulerOutput
from moeserve.engine.sequence import SeqStatus, Sequence

_ids = itertools.count()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def make(**kw: object) -> Scheduler:
    args: dict = dict(
        num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=32, max_model_len=256
    )
    args.update(kw)
    return Scheduler(**args)


def mkseq(prompt_len: int, max_tokens: int, request_id: str | None = None) -> Sequence:
    sid = next(_ids)
    # arrival_time from the id keeps arrival order deterministic (monotonic() can tie).
    return Sequence(
        sid,
        request_id or f"r{sid}",
        list(range(100, 100 + prompt_len)),
        max_tokens,
        arrival_time=float(sid),
    )


def fake_token(seq_id: int, num_tokens: int) -> int:
    """Depends only on the position, so a recomputed sequence samples the same tokens."""
    return (seq_id * 7919 + num_tokens) % 32000


def expected_output(seq: Sequence) -> list[int]:
    return [fake_token(seq.seq_id, seq.num_prompt_tokens + i) for i in range(seq.max_tokens)]


class Driver:
    """Fake engine loop: schedule, check invariants, sample, update, finish at max_tokens."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.admission_order: list[int] = []
        self.steps = 0
        self.num_preempting_steps = 0

    def step(self) -> SchedulerOutput:
        sched, bs = self.sched, self.sched.block_size
        decodes = [s for s in sched.running() if s.num_tokens - s.num_computed_tokens == 1]
        out = sched.schedule()
        self.steps += 1
        self.num_preempting_steps += bool(out.preempted)
        ids = [x.seq.seq_id for x in out.scheduled]
        assert len(ids) == len(set(ids)), "a sequence scheduled twice in one step"
        total = sum(x.num_tokens for x in out.scheduled)
        assert total == out.num_batched_tokens == out.num_prefill_tokens + out.num_decode_tokens
        assert total <= sched.max_num_batched_tokens
        assert sched.num_running <= sched.max_num_seqs
        # Decodes come first, oldest first (by priority under that policy); one is dropped
        # only by being preempted.
        if sched.by_priority:
            decodes.sort(key=lambda s: (s.priority, s.arrival_time, s.seq_id))
        gone = {s.seq_id for s in out.preempted}
        kept = [s.seq_id for s in decodes if s.seq_id not in gone]
        assert ids[: len(kept)] == kept and out.num_decode_tokens == len(kept)
        for x in out.scheduled:
            seq = x.seq
            assert seq.status is SeqStatus.RUNNING and x.start == seq.num_computed_tokens
            assert x.num_tokens >= 1 and x.seq.seq_id not in gone
            assert x.sample == (x.start + x.num_tokens == seq.num_tokens)
            assert len(seq.block_ids) == cdiv(x.start + x.num_tokens, bs)
            if not sched.enable_chunked_prefill:
                assert x.sample, "without chunked prefill the whole remainder runs at once"
            if seq.seq_id not in self.admission_order:
                self.admission_order.append(seq.seq_id)
        assert all(s.status is SeqStatus.WAITING for s in out.preempted)
        check_blocks(sched)
        sampled = {
            x.seq.seq_id: fake_token(x.seq.seq_id, x.seq.num_tokens)
            for x in out.scheduled
            if x.sample
        }
        sched.update(out, sampled)
        for x in out.scheduled:
            if x.seq.status is SeqStatus.RUNNING and x.seq.num_output_tokens >= x.seq.max_tokens:
                sched.finish(x.seq, "length")
        assert all(len(s.block_ids) == cdiv(s.num_computed_tokens, bs) for s in sched.running())
        check_blocks(sched)
        return out

    def run(self, max_steps: int = 10_000) -> None:
        while self.sched.has_unfinished():
            assert self.steps < max_steps, "scheduler made no progress"
            self.step()


def driver(sched: Scheduler, *seqs: Sequence) -> Driver:
    for s in seqs:
        sched.add(s)
    return Driver(sched)


def check_blocks(sched: Scheduler) -> None:
    seqs = sched.running() + sched.waiting()
    flat = [b for s in seqs for b in s.block_ids]
    assert len(flat) == len(set(flat)) == sched.block_pool.num_used, "block owned twice/leaked"
    waiting = sched.waiting()
    for s in waiting:
        assert s.status is SeqStatus.WAITING and not s.block_ids and s.num_computed_tokens == 0
    if sched.by_priority:  # by priority, then arrival, preempted or not
        assert waiting == sorted(waiting, key=lambda s: (s.priority, s.arrival_time, s.seq_id))
        return
    # Preempted seqs sit at the front, in arrival order, ahead of never-run ones.
    front = [s for s in waiting if s.num_preemptions]
    assert waiting[: len(front)] == front == sorted(front, key=lambda s: s.arrival_time)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"num_blocks": 0}, "num_blocks"),
        ({"block_size": 0}, "block_size"),
        ({"max_num_seqs": -1}, "max_num_seqs"),
        ({"max_model_len": 0}, "max_model_len"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
        ({"max_num_batched_tokens": 4}, "max_num_seqs"),
        ({"enable_chunked_prefill": False, "max_num_batched_tokens": 100}, "max_model_len"),
    ],
)
def test_config_validation(kw: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        make(**kw)


def test_add_rejects_what_can_never_run() -> None:
    sched = make(num_blocks=4, block_size=4, max_model_len=20)
    with pytest.raises(
        RequestTooLarge, match=r"maximum context length is 20 tokens, but the request needs 21"
    ):
        sched.add(mkseq(15, 6))
    with pytest.raises(RequestTooLarge, match=r"needs 5 KV blocks.*only 4"):
        sched.add(mkseq(10, 7))
    with pytest.raises(ValueError, match="empty"):
        sched.add(mkseq(0, 3))
    with pytest.raises(ValueError, match="max_tokens"):
        sched.add(mkseq(3, 0))
    fits = mkseq(10, 6)  # exactly the whole cache
    sched.add(fits)
    with pytest.raises(ValueError, match="already"):
        sched.add(fits)
    Driver(sched).run()
    assert fits.output_ids == expected_output(fits) and fits.finish_reason == "length"
    assert sched.block_pool.num_free == 4


def test_chunked_prefill_splits_while_decodes_continue() -> None:
    sched = make(max_num_batched_tokens=8, max_num_seqs=4)
    shorts = [mkseq(3, 40), mkseq(3, 40)]
    drv = driver(sched, *shorts)
    drv.step()
    long = mkseq(50, 2)
    sched.add(long)
    chunks = []
    while long.num_output_tokens == 0:
        out = drv.step()
        assert [(x.seq, x.num_tokens) for x in out.scheduled[:2]] == [(s, 1) for s in shorts]
        (x,) = out.scheduled[2:]
        assert x.seq is long and x.sample == (x.num_tokens == 2)
        chunks.append(x.num_tokens)
    assert chunks == [6] * 8 + [2]
    drv.run()
    assert all(s.output_ids == expected_output(s) for s in [*shorts, long])


def test_running_prefill_chunk_shrinks_to_free_blocks() -> None:
    sched = make(
        num_blocks=6, block_size=4, max_num_seqs=2, max_num_batched_tokens=15, max_model_len=64
    )
    a, b = mkseq(7, 2), mkseq(20, 1)
    drv = driver(sched, a, b)
    out = drv.step()
    assert [(x.seq, x.num_tokens) for x in out.scheduled] == [(a, 7), (b, 8)]
    out = drv.step()  # b wants 12 more tokens but only 2 free blocks (8 slots) remain
    assert [(x.seq, x.num_tokens, x.sample) for x in out.scheduled] == [(a, 1, True), (b, 8, False)]
    assert not out.preempted and sched.block_pool.num_free == 2  # a finished and freed
    drv.run()
    assert b.output_ids == expected_output(b)


def test_fcfs_head_of_line_blocks_later_requests() -> None:
    sched = make(num_blocks=10, block_size=4, max_num_batched_tokens=64, max_model_len=64)
    a, b, c = mkseq(20, 4), mkseq(24, 4), mkseq(2, 2)
    drv = driver(sched, a, b, c)
    drv.step()
    # b needs 6 blocks, 5 are free; c would fit but must not jump the queue.
    assert sched.running() == [a] and sched.waiting() == [b, c]
    drv.run()
    assert drv.admission_order == [a.seq_id, b.seq_id, c.seq_id]


def test_without_chunked_prefill_prompts_run_whole() -> None:
    sched = make(enable_chunked_prefill=False, max_num_batched_tokens=64, max_model_len=64)
    a, b = mkseq(40, 3), mkseq(40, 3)
    drv = driver(sched, a, b)
    out = drv.step()
    assert [(x.seq, x.num_tokens) for x in out.scheduled] == [(a, 40)]  # b: 40 > 24 left
    out = drv.step()
    assert [(x.seq, x.num_tokens) for x in out.scheduled] == [(a, 1), (b, 40)]
    drv.run()
    assert a.output_ids == expected_output(a) and b.output_ids == expected_output(b)


def test_preemption_under_small_pool_recomputes_and_completes() -> None:
    sched = make(num_blocks=12, block_size=4, max_num_batched_tokens=64)
    seqs = [mkseq(8, 20) for _ in range(6)]
    late = mkseq(8, 20)
    drv = driver(sched, *seqs, late)
    drv.step()  # six prompts of 2 blocks each fill the pool; `late` waits
    assert sched.block_pool.num_free == 0 and sched.waiting() == [late]
    running = sched.running()
    out = drv.step()
    # The oldest decode needs a block: the newest admitted, unscheduled seq is evicted.
    assert out.preempted and out.preempted[0] is running[-1]
    assert sched.waiting()[-1] is late and sched.waiting()[0] is out.preempted[-1]
    victim = out.preempted[0]
    assert victim.num_output_tokens == 1 and victim.num_preemptions == 1
    drv.run()
    assert sched.stats().num_preemptions_total > 0
    for s in [*seqs, late]:
        assert s.output_ids == expected_output(s) and s.finish_reason == "length"
    assert sched.block_pool.num_free == 12


def test_decode_preempts_itself_when_no_victim() -> None:
    sched = make(num_blocks=3, block_size=4, max_num_seqs=2)
    a, b = mkseq(4, 4), mkseq(4, 4)
    drv = driver(sched, a, b)
    drv.step()
    out = drv.step()  # a takes the last free block; b, scheduled after it, has no victim
    assert [x.seq for x in out.scheduled] == [a] and out.preempted == [b]
    assert b.output_ids == expected_output(b)[:1] and b.status is SeqStatus.WAITING
    drv.run()
    assert b.output_ids == expected_output(b) and a.output_ids == expected_output(a)


def test_preempted_seqs_requeue_in_arrival_order() -> None:
    sched = make(num_blocks=3, block_size=4)
    z, y, x = mkseq(4, 4), mkseq(4, 4), mkseq(4, 4)
    x.arrival_time = y.arrival_time - 0.5  # x arrived before y but was added (admitted) after it
    drv = driver(sched, z, y, x)
    drv.step()
    out = drv.step()  # z's decode evicts x (newest); y then finds no victim and evicts itself
    assert out.preempted == [x, y] and [s.seq for s in out.scheduled] == [z]
    assert sched.waiting() == [x, y]
    drv.run()
    assert all(s.output_ids == expected_output(s) for s in (x, y, z))


def test_prefill_without_room_waits_holding_its_blocks() -> None:
    sched = make(
        num_blocks=4, block_size=2, max_num_seqs=2, max_num_batched_tokens=3, max_model_len=16
    )
    a, b = mkseq(1, 5), mkseq(6, 1)
    drv = driver(sched, a, b)
    drv.step()
    drv.step()
    for _ in range(2):  # a decodes; b's blocks are full, pool empty, a is scheduled
        out = drv.step()
        assert [x.seq for x in out.scheduled] == [a] and not out.preempted
        assert b.status is SeqStatus.RUNNING and len(b.block_ids) == 2
    out = drv.step()  # a needs a block again: now b (unscheduled) is evicted
    assert out.preempted == [b] and a.is_finished
    drv.run()
    assert b.output_ids == expected_output(b)


def test_finish_abort_and_stats() -> None:
    sched = make(num_blocks=16)
    r1 = [mkseq(8, 5, "req1"), mkseq(8, 5, "req1")]
    r2 = mkseq(8, 5, "req2")
    driver(sched, *r1, r2)
    assert sched.abort_request("nope") == []
    out = sched.schedule()
    assert sched.stats().kv_blocks_used == 6 and sched.num_running == 3
    assert sched.abort_request("req1") == r1  # running, mid-step: blocks free at once
    assert sched.block_pool.num_used == 2 and all(s.finish_reason == "abort" for s in r1)
    sched.update(out, {x.seq.seq_id: 1 for x in out.scheduled})  # skips the aborted ones
    assert r2.output_ids == [1] and all(s.num_output_tokens == 0 for s in r1)
    with pytest.raises(AssertionError, match="twice"):
        sched.update(out, {r2.seq_id: 1})
    sched.finish(r2, "stop")
    sched.finish(r2, "length")  # idempotent
    assert r2.finish_reason == "stop" and r2.is_finished and not r2.block_ids
    waiting = mkseq(4, 2, "req3")
    driver(sched, waiting)
    assert sched.get(waiting.seq_id) is waiting
    assert sched.abort_request("req3") == [waiting] and sched.get(waiting.seq_id) is None
    st = sched.stats()
    assert (st.num_running, st.num_waiting, st.kv_blocks_used, st.kv_blocks_total) == (0, 0, 0, 16)
    assert st.kv_usage == 0.0 and not sched.has_unfinished()


def test_seq_cap() -> None:
    sched = make(max_num_seqs=3, max_num_batched_tokens=64)
    seqs = [mkseq(3, 4) for _ in range(10)]
    drv = driver(sched, *seqs)
    drv.step()
    assert sched.num_running == 3 and sched.num_waiting == 7
    drv.run()
    assert drv.admission_order == [s.seq_id for s in seqs]


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
@pytest.mark.parametrize("chunked", [True, False])
def test_soak_random_requests_and_aborts(chunked: bool, policy: str) -> None:
    """Random sizes, n=2 requests and aborts under a small pool (priority: random priorities
    too): every sequence finishes with its tokens or aborted, no block leaks, Driver's
    invariants hold every step."""
    rng = random.Random(20240 + chunked)
    sched = make(
        num_blocks=48,
        block_size=4,
        max_num_seqs=16,
        max_num_batched_tokens=64,
        max_model_len=64,
        enable_chunked_prefill=chunked,
        policy=policy,
    )
    drv = Driver(sched)
    added: list[Sequence] = []
    live: list[str] = []
    for i in range(300):
        prompt = rng.randint(1, 40)
        priority = rng.randint(-2, 2) if policy == "priority" else 0
        for _ in range(2 if rng.random() < 0.15 else 1):  # some requests have n=2
            added.append(mkseq(prompt, rng.randint(1, 64 - prompt), f"soak{i}"))
            added[-1].priority = priority
            sched.add(added[-1])
        live.append(f"soak{i}")
        for _ in range(rng.randint(0, 2)):
            drv.step()
            if rng.random() < 0.05:
                sched.abort_request(live.pop(rng.randrange(len(live))))
    drv.run(max_steps=20_000)
    assert sched.num_running == sched.num_waiting == 0 and not sched.has_unfinished()
    assert sched.block_pool.num_free == sched.block_pool.num_blocks
    assert drv.num_preempting_steps > 0
    if policy == "fcfs":
        assert drv.admission_order == sorted(drv.admission_order)  # first admissions: FCFS
    assert any(s.finish_reason == "abort" for s in added)
    for s in added:
        assert s.is_finished and (s.finish_reason == "abort" or s.output_ids == expected_output(s))


def test_priority_policy_orders_admission() -> None:
    """policy "priority": queued requests start by priority value (lower first), then
    arrival; under "fcfs" the same arrivals start in arrival order."""
    for policy, want in (("priority", "dbac"), ("fcfs", "abcd")):
        sched = make(max_num_seqs=1, policy=policy)
        seqs = dict(zip("abcd", (mkseq(4, 2) for _ in range(4)), strict=True))
        if policy == "priority":
            for name, prio in zip("abcd", (5, 0, 5, -1), strict=True):
                seqs[name].priority = prio
        drv = driver(sched, *seqs.values())
        drv.run()
        names = {s.seq_id: n for n, s in seqs.items()}
        assert "".join(names[i] for i in drv.admission_order) == want
        assert all(s.output_ids == expected_output(s) for s in seqs.values())
    with pytest.raises(ValueError, match="policy"):
        make(policy="lifo")


def test_priority_policy_preempts_the_lowest_priority_first() -> None:
    """A KV shortage evicts the running sequence last in priority order, even an older one
    (fcfs would evict the newest admitted); a sequence last in that order evicts itself."""
    sched = make(num_blocks=3, block_size=4, policy="priority")
    low, high = mkseq(4, 4), mkseq(4, 4)
    low.priority, high.priority = 10, 0
    drv = driver(sched, low, high)
    drv.step()  # both prompts: one block each, one block free
    out = drv.step()  # high decodes first and takes the free block; low finds no room
    assert out.preempted == [low] and [x.seq for x in out.scheduled] == [high]
    # A later, more urgent arrival queues ahead of the preempted one; a less urgent behind.
    urgent, lax = mkseq(4, 2), mkseq(4, 2)
    urgent.priority, lax.priority = -1, 11
    sched.add(lax)
    sched.add(urgent)
    assert sched.waiting() == [urgent, low, lax]
    drv.run()
    assert all(s.output_ids == expected_output(s) for s in (low, high, urgent, lax))
    # The victim is the last in priority order, not the newest admitted (fcfs's choice).
    sched2 = make(num_blocks=4, block_size=4, policy="priority")
    old, high, mid = mkseq(4, 8), mkseq(4, 8), mkseq(4, 8)
    old.priority, high.priority, mid.priority = 10, 0, 5
    drv2 = driver(sched2, old)
    drv2.step()  # old's prompt
    sched2.add(high)
    sched2.add(mid)
    drv2.step()  # old's decode takes a second block; high and mid start: the pool is full
    assert sched2.block_pool.num_free == 0
    out = drv2.step()  # high's decode needs a block: old goes, though mid came last
    assert out.preempted == [old] and {x.seq for x in out.scheduled} == {high, mid}
    drv2.run()
    assert all(s.output_ids == expected_output(s) for s in (old, high, mid))


def test_admission_wait_gathers_arrivals_beside_decodes() -> None:
    """Beside running decodes a lone arrival waits up to admission_wait_steps steps; a group
    of max_num_seqs // 8 starts at once; with nothing else running nobody waits."""
    sched = make(max_num_seqs=16, admission_wait_steps=3)  # a group is 2 requests
    d = driver(sched, mkseq(4, 50))
    d.step()  # alone: admitted at once
    assert sched.num_running == 1
    late = mkseq(4, 5)
    sched.add(late)
    waited = 0
    while late.status is SeqStatus.WAITING:
        out = d.step()
        assert all(x.num_tokens == 1 for x in out.scheduled) or late.status is SeqStatus.RUNNING
        waited += 1
    assert waited == 4  # 3 steps of decodes alone, then it starts
    pair = [mkseq(4, 5), mkseq(4, 5)]
    for s in pair:
        sched.add(s)
    d.step()
    assert all(s.status is SeqStatus.RUNNING for s in pair)  # together: no wait
    d.run()
    assert not sched.has_unfinished() and sched.block_pool.num_used == 0


def test_admission_wait_never_delays_a_step_that_prefills_anyway() -> None:
    sched = make(max_num_seqs=16, max_num_batched_tokens=32, admission_wait_steps=50)
    d = driver(sched, mkseq(4, 30), mkseq(40, 5))  # the second prompt takes 2 chunks
    d.step()
    late = mkseq(3, 3)
    sched.add(late)
    d.step()  # the long prompt's last chunk runs: the arrival joins it
    assert late.status is SeqStatus.RUNNING
    d.run()


def test_admission_wait_validation() -> None:
    with pytest.raises(ValueError, match="admission_wait_steps"):
        make(admission_wait_steps=-1)


@pytest.mark.parametrize(
    "params,tokens,want",
    [
        # (SamplingParams kwargs, sampled tokens, (index, reason, stop token) of the stop)
        ({}, [5, 6, 7, 8], (3, "length", None)),  # max_tokens 4
        ({"stop_token_ids": [6]}, [5, 6, 7], (1, "stop", 6)),
        ({}, [5, 2, 7], (1, "stop", 2)),  # EOS
        ({"ignore_eos": True}, [5, 2, 7, 8], (3, "length", None)),
        ({"stop_token_ids": [8]}, [5, 6, 7, 8], (3, "stop", 8)),  # a stop token beats length
    ],
)
def test_record_decides_stops_in_one_place(params: dict, tokens: list[int], want: tuple) -> None:
    from moeserve.engine.sequence import PENDING
    from moeserve.sampling_params import SamplingParams

    sched = make()
    seq = mkseq(3, 4)
    seq.params = SamplingParams(max_tokens=4, **params)
    sched.add(seq)
    got = None
    for i, tok in enumerate(tokens):
        out = sched.schedule()
        sched.update(out, {seq.seq_id: PENDING})
        reason, stop = sched.record(seq, i, tok, frozenset({2}))
        if reason is not None:
            got = (i, reason, stop)
            break
    assert got == want
    assert seq.is_finished and seq.finish_reason == want[1]
    assert sched.stats().kv_blocks_used == 0 and not sched.has_unfinished()


def test_record_stops_at_the_context_length() -> None:
    from moeserve.engine.sequence import PENDING
    from moeserve.sampling_params import SamplingParams

    sched = make(max_model_len=8)
    seq = mkseq(6, 2)
    seq.params = SamplingParams(max_tokens=2)
    sched.add(seq)
    sched.update(sched.schedule(), {seq.seq_id: PENDING})
    assert sched.record(seq, 0, 5, frozenset()) == (None, None)
    sched.update(sched.schedule(), {seq.seq_id: PENDING})
    assert sched.record(seq, 1, 5, frozenset()) == ("length", None)
