"""What the routes call: the loaded models, their batchers and the threads that do the heavy work.

The event loop never runs model code (one model thread) or PNG encoding and image decoding (a small
pool of image threads; Pillow releases the GIL while it compresses).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from service import imaging
from service.batcher import Batcher, NotServing
from service.metrics import Metrics
from service.repository import ServedModel, describe, discover, load_model, pick_device
from service.settings import Settings

log = logging.getLogger("vae_serve.runtime")


class UnknownModel(LookupError):
    """No model of that name in the repository: answer 404."""


class ModelUnavailable(RuntimeError):
    """The model exists but failed to load: answer 503 with the reason."""


@dataclass
class Runtime:
    settings: Settings
    metrics: Metrics
    device: torch.device
    models: dict[str, ServedModel]
    encoders: dict[str, Batcher]
    decoders: dict[str, Batcher]
    model_thread: ThreadPoolExecutor
    image_threads: ThreadPoolExecutor
    draining: bool = False

    @classmethod
    def load(cls, settings: Settings, metrics: Metrics) -> Runtime:
        """Load and warm up every model in the repository (slow: call it off the event loop)."""
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        device = pick_device(settings.device)
        models = {d.name: load_model(d, device) for d in discover(settings.model_dir)}
        if not models:
            log.error("no models in %s: every folder there with a manifest.json is served", settings.model_dir)
        for model in models.values():
            metrics.model_ready.labels(model.name).set(1 if model.ready else 0)
            if model.artifact is not None:
                m = model.artifact.manifest
                metrics.model_info.labels(model.name).info(
                    {"version": str(m.get("version", "")), "sha256": model.artifact.sha256, "device": str(device)}
                )
        return cls(
            settings=settings,
            metrics=metrics,
            device=device,
            models=models,
            encoders={},
            decoders={},
            model_thread=ThreadPoolExecutor(max_workers=1, thread_name_prefix="model"),
            image_threads=ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="image"),
        )

    def start(self) -> None:
        """Start one encode and one decode batcher per ready model (inside the event loop)."""
        s = self.settings
        for name, model in self.models.items():
            if not model.ready:
                continue
            module, device = model.module, self.device
            for op, table, predict in (
                ("encode", self.encoders, lambda x, m=module, d=device: m.encode(x.to(d))),
                ("decode", self.decoders, lambda z, m=module, d=device: m.decode(z.to(d))),
            ):
                table[name] = Batcher(
                    name, op, predict, self.model_thread, self.metrics,
                    max_batch_size=s.max_batch_size, max_wait_s=s.max_wait_ms / 1000, queue_size=s.queue_size,
                )
                table[name].start()

    async def drain(self) -> None:
        """Stop admitting work, finish what was admitted (bounded), then stop the threads."""
        self.draining = True
        batchers = [*self.encoders.values(), *self.decoders.values()]
        await asyncio.gather(*(b.drain(self.settings.drain_timeout_s) for b in batchers))
        self.model_thread.shutdown(wait=False, cancel_futures=True)
        self.image_threads.shutdown(wait=False, cancel_futures=True)

    # --- what the routes use ---------------------------------------------------------------------

    def model(self, name: str) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise UnknownModel(f"no model named {name[:100]!r}; served models: {known}")
        if not model.ready:
            raise ModelUnavailable(f"model {name!r} is not available: {model.error}")
        if self.draining:
            raise NotServing("the service is shutting down")
        return model

    def readiness(self) -> tuple[bool, dict[str, str]]:
        status = {name: "ready" if m.ready else f"failed: {m.error}" for name, m in self.models.items()}
        ready_models = [m for m in self.models.values() if m.ready]
        if self.draining:
            return False, status
        if self.settings.strict:
            return bool(self.models) and len(ready_models) == len(self.models), status
        return bool(ready_models), status

    def describe(self) -> list[dict[str, Any]]:
        return [describe(m) for m in self.models.values()]

    async def decode(self, name: str, z: Tensor) -> Tensor:
        (images,) = await self.decoders[name].submit(z, self.settings.request_timeout_s)
        self.metrics.images.labels(name).inc(len(images))
        return images

    async def encode(self, name: str, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, log_var = await self.encoders[name].submit(x, self.settings.request_timeout_s)
        return mu, log_var

    async def prepare_uploads(self, model: ServedModel, files: list[bytes], invert: bool | None) -> Tensor:
        """Decode and convert uploads on the image threads; (N, C, H, W) float in [0, 1]."""
        loop = asyncio.get_running_loop()
        digit = model.artifact is not None and model.artifact.manifest.get("upload_normalization") == "digit"
        arrays = await asyncio.gather(
            *(
                loop.run_in_executor(
                    self.image_threads,
                    functools.partial(
                        imaging.prepare_upload, data, model.image_shape,
                        max_pixels=self.settings.max_image_pixels, invert=invert, digit=digit,
                    ),
                )
                for data in files
            )
        )
        return torch.from_numpy(np.stack(arrays))

    async def pngs(self, images: Tensor) -> list[bytes]:
        """One PNG per image, encoded in parallel on the image threads."""
        loop = asyncio.get_running_loop()
        tiles = imaging.to_uint8(images)
        return list(await asyncio.gather(*(loop.run_in_executor(self.image_threads, imaging.png_bytes, t) for t in tiles)))

    async def grid_png(self, images: Tensor, columns: int | None) -> bytes:
        """One PNG: the image itself for one image, a grid for several."""
        loop = asyncio.get_running_loop()
        tiles = imaging.to_uint8(images)
        if len(tiles) == 1:
            return await loop.run_in_executor(self.image_threads, imaging.png_bytes, tiles[0])
        return await loop.run_in_executor(
            self.image_threads, lambda: imaging.png_bytes(imaging.grid(tiles, columns))
        )
