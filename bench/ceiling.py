"""The ceiling: what one Python thread gets from a model in-process, with no HTTP, batcher or event loop.

Each mode does, for one batch, exactly the work the service does for it:
- `decode`: `module.decode(z)` and the copy back to float32 on the CPU (the batcher's `_call`);
- `decode+png`: `module.decode(z)`, `imaging.quantize` to uint8 pixels and the copy to the CPU (the decode
  batcher's `_call`), then one `imaging.png_bytes` per image, one after another;
- `upload+encode`: `imaging.prepare_upload` for each uploaded PNG, then `module.encode` (what /encode does).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bench.server import machine_busy_seconds
from service import imaging
from service.artifact import Artifact
from service.settings import Settings

MODES = ("decode", "decode+png", "upload+encode")
DEFAULT_THREADS = torch.get_num_threads()  # read at import, before anything changes it
_MAX_PIXELS: int = Settings.model_fields["max_image_pixels"].default


@dataclass(frozen=True)
class CeilingRow:
    model: str
    mode: str
    batch: int
    threads_setting: int  # what VAE_TORCH_THREADS would say: 0 is torch's default
    threads: int  # torch intra-op threads actually in use
    median_s: float  # one batch, start to finish
    iterations: int
    images_per_s: float  # batch / median_s
    other_cores: float  # CPU other processes used meanwhile: above ~0.2, the machine was not quiet


@contextmanager
def torch_threads(setting: int) -> Iterator[int]:
    """Run with `setting` intra-op threads (0: torch's default), as VAE_TORCH_THREADS would; yields the count."""
    torch.set_num_threads(setting or DEFAULT_THREADS)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(DEFAULT_THREADS)


def time_call(fn: Callable[[], Any], min_time_s: float, min_iterations: int = 3, warm_up: int = 3) -> tuple[float, int]:
    """(median seconds of one call, calls timed). The first calls are not timed: TorchScript specialises
    on new shapes in its first runs, and the allocator grows."""
    for _ in range(warm_up):
        fn()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_iterations or time.perf_counter() - started < min_time_s:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), len(times)


def sample_upload(module: Any, artifact: Artifact, device: torch.device) -> bytes:
    """A PNG the model drew itself (seed 0): a realistic upload of exactly the model's size."""
    z = torch.randn(1, artifact.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        image = module.decode(z.to(device)).float().cpu()
    return imaging.png_bytes(imaging.to_uint8(image)[0])


@dataclass(frozen=True)
class Workload:
    """One model loaded in the bench process, and the upload its encode mode uses."""

    artifact: Artifact
    module: Any
    device: torch.device
    upload: bytes

    @classmethod
    def load(cls, artifact: Artifact, device: torch.device) -> Workload:
        module = artifact.load(device)
        return cls(artifact, module, device, sample_upload(module, artifact, device))

    def work(self, mode: str, batch: int) -> Callable[[], Any]:
        """One batch of `mode`: exactly what the service does for it."""
        module, device, artifact = self.module, self.device, self.artifact
        z = torch.randn(batch, artifact.latent_dim, generator=torch.Generator().manual_seed(batch))
        digit = artifact.manifest.get("upload_normalization") == "digit"

        def decode() -> torch.Tensor:
            with torch.inference_mode():
                return module.decode(z.to(device)).float().cpu()

        def decode_png() -> list[bytes]:
            with torch.inference_mode():
                tiles = imaging.quantize(module.decode(z.to(device))).cpu().numpy()
            return [imaging.png_bytes(tile) for tile in tiles]

        def upload_encode() -> tuple[torch.Tensor, ...]:
            arrays = [
                imaging.prepare_upload(self.upload, artifact.image_shape, max_pixels=_MAX_PIXELS, digit=digit)
                for _ in range(batch)
            ]
            x = torch.from_numpy(np.stack(arrays))
            with torch.inference_mode():
                mu, log_var = module.encode(x.to(device))
            return mu.float().cpu(), log_var.float().cpu()

        return dict(zip(MODES, (decode, decode_png, upload_encode), strict=True))[mode]

    def measure(self, mode: str, batch: int, threads_setting: int, min_time_s: float) -> CeilingRow:
        with torch_threads(threads_setting) as threads:
            fn = self.work(mode, batch)
            wall, own, busy = time.perf_counter(), time.process_time(), machine_busy_seconds()
            median_s, iterations = time_call(fn, min_time_s)
            wall, own = time.perf_counter() - wall, time.process_time() - own
        other = max(0.0, (machine_busy_seconds() - busy - own) / wall)
        return CeilingRow(
            model=self.artifact.directory.name, mode=mode, batch=batch, threads_setting=threads_setting,
            threads=threads, median_s=median_s, iterations=iterations, images_per_s=batch / median_s,
            other_cores=other,
        )


def measure_model(workload: Workload, batches: tuple[int, ...], threads_setting: int, min_time_s: float) -> list[CeilingRow]:
    """Every mode at every batch size for one model, at one thread setting."""
    return [workload.measure(mode, batch, threads_setting, min_time_s) for batch in batches for mode in MODES]
