"""The same model served by general-purpose means, for the bench to load as it loads vae-serve.

- `fastapi`: the server a user writes first. A FastAPI route on uvicorn decodes each request on its own, in
  FastAPI's thread pool.
- `litserve`: LitServe (Lightning AI), a general-purpose model server with dynamic batching, at vae-serve's
  own defaults: batches of up to 64 that wait up to 2 ms for company (VAE_MAX_BATCH_SIZE, VAE_MAX_WAIT_MS).

Both answer `POST /sample` with vae-serve's JSON body (`{"model": ..., "n": 1}`) with one PNG, and do the same
work for it: the model loaded by `repository.load_model` (vae-serve's layout and precision; no CUDA graphs,
which a general-purpose server does not capture), called through the decode batcher's own `batcher.compute`
(output checks and uint8 conversion), and the same PNG encoder. What differs is the serving.

    python -m bench.baselines fastapi --model-dir models/faces --port 8001 [--device auto]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Response
from pydantic import BaseModel, Field

from service import batcher, imaging
from service.repository import load_model, pick_device

BASELINES = ("fastapi", "litserve")
HEALTH_PATH = "/health"  # LitServe's own; 200 once the model is loaded


class SampleRequest(BaseModel):
    model: str
    n: int = Field(1, ge=1, le=1)  # one image per request: the scenarios they are compared on


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
    app = FastAPI()

    @app.get(HEALTH_PATH)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/sample")
    def sample(request: SampleRequest) -> Response:  # a plain def: FastAPI runs it in its thread pool
        pixels = draw(torch.randn(1, latent_dim))
        return Response(imaging.png_bytes(pixels[0]), media_type="image/png")

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
    else:
        from bench import litserve_baseline  # the bench extra installs LitServe; the other baseline does without

        litserve_baseline.run(args.model_dir, args.device, args.port)


if __name__ == "__main__":
    main()
