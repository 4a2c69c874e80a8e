"""The engine in its own process: same tokens as in-process, aborts free KV, errors come
back as the same exceptions, a dead engine process fails every open request."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import pickle
import threading
from pathlib import Path

import pytest

from moeserve import LLM, SamplingParams
from moeserve.engine.async_engine import EngineDeadError
from moeserve.engine.engine_process import EngineProcess, _Frames, _write_frame
from moeserve.engine.outputs import StepStats
from moeserve.engine.scheduler import RequestTooLarge
from tests.checkpoints import make_checkpoint
from tests.test_async_engine import _collect

KW = {"device": "cpu", "block_size": 4, "max_model_len": 128}
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "mixtral", "mixtral", tokenizer=True)


def _run(main, loop: str) -> None:
    """Under asyncio's own loop or uvloop's (uvicorn's choice when installed, and libuv makes
    the pipe's descriptor non-blocking)."""
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        uvloop.run(main())
    else:
        asyncio.run(main())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_engine_process_serves_like_the_engine(ckpt: Path, loop: str) -> None:
    prompts = [[5 + i, 9, 40 + 3 * i, 7] for i in range(8)]
    offline = LLM(ckpt, progress=False, **KW).generate(prompts + ["hello world"], GREEDY)
    stats: list[StepStats] = []
    eng = EngineProcess.start(ckpt, KW)
    assert eng.max_model_len == 128 and eng.model_config.num_experts == 6
    assert not eng.offloads_experts

    async def main() -> None:
        eng.attach(stats_sink=stats.append)
        try:
            # Concurrent streams share steps and give the in-process engine's tokens; text
            # prompts are tokenised here, in the server's process.
            got = await asyncio.gather(
                *(_collect(eng, p, GREEDY, f"r{i}") for i, p in enumerate(prompts)),
                _collect(eng, "hello world", GREEDY, "text"),
            )
            assert got == [o.outputs[0].token_ids for o in offline]
            assert max(s.num_seqs for s in stats) > 1
            assert sum(s.num_generated_tokens for s in stats) == 90
            # The routing counters are read from the engine process at scrape time.
            counts = eng.expert_token_counts()
            assert counts.shape == (3, 6)
            tokens = sum(len(p) for p in prompts) + len(eng.encode_prompt("hello world"))
            assert int(counts.sum()) == (tokens + 9 * 9) * 2 * 3
            assert eng.expert_cache_stats() == []

            # Admission errors are the engine's own exceptions, raised before any delta.
            with pytest.raises(RequestTooLarge, match="maximum context length is 128"):
                await _collect(eng, [1, 2, 3], SamplingParams(max_tokens=200), "big")
            with pytest.raises(ValueError, match="outside the vocabulary"):
                await _collect(eng, [10_000], GREEDY, "oov")

            # Leaving a stream early aborts it: the next step frees its blocks.
            long = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
            seen = 0
            async for _ in eng.generate([3, 4, 5], long, "long"):
                seen += 1
                if seen == 3:
                    break
            stats.clear()
            assert await _collect(eng, [7, 8], GREEDY, "after") != []
            last = stats[-1]
            assert last.num_running == 0 and last.kv_usage == 0.0
            assert any(reason == "abort" for s in stats for reason, _ in s.finished)
        finally:
            await eng.shutdown()
        assert not eng._proc.is_alive()
        with pytest.raises(EngineDeadError):
            await _collect(eng, [1, 2], GREEDY, "late")

    _run(main, loop)


def test_a_bad_checkpoint_fails_start_with_its_message(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="gpt2"):
        EngineProcess.start(tmp_path, KW)


def test_a_killed_engine_process_fails_open_requests(ckpt: Path) -> None:
    eng = EngineProcess.start(ckpt, KW)
    slow = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)

    async def main() -> None:
        eng.attach()
        try:
            with pytest.raises(EngineDeadError, match="exited unexpectedly"):
                async for _ in eng.generate([3, 4, 5], slow, "victim"):
                    eng._proc.kill()
            assert eng.is_dead
            assert eng.expert_token_counts().shape == (3, 6)  # last known (none): zeros
        finally:
            await eng.shutdown()

    asyncio.run(main())


def test_frames_reassemble_messages_that_arrive_in_pieces() -> None:
    """uvloop leaves the pipe non-blocking and a big message arrives in several reads: the
    reader must neither block nor fail on a partial message."""
    reader, writer = mp.Pipe()
    os.set_blocking(reader.fileno(), False)
    frames = _Frames(reader.fileno())
    assert frames.read() and list(frames.messages()) == []  # nothing there: no block, no error
    big = ("out", [], list(range(100_000)), [])
    small = ("reply", 1, "ok")
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
    big = ("add", "r1", "x" * 3_000_000, list(range(1000)), None)
    got: list = []
    t = threading.Thread(target=lambda: got.append(reader.recv()))  # a plain Connection reads it
    t.start()
    _write_frame(writer.fileno(), big)
    _write_frame(writer.fileno(), ("abort", "r1"))
    t.join(10)
    assert got == [big] and reader.recv() == ("abort", "r1")


def test_engine_loop_shortens_the_gil_switch_interval() -> None:
    """The engine process's step thread must get the GIL back within 0.5 ms of a device wait,
    not Python's 5 ms, while its relay threads run; the loop sets it as it starts."""
    import sys

    from moeserve.engine.engine_worker import SWITCH_INTERVAL_S, _EngineLoop

    class Idle:  # an engine with nothing to run
        def has_unfinished(self) -> bool:
            return False

    ours, theirs = mp.Pipe()
    before = sys.getswitchinterval()
    loop = _EngineLoop(Idle(), theirs)  # type: ignore[arg-type]
    runner = threading.Thread(target=loop.run, daemon=True)
    try:
        runner.start()
        for _ in range(100):
            if abs(sys.getswitchinterval() - SWITCH_INTERVAL_S) < 1e-6:
                break
            threading.Event().wait(0.01)
        assert abs(sys.getswitchinterval() - SWITCH_INTERVAL_S) < 1e-6
        assert before > SWITCH_INTERVAL_S
    finally:
        ours.send(("stop",))  # the loop ends (its sender thread too) whatever happened
        runner.join(timeout=10)
        sys.setswitchinterval(before)
    assert not runner.is_alive()
