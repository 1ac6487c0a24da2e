"""The ceiling: what one Python thread gets from a model in-process, with no HTTP, batcher or event loop.

Each mode does, for one batch, exactly the work the service does for it, with the model loaded as the service
loads it (`load_model`: its precision, and its CUDA graphs on a GPU):
- `decode`: the decode batcher's call (`batcher.compute`): the model's decode, the output checks,
  `imaging.quantize` to uint8 pixels and the copy to the CPU;
- `decode+png`: the same, then the PNG of each image (`imaging.png_files`, as a batch's thread writes them);
- `upload+encode`: `imaging.prepare_uploads` of the batch's uploaded PNGs, together as a batch's thread prepares them,
  then the model's encode (what /encode does).
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
from service import batcher, cpus, imaging, malloc
from service.artifact import Artifact
from service.repository import ServedModel, load_model
from service.settings import Settings

MODES = ("decode", "decode+png", "upload+encode")
# What VAE_TORCH_THREADS=0 gives the service: torch's default, read at import before anything changes it, at most the
# CPUs the process may use (service/cpus.py)
DEFAULT_THREADS = min(torch.get_num_threads(), cpus.usable_cpus())
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


def sample_upload(decode: Callable[[torch.Tensor], Any], latent_dim: int) -> bytes:
    """A PNG the model drew itself (seed 0): a realistic upload of exactly the model's size."""
    z = torch.randn(1, latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return imaging.png_bytes(imaging.quantize(decode(z)).cpu().numpy()[0])


@dataclass(frozen=True)
class Workload:
    """One model loaded in the bench process as the service loads it, and the upload its encode mode uses."""

    artifact: Artifact
    model: ServedModel
    upload: bytes
    png_level: int | None = None  # imaging.png_bytes' level, as the service's VAE_PNG_COMPRESSION sets it

    @classmethod
    def load(cls, artifact: Artifact, device: torch.device, dtype: torch.dtype = torch.float32,
             graph_sizes: tuple[int, ...] = (), png_level: int | None = None) -> Workload:
        malloc.reuse_freed_memory()  # as the service's Runtime.load does: the ceiling runs with the same allocator
        model = load_model(artifact.directory, device, dtype, graph_sizes)
        if not model.ready:
            raise RuntimeError(f"{artifact.directory} does not load: {model.error}")
        return cls(artifact, model, sample_upload(model.predictor("decode"), artifact.latent_dim), png_level)

    def work(self, mode: str, batch: int) -> Callable[[], Any]:
        """One batch of `mode`: exactly what the service does for it."""
        artifact, decoder, encoder = self.artifact, self.model.predictor("decode"), self.model.predictor("encode")
        z = torch.randn(batch, artifact.latent_dim, generator=torch.Generator().manual_seed(batch))
        digit = artifact.manifest.get("upload_normalization") == "digit"

        def decode() -> np.ndarray:
            return batcher.compute(artifact.directory.name, decoder, imaging.quantize, z)[0].numpy()

        def decode_png() -> list[bytes]:
            return imaging.png_files(decode(), self.png_level)

        def upload_encode() -> tuple[torch.Tensor, ...]:
            arrays = imaging.prepare_uploads([self.upload] * batch, artifact.image_shape, max_pixels=_MAX_PIXELS, digit=digit)
            x = torch.from_numpy(np.stack(arrays))  # type: ignore[arg-type]  # the model's own PNG: no failure
            with torch.inference_mode():
                mu, log_var = encoder(x)
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
