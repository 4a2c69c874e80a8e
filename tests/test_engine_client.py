"""EngineClient over both transports (the engine loop in a thread, or in its own process):
the same tokens as offline, aborts that free blocks at once, admission errors raised to the
caller, a dead engine failing every open request, coalesced deltas for a slow consumer."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import pickle
import sys
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from moeserve import LLM, SamplingParams
from moeserve.config import EngineConfig
from moeserve.engine.client import EngineClient, EngineDeadError
from moeserve.engine.frames import Frames, write_frame
from moeserve.engine.messages import Abort, EngineRequest, Shutdown
from moeserve.engine.outputs import StepStats
from moeserve.engine.scheduler import RequestTooLarge
from tests.checkpoints import make_checkpoint

KW: dict[str, Any] = {"device": "cpu", "block_size": 4, "max_model_len": 128}
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "mixtral", "mixtral", tokenizer=True)


def _start(ckpt: Path, transport: str) -> EngineClient:
    return EngineClient.start(EngineConfig.from_options(ckpt, **KW), process=transport == "process")


def _run(main: Callable[[], Coroutine[Any, Any, Any]], loop: str = "asyncio") -> Any:
    """Under asyncio's own loop or uvloop's (uvicorn's choice when installed; libuv makes the
    pipe's descriptor non-blocking)."""
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.run(main())
    return asyncio.run(main())


async def _collect(
    client: EngineClient, prompt: str | list[int], params: SamplingParams, rid: str
) -> list[int]:
    ids = client.encode_prompt(prompt)
    text = prompt if isinstance(prompt, str) else None
    tokens: list[int] = []
    async for out in client.generate(EngineRequest(rid, ids, params, prompt=text)):
        for o in out.outputs:
            tokens.extend(o.token_ids)
    return tokens


@pytest.mark.parametrize(
    "transport,loop", [("thread", "asyncio"), ("process", "asyncio"), ("process", "uvloop")]
)
def test_streams_match_offline(ckpt: Path, transport: str, loop: str) -> None:
    prompts: list[str | list[int]] = [[5 + i, 9, 40 + 3 * i, 7] for i in range(8)]
    prompts.append("hello world")
    offline = LLM(ckpt, progress=False, **KW).generate(prompts, GREEDY)
    stats: list[StepStats] = []
    client = _start(ckpt, transport)
    assert client.max_model_len == 128 and client.model_config.num_experts == 6
    assert not client.offloads_experts

    async def main() -> None:
        client.attach(stats_sink=stats.append)
        try:
            got = await asyncio.gather(
                *(_collect(client, p, GREEDY, f"r{i}") for i, p in enumerate(prompts))
            )
            assert got == [o.outputs[0].token_ids for o in offline]
            assert max(s.num_seqs for s in stats) > 1  # they really shared steps
            assert sum(s.num_generated_tokens for s in stats) == 90
            # The routing counters are read from the engine at scrape time.
            counts = client.expert_token_counts()
            assert counts.shape == (3, 6)
            tokens = sum(len(client.encode_prompt(p)) for p in prompts)
            assert int(counts.sum()) == (tokens + 9 * 9) * 2 * 3
            assert client.expert_cache_stats() == []

            # Admission errors are the engine's own exceptions, raised before any delta.
            with pytest.raises(RequestTooLarge, match="maximum context length is 128"):
                await _collect(client, [1, 2, 3], SamplingParams(max_tokens=200), "big")
            with pytest.raises(ValueError, match="outside the vocabulary"):
                await client.generate(EngineRequest("oov", [10_000], GREEDY)).__anext__()

            # Leaving a stream early aborts it: it is reported, and its blocks are free.
            long = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
            seen = 0
            async for _ in client.generate(EngineRequest("long", [3, 4, 5], long)):
                seen += 1
                if seen == 3:
                    break
            stats.clear()
            assert await _collect(client, [7, 8], GREEDY, "after") != []
            assert stats[-1].num_running == 0 and stats[-1].kv_usage == 0.0
            assert any(reason == "abort" for s in stats for reason, _ in s.finished)
        finally:
            await client.shutdown()
        with pytest.raises(EngineDeadError):
            await _collect(client, [1, 2], GREEDY, "late")

    _run(main, loop)


def test_abort_frees_blocks_before_the_next_step(ckpt: Path) -> None:
    client = _start(ckpt, "thread")
    core = client.core
    params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)

    async def main() -> None:
        client.attach()
        gens = [client.generate(EngineRequest(f"r{i}", [5, 6, 7 + i], params)) for i in range(6)]
        for g in gens:
            await anext(g)
        assert core.scheduler.stats().kv_blocks_used > 0
        for g in gens:  # the client goes away
            await g.aclose()
        loop = client._transport.engine_loop
        steps = loop.steps
        # The step in flight may finish; the one after it must not run them.
        while loop.steps < steps + 2 and core.has_unfinished():
            await asyncio.sleep(0.001)
        assert not core.has_unfinished()
        assert core.scheduler.stats().kv_blocks_used == 0
        assert client.num_open_requests == 0
        await client.shutdown()

    _run(main)


def test_a_crashing_step_fails_every_open_request(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = _start(ckpt, "thread")
    runner = client.core.executor.runner
    calls = {"n": 0}
    real = runner.execute

    def flaky(work: Any, feed: Any = None, prompt: Any = None) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device lost")
        return real(work, feed, prompt)

    monkeypatch.setattr(runner, "execute", flaky)
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)

    async def main() -> None:
        client.attach()
        results = await asyncio.wait_for(
            asyncio.gather(
                *(_collect(client, [5, 6 + i], params, f"r{i}") for i in range(4)),
                return_exceptions=True,
            ),
            timeout=30,
        )
        assert all(isinstance(r, EngineDeadError) for r in results), results
        assert client.is_dead and "device lost" in str(client.error)
        with pytest.raises(EngineDeadError):
            await _collect(client, [5], params, "late")

    _run(main)


def test_a_killed_engine_process_fails_open_requests(ckpt: Path) -> None:
    client = _start(ckpt, "process")
    slow = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)

    async def main() -> None:
        client.attach()
        try:
            with pytest.raises(EngineDeadError, match="exited unexpectedly"):
                async for _ in client.generate(EngineRequest("victim", [3, 4, 5], slow)):
                    client._transport.proc.kill()
            assert client.is_dead
            assert client.expert_token_counts().shape == (3, 6)  # last known (none): zeros
        finally:
            await client.shutdown()

    _run(main)


def test_a_bad_checkpoint_fails_start_with_its_message(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    for transport in ("thread", "process"):
        with pytest.raises(ValueError, match="gpt2"):
            _start(tmp_path, transport)


def test_slow_consumer_gets_coalesced_deltas(ckpt: Path) -> None:
    """A stream that falls behind receives what piled up as one delta: same tokens, text and
    logprobs in order, fewer deltas, exactly one finished."""
    client = _start(ckpt, "thread")
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=1)

    async def main() -> list:
        client.attach()
        deltas = []
        try:
            async for out in client.generate(EngineRequest("slow", [5, 9, 40, 7], params)):
                deltas.append(out)
                await asyncio.sleep(0.05)  # several engine steps pass meanwhile
        finally:
            await client.shutdown()
        return deltas

    deltas = _run(main)
    [want] = LLM(ckpt, progress=False, **KW).generate([[5, 9, 40, 7]], params)
    tokens = [t for d in deltas for o in d.outputs for t in o.token_ids]
    assert tokens == want.outputs[0].token_ids
    assert "".join(o.text for d in deltas for o in d.outputs) == want.outputs[0].text
    lps = [lp.token_id for d in deltas for o in d.outputs for lp in o.logprobs or []]
    assert lps == tokens
    assert len(deltas) < 12 and [d.finished for d in deltas].count(True) == 1
    assert deltas[-1].finished and deltas[-1].outputs[0].finish_reason == "length"


def test_frames_reassemble_messages_that_arrive_in_pieces() -> None:
    """uvloop leaves the pipe non-blocking and a big message arrives in several reads: the
    reader must neither block nor fail on a partial message."""
    reader, writer = mp.Pipe()
    os.set_blocking(reader.fileno(), False)
    frames = Frames(reader.fileno())
    assert frames.read() and list(frames.messages()) == []  # nothing there: no block, no error
    big = EngineRequest("r1", list(range(100_000)), GREEDY)
    small = Abort("r1")
    data = b""
    for msg in (big, small):
        payload = pickle.dumps(msg)
        data += len(payload).to_bytes(4, "big") + payload
    got = []
    for i in range(0, len(data), 7001):  # odd-sized pieces, split headers included
        os.write(writer.fileno(), data[i : i + 7001])
        assert frames.read()
        got.extend(frames.messages())
    assert got == [big, small]
    writer.close()
    assert not frames.read()  # end of stream


def test_write_frame_waits_out_a_full_buffer_on_a_non_blocking_pipe() -> None:
    """A prompt larger than the socket buffer, sent from uvloop's non-blocking descriptor."""
    reader, writer = mp.Pipe()
    os.set_blocking(writer.fileno(), False)
    big = EngineRequest("r1", list(range(1000)), GREEDY, prompt="x" * 3_000_000)
    got: list = []
    t = threading.Thread(target=lambda: got.append(reader.recv()))  # a plain Connection reads it
    t.start()
    write_frame(writer.fileno(), big)
    write_frame(writer.fileno(), Abort("r1"))
    t.join(10)
    assert got == [big] and reader.recv() == Abort("r1")


def test_the_engine_process_shortens_the_gil_switch_interval() -> None:
    """The engine process's step thread must get the GIL back within 0.5 ms of a device wait,
    not Python's 5 ms, while its relay threads run; the pipe loop sets it as it starts."""
    from moeserve.engine.loop import EngineLoop
    from moeserve.engine.worker import SWITCH_INTERVAL_S, _Pipe

    class Idle:  # a core with nothing to run
        def has_work(self) -> bool:
            return False

    ours, theirs = mp.Pipe()
    before = sys.getswitchinterval()
    pipe = _Pipe(EngineLoop(Idle(), None), theirs)  # type: ignore[arg-type]
    runner = threading.Thread(target=pipe.run, daemon=True)
    try:
        runner.start()
        for _ in range(100):
            if abs(sys.getswitchinterval() - SWITCH_INTERVAL_S) < 1e-6:
                break
            threading.Event().wait(0.01)
        assert abs(sys.getswitchinterval() - SWITCH_INTERVAL_S) < 1e-6
        assert before > SWITCH_INTERVAL_S
    finally:
        ours.send(Shutdown())  # the loop ends (its sender thread too) whatever happened
        runner.join(timeout=10)
        sys.setswitchinterval(before)
    assert not runner.is_alive()
