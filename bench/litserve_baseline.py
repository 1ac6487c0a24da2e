"""The `litserve` baseline (bench/baselines.py): LitServe with dynamic batching at vae-serve's default limits.

A module of its own: LitServe starts its inference worker in a fresh process, which imports this class by name.
No `from __future__ import annotations`: LitServe reads the request model from `decode_request`'s annotation."""

from pathlib import Path

import litserve
import numpy as np
import torch
from fastapi import Response

from bench.baselines import SampleRequest, load_decoder, png_level
from service import imaging
from service.repository import pick_device
from service.settings import Settings


class LitVAE(litserve.LitAPI):  # type: ignore[misc]
    def __init__(self, model_dir: Path, **options: object) -> None:
        super().__init__(**options)
        self.model_dir = model_dir

    def setup(self, device: str) -> None:
        self.draw, self.latent_dim = load_decoder(self.model_dir, device)

    def decode_request(self, request: SampleRequest) -> torch.Tensor:
        return torch.randn(self.latent_dim)

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, z: torch.Tensor) -> np.ndarray:
        return self.draw(z)

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, pixels: np.ndarray) -> Response:
        return Response(imaging.png_bytes(pixels, png_level()), media_type="image/png")


def run(model_dir: Path, device: str, port: int) -> None:
    defaults = Settings.model_fields
    api = LitVAE(model_dir, max_batch_size=defaults["max_batch_size"].default,
                 batch_timeout=defaults["max_wait_ms"].default / 1000, api_path="/sample")
    server = litserve.LitServer(api, accelerator=pick_device(device).type, devices=1, workers_per_device=1)
    server.run(host="127.0.0.1", port=port, generate_client_file=False, log_level="warning")
