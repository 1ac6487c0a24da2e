"""What the routes call: the loaded models, their batchers and the threads that do the heavy work.

The event loop never runs model code (the model thread, and on a CPU under load the lanes of lanes.py), nor image
decoding but a digit's. Where single-thread lanes share every core (`images_on_batch_thread`), the PNGs of a one-image
answer and of a JSON answer are encoded by the batch's own thread right after its decode (`decode_png`,
`decode_base64_pngs`), and an `/encode` request's one upload is decoded by its batch's thread right before the encode
(`encode_uploads`). Other PNGs (grids; and on a GPU, or with a core to spare, all of them) go to a small pool of
image threads (ISA-L's deflate and Pillow release the GIL while they (de)compress), or stay on the event loop where a
hand-off would cost it more (`_inline_png`: the small images of the one request in progress, or one small PNG under
load).

Every torch op that is large enough to run in parallel runs on the model thread, loading and warm-up
included; a lane has one torch thread, so its ops never do. With OpenMP each thread that starts a parallel
op gets its own team of worker threads; once teams hold more threads than there are cores, libgomp cuts how
long idle workers spin before sleeping, and every op then pays to wake them: a batch-1 faces decode measured
3.3 ms with one team, 5.0 ms with two.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from isal import isal_zlib
from PIL import Image
from torch import Tensor

from service import cpus, graphs, imaging, malloc
from service.batcher import Batcher, Inputs, NotServing, as_float32
from service.lanes import Lanes, single_thread_lanes
from service.metrics import Metrics
from service.repository import ServedModel, describe, discover, load_model, pick_device, pick_dtype
from service.settings import Settings
from service.uploads import Upload

log = logging.getLogger("vae_serve.runtime")
_T = TypeVar("_T")
USABLE_CPUS = cpus.usable_cpus()  # the affinity mask, capped by a container's CPU quota
# PNG encoding and upload decoding: ISA-L's deflate and Pillow release the GIL. The CPUs this process may use, not the
# host's: a container limited to 2 of 64 cores would otherwise split every answer's PNGs 64 ways.
IMAGE_THREADS = max(2, USABLE_CPUS)
INLINE_PNG_BYTES = 64 * 1024  # uint8 pixels a lone request may encode on the event loop: a 96x96 RGB image is 27 KiB
SMALL_PNG_BYTES = 4 * 1024  # uint8 pixels of a single PNG that any request encodes on the event loop: a 28x28 digit is 784
# A request's one upload is prepared on the event loop where it has at most so many bytes and pixels: a digit's PNG
# (28x28) is a few hundred bytes and 784 pixels, a faces photo (96x96 and more) stays on the image threads
SMALL_UPLOAD_BYTES = 16 * 1024
SMALL_UPLOAD_PIXELS = 64 * 64
# With `images_on_batch_thread`, a request's one upload of at most so many times the model's pixels (twice its size
# each way) is decoded by its batch's thread (`encode_uploads`): a faces upload of 192x192 takes about 1 ms there.
UPLOAD_ON_BATCH_PIXELS = 4
# An image thread goes on with a request's next upload until its turn has taken this long: a digit takes 0.1-0.2 ms,
# a faces image about 0.3, a photo tens of ms (`prepare_uploads`).
UPLOAD_TURN_S = 0.005
# Small images (SMALL_UPLOAD_BYTES, SMALL_UPLOAD_PIXELS) are prepared up to so many at once (`imaging.prepare_uploads`):
# 16 digits take about 1 ms so, against 2 one by one.
UPLOAD_CHUNK = 16
PNG_CHUNK_BYTES = 64 * 1024  # uint8 pixels of a request's PNGs for each image thread that encodes them (`base64_pngs`)
PNG_PART_BYTES = 128 * 1024  # a PNG of two of these or more (in pixels) is deflated on the image threads in parts of this or more


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
    lanes: Lanes  # the model thread, and on a CPU the single-thread lanes used under load
    image_threads: ThreadPoolExecutor
    draining: bool = False
    active: int = 0  # requests in progress, counted by the app's middleware: a drain waits for them
    spare_core: bool = False  # on the CPU with fewer torch threads than cores: a decode leaves a core to the PNG threads

    @property
    def png_level(self) -> int | None:
        return imaging.png_level(self.settings.png_compression)

    @classmethod
    def load(cls, settings: Settings, metrics: Metrics) -> Runtime:
        """Load and warm up every model in the repository on the model thread (slow: call it off the event loop)."""
        device, dtype = pick_device(settings.device), pick_dtype(settings.precision)
        threads = pick_threads(settings.torch_threads, device, settings.workers)
        if threads != torch.get_num_threads():
            log.info("torch threads %d -> %d", torch.get_num_threads(), threads)
            torch.set_num_threads(threads)
        malloc.reuse_freed_memory()
        sizes = graphs.batch_sizes(settings.max_batch_size) if settings.cuda_graphs else ()
        # The thread sets its own count: a new thread starts from the count last set on any thread, and a lane sets 1.
        # An app created after another in one process (the tests, an embedding app) computed on one thread, lane-less.
        model_thread = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="model", initializer=torch.set_num_threads, initargs=(threads,)
        )
        models = model_thread.submit(
            lambda: {d.name: load_model(d, device, dtype, sizes) for d in discover(settings.model_dir)}
        ).result()
        if not models:
            log.error("no models in %s: every folder there with a manifest.json is served", settings.model_dir)
        for model in models.values():
            metrics.model_ready.labels(model.name).set(1 if model.ready else 0)
            if model.artifact is not None:
                m = model.artifact.manifest
                metrics.model_info.labels(model.name).info({
                    "version": str(m.get("version", "")), "sha256": model.artifact.sha256, "device": str(device),
                    "precision": model.precision, "cuda_graphs": str(bool(model.graphs)).lower(),
                })
        threads = model_thread.submit(torch.get_num_threads).result()  # the count the model thread computes with
        lanes = (settings.cpu_lanes or default_lanes(threads)) if device.type == "cpu" else 1
        return cls(
            settings=settings,
            metrics=metrics,
            device=device,
            models=models,
            encoders={},
            decoders={},
            lanes=Lanes(model_thread, single_thread_lanes(lanes) if lanes > 1 else ()),
            image_threads=ThreadPoolExecutor(max_workers=IMAGE_THREADS, thread_name_prefix="image"),
            spare_core=device.type == "cpu" and threads < USABLE_CPUS,
        )

    @property
    def alone(self) -> bool:
        """Whether the request asking is the only one in progress (the middleware counts it among `active`): then
        nothing else waits for the event loop or a thread, and its work can skip the hand-offs meant for company."""
        return self.active <= 1

    @property
    def images_on_batch_thread(self) -> bool:
        """Whether a batch's own thread encodes the PNGs its requests answer with, right after the decode, and decodes
        the uploads it encodes, right before: where single-thread lanes share every core (lanes exist only on a CPU),
        each lane does its own batch's while another computes. Elsewhere the image threads do them in parallel: on a
        GPU the model thread goes on to the next batch, and with a spare core they use it meanwhile."""
        return bool(self.lanes.singles) and not self.spare_core

    @property
    def max_batch_size(self) -> int:
        """Images per model call: with lanes, the settings' limit is shared between them, so that the batches in
        flight together hold no more images (and no more memory) than one batch on the model thread would."""
        return max(1, self.settings.max_batch_size // max(1, len(self.lanes.singles)))

    def start(self, active_connections: Callable[[], int] | None = None) -> None:
        """Start one encode and one decode batcher per ready model (inside the event loop). `active_connections`: what
        the HTTP server says of its connections (`Batcher`)."""
        s = self.settings
        for name, model in self.models.items():
            if not model.ready:
                continue
            for op, table, finish in (("encode", self.encoders, as_float32), ("decode", self.decoders, imaging.quantize)):
                table[name] = Batcher(
                    name, op, model.predictor(op), self.lanes, self.metrics,
                    max_batch_size=self.max_batch_size, max_wait_s=s.max_wait_ms / 1000, queue_size=s.queue_size,
                    finish=finish, active_connections=active_connections,
                )
                table[name].start()

    async def drain(self) -> None:
        """Stop admitting work, finish what was admitted (bounded), then stop the threads."""
        self.draining = True
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.settings.drain_timeout_s
        batchers = [*self.encoders.values(), *self.decoders.values()]
        await asyncio.gather(*(b.drain(self.settings.drain_timeout_s) for b in batchers))
        while self.active and loop.time() < give_up:  # their last steps, PNG encoding, need the image threads
            await asyncio.sleep(0.01)
        self.lanes.shutdown()
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

    async def decode(self, name: str, z: Inputs) -> Tensor:
        """Latents (N, latent_dim) -> uint8 images (N, H, W, C), ready for PNG encoding."""
        (images,) = await self.decoders[name].submit(z, self.settings.request_timeout_s, alone=self.alone)
        self.metrics.images.labels(name).inc(len(images))
        return images

    async def decode_png(self, name: str, z: Inputs) -> bytes:
        """One latent (1, latent_dim), or what draws it on the batch's thread (`batcher.Deferred`) -> its image's PNG.
        With `images_on_batch_thread`, the batch's thread encodes it right after the decode (`then`), not the event loop
        or an image thread after two more hand-offs. 2 cores, 2 torch threads, alternating servers: mnist at 64
        connections 3,727 -> 4,043 requests/s; faces alone p99 9.4 -> 3.3 ms (p50 within the noise), at 8 and 64
        connections the same (bench/README.md)."""
        if not self.images_on_batch_thread:
            return await self.grid_png(await self.decode(name, z), None)
        (png,) = await self._decode_then(name, z, functools.partial(_pngs_of, level=self.png_level))
        return png

    async def _decode_then(self, name: str, z: Inputs, then: Callable[[tuple[Tensor, ...]], list[bytes]]) -> list[bytes]:
        """Decode `z` in batch-sized parts, each put through `then` (one item per image) on its batch's thread."""
        decoder = self.decoders[name]
        if len(z) <= decoder.max_batch_size:  # one part, as most requests are: no async generator (`Batcher.one`)
            pngs: list[bytes] = await decoder.one(z, self.settings.request_timeout_s, alone=self.alone, then=then)
            self.metrics.images.labels(name).inc(len(pngs))
            return pngs
        done: list[bytes] = []
        parts = decoder.parts(z, self.settings.request_timeout_s, decoder.max_batch_size, alone=self.alone, then=then)
        async with contextlib.aclosing(parts) as results:  # a part failed: the others are dropped
            async for result in results:
                self.metrics.images.labels(name).inc(len(result))
                done += result
        return done

    async def decode_base64_pngs(self, name: str, z: Tensor) -> list[bytes]:
        """Latents (N, latent_dim) -> one base64-encoded PNG per image, for a JSON answer.

        With `images_on_batch_thread` (2 torch threads on 2 cores: a lone n=64 request decodes its two halves on the two
        lanes side by side), each batch's thread encodes its part's PNGs right after the decode (`then`), without
        handing them to the image threads and back, and base64 is no longer the event loop's: `faces` n=64 at one
        connection 1,592 -> 1,640 images/s (alternating servers, faster in 5 of 5 rounds), a lone n=1 request 2.10 ->
        1.86 ms p50 (bench/README.md). Elsewhere the image threads encode them. When it is the only request in
        progress and the decode leaves a core free (on the CPU, fewer torch threads than cores), more than half a
        batch is decoded in parts of half a batch, and the image threads encode one part's PNGs while the model
        decodes the next: `faces` +8-16% images/s with 1 torch thread. With 2 threads such parts were no faster, and
        at 2 connections they only made smaller batches (-12%). Parts of 16 were slower than 32."""
        decoder = self.decoders[name]
        if self.images_on_batch_thread:
            return await self._decode_then(name, z, functools.partial(_base64_pngs_of, level=self.png_level))
        in_parts = self.spare_core and self.alone
        part_size = max(1, decoder.max_batch_size // 2) if in_parts else decoder.max_batch_size
        encoding: list[asyncio.Task[list[bytes]]] = []
        try:
            parts_of_z = decoder.parts(z, self.settings.request_timeout_s, part_size, alone=self.alone)
            async with contextlib.aclosing(parts_of_z) as parts:
                async for (images,) in parts:
                    self.metrics.images.labels(name).inc(len(images))
                    encoding.append(asyncio.ensure_future(self.base64_pngs(images)))
            return [png for part in await asyncio.gather(*encoding) for png in part]
        finally:
            for task in encoding:
                task.cancel()  # a part failed or timed out: the answer is an error, the PNGs are not needed

    async def encode(self, name: str, x: Inputs) -> tuple[Tensor, Tensor]:
        mu, log_var = await self.encoders[name].submit(x, self.settings.request_timeout_s, alone=self.alone)
        return mu, log_var

    async def encode_uploads(self, model: ServedModel, files: list[bytes], invert: bool | None) -> tuple[Tensor, Tensor]:
        """Decode uploads and encode them. Room in the encoder's queue is held before the uploads are decoded: when
        it is full, the request is refused (429) without the CPU spent on decoding.

        With `images_on_batch_thread`, a request's one upload of at most UPLOAD_ON_BATCH_PIXELS times the model's
        pixels (by its header, in a file of no more bytes than those pixels hold) is decoded by its batch's own thread
        (`uploads.Upload`), not handed to an image thread and back, a pass of the event loop each way (or, for a digit,
        prepared on the loop). 2 cores, one image at 32 connections, alternating servers: faces 862 -> 957 images/s, mnist 2,102 -> 2,696, the event loop's time a
        request 330 -> 244 and 399 -> 174 us (bench/README.md, *Uploads decoded by their batch's thread*). A larger
        upload goes to the image threads, so that no batch waits on its decode."""
        channels, height, width = model.image_shape
        most = UPLOAD_ON_BATCH_PIXELS * height * width
        uploads: list[bytes | Image.Image] = list(files)
        # Its header is read here, on the event loop: only in a file no larger than those pixels' own bytes, so that no
        # file makes the loop read long (a PNG's chunks, a JPEG's markers, all before the pixels).
        if self.images_on_batch_thread and len(files) == 1 and len(files[0]) <= most * channels:
            image = uploads[0] = imaging.open_upload(files[0], self.settings.max_image_pixels)  # not read again below
            if image.width * image.height <= most:
                upload = Upload(image, model.image_shape, invert, _digit(model), self.settings.max_image_pixels)
                return await self.encode(model.name, upload)
        with self.encoders[model.name].reserve(len(uploads)):
            x = await self.prepare_uploads(model, uploads, invert)
        return await self.encode(model.name, x)

    async def prepare_uploads(
        self, model: ServedModel, files: Sequence[bytes | Image.Image], invert: bool | None
    ) -> Tensor:
        """Decode and convert uploads (their bytes, or what `imaging.open_upload` read of them) on the image threads;
        (N, C, H, W) float in [0, 1]. (`encode_uploads` may have the batch's thread do it instead.)

        A request's one small upload (SMALL_UPLOAD_BYTES, SMALL_UPLOAD_PIXELS by its header) is prepared on the event
        loop instead: a digit takes it 0.1-0.2 ms, less than handing it to a thread and back, a loop pass each way. mnist
        /encode at 32 connections on 2 cores, alternating servers: 830 -> 1,190 requests/s, faster in 6 of 6 rounds
        (bench/README.md, *A small upload prepared on the event loop*). The header read first bounds the work: a small
        file can declare any size.

        Several uploads are prepared in turns: a thread prepares one upload after another until its turn has taken
        UPLOAD_TURN_S (at least one), rather than one upload a hand-off and a pass of the event loop. A request has at
        most IMAGE_THREADS turns on the threads at once, and one where its first upload is small: a digit is mostly
        Python's work with the GIL held, and two threads preparing digits at once took longer than one. The threads'
        queue is first come, first served, and 16 uploads of 40 megapixels each had held a one-image request behind
        them for 3.4 s: it now waits for one turn at most. On 2 cores, alternating servers, one connection: 64 digits
        in one request 23.8 -> 10.7 ms p50, 32 faces images 28.9 -> 25.1 ms (bench/README.md, *Several uploads in
        turns*). Within a turn, small images in a row are prepared up to UPLOAD_CHUNK at once (`take`), stage by stage:
        64 digits 10.4 -> 6.8 ms (*A batch's uploads prepared together*)."""
        loop = asyncio.get_running_loop()
        max_pixels = self.settings.max_image_pixels
        shape, digit = model.image_shape, _digit(model)
        prepare = functools.partial(imaging.prepare_upload, shape=shape, max_pixels=max_pixels, invert=invert, digit=digit)
        prepare_many = functools.partial(
            imaging.prepare_uploads, shape=shape, max_pixels=max_pixels, invert=invert, digit=digit
        )

        def small_image(upload: bytes | Image.Image) -> tuple[bytes | Image.Image, bool]:
            """The upload, its header read where its file is small (SMALL_UPLOAD_BYTES), and whether it is a small image
            (SMALL_UPLOAD_PIXELS by that header)."""
            if isinstance(upload, bytes) and len(upload) <= SMALL_UPLOAD_BYTES:
                upload = imaging.open_upload(upload, max_pixels)
            return upload, isinstance(upload, Image.Image) and upload.width * upload.height <= SMALL_UPLOAD_PIXELS

        uploads: list[bytes | Image.Image] = list(files)
        uploads[0], small = small_image(files[0])  # opened here, where small: its header is not read twice
        if len(uploads) == 1:  # one hand-off, or none
            array = prepare(uploads[0]) if small else await loop.run_in_executor(self.image_threads, prepare, uploads[0])
            return torch.from_numpy(array)[None]
        waiting = collections.deque(enumerate(uploads))  # popleft is atomic: the turns share it without a lock
        arrays: list[np.ndarray | None] = [None] * len(uploads)

        def take() -> list[tuple[int, bytes | Image.Image]]:
            """The next uploads to prepare: up to UPLOAD_CHUNK small images in a row (their headers read here), or one
            larger one."""
            chunk: list[tuple[int, bytes | Image.Image]] = []
            while len(chunk) < UPLOAD_CHUNK:
                try:
                    index, upload = waiting.popleft()
                except IndexError:  # the other turns took the last
                    break
                upload, small_one = small_image(upload)
                if not small_one:
                    if not chunk:
                        return [(index, upload)]
                    waiting.appendleft((index, upload))  # the next chunk's, or another turn's
                    break
                chunk.append((index, upload))
            return chunk

        def turn() -> None:
            ends = time.perf_counter() + UPLOAD_TURN_S
            while chunk := take():
                made = prepare_many([upload for _, upload in chunk])
                for (index, _), array in zip(chunk, made, strict=True):
                    if isinstance(array, Exception):
                        raise array
                    arrays[index] = array
                if time.perf_counter() >= ends:
                    return

        async def turns() -> None:
            while waiting:
                await loop.run_in_executor(self.image_threads, turn)

        try:
            await asyncio.gather(*(turns() for _ in range(1 if small else min(IMAGE_THREADS, len(uploads)))))
        finally:
            waiting.clear()  # an upload that failed, or the request cancelled: no more turns
        return torch.from_numpy(np.stack(arrays))  # type: ignore[arg-type]

    async def base64_pngs(self, images: Tensor) -> list[bytes]:
        """One base64-encoded PNG per uint8 image (N, H, W, C), encoded in parallel: one hand-off per image thread,
        not per image, and a thread only for every PNG_CHUNK_BYTES of pixels or more. A small image's PNG is mostly
        Python's work between short calls that let go of the GIL, and threads encoding such PNGs at once hold each
        other up: 64 digits took 1.45 ms on two threads against 1.24 on one (in-process, 2 cores)."""
        loop = asyncio.get_running_loop()
        tiles = images.numpy()
        if _inline_png(self.alone, tiles, pngs=len(tiles)):
            return _base64_pngs(tiles, self.png_level)
        chunks = np.array_split(tiles, max(1, min(len(tiles), IMAGE_THREADS, tiles.nbytes // PNG_CHUNK_BYTES)))
        parts = await asyncio.gather(
            *(loop.run_in_executor(self.image_threads, _base64_pngs, c, self.png_level) for c in chunks)
        )
        return [png for part in parts for png in part]

    async def grid_png(self, images: Tensor, columns: int | None) -> bytes:
        """One PNG of uint8 images (N, H, W, C): the image itself for one image, a grid for several."""
        tiles = images.numpy()

        def image() -> np.ndarray:
            return tiles[0] if len(tiles) == 1 else imaging.grid(tiles, columns)

        level = self.png_level
        if _inline_png(self.alone, tiles, pngs=1):
            return imaging.png_bytes(image(), level)
        if tiles.nbytes >= 2 * PNG_PART_BYTES and level is None:  # stored rows are written at memory speed: no parts
            return await self._png_in_parts(image)
        return await asyncio.get_running_loop().run_in_executor(self.image_threads, lambda: imaging.png_bytes(image(), level))

    async def _png_in_parts(self, image: Callable[[], np.ndarray]) -> bytes:
        """A large PNG with its rows deflated in parts on the image threads at once, joined into one file. On one
        thread an 8x8 grid of faces (1.8 MB of pixels) takes 23-30 ms: most of an n=64 answer on a GPU."""
        loop = asyncio.get_running_loop()

        def run(fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
            return loop.run_in_executor(self.image_threads, fn, *args)

        def filtered_rows() -> tuple[tuple[int, ...], np.ndarray]:
            whole = image()
            return whole.shape, imaging.png_rows(whole)

        shape, rows = await run(filtered_rows)
        chunks = np.array_split(rows, min(IMAGE_THREADS, rows.nbytes // PNG_PART_BYTES))
        adler = run(isal_zlib.adler32, rows.data)  # 5x zlib's speed
        parts = await asyncio.gather(*(run(imaging.deflate_rows, c, i == len(chunks) - 1) for i, c in enumerate(chunks)))
        return await run(imaging.png_from_parts, shape, parts, await adler)


def pick_threads(setting: int, device: torch.device, workers: int = 1) -> int:
    """Intra-op threads for the torch ops the service runs on the CPU. The setting when there is one. On a GPU, one:
    there the CPU's torch work is joining batches and copying them, and every thread of a larger OpenMP team spins
    after each op, which on an H200's 16 cores burned 7 of them under /encode load and served 0.7x the images of one
    thread (bench/README.md, *On a GPU*). On a CPU, torch's default, but at most this process's share of the CPUs it
    may use (torch counts the host's cores: see cpus.py), shared among the VAE_WORKERS processes: on 2 cores, 2 workers
    of 2 threads each served `mnist` `/encode` at 1,211 requests/s, as one process does, and of 1 thread each at 2,474
    (bench/README.md)."""
    if setting:
        return setting
    return 1 if device.type == "cuda" else max(1, min(torch.get_num_threads(), USABLE_CPUS // workers))


def default_lanes(torch_threads: int) -> int:
    """Two lanes where torch runs two threads: measured faster there (bench/README.md, CPU lanes). Elsewhere none: on
    4 and 16 cores lanes were faster under heavy load but slower for some requests, and with many lanes the shared
    batch limit makes every batch small."""
    return 2 if torch_threads == 2 else 1


def _digit(model: ServedModel) -> bool:
    """Whether the model's uploads get MNIST's size-and-centre normalisation (`imaging.prepare_upload`)."""
    return model.artifact is not None and model.artifact.manifest.get("upload_normalization") == "digit"


def _inline_png(alone: bool, tiles: np.ndarray, pngs: int) -> bool:
    """Whether `pngs` PNGs of `tiles` are encoded on the event loop, without the two thread hand-offs: the small images
    of the only request in progress (`Runtime.alone`: nothing else needs the loop meanwhile, and the hand-offs cost it
    0.1-0.2 ms), or, under load, one PNG of a few KiB of pixels, which costs the loop less than handing it to an image
    thread and back (a 28x28 digit 20 us, a 2x2 grid of them 33 us): mnist n=1 on 2 cores, 1,601 -> 2,234 images/s at
    64 connections and 1,650 -> 2,317 at 32 (alternating servers; bench/README.md). A faces image (27 KiB, 0.34 ms)
    under load stays on the image threads: on the loop, 64 connections were 5% slower. With `images_on_batch_thread` a
    one-image answer never comes here: its batch's thread encodes it (`Runtime.decode_png`)."""
    if alone:
        return tiles.nbytes <= INLINE_PNG_BYTES
    return pngs == 1 and tiles.nbytes <= SMALL_PNG_BYTES


def _base64_pngs(tiles: np.ndarray, level: int | None) -> list[bytes]:
    return [base64.b64encode(png) for png in imaging.png_files(tiles, level)]


def _pngs_of(outputs: tuple[Tensor, ...], level: int | None) -> list[bytes]:
    """A decoder's uint8 images (its one output) -> PNGs: what `decode_png` has a batch's thread do."""
    return imaging.png_files(outputs[0].numpy(), level)


def _base64_pngs_of(outputs: tuple[Tensor, ...], level: int | None) -> list[bytes]:
    """A decoder's uint8 images (its one output) -> base64 PNGs: what `decode_base64_pngs` has a batch's thread do."""
    return _base64_pngs(outputs[0].numpy(), level)
