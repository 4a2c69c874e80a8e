"""Pure-ASGI middleware: the request-body limit and the one-line-per-request log.

Pure ASGI (not BaseHTTPMiddleware) so that streaming responses and disconnect messages pass
through untouched, and the body is checked as it arrives instead of being buffered first.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moeserve.server.errors import APIError

log = logging.getLogger("moeserve.server")

# Probes and scrapes arrive every few seconds; at INFO they would drown the request log.
_QUIET_PATHS = ("/health", "/ready", "/metrics")
# Logged at DEBUG too, but not exempt from --allowed-hosts: the web page polls it every second.
_DEBUG_PATHS = (*_QUIET_PATHS, "/ui/stats")


def too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"the request body is larger than the server's limit of {limit} bytes",
        code="request_too_large",
        headers={"Connection": "close"},
        reject_reason="too_large",
    )


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
            await send_error(send, too_large(self.limit))
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


async def send_error(send: Send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # visible ASCII: safe to echo and to log


def _client_request_id(scope: Scope) -> str | None:
    """The client's X-Request-Id when it is a short visible-ASCII string (else ignored)."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if REQUEST_ID.fullmatch(text) else None
    return None


def bad_host() -> APIError:
    return APIError(
        400,
        "invalid Host header: this server answers only its allowed hosts",
        code="invalid_host",
        reject_reason="invalid_request",
    )


def host_allowed(scope: Scope, patterns: tuple[str, ...]) -> bool:
    """Whether the Host header matches one of `patterns` (`*` any, `*.x.com` subdomains).
    The probes are exempt: kubelets call them by the pod's IP."""
    if scope.get("path") in _QUIET_PATHS:
        return True
    host = ""
    for name, value in scope.get("headers", ()):
        if name == b"host":
            host = value.decode("latin-1").lower()
            break
    host = host.rsplit(":", 1)[0] if not host.endswith("]") else host  # drop the port
    for pattern in patterns:
        if pattern == "*" or host == pattern:
            return True
        if pattern.startswith("*.") and host.endswith(pattern[1:]):
            return True
    return False


class AccessLogMiddleware:
    """One log line per request when its response ends: id, status, tokens, latency; every
    response carries X-Request-Id (the client's own, echoed, or the request's id).

    Handlers put what they know in `request.state` (scope["state"]): `request_id`,
    `prompt_tokens`, `completion_tokens`, `disconnected`, and `prompt` (logged only with
    log_prompts). A client that left before its response is logged with status 499.
    """

    def __init__(
        self,
        app: ASGIApp,
        log_prompts: bool = False,
        on_done: Callable[[int], None] | None = None,
    ) -> None:
        """on_done: called with each response's final status (499 for a client that left)."""
        self.app, self.log_prompts, self.on_done = app, log_prompts, on_done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        info: dict[str, Any] = scope.setdefault("state", {})
        status = 500
        client_id = _client_request_id(scope)
        if client_id is not None:
            info["client_request_id"] = client_id

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # The client's id echoed, else the request's own (set by its handler).
                rid = client_id or info.get("request_id") or f"req-{uuid.uuid4().hex}"
                info.setdefault("request_id", rid)
                headers = [h for h in message.get("headers", ()) if h[0] != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self._log(scope, info, status, time.monotonic() - start)
            if self.on_done is not None:
                self.on_done(499 if info.get("disconnected") else status)

    def _log(self, scope: Scope, info: dict[str, Any], status: int, seconds: float) -> None:
        path = scope.get("path", "")
        level = logging.DEBUG if path in _DEBUG_PATHS else logging.INFO
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
        if info.get("client_request_id") and info["client_request_id"] != parts[0]:
            parts.append(f"x_request_id={info['client_request_id']}")
        parts.append(f"{seconds:.3f}s")
        if self.log_prompts and info.get("prompt") is not None:
            parts.append(f"prompt={info['prompt']!r:.4000}")
        log.log(level, " ".join(parts))
