"""Which thread does what: torch's parallel work stays on the one model thread, and OpenMP's idle spin is short."""

from __future__ import annotations

import base64
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch

from service import imaging, runtime
from service.metrics import Metrics
from service.runtime import Runtime
from service.settings import Settings
from tests.conftest import decode_png
from tests.service.tools import images_on_batch_thread


def test_models_load_and_warm_up_on_the_model_thread_that_later_runs_them(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded_on: list[str] = []
    real = runtime.load_model

    def load_model(*args, **kwargs):  # type: ignore[no-untyped-def]
        loaded_on.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(runtime, "load_model", load_model)
    rt = Runtime.load(settings, Metrics())
    try:
        model_thread = rt.lanes.model_thread.submit(lambda: threading.current_thread().name).result()
        assert loaded_on == [model_thread] * len(rt.models) and len(rt.models) >= 2
    finally:
        rt.lanes.shutdown()
        rt.image_threads.shutdown()


def test_the_model_thread_computes_with_the_threads_chosen_whatever_ran_in_the_process_before(settings: Settings) -> None:
    """A new thread starts from the torch thread count last set on any thread, and a lane sets 1: the model thread sets
    its own, so that an app created after another (an embedding app, the tests) still has its team and its lanes."""
    for _ in range(2):  # the first runtime's lanes set 1 before the second one starts
        rt = Runtime.load(settings.model_copy(update={"torch_threads": 2, "cpu_lanes": 2, "device": "cpu"}), Metrics())
        try:
            assert rt.lanes.model_thread.submit(torch.get_num_threads).result() == 2
            assert [lane.submit(torch.get_num_threads).result() for lane in rt.lanes.singles] == [1, 1]
        finally:
            rt.lanes.shutdown()
            rt.image_threads.shutdown()


def test_torch_runs_one_thread_beside_a_gpu_and_its_share_of_the_cpus_it_may_use_on_a_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Beside a GPU, the CPU's torch work is joining and copying batches, where a larger OpenMP team only spins. On a
    CPU, VAE_WORKERS processes share the CPUs rather than each start a team of them all. The setting, when there is
    one, wins."""
    monkeypatch.setattr(runtime, "USABLE_CPUS", 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)  # torch counted the host's cores
    assert runtime.pick_threads(0, torch.device("cuda")) == 1
    assert runtime.pick_threads(0, torch.device("cpu")) == 2
    assert runtime.pick_threads(0, torch.device("cpu"), workers=2) == runtime.pick_threads(0, torch.device("cpu"), 3) == 1
    monkeypatch.setattr(runtime, "USABLE_CPUS", 16)
    assert runtime.pick_threads(0, torch.device("cpu"), workers=4) == 4
    assert runtime.pick_threads(0, torch.device("cuda"), workers=4) == 1
    assert runtime.pick_threads(3, torch.device("cuda")) == runtime.pick_threads(3, torch.device("cpu"), 2) == 3


async def test_a_request_larger_than_a_batch_is_reassembled_in_order(
    client: httpx.AsyncClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A JSON answer alone is decoded in parts of half a batch where a core is left for the PNGs (made so here), each
    part's PNGs encoded while the next decodes; the images must come back in the order of their latents, across the
    parts' seams too."""
    monkeypatch.setattr(client.app.state.runtime, "spare_core", True)  # type: ignore[attr-defined]
    n = settings.max_batch_size + 3
    whole = await client.post("/sample", json={"model": "mnist", "n": n, "seed": 5}, headers={"Accept": "application/json"})
    assert whole.status_code == 200
    images = whole.json()["images"]
    assert len(images) == n and len(set(images)) > 1
    half = settings.max_batch_size // 2
    for i in (0, half - 1, half, n - 1):  # the same latent decoded alone gives the same image
        z = whole.json()["latents"][i]
        alone = await client.post("/decode", json={"model": "mnist", "z": [z]}, headers={"Accept": "application/json"})
        pixels = [np.asarray(decode_png(base64.b64decode(p)), dtype=int) for p in (alone.json()["images"][0], images[i])]
        assert np.abs(pixels[0] - pixels[1]).max() <= 1  # batch sizes may round differently


@pytest.mark.parametrize("shape", [(5, 28, 28, 1), (5, 64, 64, 3)])
async def test_pngs_encoded_in_parallel_come_back_in_the_order_of_their_images(shape: tuple[int, ...]) -> None:
    images = torch.stack([torch.full(shape[1:], 40 * i, dtype=torch.uint8) for i in range(shape[0])])
    with ThreadPoolExecutor(2) as pool:
        runtime = SimpleNamespace(png_level=None, image_threads=pool, alone=False)  # another request in progress: the threads encode
        pngs = await Runtime.base64_pngs(runtime, images)  # type: ignore[arg-type]
    assert [int(np.asarray(decode_png(base64.b64decode(p))).max()) for p in pngs] == [0, 40, 80, 120, 160]


async def test_the_only_request_in_progress_encodes_its_small_images_without_the_image_threads() -> None:
    images = torch.stack([torch.full((96, 96, 3), 40 * i, dtype=torch.uint8) for i in range(2)])
    closed = ThreadPoolExecutor(1)
    closed.shutdown()  # a hand-off to it raises RuntimeError
    alone = SimpleNamespace(png_level=None, image_threads=closed, alone=True)
    pngs = [base64.b64decode(p) for p in await Runtime.base64_pngs(alone, images)]  # type: ignore[arg-type]
    grid = await Runtime.grid_png(alone, images[:1], None)  # type: ignore[arg-type]
    assert [int(np.asarray(decode_png(p)).max()) for p in pngs] == [0, 40]
    assert grid == pngs[0]
    with pytest.raises(RuntimeError, match="shutdown"):  # large images still go to the threads, even alone
        await Runtime.base64_pngs(alone, torch.zeros(2, 256, 256, 3, dtype=torch.uint8))  # type: ignore[arg-type]


async def test_under_load_one_small_png_is_encoded_on_the_event_loop_and_larger_work_on_the_image_threads() -> None:
    digits = torch.stack([torch.full((28, 28, 1), 30 * (i + 1), dtype=torch.uint8) for i in range(8)])
    closed = ThreadPoolExecutor(1)
    closed.shutdown()  # a hand-off to it raises RuntimeError
    busy = SimpleNamespace(png_level=None, image_threads=closed, alone=False)  # another request in progress
    (png,) = [base64.b64decode(p) for p in await Runtime.base64_pngs(busy, digits[:1])]  # type: ignore[arg-type]
    assert int(np.asarray(decode_png(png)).max()) == 30
    assert await Runtime.grid_png(busy, digits[:1], None) == png  # type: ignore[arg-type]
    assert await Runtime.grid_png(busy, digits[:2], None)  # type: ignore[arg-type]  # a grid of two is one small PNG too
    with pytest.raises(RuntimeError, match="shutdown"):  # two PNGs
        await Runtime.base64_pngs(busy, digits[:2])  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="shutdown"):  # one PNG of 6 KiB of pixels
        await Runtime.grid_png(busy, digits, None)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="shutdown"):  # a faces image: 27 KiB
        await Runtime.grid_png(busy, torch.zeros(1, 96, 96, 3, dtype=torch.uint8), None)  # type: ignore[arg-type]


async def test_a_request_s_pngs_take_an_image_thread_for_every_64_kib_of_pixels_at_most_one_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Small images' PNGs (digits) are encoded on one image thread: threads encoding them at once share the GIL. Larger
    ones spread over the threads, a thread for every PNG_CHUNK_BYTES of pixels."""
    encoded_on: list[tuple[str, int]] = []
    real = runtime._base64_pngs

    def spy(tiles: np.ndarray, level: int | None) -> list[bytes]:
        encoded_on.append((threading.current_thread().name, len(tiles)))
        return real(tiles, level)

    monkeypatch.setattr(runtime, "_base64_pngs", spy)
    monkeypatch.setattr(runtime, "IMAGE_THREADS", 4)
    with ThreadPoolExecutor(4, thread_name_prefix="image") as pool:
        busy = SimpleNamespace(png_level=None, image_threads=pool, alone=False)
        digits = torch.randint(0, 256, (64, 28, 28, 1), dtype=torch.uint8)  # 49 KiB of pixels
        pngs = await Runtime.base64_pngs(busy, digits)  # type: ignore[arg-type]
        assert len(pngs) == 64 and [size for _, size in encoded_on] == [64]
        encoded_on.clear()
        faces = torch.randint(0, 256, (8, 96, 96, 3), dtype=torch.uint8)  # 216 KiB: three threads' worth
        pngs = await Runtime.base64_pngs(busy, faces)  # type: ignore[arg-type]
        assert [np.asarray(decode_png(base64.b64decode(p))).tolist() for p in pngs] == faces.numpy().tolist()
        assert sorted(size for _, size in encoded_on) == [2, 3, 3]
        assert all(name.startswith("image") for name, _ in encoded_on)


@pytest.mark.parametrize("count, size", [(64, 48), (1, 320)])
async def test_a_large_png_is_deflated_in_parts_on_the_image_threads_and_is_the_same_image(
    count: int, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grid of 64 images, or one large image (then the image itself, not a grid of one)."""
    images = torch.randint(0, 256, (count, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images[:, : size // 2] = 9  # flat halves, as decoders draw backgrounds
    deflated_on: list[str] = []
    deflate_rows = imaging.deflate_rows

    def spy(rows: np.ndarray, last: bool) -> bytes:
        deflated_on.append(threading.current_thread().name)
        return deflate_rows(rows, last)

    monkeypatch.setattr(imaging, "deflate_rows", spy)
    with ThreadPoolExecutor(2, thread_name_prefix="image") as pool:
        server = SimpleNamespace(png_level=None, image_threads=pool, alone=False)
        server._png_in_parts = functools.partial(Runtime._png_in_parts, server)
        png = await Runtime.grid_png(server, images, None)  # type: ignore[arg-type]
    expected = images.numpy()[0] if count == 1 else imaging.grid(images.numpy())
    assert np.array_equal(np.asarray(decode_png(png)), expected)
    assert len(deflated_on) >= 2 and all(name.startswith("image") for name in deflated_on)


def test_pngs_are_encoded_on_the_batch_s_thread_only_where_single_thread_lanes_share_every_core() -> None:
    lanes = SimpleNamespace(singles=("lane0", "lane1"))
    on = Runtime.images_on_batch_thread.fget  # type: ignore[attr-defined]
    assert on(SimpleNamespace(lanes=lanes, spare_core=False))
    assert not on(SimpleNamespace(lanes=lanes, spare_core=True))  # the image threads use the spare core meanwhile
    assert not on(SimpleNamespace(lanes=SimpleNamespace(singles=()), spare_core=False))  # a GPU, or no lanes


async def test_a_json_answer_is_decoded_in_parts_only_alone_and_with_a_core_left_for_the_pngs(
    client: httpx.AsyncClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Then the image threads encode a part's PNGs while the next part decodes. With other requests in progress there
    is no idle core to fill: whole batches. Where single-thread lanes fill every core, whole batches too, each
    batch's thread encoding the PNGs of its own rows right after its decode."""
    server = client.app.state.runtime  # type: ignore[attr-defined]
    decoder = server.decoders["mnist"]
    batches: list[tuple[int, bool]] = []  # (part size, PNGs encoded on the batch's thread), one per model call
    call_batch = decoder._call_batch

    def spy(parts: list[torch.Tensor], thens: list[object]) -> object:
        batches.extend((len(part), then is not None) for part, then in zip(parts, thens, strict=True))
        return call_batch(parts, thens)

    async def json_answer() -> None:
        body = {"model": "mnist", "n": decoder.max_batch_size}
        assert (await client.post("/sample", json=body, headers={"Accept": "application/json"})).status_code == 200

    model_threads = server.lanes.model_thread.submit(torch.get_num_threads).result()
    assert server.spare_core == (server.device.type == "cpu" and model_threads < runtime.USABLE_CPUS)
    monkeypatch.setattr(decoder, "_call_batch", spy)
    monkeypatch.setattr(server, "spare_core", True)
    images_on_batch_thread(monkeypatch, False)
    await json_answer()
    server.active += 1  # another request in progress
    try:
        await json_answer()
    finally:
        server.active -= 1
    monkeypatch.setattr(server, "spare_core", False)
    images_on_batch_thread(monkeypatch, True)  # as with two single-thread lanes on two cores
    await json_answer()
    half, whole = decoder.max_batch_size // 2, decoder.max_batch_size
    assert batches == [(half, False), (half, False), (whole, False), (whole, True)]


@pytest.mark.parametrize("accept", ["image/png", "application/json"])
async def test_an_answer_is_the_same_bytes_whichever_thread_encodes_its_pngs(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, accept: str
) -> None:
    answers = []
    for on_batch_thread in (False, True):
        images_on_batch_thread(monkeypatch, on_batch_thread)
        r = await client.post("/sample", json={"model": "faces", "n": 1, "seed": 5}, headers={"Accept": accept})
        assert r.status_code == 200 and r.headers["content-type"].startswith(accept)
        answers.append(r.content)
    assert answers[0] == answers[1]
