"""Running engine requests for one HTTP request: merged streams, disconnects, the drain's kill.

Two rules hold here. A client that goes away aborts its engine requests at once, streaming or
not (its KV blocks are free before the next step). When the drain gives up, every request
still running ends with an explicit error: a 503 envelope, or an error chunk and [DONE].
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from moeserve.engine.client import EngineClient, EngineDeadError
from moeserve.engine.messages import EngineRequest
from moeserve.engine.outputs import RequestOutput
from moeserve.server.errors import RETRY_DRAINING, APIError, from_value_error, internal_error
from moeserve.server.protocol import REQUEST_FIELDS
from moeserve.server.state import ServerState, Ticket

log = logging.getLogger("moeserve.server")


class ClientGone(Exception):
    """The client disconnected; nobody is left to answer."""


class Stopped(Exception):
    """The drain gave up on this request."""


def stopped_error() -> APIError:
    return APIError(
        503,
        "the server is shutting down and stopped this request before it finished",
        type="service_unavailable",
        code="server_shutting_down",
        headers={"Retry-After": str(RETRY_DRAINING)},
    )


def as_api_error(e: BaseException) -> APIError:
    """What an exception raised while generating means for the client."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, Stopped):
        return stopped_error()
    if isinstance(e, EngineDeadError):
        return APIError(500, str(e), type="server_error", code="engine_dead")
    if isinstance(e, ValueError):  # param: a request field the message starts with, if any
        return from_value_error(e, REQUEST_FIELDS)
    log.error("generation failed", exc_info=e)
    return internal_error()


async def merged_outputs(
    client: EngineClient, reqs: list[EngineRequest], ticket: Ticket
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Deltas of all `reqs` as (index, delta), interleaved as they come. Closing the
    iterator (or cancelling its consumer) aborts every engine request still running."""
    if len(reqs) == 1:  # the common case: no fan-in task and queue per delta
        r = reqs[0]
        try:
            async for out in client.generate(r):
                ticket.started(0)
                yield 0, out
        finally:
            ticket.started(0)
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, r: EngineRequest) -> None:
        try:
            async for out in client.generate(r):
                ticket.started(i)
                queue.put_nowait((i, out))
        except Exception as e:  # handed to the consumer; CancelledError propagates
            queue.put_nowait((i, e))
        finally:
            ticket.started(i)
        queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(reqs)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()  # leaving generate() early aborts the engine request
        await asyncio.gather(*tasks, return_exceptions=True)


class Guard:
    """Watches one HTTP request for its client leaving and for the drain giving up, and
    interrupts the task serving it (a cancel, turned into ClientGone or Stopped) while that
    task is inside `protect()`. One watcher task per request: the asyncio.wait over three tasks
    per phase that this replaces created six tasks per streamed request, a cost every arrival
    paid on the event loop (benchmarks/RESULTS.md)."""

    def __init__(self, request: Request, state: ServerState) -> None:
        self._request = request
        self._task = asyncio.current_task()
        self.reason: str | None = None  # "gone" or "stopped", once either happened
        self._active = False
        self._watcher: asyncio.Task[None] | None = asyncio.create_task(self._watch())
        self._unhook: Callable[[], None] | None = state.on_stop(self._stopped)

    async def _watch(self) -> None:
        """Until the client disconnects (the body must already have been read)."""
        while (await self._request.receive())["type"] != "http.disconnect":
            pass
        self._interrupt("gone")

    def _stopped(self) -> None:
        self._interrupt("stopped")

    def _interrupt(self, reason: str) -> None:
        if self.reason is not None:
            return
        self.reason = reason
        if self._active and self._task is not None:
            self._task.cancel()  # lands at the protected section's await, inside it

    @contextlib.contextmanager
    def protect(self) -> Iterator[None]:
        """Raise ClientGone or Stopped inside this block as soon as either happens (at once
        if it already has)."""
        self._check()
        self._active = True
        try:
            yield
        except asyncio.CancelledError:
            if self.reason is None:
                raise  # cancelled from outside: not ours to turn into an answer
            uncancel = getattr(self._task, "uncancel", None)  # Python 3.11+
            if uncancel is not None:
                uncancel()
            self._check()
        finally:
            self._active = False

    def _check(self) -> None:
        if self.reason == "gone":
            self._request.state.disconnected = True
            raise ClientGone()
        if self.reason == "stopped":
            raise Stopped()

    def close(self) -> None:
        """Stop watching (idempotent). Drops the references that tie the guard, its request's
        task and the server's hooks into a cycle, so a finished request is freed at once
        rather than left to the garbage collector."""
        if self._unhook is not None:
            self._unhook()
            self._unhook = None
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        self._task = None


def sse(payload: object) -> bytes:
    """One server-sent event: `data: {json}\\n\\n`."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


class ChunkTemplate:
    """SSE chunks of one stream that differ only in index, text and finish_reason, rendered
    without building pydantic models per token (the common case: no logprobs). The output
    is byte-for-byte what sse(model.model_dump()) gives; tests/test_server_api.py checks it."""

    def __init__(self, head: dict[str, Any], choice_key: str) -> None:
        # The invariant fields once, with the choices list opened; `choice_key` is the text
        # field ("text" for completions, "delta" for chat).
        body = json.dumps({**head, "choices": []}, separators=(",", ":"))
        self._prefix = b"data: " + body[: -len("[]}")].encode() + b"[{"
        self._chat = choice_key == "delta"

    def render(
        self, index: int, text: str | None, finish_reason: str | None, key: str = "content"
    ) -> bytes:
        """`key`: the chat delta's text field (content, or reasoning_content)."""
        reason = "null" if finish_reason is None else json.dumps(finish_reason)
        if self._chat:
            delta = "{}" if text is None else "{" + json.dumps(key) + ":" + json.dumps(text) + "}"
            choice = f'"index":{index},"delta":{delta},"logprobs":null,"finish_reason":{reason}'
        else:
            choice = (
                f'"index":{index},"text":{json.dumps(text or "")},"logprobs":null,'
                f'"finish_reason":{reason}'
            )
        return self._prefix + choice.encode() + b"}]}\n\n"


class SSEResponse(Response):
    """A text/event-stream response over `chunks`, interrupted by its request's Guard: a client
    that leaves stops generating; when the drain gives up, the stream ends with an error chunk
    and [DONE]. `on_close` runs once when the stream ends, however it ends, and the guard is
    closed then. `chunks` must itself turn its own errors into an error chunk + [DONE]."""

    media_type = "text/event-stream"

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        *,
        guard: Guard,
        on_close: Callable[[], None],
        request: Request,
        stopped: Callable[[APIError], bytes] | None = None,
    ) -> None:
        # Not Response.__init__: it would set a body, and with it Content-Length: 0.
        self.status_code, self.background = 200, None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._chunks, self._guard, self._on_close, self._request = chunks, guard, on_close, request
        # The stream's last bytes when the drain stops it, for another API's shapes (by
        # default an error chunk, then [DONE]).
        self._stopped = stopped

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            try:
                with self._guard.protect():
                    async for chunk in self._chunks:
                        # [DONE] is a stream's last chunk: it ends the body in the same write.
                        last = chunk is DONE
                        await send(
                            {"type": "http.response.body", "body": chunk, "more_body": not last}
                        )
                        if last:
                            return
            except ClientGone:
                return
            except Stopped:
                self._request.state.error = "server_shutting_down"
                if self._stopped is not None:
                    tail = self._stopped(stopped_error())
                    await send({"type": "http.response.body", "body": tail, "more_body": False})
                    return
                await send(
                    {
                        "type": "http.response.body",
                        "body": sse(stopped_error().body()),
                        "more_body": True,
                    }
                )
                await send({"type": "http.response.body", "body": DONE, "more_body": False})
                return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the socket went away while sending
            self._request.state.disconnected = True
        finally:
            self._guard.close()
            with contextlib.suppress(Exception):
                await self._chunks.aclose()  # type: ignore[attr-defined]
            self._on_close()


async def run_admitted(
    request: Request,
    state: ServerState,
    num_prompts: int,
    work: Callable[[Ticket, Guard], Awaitable[Response]],
) -> Response:
    """Admit the request (429/503), then run `work` guarded against disconnects and the drain.

    The ticket is released when the response is complete: by SSEResponse.on_close for a
    stream (which also closes the guard), here otherwise. Errors leave as APIError, so they
    reach the envelope handler.
    """
    ticket = state.admit(num_prompts)
    guard = Guard(request, state)
    response: Response | None = None
    try:
        with guard.protect():
            response = await work(ticket, guard)
    except ClientGone:
        response = Response(status_code=499)  # nobody reads it; the access log says 499
    except Exception as e:
        raise as_api_error(e) from None
    finally:
        if not isinstance(response, SSEResponse):  # a stream closes both when it ends
            guard.close()
            ticket.close()
    return response
