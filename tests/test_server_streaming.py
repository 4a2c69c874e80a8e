"""streaming.py's pieces without a server: the per-request Guard (one watcher task that turns
a disconnect or the drain's stop into ClientGone or Stopped inside a protected section, and
never cancels anything outside one) and SSEResponse's messages."""

from __future__ import annotations

import asyncio
import gc
import sys
import weakref
from types import SimpleNamespace
from typing import Any

import pytest

from moeserve.runtime import freeze_startup_heap
from moeserve.server.state import ServerConfig, ServerState
from moeserve.server.streaming import DONE, ClientGone, Guard, SSEResponse, Stopped


def fake_state() -> ServerState:
    """A ServerState with no engine: the tests use its stop hooks."""
    state = ServerState(ServerConfig(served_model_name="test"), lambda: None)  # type: ignore
    state._pool.shutdown()
    return state


def fake_request() -> tuple[Any, asyncio.Queue[dict[str, str]]]:
    """A request whose receive() hands out what the test puts in the queue."""
    messages: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    return SimpleNamespace(receive=messages.get, state=SimpleNamespace()), messages


def cancelling() -> int:
    task = asyncio.current_task()
    return task.cancelling() if sys.version_info >= (3, 11) else 0  # type: ignore[union-attr]


def test_disconnect_inside_protect_is_client_gone() -> None:
    async def main() -> None:
        request, messages = fake_request()
        state = fake_state()
        guard = Guard(request, state)
        messages.put_nowait({"type": "http.request"})  # not a disconnect: keeps watching
        with pytest.raises(ClientGone), guard.protect():
            asyncio.get_running_loop().call_later(
                0.01, messages.put_nowait, {"type": "http.disconnect"}
            )
            await asyncio.sleep(5)
        assert request.state.disconnected is True
        assert cancelling() == 0  # the guard's own cancel was taken back
        await asyncio.sleep(0)  # nothing pending: the task runs on
        guard.close()
        assert not state._stop_hooks

    asyncio.run(asyncio.wait_for(main(), 5))


def test_stop_before_and_during_protect() -> None:
    async def main() -> None:
        state = fake_state()
        request, _ = fake_request()
        during = Guard(request, state)
        with pytest.raises(Stopped), during.protect():
            asyncio.get_running_loop().call_later(0.01, state.stop_all)
            await asyncio.sleep(5)
        during.close()
        # A request that arrives after the stop fails as it enters its first section.
        late = Guard(fake_request()[0], state)
        with pytest.raises(Stopped), late.protect():
            raise AssertionError("the section must not run")
        late.close()

    asyncio.run(asyncio.wait_for(main(), 5))


def test_events_outside_protect_cancel_nothing() -> None:
    async def main() -> None:
        request, messages = fake_request()
        guard = Guard(request, fake_state())
        with guard.protect():
            await asyncio.sleep(0)
        messages.put_nowait({"type": "http.disconnect"})  # between sections
        await asyncio.sleep(0.02)  # the watcher saw it, and must not have cancelled us
        assert guard.reason == "gone" and cancelling() == 0
        with pytest.raises(ClientGone), guard.protect():  # the next section learns at once
            pass
        guard.close()

    asyncio.run(asyncio.wait_for(main(), 5))


def test_a_cancel_from_outside_stays_a_cancel() -> None:
    async def main() -> None:
        request, _ = fake_request()
        guard = Guard(request, fake_state())

        async def section() -> None:
            with guard.protect():
                await asyncio.sleep(5)

        guard._task = task = asyncio.create_task(section())  # the guarded task is that one
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        guard.close()
        assert guard._watcher is None

    asyncio.run(asyncio.wait_for(main(), 5))


def run_sse(chunks: list[bytes], stop_after: int | None = None) -> tuple[list[dict], list[str]]:
    """The ASGI messages an SSEResponse over `chunks` sends, and what happened at its close;
    with `stop_after`, the drain stops it once that many chunks are out."""

    async def main() -> tuple[list[dict], list[str]]:
        state = fake_state()
        request, _ = fake_request()
        guard = Guard(request, state)
        events: list[str] = []

        async def gen() -> Any:
            for i, c in enumerate(chunks):
                if i == stop_after:
                    state.stop_all()
                    await asyncio.sleep(5)
                yield c

        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        resp = SSEResponse(
            gen(), guard=guard, on_close=lambda: events.append("closed"), request=request
        )
        await resp({"type": "http"}, request.receive, send)
        events.append(f"hooks={len(state._stop_hooks)}")
        return sent, events

    return asyncio.run(asyncio.wait_for(main(), 5))


def test_sse_ends_the_body_with_done() -> None:
    sent, events = run_sse([b"data: 1\n\n", b"data: 2\n\n", DONE])
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    bodies = [(m["body"], m["more_body"]) for m in sent[1:]]
    # [DONE] ends the body itself: no empty closing message after it.
    assert bodies == [(b"data: 1\n\n", True), (b"data: 2\n\n", True), (DONE, False)]
    assert events == ["closed", "hooks=0"]


def test_sse_stopped_mid_stream_sends_error_then_done() -> None:
    sent, events = run_sse([b"data: 1\n\n", b"data: 2\n\n", DONE], stop_after=1)
    bodies = [(m["body"], m["more_body"]) for m in sent[1:]]
    assert bodies[0] == (b"data: 1\n\n", True)
    assert bodies[1][0].startswith(b'data: {"error":') and bodies[1][1]
    assert b"server_shutting_down" in bodies[1][0]
    assert bodies[2:] == [(DONE, False)]
    assert events == ["closed", "hooks=0"]


def test_a_closed_guard_is_freed_without_the_collector() -> None:
    """No reference cycle is left behind by a request (its guard, task and the stop hook):
    at 64 streams those would pile up for the collector's full passes."""

    async def main() -> None:
        state = fake_state()
        request, messages = fake_request()
        guard = Guard(request, state)
        with guard.protect():
            await asyncio.sleep(0)
        guard.close()
        await asyncio.sleep(0.01)  # the cancelled watcher finishes
        ref = weakref.ref(guard)
        del guard
        assert ref() is None and not state._stop_hooks

    gc.disable()
    try:
        asyncio.run(asyncio.wait_for(main(), 5))
    finally:
        gc.enable()


def test_freeze_startup_heap_moves_the_heap_out_of_the_scans() -> None:
    try:
        frozen = freeze_startup_heap("test")
        assert frozen == gc.get_freeze_count() > 0
        assert len(gc.get_objects()) < frozen  # what a full collection still walks
    finally:
        gc.unfreeze()  # the test process is not ours to freeze
    assert gc.get_freeze_count() == 0
