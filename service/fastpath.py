"""The busy routes (POST /sample, /decode, /interpolate with JSON; POST /encode) answered from the HTTP protocol.

For these routes uvicorn's request cycle, the app's middleware and FastAPI's routing, dependency solving and body
parsing cost more event-loop time than the route itself, and the event loop shares the cores with the model.
`DirectAnswers` calls the same route functions, with the same validation and the app's own exception handlers, for the
common request, and leaves every other one to uvicorn and the app as it came: so every answer a client can get is the
app's, only faster for the common one.
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


async def _encode(body: bytes, request: Request, runtime: Runtime) -> Response:
    """POST /encode reads its own body (a multipart form or JSON) from its request, as through FastAPI."""
    return await routes.encode(request, runtime)


# path: (the schema of its JSON body, or None where the route reads its body itself; the route)
ROUTES: dict[str, tuple[type[BaseModel] | None, Route]] = {
    "/sample": (SampleRequest, routes.sample),
    "/decode": (DecodeRequest, routes.decode),
    "/interpolate": (InterpolateRequest, routes.interpolate),
    "/encode": (None, _encode),
}


_ANSWER = "vae.direct_answer"  # the scope's key for the answer whose head `_start_of_answer` sends


async def _start_of_answer(scope: Scope, receive: Receive, send: Send) -> None:
    """An ASGI app that sends the start of the direct answer in its scope: what the CORS middleware adds its headers to."""
    response: Response = scope[_ANSWER]
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})


async def _nothing_to_receive() -> Message:
    return {"type": "http.disconnect"}


async def _add_cors_headers(cors: ASGIApp, scope: Scope, response: Response) -> None:
    """The CORS middleware's headers on `response`, added by the middleware itself: the same as on the app's answers.
    `cors`: the middleware around `_start_of_answer`."""

    async def keep(message: Message) -> None:
        response.raw_headers = list(message["headers"])

    scope[_ANSWER] = response
    await cors(scope, _nothing_to_receive, keep)


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` for a route that reads its own body: the body read here, then whatever comes next (a disconnect)."""
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
    messages and the middleware's wrappers, and the answer goes out in one write. On 2 cores, against the lean
    middleware that took these routes past FastAPI's layers before (alternating servers, 6 rounds each;
    bench/README.md): faces `/sample` at 64 connections 1,347 -> 1,431 images/s (faster in 6 of 6), mnist
    5,192 -> 6,471 requests/s (5 of 6); mnist `/decode` 3,581 -> 4,411 (6 of 6).

    The protocol asks `takes` once a request's head is in, holding uvicorn's handling of it back, then `parse` once its
    body is. A request declined at either step (another method or path, no JSON content type on a JSON route, a body
    over `max_body`, declared or, chunked, as it comes, a wrong API key, models loading, a JSON body that is not valid)
    goes to uvicorn and the app as if it had never been held, so every answer but the common ones is the app's as ever.
    A query string is taken along: these routes read none, and FastAPI ignores one they do not declare. `/encode` reads
    its own body (a form or JSON), and answers what is wrong with it itself, as through the app. Where the server
    answers CORS (`cors`), Starlette's CORS middleware adds its headers to a direct answer as it does to the app's, so a
    page's requests are answered directly too.

    A held body is not counted against VAE_MAX_BODY_BYTES_IN_FLIGHT: it is at most what uvicorn buffers of any
    request's body before it stops reading from its connection (HIGH_WATER_LIMIT), so it adds nothing to what the
    server's connections can hold at once.

    It answers nothing until `start` (once the models are loaded), nor at all where FastAPI's own OpenTelemetry hook
    records requests: a deployment that traces gets a span for every request, at the speed of FastAPI's stack."""

    max_body = HIGH_WATER_LIMIT
    on = False  # see `start`

    def __init__(
        self, fastapi: FastAPI, observe: Observe, key_matches: Callable[[str], bool] | None,
        cors: Callable[[ASGIApp], ASGIApp] | None = None,
    ) -> None:
        """`cors`: the app's CORS middleware around a given app, where the server answers CORS."""
        self.fastapi, self.observe, self.key_matches = fastapi, observe, key_matches
        self.cors = cors(_start_of_answer) if cors is not None else None
        # What FastAPI's router would put in the scope: the access log and the metrics label requests by route.
        fastapi_routes = {getattr(route, "path", None): route for route in routes.router.routes}
        # by the request line's path: (the path as text, its JSON body's schema, the route, FastAPI's route)
        self.routes: dict[bytes, tuple[str, type[BaseModel] | None, Route, Any]] = {
            path.encode(): (path, schema, route, fastapi_routes[path]) for path, (schema, route) in ROUTES.items()
        }
        self.max_body = min(self.max_body, fastapi.state.settings.max_body_bytes)

    def start(self) -> None:
        """Answer from now on (the app's runtime is loaded), unless FastAPI's OpenTelemetry hook records requests:
        FastAPI 0.165 and later, once a tracer, meter or logger provider is set in the process (an OpenTelemetry SDK
        set up, `opentelemetry-instrument`, FASTAPI_OTEL_AUTO_CONFIGURE). Asked once, after FastAPI's lifespan has
        set up what the environment asks for: a provider set later leaves direct answers on."""
        telemetry = getattr(self.fastapi, "_native_telemetry", None)  # FastAPI's, not public: absent before 0.165
        if telemetry is not None and telemetry.enabled():
            log.info("FastAPI's OpenTelemetry hook records requests: every request goes through FastAPI's stack")
            return
        self.on = True

    def takes(self, method: bytes, url: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
        """From the request's head (header names in lower case, as uvicorn keeps them)."""
        if method != b"POST" or not self.on:
            return False
        entry = self.routes.get(url.partition(b"?")[0])
        if entry is None:
            return False
        length = content_type = encoding = None
        authorization = b""
        for name, value in headers:
            if name == b"content-length":
                length = value
            elif name == b"content-type":
                content_type = value
            elif name == b"authorization":
                authorization = value
            elif name == b"transfer-encoding":
                if encoding is not None:  # several: the app's, as anything unusual is
                    return False
                encoding = value
        if encoding is not None:  # chunked: held till it is in, unless more than `max_body` comes (the protocol)
            if length is not None or encoding.lower() != b"chunked":
                return False
        elif length is None or not length.isdigit() or int(length) > self.max_body:
            return False
        if entry[1] is not None and (content_type is None or not content_type.startswith(b"application/json")):
            return False
        return self.key_matches is None or self.key_matches(authorization.decode("latin-1"))

    def parse(self, url: bytes, body: bytes) -> tuple[bytes, BaseModel | bytes] | None:
        """The request's path and its body, as the route takes it; None where a JSON body is not valid: the app answers
        it (FastAPI's 422, worded as ever). `url`: one that `takes` took."""
        schema = self.routes[url.partition(b"?")[0]][1]
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
        raw_path, _, query = url.partition(b"?")
        path, _, route, fastapi_route = self.routes[raw_path]
        scope.update(method="POST", path=path, raw_path=raw_path, query_string=query, app=self.fastapi, route=fastapi_route)
        request = Request(scope, _replay(body, receive) if isinstance(body, bytes) else receive)
        runtime: Runtime = self.fastapi.state.runtime
        runtime.active += 1  # as LimitsAndAccessLog counts every request: `Runtime.alone`, the drain
        try:
            response = await route(body, request, runtime)
        except Exception as exc:
            try:
                response = await self._handled(request, exc)
            except Exception:
                log.exception("POST %s failed", path)
                response = Response(b'{"detail":"internal error"}', 500, media_type="application/json")
        finally:
            runtime.active -= 1
            await request.close()  # a form Starlette parsed may have spooled files
        if self.cors is not None:
            await _add_cors_headers(self.cors, scope, response)
        return response

    async def _handled(self, request: Request, exc: Exception) -> Response:
        """The answer the app's exception handlers give (HTTPException, UnknownModel, QueueFull, ... and Exception)."""
        for cls in type(exc).__mro__:
            handler = self.fastapi.exception_handlers.get(cls)
            if handler is not None:
                response = handler(request, exc)
                return await response if inspect.isawaitable(response) else response
        raise exc

