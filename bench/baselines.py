"""The same model served by general-purpose means, for the bench to load as it loads vae-serve.

- `fastapi`: the server a user writes first. A FastAPI route on uvicorn decodes each request on its own, in
  FastAPI's thread pool.
- `litserve`: LitServe (Lightning AI), a general-purpose model server with dynamic batching, at vae-serve's
  own defaults: batches of up to 64 that wait up to 2 ms for company (VAE_MAX_BATCH_SIZE, VAE_MAX_WAIT_MS).
- `asgi`: the floor under both: the least a server on uvicorn can do. A bare ASGI app (no framework, batching,
  metrics or log lines) hands each request's decode and PNG to one thread of its own, the model loaded and warmed
  up there, with vae-serve's malloc settings: what a lone request costs over the work itself with nothing but
  uvicorn, one hand-off each way and the client in between.

All three answer `POST /sample` with vae-serve's JSON body (`{"model": ..., "n": 1}`) with one PNG, and do the same
work for it: the model loaded by `repository.load_model` (vae-serve's layout and precision; no CUDA graphs,
which a general-purpose server does not capture), called through the decode batcher's own `batcher.compute`
(output checks and uint8 conversion), and the same PNG encoder. What differs is the serving.

    python -m bench.baselines fastapi --model-dir models/faces --port 8001 [--device auto]
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Response
from pydantic import BaseModel, Field, ValidationError
from starlette.types import Receive, Scope, Send

from service import batcher, imaging, malloc
from service.repository import load_model, pick_device

BASELINES = ("fastapi", "litserve", "asgi")
HEALTH_PATH = "/health"  # LitServe's own; 200 once the model is loaded


class SampleRequest(BaseModel):
    model: str
    n: int = Field(1, ge=1, le=1)  # one image per request: the scenarios they are compared on


def png_level() -> int | None:
    """`imaging.png_bytes`' level, as the service's VAE_PNG_COMPRESSION sets it (the bench sets it for the baselines
    too, and LitServe's worker, a fresh process, reads it from the environment as well)."""
    return imaging.png_level(os.environ.get("VAE_PNG_COMPRESSION", "fast"))


def load_decoder(model_dir: Path, device: str) -> tuple[Callable[[torch.Tensor], np.ndarray], int]:
    """Latents (B, latent_dim) -> uint8 pixels (B, H, W, C) on the host, by the decode batcher's own model call
    (`batcher.compute`, as the ceiling times it), and the model's latent size."""
    served = load_model(model_dir, pick_device(device), graph_sizes=())
    if not served.ready or served.artifact is None:
        raise SystemExit(f"{model_dir} does not load: {served.error}")
    predict = served.predictor("decode")

    def draw(z: torch.Tensor) -> np.ndarray:
        return batcher.compute(served.name, predict, imaging.quantize, z)[0].numpy()

    return draw, served.artifact.latent_dim


def fastapi_app(model_dir: Path, device: str) -> FastAPI:
    draw, latent_dim = load_decoder(model_dir, device)
    level = png_level()
    app = FastAPI()

    @app.get(HEALTH_PATH)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/sample")
    def sample(request: SampleRequest) -> Response:  # a plain def: FastAPI runs it in its thread pool
        pixels = draw(torch.randn(1, latent_dim))
        return Response(imaging.png_bytes(pixels[0], level), media_type="image/png")

    return app


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


def asgi_app(model_dir: Path, device: str) -> Callable[[Scope, Receive, Send], Any]:
    """The floor: a bare ASGI app that decodes and encodes each request's image on one thread of its own. The model is
    loaded and warmed up on that thread, so that its OpenMP team is the only one (service/runtime.py says why)."""
    malloc.reuse_freed_memory()
    thread = ThreadPoolExecutor(1, thread_name_prefix="model")
    draw, latent_dim = thread.submit(load_decoder, model_dir, device).result()
    level = png_level()

    def png() -> bytes:
        return imaging.png_bytes(draw(torch.randn(1, latent_dim))[0], level)

    thread.submit(png).result()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        if body is None:  # the client went away
            return
        status, content_type, content = 404, b"text/plain", b"not found"
        if scope["path"] == HEALTH_PATH:
            status, content = 200, b"ok"
        elif scope["path"] == "/sample" and scope["method"] == "POST":
            try:
                SampleRequest.model_validate_json(body)
                status, content_type, content = 200, b"image/png", await asyncio.wrap_future(thread.submit(png))
            except ValidationError as exc:
                status, content_type, content = 422, b"application/json", exc.json().encode()
        headers = [(b"content-type", content_type), (b"content-length", str(len(content)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    return app


def command(server: str, model_dir: Path, device: str, port: int, python: str) -> list[str]:
    """How the bench starts one baseline (bench/__main__.py)."""
    return [python, "-m", "bench.baselines", server, "--model-dir", str(model_dir), "--port", str(port),
            "--device", device]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.baselines", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("server", choices=BASELINES)
    p.add_argument("--model-dir", type=Path, required=True, help="one model's folder, e.g. models/faces")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    args = p.parse_args(argv)
    if args.server == "fastapi":
        uvicorn.run(fastapi_app(args.model_dir, args.device), host="127.0.0.1", port=args.port, log_level="warning")
    elif args.server == "asgi":  # as vae-serve runs uvicorn: no access log, no proxy-headers middleware
        uvicorn.run(asgi_app(args.model_dir, args.device), host="127.0.0.1", port=args.port, log_level="warning",
                    access_log=False, proxy_headers=False, lifespan="off")
    else:
        from bench import litserve_baseline  # the bench extra installs LitServe; the other baseline does without

        litserve_baseline.run(args.model_dir, args.device, args.port)


if __name__ == "__main__":
    main()
