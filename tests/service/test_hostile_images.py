"""Hostile and unusual uploads to POST /encode and /interpolate: a clear 422 or a correct answer, never a 500,
never a decoded decompression bomb."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.imaging import prepare_upload
from service.settings import Settings
from tests.conftest import png, serve
from tests.service.tools import images_on_batch_thread, peak_memory_growth

FACES = (3, 32, 32)


def jpeg(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, **options)
    return buffer.getvalue()


def noise(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    w, h = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_bomb(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG: a few hundred KB on the wire, width x height pixels once decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)  # filter type 0, then the packed bits of one row
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return png_bomb(30_000, 30_000)  # 900 million pixels


@pytest.fixture(scope="module")
async def client(tiny_models: Path) -> AsyncIterator[httpx.AsyncClient]:
    """One app for the module: these requests change nothing, and loading the models per test adds up."""
    async with serve(Settings(model_dir=tiny_models, max_wait_ms=1.0)) as c:
        yield c


async def encode_form(client: httpx.AsyncClient, data: bytes, name: str = "x.png", content_type: str = "image/png",
                      model: str = "faces") -> httpx.Response:
    return await client.post("/encode", data={"model": model}, files={"image": (name, data, content_type)})


async def encode_json(client: httpx.AsyncClient, data: bytes, name: str = "", content_type: str = "",
                      model: str = "faces") -> httpx.Response:
    return await client.post("/encode", json={"model": model, "images": [base64.b64encode(data).decode()]})


Send = Callable[..., Awaitable[httpx.Response]]
TRANSPORTS = [pytest.param(encode_form, id="multipart"), pytest.param(encode_json, id="json")]
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><circle cx="32" cy="32" r="30"/></svg>'
HOSTILE = [
    pytest.param(b"", "x.png", "image/png", "empty", id="empty file"),
    pytest.param(png(size=(64, 64))[:200], "x.png", "image/png", "truncated", id="truncated PNG"),
    pytest.param(jpeg(noise())[:3000], "x.jpg", "image/jpeg", "truncated", id="truncated JPEG"),
    pytest.param(np.random.default_rng(1).bytes(4096), "x.png", "image/png", "not a readable image",
                 id="random bytes named .png"),
    pytest.param(b"Dear server,\nthis is not an image.\n" * 20, "notes.txt", "text/plain", "not a readable image",
                 id="text file"),
    pytest.param(SVG, "logo.svg", "image/svg+xml", "not a readable image", id="SVG"),
]


ON_BATCH_THREAD = pytest.mark.parametrize("on_batch_thread", [False, True], ids=["image threads", "batch thread"])


@ON_BATCH_THREAD
@pytest.mark.parametrize("send", TRANSPORTS)
@pytest.mark.parametrize(("data", "name", "content_type", "message"), HOSTILE)
async def test_an_unusable_upload_is_422_saying_why(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, on_batch_thread: bool,
    send: Send, data: bytes, name: str, content_type: str, message: str,
) -> None:
    """Whether an image thread finds out or the thread of the batch the upload joined (`uploads.Upload`)."""
    images_on_batch_thread(monkeypatch, on_batch_thread)
    r = await send(client, data, name, content_type)
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]
    assert " at 0x" not in r.json()["detail"]  # no Python object's address: nothing a client can act on


async def test_invalid_base64_is_422_naming_the_image(client: httpx.AsyncClient) -> None:
    r = await client.post("/encode", json={"model": "faces", "images": [base64.b64encode(png()).decode(), "no*base64"]})
    assert r.status_code == 422
    assert r.json()["detail"] == "images[1] is not valid base64"


@pytest.mark.parametrize("send", TRANSPORTS)
async def test_a_decompression_bomb_is_refused_from_its_header_without_decoding_it(
    client: httpx.AsyncClient, bomb: bytes, send: Send
) -> None:
    assert len(bomb) < 200_000
    started = time.perf_counter()
    with peak_memory_growth() as growth:
        r = await send(client, bomb)
    assert r.status_code == 422
    assert "too many pixels" in r.json()["detail"]
    assert time.perf_counter() - started < 5
    assert growth[0] < 100 * 2**20  # decoded, it would take 900 MB


def test_a_large_evenly_inked_upload_to_a_digit_model_is_normalised_without_listing_its_pixels() -> None:
    """16 megapixels of gray compress to a few KB; the digit's box is found from its rows and columns, not from a list
    of every inked pixel (two int64 indices each: 256 MB here, 635 MB at the 40-megapixel limit)."""
    buffer = io.BytesIO()
    Image.new("L", (4000, 4000), 128).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < 50_000
    with peak_memory_growth() as growth:
        x = prepare_upload(buffer.getvalue(), (1, 28, 28), max_pixels=40_000_000, digit=True)
    assert x.shape == (1, 28, 28) and x.max() > 0
    assert growth[0] < 160 * 2**20


@pytest.mark.parametrize("alpha", [0, 128, 255])
def test_transparency_is_composited_on_white(alpha: int) -> None:
    buffer = io.BytesIO()
    Image.new("RGBA", (40, 40), (200, 100, 50, alpha)).save(buffer, format="PNG")
    x = prepare_upload(buffer.getvalue(), FACES, max_pixels=40_000_000)
    expected = [(c * alpha + 255 * (255 - alpha)) / 255 / 255 for c in (200, 100, 50)]
    assert np.allclose(x.mean(axis=(1, 2)), expected, atol=1 / 255)


def test_a_large_square_photo_is_resized_without_a_full_size_copy() -> None:
    """16 megapixels of RGB, 48 MB decoded (64 MB as Pillow holds it): no full-size copy of it is made (at first three,
    then one: `exif_transpose` returns a copy of an image it does not turn)."""
    buffer = io.BytesIO()
    Image.new("RGB", (4000, 4000), (200, 100, 50)).save(buffer, format="PNG")
    with peak_memory_growth() as growth:
        x = prepare_upload(buffer.getvalue(), FACES, max_pixels=40_000_000)
    assert x.shape == FACES and abs(float(x[0].mean()) - 200 / 255) < 1e-3
    assert growth[0] < 100 * 2**20  # 61 MiB; with one copy, 122


async def test_an_image_over_the_configured_pixel_limit_is_422_with_the_limit(client: httpx.AsyncClient) -> None:
    r = await encode_form(client, png_bomb(8000, 8000))  # 64 M pixels: under Pillow's own bomb limit, over ours
    assert r.status_code == 422
    assert "8000x8000" in r.json()["detail"] and "40000000" in r.json()["detail"]


async def test_only_the_first_frame_of_a_many_frame_gif_is_used(client: httpx.AsyncClient) -> None:
    frames = [Image.fromarray(np.full((40, 40), 8 * i % 256, dtype=np.uint8)) for i in range(300)]
    frames[0] = Image.fromarray(np.tile(np.arange(0, 240, 6, dtype=np.uint8), (40, 1)))
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=10, loop=0)
    started = time.perf_counter()
    gif = await encode_form(client, buffer.getvalue(), "a.gif", "image/gif")
    assert gif.status_code == 200, gif.text
    assert time.perf_counter() - started < 5
    first = await encode_form(client, png(np.asarray(frames[0])))
    assert gif.json()["mu"] == first.json()["mu"]


async def test_a_16_bit_png_is_scaled_to_8_bits(client: httpx.AsyncClient) -> None:
    levels = np.tile(np.linspace(0, 255, 48).astype(np.uint16), (40, 1))
    sixteen = await encode_form(client, png(levels * 257))  # uint16 -> a 16-bit grayscale PNG
    eight = await encode_form(client, png(levels.astype(np.uint8)))
    assert sixteen.status_code == eight.status_code == 200
    np.testing.assert_allclose(sixteen.json()["mu"], eight.json()["mu"], atol=1e-6)


async def test_a_dark_16_bit_png_stays_dark(client: httpx.AsyncClient) -> None:
    dark = await encode_form(client, png(np.full((40, 40), 100, dtype=np.uint16)))  # 100 of 65535: black
    black = await encode_form(client, png(np.zeros((40, 40), dtype=np.uint8)))
    assert dark.status_code == 200
    np.testing.assert_allclose(dark.json()["mu"], black.json()["mu"], atol=1e-6)


async def test_a_cmyk_jpeg_is_converted_to_rgb(client: httpx.AsyncClient) -> None:
    red = jpeg(Image.new("CMYK", (40, 40), (0, 255, 255, 0)))
    assert Image.open(io.BytesIO(red)).mode == "CMYK"
    r = await encode_form(client, red, "red.jpg", "image/jpeg")
    assert r.status_code == 200, r.text
    pixels = prepare_upload(red, FACES, max_pixels=10**6)
    np.testing.assert_allclose(pixels[:, 16, 16], [1.0, 0.0, 0.0], atol=0.02)


def with_orientation(image: Image.Image, orientation: int, fmt: str) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def landscape() -> Image.Image:
    """64x32: a white square on the left half, black on the right, so that a rotation is visible."""
    array = np.zeros((32, 64, 3), dtype=np.uint8)
    array[:, :32] = 255
    array[:8, :] = 128  # a grey top band: tells 90 from 270 degrees
    return Image.fromarray(array)


async def test_exif_rotation_is_applied_before_encoding(client: httpx.AsyncClient) -> None:
    # Orientation 6: the camera was turned; a viewer rotates the picture 90 degrees clockwise to show it.
    rotated = await encode_form(client, with_orientation(landscape(), 6, "PNG"))
    upright = await encode_form(client, png(np.asarray(landscape().transpose(Image.Transpose.ROTATE_270))))
    ignored = await encode_form(client, png(np.asarray(landscape())))
    assert rotated.status_code == 200, rotated.text
    assert rotated.json()["mu"] == upright.json()["mu"]
    assert rotated.json()["mu"] != ignored.json()["mu"]


@pytest.mark.parametrize(
    ("orientation", "transpose"),
    [(3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)],
)
def test_exif_rotation_of_a_jpeg_gives_the_upright_pixels(orientation: int, transpose: Image.Transpose) -> None:
    pixels = prepare_upload(with_orientation(landscape(), orientation, "JPEG"), FACES, max_pixels=10**6)
    upright = prepare_upload(jpeg(landscape().transpose(transpose)), FACES, max_pixels=10**6)
    ignored = prepare_upload(jpeg(landscape()), FACES, max_pixels=10**6)
    assert np.abs(pixels - upright).mean() < 0.02
    assert np.abs(pixels - ignored).mean() > 0.1


@ON_BATCH_THREAD
@pytest.mark.parametrize("model", ["mnist", "faces"])
@pytest.mark.parametrize("size", [(1, 1), (20_000, 1), (1, 20_000)], ids=["1x1", "20000x1", "1x20000"])
async def test_tiny_and_extremely_thin_images_are_encoded(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, on_batch_thread: bool, model: str, size: tuple[int, int]
) -> None:
    images_on_batch_thread(monkeypatch, on_batch_thread)
    r = await encode_form(client, png(size=size), model=model)
    assert r.status_code == 200, r.text
    assert np.isfinite(r.json()["mu"]).all() and np.isfinite(r.json()["log_var"]).all()


async def interpolate(client: httpx.AsyncClient, start: dict[str, object], end: dict[str, object]) -> httpx.Response:
    return await client.post("/interpolate", json={"model": "faces", "start": start, "end": end, "steps": 3})


@ON_BATCH_THREAD
@pytest.mark.parametrize(("data", "name", "content_type", "message"), HOSTILE)
async def test_a_hostile_interpolation_endpoint_image_is_422_naming_the_end(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, on_batch_thread: bool,
    data: bytes, name: str, content_type: str, message: str,
) -> None:
    images_on_batch_thread(monkeypatch, on_batch_thread)
    r = await interpolate(client, {"z": [0.0] * 8}, {"image": base64.b64encode(data).decode()})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("end.image: ") and message in r.json()["detail"]


async def test_a_decompression_bomb_as_an_interpolation_endpoint_is_422(client: httpx.AsyncClient, bomb: bytes) -> None:
    r = await interpolate(client, {"image": base64.b64encode(bomb).decode()}, {"z": [0.0] * 8})
    assert r.status_code == 422
    assert r.json()["detail"].startswith("start.image: ") and "too many pixels" in r.json()["detail"]


async def test_an_unusual_but_valid_interpolation_endpoint_image_is_used(client: httpx.AsyncClient) -> None:
    cmyk = jpeg(Image.new("CMYK", (40, 40), (0, 255, 255, 0)))
    r = await interpolate(client, {"image": base64.b64encode(cmyk).decode()}, {"z": [0.0] * 8})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
