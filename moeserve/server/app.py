"""The application: routes, API-key auth, probes, metrics, middleware, lifespan.

`create_app(state)` builds a FastAPI app around a ServerState and puts the two inference
POST routes in front of it (`InferenceFastPath`); serve.py runs that under uvicorn. The
inference routes live under /v1 and require the API key when one is set; the probes and
/metrics stay open so orchestrators and scrapers need no secret.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from moeserve.server.chat import create_chat_completion
from moeserve.server.completions import create_completion
from moeserve.server.errors import (
    RETRY_DRAINING,
    RETRY_LOADING,
    APIError,
    api_error_response,
    install_handlers,
    unavailable,
    unexpected_error_response,
)
from moeserve.server.messages import count_tokens_endpoint, messages_endpoint
from moeserve.server.middleware import (
    AccessLogMiddleware,
    BodyLimitMiddleware,
    bad_host,
    host_allowed,
    send_error,
)
from moeserve.server.protocol import ModelCard, ModelList
from moeserve.server.responses import create_response
from moeserve.server.state import ServerState
from moeserve.server.tokenize import tokenizer_router
from moeserve.server.ui import ui_router

Endpoint = Callable[[Request], Awaitable[Response]]


def create_app(state: ServerState) -> InferenceFastPath:
    """The app; its lifespan starts loading the model and shuts the engine down at exit."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start_loading()
        try:
            yield
        finally:
            await state.close()

    # No /docs or /openapi.json: the API is OpenAI's, documented elsewhere, and a production
    # server should not expose more surface than it serves.
    # redirect_slashes off: the 307 for `/v1/completions/` came before the API-key check and
    # built its Location from the client's Host header.
    app = FastAPI(title="moeserve", lifespan=lifespan, openapi_url=None, redirect_slashes=False)
    app.state.moeserve = state
    install_handlers(app, state.reject)
    app.add_middleware(
        BodyLimitMiddleware, limit=state.config.max_body_bytes, on_reject=state.reject
    )
    app.add_middleware(AccessLogMiddleware, log_prompts=state.config.log_prompts)  # outermost
    endpoints = _add_inference_routes(app, state)
    app.include_router(_v1_router(state))
    app.include_router(tokenizer_router(state, Depends(_require_key(state))))
    _add_probes(app, state)
    if state.config.ui:  # the web page (server/ui.py); --no-ui leaves it out
        app.include_router(ui_router(state, Depends(_require_key(state))))
    return InferenceFastPath(app, state, endpoints)


class InferenceFastPath:
    """The app uvicorn runs. POST /v1/completions and /v1/chat/completions go straight to
    their endpoints, inside the same access-log and body-limit middleware and the same error
    envelopes; everything else (the other routes, a wrong method, the lifespan) goes to the
    FastAPI app, which holds the two routes as well. FastAPI's own layers on the way (its
    error, telemetry and body-limit middleware, the exception middleware, the exit stack, the
    router and the route's wrappers) took about a tenth of a request's event-loop CPU in a
    py-spy profile (benchmarks/RESULTS.md), and every SSE chunk passed three of
    their send wrappers."""

    def __init__(self, app: FastAPI, state: ServerState, endpoints: dict[str, Endpoint]) -> None:
        self.app = app
        cfg = state.config
        self._hosts = cfg.allowed_hosts
        self._routes: dict[str, ASGIApp] = {
            path: AccessLogMiddleware(
                BodyLimitMiddleware(_as_asgi(endpoint, state), cfg.max_body_bytes, state.reject),
                log_prompts=cfg.log_prompts,
                on_done=partial(state.count_response, path),
            )
            for path, endpoint in endpoints.items()
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self._hosts is not None
            and scope["type"] == "http"
            and not host_allowed(scope, self._hosts)
        ):
            await send_error(send, bad_host())
            return
        if scope["type"] == "http" and scope["method"] == "POST":
            route = self._routes.get(scope["path"])
            if route is not None:
                await route(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def __getattr__(self, name: str) -> Any:  # the FastAPI app's: routes, state, ...
        return getattr(self.app, name)


def _as_asgi(endpoint: Endpoint, state: ServerState) -> ASGIApp:
    """`endpoint` as an ASGI app, its errors answered as the FastAPI app's handlers do."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        try:
            response = await endpoint(request)
        except APIError as e:
            response = api_error_response(request, e, state.reject)
        except Exception as e:  # noqa: BLE001 - a bug: logged, answered with a 500 envelope
            response = unexpected_error_response(request, e)
        await response(scope, receive, send)

    return app


def _require_key(state: ServerState):  # noqa: ANN202 - a FastAPI dependency (and called)
    key = state.config.api_key.encode() if state.config.api_key else None

    async def check(request: Request) -> None:
        """401 unless `Authorization: Bearer KEY` matches (constant-time comparison)."""
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
            raise APIError(
                401,
                "missing or invalid API key: send `Authorization: Bearer <key>`",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
                reject_reason="unauthorized",
            )

    return check


def _add_inference_routes(app: FastAPI, state: ServerState) -> dict[str, Endpoint]:
    """POST /v1/completions and /v1/chat/completions as plain Starlette routes, the key
    checked first in each: FastAPI's per-request dependency solving and endpoint wrapping
    took about a sixth of a request's event-loop CPU (benchmarks/RESULTS.md), and a
    burst of new requests waits for that on the loop. The handlers parse their bodies.
    Returns the endpoints by path, for InferenceFastPath."""
    check = _require_key(state)

    async def completions(request: Request) -> Response:
        await check(request)
        return await create_completion(request, state)

    async def chat_completions(request: Request) -> Response:
        await check(request)
        return await create_chat_completion(request, state)

    async def responses(request: Request) -> Response:
        await check(request)
        return await create_response(request, state)

    async def messages(request: Request) -> Response:  # its own key check and envelope
        return await messages_endpoint(request, state)

    async def count_tokens(request: Request) -> Response:
        return await count_tokens_endpoint(request, state)

    endpoints: dict[str, Endpoint] = {
        "/v1/completions": completions,
        "/v1/chat/completions": chat_completions,
        "/v1/responses": responses,
        "/v1/messages": messages,
        "/v1/messages/count_tokens": count_tokens,
    }
    for path, endpoint in endpoints.items():
        app.router.add_route(path, endpoint, methods=["POST"])
    return endpoints


def _v1_router(state: ServerState) -> APIRouter:
    # The dependency sits on the routes themselves, so no rewritten URL can route around it.
    router = APIRouter(prefix="/v1", dependencies=[Depends(_require_key(state))])

    def card() -> ModelCard:
        return ModelCard(
            id=state.config.served_model_name,
            created=state.created,
            max_model_len=state.client.max_model_len if state.client else None,
        )

    @router.get("/models")
    async def models() -> JSONResponse:
        return JSONResponse(ModelList(data=[card()]).model_dump())

    @router.get("/models/{model_id:path}")
    async def model(model_id: str) -> JSONResponse:
        name = state.config.served_model_name
        if model_id != name:
            raise APIError(
                404,
                f"the model `{model_id}` does not exist; this server serves `{name}`",
                type="not_found_error",
                param="model",
                code="model_not_found",
            )
        return JSONResponse(card().model_dump())

    return router


def _add_probes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health() -> JSONResponse:
        """Liveness: the process answers and the engine loop (once loaded) is alive."""
        if not state.alive:
            why = "the model failed to load" if state.load_error else "the engine loop died"
            return APIError(503, why, type="server_error", code="engine_dead").response()
        if state.stalled:
            return state.stalled_error().response()
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: weights loaded, warm-up step done, not draining, engine alive."""
        if state.ready:
            return JSONResponse({"status": "ready"})
        if state.phase == "loading":
            return unavailable("the model is still loading", RETRY_LOADING, None).response()
        if state.phase == "draining":
            return unavailable("the server is shutting down", RETRY_DRAINING, None).response()
        if state.stalled:
            return state.stalled_error().response()
        return APIError(
            503, "the engine is not running", type="server_error", code="engine_dead"
        ).response()

    @app.get("/metrics")
    async def metrics() -> Response:
        if state.metrics is None:
            return unavailable(
                "metrics start once the model is loaded", RETRY_LOADING, None
            ).response()
        # render() copies the expert counts off the device: not on the event loop.
        body, content_type = await state.offload(state.metrics.render)
        return Response(body, media_type=content_type)
