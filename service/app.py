"""create_app(settings): the FastAPI app, its lifespan, middleware and error mapping."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import SecretStr
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.access import CLIENT_CLOSED_REQUEST, count_failure, log_request, request_id_of
from service.batcher import BatchFailed, DeadlineExceeded, NotServing, QueueFull
from service.fastpath import DirectAnswers, Observe
from service.http_protocol import OVER_LIMIT, TIMED_OUT
from service.metrics import Metrics
from service.routes import is_json, media_type, metrics_router, probes, router
from service.runtime import ModelUnavailable, Runtime, UnknownModel
from service.schemas import Problem
from service.settings import Settings

log = logging.getLogger("vae_serve")


class _BodyTooLarge(HTTPException):
    """Raised from `receive`. An HTTPException, so that body parsers (FastAPI's JSON, the multipart form)
    pass it on as the 413 it is instead of wrapping it into a 400 or 422."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over the {limit}-byte limit")


class _BodiesOverBudget(HTTPException):
    """Raised before a body is read, or from `receive`, like _BodyTooLarge."""

    def __init__(self, budget: int) -> None:
        super().__init__(
            503,
            f"the server is holding as many request bodies as it takes at once ({budget} bytes in all, "
            "VAE_MAX_BODY_BYTES_IN_FLIGHT): retry in a moment",
            headers={"Retry-After": "1", "Connection": "close"},
        )


class _ConnectionOverLimit(HTTPException):
    """A request on a connection that opened beyond VAE_MAX_CONNECTIONS (the server's protocol marks it in the scope:
    service/http_protocol.py). The connection is closed after the answer, so that it no longer counts."""

    def __init__(self, count: int, limit: int) -> None:
        super().__init__(
            503,
            f"the server had {count} connections open when this one opened, and serves at most {limit} "
            "(VAE_MAX_CONNECTIONS): retry on a new connection, or send more requests on fewer connections",
            headers={"Retry-After": "1", "Connection": "close"},
        )


class LimitsAndAccessLog:
    """Pure ASGI middleware: 503 on a connection beyond `max_connections`, 413 before an oversized body is read, 503 for a
    body that would take the bodies held at once over `max_bodies_bytes`, one log line and metrics per request.

    The bodies held at once are bounded because each is held whole, and parsed: 60 clients sending 16 MB each at once
    took the server from 420 MB to 1.1 GB."""

    def __init__(
        self, app: ASGIApp, max_body_bytes: int, max_bodies_bytes: int, max_connections: int, metrics: Metrics
    ) -> None:
        self.app, self.max_body_bytes, self.max_connections, self.metrics = app, max_body_bytes, max_connections, metrics
        self.max_bodies_bytes = max(max_bodies_bytes, max_body_bytes)  # one body of the largest size always fits
        self.bodies_bytes = 0  # what the requests in progress hold of their bodies, or have declared they will send
        # (endpoint, model, status) -> the children of the two request metrics: `labels(...)` looks them up under a lock
        # on every call. Bounded as the labels are: route templates, served models, the statuses the app answers.
        self._counted: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        response_started = False
        headers = dict(scope["headers"])
        request_id = request_id_of(scope["headers"])

        async def send_wrapper(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id)]
            await send(message)

        received = 0
        client_gone = False
        try:
            declared = max(0, int(headers.get(b"content-length", b"0") or 0))
        except ValueError:
            declared = 0
        counted = 0  # of this request's body, in self.bodies_bytes

        async def receive_wrapper() -> Message:
            nonlocal received, client_gone, counted
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge(self.max_body_bytes)
                if received > counted:  # more than it declared (a chunked body): counted as it comes
                    self.bodies_bytes += received - counted
                    counted = received
                    if self.bodies_bytes > self.max_bodies_bytes:
                        raise _BodiesOverBudget(self.max_bodies_bytes)
            elif message["type"] == "http.disconnect":
                client_gone = True
            return message

        runtime: Runtime | None = getattr(scope["app"].state, "runtime", None)  # None while the models load
        if runtime is not None:
            runtime.active += 1  # a drain waits for requests in progress: their PNGs need the image threads
        try:
            if over_limit := scope.get("state", {}).get(OVER_LIMIT):
                raise _ConnectionOverLimit(over_limit, self.max_connections)
            if declared > self.max_body_bytes:
                raise _BodyTooLarge(self.max_body_bytes)
            if declared and self.bodies_bytes + declared > self.max_bodies_bytes:
                raise _BodiesOverBudget(self.max_bodies_bytes)
            self.bodies_bytes += declared
            counted = declared
            await self.app(scope, receive_wrapper, send_wrapper)
        except (_ConnectionOverLimit, _BodyTooLarge, _BodiesOverBudget) as exc:
            if response_started:
                raise
            await _error(exc.status_code, exc.detail, dict(exc.headers or {}))(scope, receive, send_wrapper)
        finally:
            self.bodies_bytes -= counted
            if client_gone:  # before its request was read: whatever was answered (FastAPI's 400, say) went to nobody
                timed_out = scope.get("state", {}).get(TIMED_OUT)  # the server closed it: the client was too slow
                status = 408 if timed_out else CLIENT_CLOSED_REQUEST
            if runtime is not None:
                runtime.active -= 1
            self.observe(scope, status, time.perf_counter() - started, request_id)

    def observe(self, scope: Scope, status: int, seconds: float, request_id: bytes) -> None:
        """A request's metrics and access line (fastpath.DirectAnswers' too)."""
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"  # templates only: bounded label values
        model = str(scope.get("state", {}).get("model", ""))
        runtime = getattr(scope["app"].state, "runtime", None)
        if model and (runtime is None or model not in runtime.models):
            model = "unknown"  # client-chosen names must not create label values
        children = self._counted.get((endpoint, model, status))
        if children is None:
            children = self.metrics.requests.labels(endpoint, model, str(status)), self.metrics.request_seconds.labels(endpoint)
            self._counted[endpoint, model, status] = children
        children[0].inc()
        children[1].observe(seconds)
        count_failure(self.metrics, status)
        if endpoint not in ("/healthz", "/readyz", "/metrics") or status >= 400:
            log_request(scope["method"], scope["path"], model, status, seconds, request_id)


class VaeServe(FastAPI):
    """The FastAPI app, with the middleware every HTTP request passes (`front`: limits, the access line, the metrics and
    the X-Request-ID) in front of FastAPI's own stack rather than inside it: it sees every answer as it went out,
    Starlette's 500 included, and its `observe` is what the protocol's direct answers (fastpath.py) share with the
    app. Those never enter the app; every other request goes on into FastAPI's stack, OpenTelemetry's server span
    included."""

    front: ASGIApp | None = None
    observe: Observe | None = None  # the front's: a request's metrics and access line

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.front is not None:
            scope["app"] = self  # as Starlette sets it: the middlewares find the runtime and settings through it
            await self.front(scope, receive, send)
        elif scope["type"] == "websocket" and self.observe is not None:
            await self._websocket(scope, receive, send, self.observe)
        else:
            await super().__call__(scope, receive, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send, observe: Observe) -> None:
        """A WebSocket upgrade: no route takes one, so FastAPI's router closes it unaccepted, which uvicorn answers
        with 403. Counted and logged as any refused request is (a client trying it again and again shows)."""
        started, status = time.perf_counter(), 403
        request_id = request_id_of(scope["headers"])

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "websocket.http.response.start":  # an answer of the app's own, where one is sent
                status = message["status"]
            await send(message)

        scope["app"] = self
        try:
            await super().__call__(scope, receive, sending)
        finally:
            observe({**scope, "method": "GET"}, status, time.perf_counter() - started, request_id)

    async def behind_front(self, scope: Scope, receive: Receive, send: Send) -> None:
        """FastAPI's own stack: its middleware, routing and exception handlers."""
        await super().__call__(scope, receive, send)


# The error answers of the API routes, documented so that clients (and schema checks) know them.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "description": description}
    for status, description in {
        400: "the body could not be parsed (not UTF-8, or JSON nested too deeply)",
        401: "missing or wrong API key (only when the server has one)",
        404: "no model of that name",
        413: "the request body is over the size limit",
        415: "the body is not JSON (or, for POST /encode, neither JSON nor multipart/form-data)",
        422: "the request is invalid: the detail says what to fix",
        429: "the model's queue is full: retry after Retry-After seconds",
        500: "the model failed on this request's batch",
        503: "the model failed to load, or the service is loading or shutting down",
        504: "no answer within the request deadline",
    }.items()
}


def _error(status: int, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _clip(value: Any, limit: int = 100) -> Any:
    return value[:limit] + "…" if isinstance(value, str) and len(value) > limit else value


def _body_not_json(request: Request, exc: RequestValidationError) -> bool:
    """A JSON route's body sent with another content type, or none: FastAPI does not parse it (rightly: no guessing),
    and its error, "Input should be a valid dictionary", would not say that the header is what to fix."""
    if is_json(media_type(request.headers.get("content-type", ""))):
        return False  # what FastAPI reads as JSON: its errors are about the JSON itself
    return any(tuple(e.get("loc", ())) == ("body",) for e in exc.errors())


def _unreadable_body(exc: StarletteHTTPException) -> str | None:
    """What FastAPI's 400, "There was an error parsing the body", was about, where its cause says: a JSON body that is
    not UTF-8, or nested deeper than Python's parser goes. That message alone does not say what to fix."""
    cause = exc.__cause__
    if exc.status_code != 400:
        return None
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not UTF-8 (byte {cause.start} is {cause.object[cause.start]:#04x}): send JSON as UTF-8 text"
    if isinstance(cause, RecursionError):
        return "the body's JSON is nested too deeply to be read: a request needs only a few levels"
    return None


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if reason := _unreadable_body(exc):
            return _error(400, reason)
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        if _body_not_json(request, exc):
            sent = repr(_clip(request.headers["content-type"])) if "content-type" in request.headers else "missing"
            return _error(415, f"send the body as JSON with the header Content-Type: application/json (it was {sent})")
        # Never echo the input back: it may be huge. Type, location and message say what to fix; a location
        # can hold a client-chosen key (an unexpected field), so its parts are cut short too.
        errors = [
            {"type": e.get("type"), "loc": [_clip(part) for part in e.get("loc", ())], "msg": _clip(e.get("msg"), 300)}
            for e in exc.errors()[:20]
        ]
        return _error(422, errors)

    handlers: list[tuple[type[Exception], int, dict[str, str] | None]] = [
        (UnknownModel, 404, None),
        (QueueFull, 429, {"Retry-After": "1"}),
        (ModelUnavailable, 503, None),
        (NotServing, 503, {"Retry-After": "5"}),
        (DeadlineExceeded, 504, None),
        (BatchFailed, 500, None),
    ]
    for exc_type, status, headers in handlers:

        async def handler(_: Request, exc: Exception, status: int = status, headers: dict[str, str] | None = headers) -> JSONResponse:
            return _error(status, str(exc), headers)

        app.add_exception_handler(exc_type, handler)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(_: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # for the access log and the metrics: nobody reads it

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return _error(500, "internal error; the server log has the details")


def api_key_check(key: SecretStr) -> Callable[[str], bool]:
    """Whether an Authorization header carries `key` as a bearer token (compared in constant time)."""
    expected = key.get_secret_value().encode()

    def matches(header: str) -> bool:
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), expected)

    return matches


def _api_key_dependency(key_matches: Callable[[str], bool]) -> Any:
    async def require_api_key(request: Request) -> None:
        if not key_matches(request.headers.get("authorization", "")):
            raise HTTPException(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", {"WWW-Authenticate": "Bearer"})

    return require_api_key


def freeze_what_is_loaded() -> None:
    """Leave every object alive now (the models, the app, the libraries: about 210,000) out of Python's garbage
    collections from here on. A full collection walks every tracked object with the GIL held, and with them it took
    about 100 ms, a few times a minute under load, with every request on hold: faces at 64 connections on 2 cores
    1,159 -> 1,294 images/s and p99 157 -> 82 ms, mnist 3,578 -> 4,010 requests/s and p99 120 -> 36 ms
    (alternating servers, 4 rounds each; bench/README.md). A full collection now takes about 1 ms."""
    gc.collect()  # the garbage of loading, so that none of it is kept for good
    gc.freeze()


async def sample_process(metrics: Metrics, every_s: float = 5.0) -> None:
    """With several workers, each records its own memory and CPU time for /metrics to add up."""
    while True:
        metrics.sample_process()
        await asyncio.sleep(every_s)


def create_app(settings: Settings | None = None, *, wait_for_models: bool = False) -> VaeServe:
    """The app for `settings`: models load in the background; /readyz turns 200 once all are warm. With
    `wait_for_models`, the lifespan's startup waits for them, and the server accepts connections only then."""
    settings = settings or Settings()
    metrics = Metrics()
    metrics.connections_max.set(settings.max_connections)  # counted against by the protocol (http_protocol.py)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def load() -> None:
            runtime = await asyncio.to_thread(Runtime.load, settings, metrics)
            runtime.start(getattr(app.state, "active_connections", None))  # set by the server (server.DrainingServer)
            freeze_what_is_loaded()
            app.state.runtime = runtime
            if (direct := getattr(app.state, "direct", None)) is not None:
                direct.start()
            ready, status = runtime.readiness()
            log.info("models loaded", extra={"ready": ready, "models": status})

        loading = asyncio.create_task(load())
        app.state.loading = loading
        sampling = asyncio.create_task(sample_process(metrics)) if metrics.multiprocess else None
        if wait_for_models:
            await loading
        try:
            yield
        finally:
            if not loading.done():
                loading.cancel()
            if sampling is not None:
                sampling.cancel()
            runtime: Runtime | None = getattr(app.state, "runtime", None)
            if runtime is not None:
                await runtime.drain()
            gc.unfreeze()  # a process that goes on (an app that embeds this one, the tests) collects them again

    app = VaeServe(
        title="vae-serve",
        version="0.1.0",
        summary="Sample, encode, decode and interpolate with variational autoencoders.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    # Without a key there is nothing to check: no dependency, rather than one that returns at once on every request.
    key_matches = api_key_check(settings.api_key) if settings.api_key else None
    auth = [Depends(_api_key_dependency(key_matches))] if key_matches else []
    app.include_router(router, dependencies=auth, responses=ERROR_RESPONSES)
    app.include_router(probes)
    app.include_router(metrics_router, dependencies=auth if settings.metrics_require_key else [])
    _install_error_handlers(app)
    app.front = limits = LimitsAndAccessLog(
        app.behind_front, max_body_bytes=settings.max_body_bytes, max_bodies_bytes=settings.max_body_bytes_in_flight,
        max_connections=settings.max_connections, metrics=metrics,
    )
    answers_cors = functools.partial(cors, origins=origins) if (origins := settings.cors_origin_list) else None
    if answers_cors is not None:
        app.front = answers_cors(app.front)
    # server.config hands it to the HTTP protocol
    app.state.direct = DirectAnswers(app, limits.observe, key_matches, answers_cors)
    app.observe = limits.observe
    return app


def cors(app: ASGIApp, origins: list[str]) -> ASGIApp:
    """Starlette's CORS middleware in front of every route (and around the protocol's direct answers: fastpath.py): it
    answers a browser's preflight (before the API key, which a preflight never carries) and marks the answers to
    `origins` as readable by their pages, errors too. Pages may send the headers the API reads and read the ones it
    sets."""
    return CORSMiddleware(
        app, allow_origins=origins, allow_methods=["GET", "HEAD", "POST"],
        allow_headers=["authorization", "content-type", "accept", "x-request-id"],
        expose_headers=["x-seed", "retry-after", "x-request-id"], max_age=600,
    )
