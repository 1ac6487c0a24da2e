"""Shared fixtures: tiny artifacts made with `train/`, settings, and an in-process client (lifespan on)."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from service.app import create_app
from service.settings import Settings
from train.export import export
from train.face_vae import FaceVAE, FaceVAEConfig
from train.mnist_vae import MnistVAE, MnistVAEConfig

REPO = Path(__file__).resolve().parents[1]


def make_tiny_models(directory: Path) -> Path:
    """A model repository with an untrained `mnist` (1x28x28, z=2) and `faces` (3x32x32, z=8)."""
    torch.manual_seed(0)
    mnist = MnistVAE(MnistVAEConfig(latent_dim=2, hidden_dim=16))
    faces = FaceVAE(FaceVAEConfig(latent_dim=8, image_size=32, channels=(4, 4, 8, 8, 8), hidden_dim=16))
    common: dict[str, Any] = {"data": {"name": "generated"}, "training": {"epochs": 0}, "metrics": {}}
    export(mnist, directory / "mnist", name="mnist", architecture="mnist_fc_vae",
           extra={"upload_normalization": "digit"}, **common)
    export(faces, directory / "faces", name="faces", architecture="face_conv_vae", **common)
    return directory


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture
def settings(tiny_models: Path) -> Settings:
    return Settings(model_dir=tiny_models, max_wait_ms=1.0)


@asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app for `settings` with its lifespan running and its models loaded."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await app.state.loading
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            client.app = app  # type: ignore[attr-defined]  # tests may look at app.state
            yield client


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(settings) as c:
        yield c


def png(array: np.ndarray | None = None, *, size: tuple[int, int] = (40, 40), mode: str = "RGB") -> bytes:
    """PNG bytes of `array` (uint8), or of a gradient of `size` in `mode`."""
    if array is None:
        w, h = size
        gradient = np.linspace(0, 255, w * h, dtype=np.float64).reshape(h, w).astype(np.uint8)
        image = Image.fromarray(gradient, "L").convert(mode)
    else:
        image = Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


ImageFactory = Callable[..., bytes]


@pytest.fixture
def make_png() -> ImageFactory:
    return png
