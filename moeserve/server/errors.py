"""Errors as the OpenAI envelope: `{"error": {"message", "type", "param", "code"}}`.

Every failure leaves the server through `APIError` or one of the handlers installed here, so a
client never sees FastAPI's 422 body or a bare 500 page. `ValueError` from the engine or
SamplingParams (a client's mistake by the codebase's convention) becomes a 400.
"""

from __future__ import annotations

import difflib
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
from moeserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorInfo,
    ErrorResponse,
)

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
        503,
        message,
        type="service_unavailable",
        code="service_unavailable",
        headers={"Retry-After": str(retry_after)},
        reject_reason=reason,
    )


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
    except RecursionError:
        field = _deep_field(text)
        raise bad_request(
            f"{field or 'the request body'}: JSON nested more than {_MAX_DEPTH} levels deep",
            param=field,
        ) from None
    except ValueError:  # an integer literal past Python's 4,300-digit limit
        field = _field_before(text, _LONG_INT)
        raise bad_request(
            f"{field or 'the request body'}: an integer literal of more than 4,300 digits",
            param=field,
        ) from None
    if not isinstance(obj, dict):
        raise bad_request("the request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(text):  # only then can a string hold a lone surrogate
        field = _lone_surrogate(obj)
        if field is not None:
            top = field.split(".")[0]
            raise bad_request(
                f"{field}: a string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff "
                "without its pair), which is not text",
                param=top,
            )
    try:
        return model.model_validate(obj, strict=None)
    except ValidationError as e:
        raise _from_pydantic(e.errors(), model) from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply") from None


# Python's JSON decoder raises RecursionError near its recursion limit (about 1,000 levels).
_MAX_DEPTH = 900
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# A string literal (skipped) or an integer literal longer than Python converts.
_LONG_INT = re.compile(r'"(?:[^"\\]|\\.)*"|(-?\d{4301,})')
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"\s*:?|[\[\]{}]')


def _field_before(text: str, pattern: re.Pattern[str]) -> str | None:
    """The top-level key whose value holds the first match of `pattern`'s group 1 (error
    paths only)."""
    for m in pattern.finditer(text):
        if m.group(1) is not None:
            return _top_key_at(text, m.start())
    return None


def _top_key_at(text: str, pos: int) -> str | None:
    key, depth = None, 0
    for m in _TOKEN.finditer(text, 0, pos):
        tok = m.group()
        if tok in "[{":
            depth += 1
        elif tok in "]}":
            depth -= 1
        elif depth == 1 and tok.endswith(":"):
            key = json.loads(tok[:-1].rstrip())
    return key


def _deep_field(text: str) -> str | None:
    """The top-level key under which the body nests past _MAX_DEPTH (error path only)."""
    depth = 0
    for m in _TOKEN.finditer(text):
        tok = m.group()
        if tok in "[{":
            depth += 1
            if depth > _MAX_DEPTH:
                return _top_key_at(text, m.start())
        elif tok in "]}":
            depth -= 1
    return None


def _lone_surrogate(obj: Any, path: str = "") -> str | None:
    """The dotted path of the first string (value or key) holding a lone surrogate."""
    if isinstance(obj, str):
        return (path or "body") if _has_surrogate(obj) else None
    if isinstance(obj, dict):
        for k, v in obj.items():
            sub = f"{path}.{k}" if path else str(k)
            if _has_surrogate(k):
                return sub
            found = _lone_surrogate(v, sub)
            if found:
                return found
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found = _lone_surrogate(v, f"{path}.{i}")
            if found:
                return found
    return None


def _has_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _from_pydantic(errors: list[Any], model: type[BaseModel] | None = None) -> APIError:
    """One message naming the first bad field (`messages.0.content: ...`)."""
    err = errors[0]
    # Union members appear in loc as type names ('str', 'list[int]'); they are noise to users.
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body",) and not _is_type_tag(p)]
    field = ".".join(loc) or "body"
    top = loc[0] if loc else None
    if err.get("type") == "extra_forbidden":
        hint = _did_you_mean(loc[-1], model) if loc and len(loc) == 1 else ""
        return bad_request(
            f"{field}: unknown field{hint}; this server accepts OpenAI's fields and the "
            "extensions its README lists, and refuses the rest rather than ignore them",
            param=top,
        )
    if top == "prompt" and len(errors) > 1:
        msg = "must be a string, a list of token ids, or a list of strings or token-id lists"
        return bad_request(f"prompt: {msg}", param="prompt")
    return bad_request(f"{field}: {err.get('msg', 'invalid value')}", param=top)


def _did_you_mean(name: str, model: type[BaseModel] | None) -> str:
    """A hint for an unknown top-level field: the other endpoint's field, or a close name."""
    if model is None:
        return ""
    for other, path in (
        (ChatCompletionRequest, "chat/completions"),
        (CompletionRequest, "completions"),
    ):
        if other is not model and name in other.model_fields:
            return f" here (it is a field of /v1/{path})"
    close = difflib.get_close_matches(name, sorted(model.model_fields), n=1)
    return f" (did you mean `{close[0]}`?)" if close else ""


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
        # exc.headers carries the 405's Allow, which RFC 9110 requires.
        return APIError(exc.status_code, str(exc.detail), type=kind, headers=exc.headers).response()

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
