"""Errors as the OpenAI envelope: `{"error": {"message", "type", "param", "code"}}`.

Every failure leaves the server through `APIError` or one of the handlers installed here, so a
client never sees FastAPI's 422 body or a bare 500 page. `ValueError` from the engine or
SamplingParams (a client's mistake by the codebase's convention) becomes a 400.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from moeserve.engine.scheduler import RequestTooLarge
from moeserve.server.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("moeserve.server")

# Seconds a client should wait before retrying each kind of refusal.
RETRY_LOADING = 5
RETRY_DRAINING = 10
RETRY_QUEUE_FULL = 1


class APIError(Exception):
    """An HTTP error with the OpenAI envelope. `reject_reason` (a fixed label from
    metrics.REJECT_REASONS) counts it in moeserve_request_rejected_total."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        reject_reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code = param, code
        self.headers = dict(headers or {})
        self.reject_reason = reject_reason

    def body(self) -> dict[str, Any]:
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code, reject_reason="invalid_request")


def unavailable(message: str, retry_after: int, reason: str | None = "draining") -> APIError:
    return APIError(
        503, message, type="service_unavailable", code="service_unavailable",
        headers={"Retry-After": str(retry_after)}, reject_reason=reason,
    )  # fmt: skip


_FIELD = re.compile(r"^([a-z_]+)\b")


def from_value_error(e: ValueError, params: set[str] | None = None) -> APIError:
    """A client's ValueError as a 400; `param` is the field the message starts with, if any."""
    message = str(e)
    if isinstance(e, RequestTooLarge):
        return APIError(
            400, message, code="context_length_exceeded", reject_reason="context_length_exceeded"
        )
    m = _FIELD.match(message)
    param = m.group(1) if m and (params is None or m.group(1) in params) else None
    return bad_request(message, param=param)


def parse_json(body: bytes, model: type[BaseModel]) -> Any:
    """Decode a request body (strict UTF-8 JSON object) into `model`; 400 naming the field."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"the request body is not valid UTF-8: {e}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return model.model_validate(obj, strict=None)
    except ValidationError as e:
        raise _from_pydantic(e.errors()) from None


def _from_pydantic(errors: list[Any]) -> APIError:
    """One message naming the first bad field (`messages.0.content: ...`)."""
    err = errors[0]
    # Union members appear in loc as type names ('str', 'list[int]'); they are noise to users.
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body",) and not _is_type_tag(p)]
    field = ".".join(loc) or "body"
    top = loc[0] if loc else None
    if top == "prompt" and len(errors) > 1:
        msg = "must be a string, a list of token ids, or a list of strings or token-id lists"
        return bad_request(f"prompt: {msg}", param="prompt")
    return bad_request(f"{field}: {err.get('msg', 'invalid value')}", param=top)


def _is_type_tag(part: Any) -> bool:
    return isinstance(part, str) and (
        part in ("str", "int", "float", "bool", "dict", "list") or "[" in part or "-" in part
    )


def install_handlers(app: FastAPI, on_reject: Callable[[str], None]) -> None:
    """Route every error through the envelope; `on_reject(reason)` counts refusals."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return api_error_response(request, exc, on_reject)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        on_reject("invalid_request")
        return _from_pydantic(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return unexpected_error_response(request, exc)


def api_error_response(
    request: Request, exc: APIError, on_reject: Callable[[str], None]
) -> JSONResponse:
    """The envelope for `exc`, counted when it is a refusal and named in the access log."""
    if exc.reject_reason:
        on_reject(exc.reject_reason)
    request.state.error = exc.code or exc.type
    return exc.response()


def unexpected_error_response(request: Request, exc: Exception) -> JSONResponse:
    """A bug: the trace in the log, a plain 500 envelope to the client."""
    log.error("unexpected error on %s", request.url.path, exc_info=exc)
    return internal_error().response()


def internal_error(message: str = "internal server error") -> APIError:
    return APIError(500, message, type="server_error", code="internal_error")
