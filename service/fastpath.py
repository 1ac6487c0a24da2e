"""The busy routes (POST /sample, /decode, /interpolate with JSON; POST /encode) without FastAPI's per-request layers.

For these routes FastAPI's routing, dependency solving, body parsing and its own middleware cost more event-loop time
than the route itself, and the event loop shares the cores with the model. Taking those layers off its path, measured
on 2 cores with alternating servers (medians of 3 runs): faces `n=1` at 64 connections 513 -> 592 images/s, a lone
mnist request 0.80 -> 0.72 ms; see MODEL_ROUTES for /encode.

This middleware calls the same route functions, with the same validation and the app's own exception handlers. A
request it does not take as it is, it hands to FastAPI unchanged, with the body it has read: a JSON body that is not
valid (FastAPI answers it 422 as always), no `application/json` content type on the image routes, a wrong API key,
models still loading. So every answer a client can get is FastAPI's, only faster for the common one.

The commonest, these routes with a body of up to 64 KiB, go further: `DirectAnswers` answers them from the HTTP
protocol, past uvicorn's request cycle and this middleware too.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT

from service import routes
from service.runtime import Runtime
from service.schemas import DecodeRequest, InterpolateRequest, SampleRequest

log = logging.getLogger(__name__)
Route = Callable[[Any, Request, Runtime], Awaitable[Response]]
Observe = Callable[[Scope, int, float, bytes], None]  # app.LimitsAndAccessLog's: metrics and the access line
ROUTES: dict[str, tuple[type[BaseModel], Route]] = {
    "/sample": (SampleRequest, routes.sample),
    "/decode": (DecodeRequest, routes.decode),
    "/interpolate": (InterpolateRequest, routes.interpolate),
}
# Routes that read their own body, a multipart form or JSON, and return their answer, the same one FastAPI gets from
# them. /encode of one faces image at 32 connections on 2 cores, alternating servers: 483 -> 556 images/s
# (bench/README.md).
ModelRoute = Callable[[Request, Runtime], Awaitable[Response]]
MODEL_ROUTES: dict[str, ModelRoute] = {"/encode": routes.encode}


class LeanRoutes:
    """Pure ASGI middleware; inside the app's LimitsAndAccessLog, which limits the body, counts and logs."""

    def __init__(self, app: ASGIApp, fastapi: FastAPI, key_matches: Callable[[str], bool] | None) -> None:
        self.app, self.fastapi, self.key_matches = app, fastapi, key_matches
        # What FastAPI's router would put in the scope: the access log and metrics label requests by route.
        self.routes = {
            path: route for route in routes.router.routes
            if (path := getattr(route, "path", None)) in ROUTES or path in MODEL_ROUTES
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path")
        runtime: Runtime | None = getattr(self.fastapi.state, "runtime", None)
        if (
            scope["type"] != "http" or scope["method"] != "POST" or runtime is None
            or (path not in ROUTES and path not in MODEL_ROUTES)
        ):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.key_matches is not None and not self.key_matches(headers.get(b"authorization", b"").decode("latin-1")):
            await self.app(scope, receive, send)
            return
        if path in MODEL_ROUTES:
            await self._model_route(MODEL_ROUTES[path], scope, receive, send, runtime)
            return
        if not headers.get(b"content-type", b"").startswith(b"application/json"):
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        if body is None:  # the client went away
            return
        schema, route = ROUTES[path]
        try:
            parsed = schema.model_validate_json(body)
        except ValidationError:
            await self.app(scope, _replay(body, receive), send)  # FastAPI's 422, worded as for every other route
            return
        scope["route"] = self.routes[path]
        request = Request(scope, receive)
        try:
            response = await route(parsed, request, runtime)
        except Exception as exc:
            response = await self.handle(request, exc)
        await response(scope, receive, send)

    async def _model_route(self, route: ModelRoute, scope: Scope, receive: Receive, send: Send, runtime: Runtime) -> None:
        """A route that reads its own body: whatever it raises (415, 422, 404, 429 ...) goes to the same handlers."""
        scope["route"] = self.routes[scope["path"]]
        request = Request(scope, receive)
        try:
            response = await route(request, runtime)
        except Exception as exc:
            response = await self.handle(request, exc)
        finally:
            await request.close()  # uploads a form spooled to temporary files
        await response(scope, receive, send)

    async def handle(self, request: Request, exc: Exception) -> Response:
        """The answer the app's exception handlers give (HTTPException, UnknownModel, QueueFull, ... and Exception)."""
        for cls in type(exc).__mro__:
            handler = self.fastapi.exception_handlers.get(cls)
            if handler is not None:
                response = handler(request, exc)
                return await response if inspect.isawaitable(response) else response
        raise exc


async def read_body(receive: Receive) -> bytes | None:
    """A request's whole body, or None if the client went away first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` for the app behind: the body read here, then whatever comes next (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class DirectAnswers:
    """The busy routes' requests with a body of up to 64 KiB (POST /sample, /decode and /interpolate with JSON; POST
    /encode), answered from the HTTP protocol (`http_protocol.GuardedHttpProtocol`) rather than through uvicorn's ASGI
    cycle and the app's middleware. The route, its validation, the app's exception handlers, the metrics, the access
    line and the X-Request-ID are the app's own; what is left out is uvicorn's request cycle and task, the ASGI
    messages and the middleware's wrappers, and the answer goes out in one write. On 2 cores, alternating servers (6
    rounds each; bench/README.md): faces `/sample` at 64 connections 1,347 -> 1,431 images/s (faster in 6 of 6), mnist
    5,192 -> 6,471 requests/s (5 of 6); mnist `/decode` 3,581 -> 4,411 (6 of 6).

    The protocol asks `takes` once a request's head is in, holding uvicorn's handling of it back, then `parse` once its
    body is. A request declined at either step (another method or path, a query string, no JSON content type on a JSON
    route, no Content-Length or a body over `max_body`, a wrong API key, an Origin where the server answers CORS,
    models loading, a JSON body that is not valid) goes to uvicorn and the app as if it had never been held, so every
    answer but the common ones is the app's as ever. `/encode` reads its own body (a form or JSON), and answers what
    is wrong with it itself, as through the app.

    A held body is not counted against VAE_MAX_BODY_BYTES_IN_FLIGHT: it is at most what uvicorn buffers of any
    request's body before it stops reading from its connection (HIGH_WATER_LIMIT), so it adds nothing to what the
    server's connections can hold at once."""

    max_body = HIGH_WATER_LIMIT

    def __init__(
        self, fastapi: FastAPI, lean: LeanRoutes, observe: Observe, key_matches: Callable[[str], bool] | None, cors: bool
    ) -> None:
        self.fastapi, self.lean, self.observe, self.key_matches, self.cors = fastapi, lean, observe, key_matches, cors
        # by the request line's path: (the path as text, its JSON body's schema or None where the route reads its own
        # body, the route, FastAPI's route for the scope)
        self.routes: dict[bytes, tuple[str, type[BaseModel] | None, Route, Any]] = {
            path.encode(): (path, schema, route, lean.routes[path]) for path, (schema, route) in ROUTES.items()
        }
        self.routes.update({
            path.encode(): (path, None, _reading_its_body(route), lean.routes[path]) for path, route in MODEL_ROUTES.items()
        })
        self.max_body = min(self.max_body, fastapi.state.settings.max_body_bytes)

    def takes(self, method: bytes, url: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
        """From the request's head (header names in lower case, as uvicorn keeps them)."""
        if method != b"POST" or getattr(self.fastapi.state, "runtime", None) is None:
            return False
        entry = self.routes.get(url)
        if entry is None:
            return False
        length = content_type = None
        authorization = b""
        for name, value in headers:
            if name == b"content-length":
                length = value
            elif name == b"content-type":
                content_type = value
            elif name == b"authorization":
                authorization = value
            elif name == b"transfer-encoding" or (name == b"origin" and self.cors):
                return False
        if length is None or not length.isdigit() or int(length) > self.max_body:
            return False
        if entry[1] is not None and (content_type is None or not content_type.startswith(b"application/json")):
            return False
        return self.key_matches is None or self.key_matches(authorization.decode("latin-1"))

    def parse(self, url: bytes, body: bytes) -> tuple[bytes, BaseModel | bytes] | None:
        """The request's path and its body, as the route takes it; None where a JSON body is not valid: the app answers
        it (FastAPI's 422, worded as ever). `url`: one that `takes` took."""
        schema = self.routes[url][1]
        if schema is None:
            return url, body
        try:
            return url, schema.model_validate_json(body)
        except ValidationError:
            return None

    async def answer(self, scope: Scope, parsed: tuple[bytes, BaseModel | bytes], receive: Receive) -> Response:
        """The route's answer, or the app's exception handlers' answer to what it raised. `scope`: as uvicorn begins
        it, before the parts it fills in from the request line, which `takes` has read. `receive`: what comes after
        the body (a disconnect)."""
        url, body = parsed
        path, _, route, fastapi_route = self.routes[url]
        scope.update(method="POST", path=path, raw_path=url, query_string=b"", app=self.fastapi, route=fastapi_route)
        request = Request(scope, _replay(body, receive) if isinstance(body, bytes) else receive)
        runtime: Runtime = self.fastapi.state.runtime
        runtime.active += 1  # as LimitsAndAccessLog counts every request: `Runtime.alone`, the drain
        try:
            return await route(body, request, runtime)
        except Exception as exc:
            try:
                return await self.lean.handle(request, exc)
            except Exception:
                log.exception("POST %s failed", path)
                return Response(b'{"detail":"internal error"}', 500, media_type="application/json")
        finally:
            runtime.active -= 1
            await request.close()  # a form Starlette parsed may have spooled files


def _reading_its_body(route: ModelRoute) -> Route:
    """A route that reads its own body from its request, called as the JSON routes are."""

    async def call(_: object, request: Request, runtime: Runtime) -> Response:
        return await route(request, runtime)

    return call
