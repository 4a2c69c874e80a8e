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
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from moeserve.engine.async_engine import AsyncEngine, EngineDeadError
from moeserve.engine.outputs import RequestOutput
from moeserve.sampling_params import SamplingParams
from moeserve.server.errors import RETRY_DRAINING, APIError, from_value_error, internal_error
from moeserve.server.state import ServerState, Ticket

log = logging.getLogger("moeserve.server")
T = TypeVar("T")


@dataclass
class EngineRequest:
    """One prompt of an HTTP request, ready for the engine."""

    request_id: str
    prompt: str | list[int]
    prompt_ids: list[int]
    params: SamplingParams


class ClientGone(Exception):
    """The client disconnected; nobody is left to answer."""


def stopped_error() -> APIError:
    return APIError(
        503, "the server is shutting down and stopped this request before it finished",
        type="service_unavailable", code="server_shutting_down",
        headers={"Retry-After": str(RETRY_DRAINING)},
    )  # fmt: skip


def as_api_error(e: BaseException) -> APIError:
    """What an exception raised while generating means for the client."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineDeadError):
        return APIError(500, str(e), type="server_error", code="engine_dead")
    if isinstance(e, ValueError):
        return from_value_error(e)
    log.error("generation failed", exc_info=e)
    return internal_error()


async def merged_outputs(
    aengine: AsyncEngine, reqs: list[EngineRequest], ticket: Ticket
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Deltas of all `reqs` as (index, delta), interleaved as they come. Closing the
    iterator (or cancelling its consumer) aborts every engine request still running."""
    if len(reqs) == 1:  # the common case: no fan-in task and queue per delta
        r = reqs[0]
        try:
            async for out in aengine.generate(
                r.prompt, r.params, r.request_id, prompt_ids=r.prompt_ids
            ):
                ticket.started(0)
                yield 0, out
        finally:
            ticket.started(0)
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, r: EngineRequest) -> None:
        try:
            async for out in aengine.generate(
                r.prompt, r.params, r.request_id, prompt_ids=r.prompt_ids
            ):
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


async def wait_disconnect(receive: Receive) -> None:
    """Return when the client disconnects (the body must already have been read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def guarded(request: Request, kill: asyncio.Event, work: Awaitable[T]) -> T:
    """Await `work` unless the client leaves (ClientGone) or the drain gives up (503)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.create_task(wait_disconnect(request.receive))
    killed = asyncio.create_task(kill.wait())
    try:
        await asyncio.wait({task, gone, killed}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        if gone.done():
            request.state.disconnected = True
            raise ClientGone()
        raise stopped_error()
    finally:
        for t in (task, gone, killed):
            t.cancel()
        await asyncio.gather(task, gone, killed, return_exceptions=True)


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

    def render(self, index: int, text: str | None, finish_reason: str | None) -> bytes:
        reason = "null" if finish_reason is None else json.dumps(finish_reason)
        if self._chat:
            delta = "{}" if text is None else '{"content":' + json.dumps(text) + "}"
            choice = f'"index":{index},"delta":{delta},"logprobs":null,"finish_reason":{reason}'
        else:
            choice = (f'"index":{index},"text":{json.dumps(text or "")},"logprobs":null,'
                      f'"finish_reason":{reason}')  # fmt: skip
        return self._prefix + choice.encode() + b"}]}\n\n"


class SSEResponse(Response):
    """A text/event-stream response over `chunks` that also watches for a disconnect (stop
    generating) and the drain's kill (send an error chunk and [DONE]). `on_close` runs once
    when the stream ends, however it ends. `chunks` must itself turn its own errors into an
    error chunk + [DONE]."""

    media_type = "text/event-stream"

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        *,
        kill: asyncio.Event,
        on_close: Callable[[], None],
        request: Request,
    ) -> None:
        # Not Response.__init__: it would set a body, and with it Content-Length: 0.
        self.status_code, self.background = 200, None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._chunks, self._kill, self._on_close, self._request = chunks, kill, on_close, request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            body = asyncio.create_task(self._pump(send))
            gone = asyncio.create_task(wait_disconnect(receive))
            killed = asyncio.create_task(self._kill.wait())
            try:
                done, _ = await asyncio.wait(
                    {body, gone, killed}, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for t in (body, gone, killed):
                    t.cancel()
                await asyncio.gather(body, gone, killed, return_exceptions=True)
            if body in done:
                body.result()  # re-raises a failed send
            elif gone in done:
                self._request.state.disconnected = True
                return
            else:  # the drain gave up on this stream
                self._request.state.error = "server_shutting_down"
                await send({"type": "http.response.body", "body": sse(stopped_error().body()),
                            "more_body": True})  # fmt: skip
                await send({"type": "http.response.body", "body": DONE, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the socket went away while sending
            self._request.state.disconnected = True
        finally:
            with contextlib.suppress(Exception):
                await self._chunks.aclose()  # type: ignore[attr-defined]
            self._on_close()

    async def _pump(self, send: Send) -> None:
        async for chunk in self._chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})


async def run_admitted(
    request: Request,
    state: ServerState,
    num_prompts: int,
    work: Callable[[Ticket], Awaitable[Response]],
) -> Response:
    """Admit the request (429/503), then run `work` guarded against disconnects and the drain.

    The ticket is released when the response is complete: by SSEResponse.on_close for a
    stream, here otherwise. Errors leave as APIError, so they reach the envelope handler.
    """
    ticket = state.admit(num_prompts)
    try:
        response = await guarded(request, state.kill, work(ticket))
    except ClientGone:
        ticket.close()
        return Response(status_code=499)  # nobody reads it; the access log says 499
    except Exception as e:
        ticket.close()
        raise as_api_error(e) from None
    except BaseException:
        ticket.close()
        raise
    if not isinstance(response, SSEResponse):
        ticket.close()
    return response
