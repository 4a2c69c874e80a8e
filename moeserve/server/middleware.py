"""Pure-ASGI middleware: the request-body limit and the one-line-per-request log.

Pure ASGI (not BaseHTTPMiddleware) so that streaming responses and disconnect messages pass
through untouched, and the body is checked as it arrives instead of being buffered first.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moeserve.server.errors import APIError

log = logging.getLogger("moeserve.server")

# Probes and scrapes arrive every few seconds; at INFO they would drown the request log.
_QUIET_PATHS = ("/health", "/ready", "/metrics")


def too_large(limit: int) -> APIError:
    return APIError(
        413, f"the request body is larger than the server's limit of {limit} bytes",
        code="request_too_large", headers={"Connection": "close"}, reject_reason="too_large",
    )  # fmt: skip


class BodyLimitMiddleware:
    """413 for a body over `limit` bytes: at once from Content-Length, or while counting the
    bytes of a chunked body as they stream in (the endpoint's read then raises the 413).
    `Connection: close` on the 413 so the unread rest of the body never reaches a parser."""

    def __init__(self, app: ASGIApp, limit: int, on_reject: Callable[[str], None]) -> None:
        self.app, self.limit, self.on_reject = app, limit, on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            self.on_reject("too_large")
            await _send_error(send, too_large(self.limit))
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise too_large(self.limit)  # the APIError handler turns this into the 413
            return message

        await self.app(scope, counting_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_error(send: Send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class AccessLogMiddleware:
    """One log line per request when its response ends: id, status, tokens, latency.

    Handlers put what they know in `request.state` (scope["state"]): `request_id`,
    `prompt_tokens`, `completion_tokens`, `disconnected`, and `prompt` (logged only with
    log_prompts). A client that left before its response is logged with status 499.
    """

    def __init__(self, app: ASGIApp, log_prompts: bool = False) -> None:
        self.app, self.log_prompts = app, log_prompts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        info: dict[str, Any] = scope.setdefault("state", {})
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self._log(scope, info, status, time.monotonic() - start)

    def _log(self, scope: Scope, info: dict[str, Any], status: int, seconds: float) -> None:
        path = scope.get("path", "")
        level = logging.DEBUG if path in _QUIET_PATHS else logging.INFO
        if not log.isEnabledFor(level):
            return
        if info.get("disconnected"):
            status = 499
        parts = [info.get("request_id") or "-", scope.get("method", ""), path, str(status)]
        if "prompt_tokens" in info:
            parts.append(f"prompt_tokens={info['prompt_tokens']}")
            parts.append(f"completion_tokens={info.get('completion_tokens', 0)}")
        if info.get("error"):
            parts.append(f"error={info['error']}")
        parts.append(f"{seconds:.3f}s")
        if self.log_prompts and info.get("prompt") is not None:
            parts.append(f"prompt={info['prompt']!r:.4000}")
        log.log(level, " ".join(parts))
