"""POST /encode: images in any common format -> mu and log_var, one row per image."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

import service.imaging
import service.runtime
from service.imaging import ImageError, open_upload, prepare_upload
from service.uploads import Upload
from tests.conftest import png
from tests.service.tools import images_on_batch_thread, most_significant_digits


def with_text(image: bytes, size: int) -> bytes:
    """A PNG with a text chunk of `size` bytes before its pixels."""
    buffer = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * size)
    Image.open(io.BytesIO(image)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def jpeg(mode: str = "RGB", size: tuple[int, int] = (50, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 128 if mode == "L" else (200, 100, 50)).save(buffer, format="JPEG")
    return buffer.getvalue()


async def test_multipart_upload_returns_one_row_per_image(client: httpx.AsyncClient) -> None:
    files = [("image", ("a.png", png(), "image/png")), ("image", ("b.jpg", jpeg(), "image/jpeg"))]
    r = await client.post("/encode", data={"model": "faces"}, files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "faces" and body["latent_dim"] == 8
    assert np.array(body["mu"]).shape == (2, 8) and np.array(body["log_var"]).shape == (2, 8)
    assert most_significant_digits(r.text) <= 9  # float32's shortest decimals (schemas.float32_json)


async def test_json_base64_upload_matches_multipart(client: httpx.AsyncClient) -> None:
    image = png(size=(64, 48))
    as_json = await client.post("/encode", json={"model": "faces", "images": [base64.b64encode(image).decode()]})
    as_form = await client.post("/encode", data={"model": "faces"}, files={"image": ("x.png", image, "image/png")})
    assert as_json.status_code == as_form.status_code == 200
    assert as_json.json()["mu"] == as_form.json()["mu"]


async def test_a_form_in_an_unusual_shape_is_read_as_a_plain_one(client: httpx.AsyncClient) -> None:
    """An epilogue after the closing delimiter is left to Starlette's parser (service.multipart_form): same answer."""
    image = png(size=(64, 48))
    plain = httpx.Request("POST", "http://test/encode", data={"model": "faces"}, files={"image": ("x.png", image, "image/png")})
    body, content_type = plain.read(), plain.headers["content-type"]
    unusual = body + b"\r\nan epilogue"
    answers = [await client.post("/encode", content=b, headers={"content-type": content_type}) for b in (body, unusual)]
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[0].json() == answers[1].json()


async def test_data_urls_are_accepted(client: httpx.AsyncClient) -> None:
    url = "data:image/png;base64," + base64.b64encode(png()).decode()
    r = await client.post("/encode", json={"model": "mnist", "images": [url]})
    assert r.status_code == 200


async def test_grayscale_rgba_and_palette_images_convert_to_the_model_channels(client: httpx.AsyncClient) -> None:
    for mode in ("L", "RGBA", "P", "LA", "I;16"):
        for model in ("mnist", "faces"):
            r = await client.post("/encode", data={"model": model}, files={"image": ("x.png", png(mode=mode), "image/png")})
            assert r.status_code == 200, (mode, model, r.text)


async def test_dark_on_light_digits_are_inverted_automatically_for_mnist(client: httpx.AsyncClient) -> None:
    ink_on_paper = np.full((100, 100), 255, dtype=np.uint8)
    ink_on_paper[20:80, 45:55] = 0  # a black "1" on white paper
    mnist_style = 255 - ink_on_paper
    auto = await client.post("/encode", data={"model": "mnist"}, files={"image": ("a.png", png(ink_on_paper), "image/png")})
    same = await client.post("/encode", data={"model": "mnist"}, files={"image": ("b.png", png(mnist_style), "image/png")})
    forced = await client.post(
        "/encode", data={"model": "mnist", "invert": "false"}, files={"image": ("a.png", png(ink_on_paper), "image/png")}
    )
    assert auto.json()["mu"] == same.json()["mu"]
    assert forced.json()["mu"] != auto.json()["mu"]


def test_a_digit_is_boxed_into_20_of_28_pixels_and_centred_by_its_mass_as_mnist_was() -> None:
    photo = np.zeros((300, 200), dtype=np.uint8)
    photo[30:130, 10:60] = 255  # a bar 100 tall and 50 wide, in a corner of a large frame
    photo[200, 190] = 40  # faint specks under a quarter of the ink's peak are not part of the digit
    x = prepare_upload(png(photo), (1, 28, 28), max_pixels=10**6, invert=False, digit=True)[0]
    ink = x > 0.5
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    assert x.shape == (28, 28) and x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1
    assert rows[-1] - rows[0] + 1 == 20 and cols[-1] - cols[0] + 1 == 10  # the longer side 20, the aspect kept
    mass = x / x.sum()
    centre = (mass.sum(axis=1) @ np.arange(28), mass.sum(axis=0) @ np.arange(28))
    assert np.allclose(centre, (14, 14), atol=0.51)  # to the half pixel that a shift by whole pixels allows
    blank = prepare_upload(png(np.zeros((40, 40), dtype=np.uint8)), (1, 28, 28), max_pixels=10**6, digit=True)
    assert blank.shape == (1, 28, 28) and not blank.any()


@pytest.mark.parametrize("invert", [None, True, False])
@pytest.mark.parametrize(("shape", "digit"), [((1, 28, 28), True), ((1, 28, 28), False), ((3, 96, 96), False)])
def test_uploads_prepared_together_are_each_as_prepared_alone_and_one_that_fails_fails_alone(
    shape: tuple[int, int, int], digit: bool, invert: bool | None
) -> None:
    rng = np.random.default_rng(0)
    speck = np.zeros((28, 28), np.uint8)
    speck[3:7, 20:23] = 200  # a small digit off centre
    arrays = [
        rng.integers(0, 256, (28, 28), dtype=np.uint8), speck, 255 - speck,  # dark on light: inverted by its border
        np.zeros((28, 28), np.uint8),  # nothing inked
        rng.integers(0, 256, (40, 33), dtype=np.uint8),  # another size
        rng.integers(0, 256, (50, 60, 3), dtype=np.uint8), speck.T.copy(),
    ]
    uploads: list[bytes | Image.Image] = [png(a) for a in arrays]
    uploads.insert(2, b"not an image")
    uploads.append(open_upload(png(speck), 10**6))  # an image whose header is read already
    made = service.imaging.prepare_uploads(uploads, shape, max_pixels=10**6, invert=invert, digit=digit)
    assert len(made) == len(uploads)
    for upload, array in zip(uploads, made, strict=True):
        if upload == b"not an image":
            assert isinstance(array, ImageError) and "not a readable image" in str(array)
            continue
        if isinstance(upload, Image.Image):
            upload = png(speck)
        alone = prepare_upload(upload, shape, max_pixels=10**6, invert=invert, digit=digit)
        assert isinstance(array, np.ndarray) and array.dtype == alone.dtype and np.array_equal(array, alone)


async def test_an_undecodable_image_is_422_saying_so(client: httpx.AsyncClient) -> None:
    r = await client.post("/encode", data={"model": "faces"}, files={"image": ("x.png", b"not an image", "image/png")})
    assert r.status_code == 422
    assert "image" in r.json()["detail"]


async def test_a_form_without_model_or_image_says_what_is_missing(client: httpx.AsyncClient) -> None:
    no_model = await client.post("/encode", files={"image": ("x.png", png(), "image/png")})
    model_only = b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nfaces\r\n--b--\r\n'
    no_image = await client.post("/encode", content=model_only, headers={"content-type": "multipart/form-data; boundary=b"})
    assert no_model.status_code == 422 and "'model' field" in no_model.json()["detail"]
    assert no_image.status_code == 422 and "'image' field" in no_image.json()["detail"]


IMAGE = ("image", ("x.png", png(), "image/png"))


@pytest.mark.parametrize(
    ("fields", "files", "message"),
    [
        ({"model": "faces", "colour": "red"}, [IMAGE], "a field 'colour'; it takes 'model', 'image' files and 'invert'"),
        ({"model": "faces"}, [IMAGE, ("images", ("y.png", png(), "image/png"))], "a field 'images'"),
        ({"model": ["faces", "mnist"]}, [IMAGE], "2 'model' fields; give one"),
        ({"model": "mnist", "invert": ["true", "false"]}, [IMAGE], "2 'invert' fields"),
        ({"model": "mnist", "invert": "maybe"}, [IMAGE], "'invert' field is true, false or auto"),
        ({"model": "faces", "image": "iVBORw0KGgo"}, [IMAGE], "holds text, not a file"),
    ],
    ids=["a field it does not take", "a file it does not take", "two models", "two inverts", "invert of another word",
         "an image as text"],
)
async def test_a_form_that_does_not_say_one_thing_is_422_saying_what_to_fix(
    client: httpx.AsyncClient, fields: dict[str, object], files: list[object], message: str
) -> None:
    """As the JSON body refuses a field it does not take, rather than guess which of two models was meant."""
    r = await client.post("/encode", data=fields, files=files)
    assert r.status_code == 422 and message in r.json()["detail"], r.text


@pytest.mark.parametrize(("value", "invert"), [("true", True), ("Yes", True), ("1", True), ("on", True),
                                               ("false", False), ("NO", False), ("0", False), ("auto", None), ("", None)])
async def test_the_form_s_invert_reads_as_the_json_body_s(client: httpx.AsyncClient, value: str, invert: bool | None) -> None:
    digit = png(np.full((28, 28), 230, dtype=np.uint8))  # a light image: auto inverts it
    form = await client.post("/encode", data={"model": "mnist", "invert": value}, files={"image": ("d.png", digit, "image/png")})
    body = await client.post("/encode", json={"model": "mnist", "images": [base64.b64encode(digit).decode()], "invert": invert})
    assert form.status_code == body.status_code == 200
    assert form.json()["mu"] == body.json()["mu"]


async def test_a_broken_multipart_body_is_422_with_the_parser_s_reason(client: httpx.AsyncClient) -> None:
    r = await client.post("/encode", content=b"garbage", headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 422
    assert r.json()["detail"] == "could not read the multipart form: Invalid multipart data."  # no "400:" of its own


@pytest.mark.parametrize("content_type", ["Multipart/Form-Data", "APPLICATION/JSON", "application/vnd.example+json"])
async def test_media_types_are_read_whatever_their_case_as_on_the_other_routes(
    client: httpx.AsyncClient, content_type: str
) -> None:
    if content_type.lower().startswith("multipart"):
        request = client.build_request("POST", "/encode", data={"model": "mnist"}, files=[IMAGE])
        params = request.headers["content-type"].partition(";")[2]
        headers, content = {"content-type": f"{content_type};{params}"}, request.read()
    else:
        headers, content = {"content-type": content_type}, json.dumps(
            {"model": "mnist", "images": [base64.b64encode(png()).decode()]}).encode()
    r = await client.post("/encode", content=content, headers=headers)
    assert r.status_code == 200, r.text


async def test_too_many_images_is_422_with_the_limit(client: httpx.AsyncClient) -> None:
    images = [base64.b64encode(png()).decode()] * 65
    r = await client.post("/encode", json={"model": "mnist", "images": images})
    assert r.status_code == 422
    assert "64" in r.json()["detail"]


async def test_a_one_image_request_is_not_held_behind_the_uploads_of_a_many_image_one(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = service.imaging.prepare_upload

    def slow(data: bytes, *args: object, **kwargs: object) -> np.ndarray:
        time.sleep(0.05)  # as a large upload: the image threads are busy with it
        return real(data, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(service.imaging, "prepare_upload", slow)
    # Two image threads, as on the 2-core machine: with 16, 32 uploads would not outlast the one request's own turn.
    monkeypatch.setattr(service.runtime, "IMAGE_THREADS", 2)

    async def encode(images: int) -> float:
        started = time.perf_counter()
        files = [("image", (f"{i}.png", png(size=(80, 80)), "image/png")) for i in range(images)]  # not small
        r = await client.post("/encode", data={"model": "faces"}, files=files)
        assert r.status_code == 200
        return time.perf_counter() - started

    with ThreadPoolExecutor(2, thread_name_prefix="image") as pool:
        monkeypatch.setattr(client.app.state.runtime, "image_threads", pool)  # type: ignore[attr-defined]
        many = asyncio.create_task(encode(32))  # 32 uploads: 0.8 s on two image threads
        await asyncio.sleep(0.05)
        one = await encode(1)
        assert one < 0.4 and one < await many / 2  # it took a turn among them, not the end of their queue


async def test_a_request_s_digits_are_prepared_in_turns_on_one_image_thread_together_and_larger_uploads_on_each(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several uploads are prepared in turns, one after another on a thread until the turn's time is up, not a hand-off
    each. Small ones (digits: Python's work, the GIL held) take one image thread, up to UPLOAD_CHUNK of them prepared
    together; larger ones every image thread, one at a time, a request's turns never more than there are threads."""
    real_decoded, real_many, threads, chunks, running, most = service.imaging._decoded, service.imaging.prepare_uploads, [], [], [0], [0]

    def decoded(image: Image.Image, channels: int, *args: int) -> Image.Image:
        threads.append(threading.current_thread().name)
        running[0] += 1
        most[0] = max(most[0], running[0])
        try:
            if channels == 3:
                time.sleep(0.01)  # each larger upload a turn of its own
            return real_decoded(image, channels, *args)
        finally:
            running[0] -= 1

    def many(uploads: list[object], *args: object, **kwargs: object) -> list[object]:
        chunks.append(len(uploads))
        return real_many(uploads, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(service.imaging, "_decoded", decoded)
    monkeypatch.setattr(service.imaging, "prepare_uploads", many)
    monkeypatch.setattr(service.runtime, "UPLOAD_TURN_S", 1.0)  # a turn has time for every digit
    image_threads = client.app.state.runtime.image_threads  # type: ignore[attr-defined]
    handed, real_submit = [], image_threads.submit
    monkeypatch.setattr(image_threads, "submit", lambda *a, **k: handed.append(1) or real_submit(*a, **k))

    rng = np.random.default_rng(0)
    digits = [png(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(service.runtime.UPLOAD_CHUNK + 4)]
    r = await client.post("/encode", data={"model": "mnist"}, files=[("image", ("d.png", d, "image/png")) for d in digits])
    assert r.status_code == 200
    assert len(threads) == len(digits) and len(set(threads)) == 1 and threads[0].startswith("image")
    assert len(handed) == 1  # one turn, one hand-off, for all of them
    assert chunks == [service.runtime.UPLOAD_CHUNK, 4]
    mu = np.array(r.json()["mu"])  # in the request's order, each row as the digit's alone
    for i in (0, 5, len(digits) - 1):
        one = await client.post("/encode", data={"model": "mnist"}, files=[("image", ("d.png", digits[i], "image/png"))])
        assert np.allclose(mu[i], one.json()["mu"][0], atol=1e-5)

    threads.clear()
    chunks.clear()
    faces = [png(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)) for _ in range(6)]
    r = await client.post("/encode", data={"model": "faces"}, files=[("image", ("f.png", f, "image/png")) for f in faces])
    assert r.status_code == 200
    assert len(threads) == 6 and len(set(threads)) == min(6, service.runtime.IMAGE_THREADS) == most[0]
    assert chunks == [1] * 6


async def test_a_request_s_small_uploads_are_prepared_together_and_a_larger_one_among_them_alone(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk holds small images only (by their headers): a large one between digits is prepared on its own, and a
    bad one among them fails the request."""
    real_many, chunks = service.imaging.prepare_uploads, []

    def many(uploads: list[object], *args: object, **kwargs: object) -> list[object]:
        chunks.append(len(uploads))
        return real_many(uploads, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(service.imaging, "prepare_uploads", many)
    monkeypatch.setattr(service.runtime, "UPLOAD_TURN_S", 1.0)
    digit, large = png(size=(28, 28)), png(np.zeros((300, 300), np.uint8))  # a small file of many pixels
    files = [digit] * 3 + [large] + [digit] * 2
    r = await client.post("/encode", data={"model": "mnist"}, files=[("image", ("d.png", f, "image/png")) for f in files])
    assert r.status_code == 200 and chunks == [3, 1, 2]
    mu = np.array(r.json()["mu"])
    alone = await client.post("/encode", data={"model": "mnist"}, files=[("image", ("d.png", large, "image/png"))])
    assert np.allclose(mu[3], alone.json()["mu"][0], atol=1e-5) and np.allclose(mu[0], mu[5], atol=1e-5)

    r = await client.post(
        "/encode", data={"model": "mnist"}, files=[("image", ("d.png", f, "image/png")) for f in [digit, b"not a png", digit]]
    )
    assert r.status_code == 422 and "not a readable image" in r.json()["detail"]


async def test_an_upload_that_fails_ends_its_request_s_turns(client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    real, prepared = service.imaging.prepare_upload, []

    def slow(data: object, *args: object, **kwargs: object) -> np.ndarray:
        prepared.append(1)
        time.sleep(0.01)
        return real(data, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(service.imaging, "prepare_upload", slow)
    files = [b"not an image"] + [png(size=(80, 80))] * 15
    r = await client.post("/encode", data={"model": "faces"}, files=[("image", ("x.png", f, "image/png")) for f in files])
    assert r.status_code == 422 and "not a readable image" in r.json()["detail"]
    await asyncio.sleep(0.1)
    assert len(prepared) <= 1 + service.runtime.IMAGE_THREADS  # the turns running when it failed, no more


@pytest.mark.parametrize("on_batch_thread", [False, True])
async def test_a_request_s_one_upload_is_prepared_where_it_costs_least_and_larger_work_on_the_image_threads(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, on_batch_thread: bool
) -> None:
    """Where lanes share every core, a request's one upload of up to 4 times the model's pixels is prepared by its
    batch's own thread; elsewhere a small one (a digit) on the event loop, less than a hand-off costs. Larger uploads,
    and requests of several, go to the image threads."""
    real, where = service.imaging._decoded, []

    def recording(*args: object) -> Image.Image:
        thread = threading.current_thread()
        where.append("loop" if thread is loop_thread else "image" if thread.name.startswith("image") else "batch")
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(service.imaging, "_decoded", recording)
    images_on_batch_thread(monkeypatch, on_batch_thread)
    loop_thread = threading.current_thread()  # the test's event loop is the app's
    uploads = {
        "a digit": [png(size=(28, 28))],
        "a larger image": [png(size=(80, 80))],  # over 4 times a digit's pixels
        "a small file of many pixels": [png(np.zeros((2000, 2000), np.uint8))],  # 4 KB that decode to 4 megapixels
        "a digit in a large file": [with_text(png(size=(28, 28)), 20_000)],  # its header is not read on the loop
        "two digits": [png(size=(28, 28))] * 2,
    }
    answers = {}
    for name, files in uploads.items():
        r = await client.post("/encode", data={"model": "mnist"}, files=[("image", ("x.png", f, "image/png")) for f in files])
        assert r.status_code == 200, name
        answers[name] = r.json()["mu"]
    assert where == ["batch" if on_batch_thread else "loop"] + ["image"] * 5
    both = np.array(answers["two digits"])  # the same rows either way, to float rounding (a batch of 2, not 1)
    assert np.allclose(both, np.array(answers["a digit"] * 2), atol=1e-5)


@pytest.mark.parametrize("on_batch_thread", [False, True])
async def test_a_request_s_one_upload_has_its_header_read_once_wherever_it_is_prepared(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, on_batch_thread: bool
) -> None:
    """The header the event loop read to choose where an upload goes is the one its decode starts from."""
    real, reads = service.imaging.open_upload, []

    def counting(data: bytes, max_pixels: int) -> Image.Image:
        reads.append(len(data))
        return real(data, max_pixels)

    monkeypatch.setattr(service.imaging, "open_upload", counting)
    images_on_batch_thread(monkeypatch, on_batch_thread)
    uploads = {
        "a digit": png(size=(28, 28)),
        "a larger image": png(size=(80, 80)),
        "a small file of many pixels": png(np.zeros((2000, 2000), np.uint8)),
    }
    for name, upload in uploads.items():
        reads.clear()
        r = await client.post("/encode", data={"model": "mnist"}, files={"image": ("x.png", upload, "image/png")})
        assert r.status_code == 200, name
        assert reads == [len(upload)], name


@pytest.mark.parametrize("model, size", [("mnist", (28, 28)), ("faces", (96, 96)), ("faces", (150, 120))])
async def test_an_upload_encodes_to_the_same_numbers_whichever_thread_prepares_it(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, model: str, size: tuple[int, int]
) -> None:
    files = {"image": ("x.png", png(size=size), "image/png")}
    answers = []
    for on_batch_thread in (False, True):
        images_on_batch_thread(monkeypatch, on_batch_thread)
        r = await client.post("/encode", data={"model": model}, files=files)
        assert r.status_code == 200, r.text
        answers.append(r.json())
    assert answers[0] == answers[1]


def test_uploads_made_together_are_each_as_made_alone_and_one_that_does_not_decode_is_zeros_that_say_why() -> None:
    def upload(data: bytes) -> Upload:
        return Upload(open_upload(data, 10**6), (3, 96, 96), invert=None, digit=False, max_pixels=10**6)

    good, cut = png(size=(96, 96)), png(size=(120, 100))
    uploads = [upload(good), upload(cut[: len(cut) // 2]), upload(png(size=(50, 40)))]
    rows = Upload.together(uploads)
    assert rows.shape == (3, 3, 96, 96)
    assert np.array_equal(rows[0].numpy(), prepare_upload(good, (3, 96, 96), max_pixels=10**6))
    assert not rows[1].any() and isinstance(uploads[1].failure(), ImageError)
    assert uploads[0].failure() is None and uploads[2].failure() is None
    assert torch.equal(upload(good)(), rows[:1])


@pytest.mark.parametrize("on_batch_thread", [False, True])
async def test_an_upload_whose_pixels_do_not_decode_is_422_whichever_thread_finds_out(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, on_batch_thread: bool
) -> None:
    """Its header reads, its pixels are cut short: only decoding them tells."""
    images_on_batch_thread(monkeypatch, on_batch_thread)
    whole = png(size=(96, 96))
    r = await client.post("/encode", data={"model": "faces"}, files={"image": ("x.png", whole[: len(whole) // 2], "image/png")})
    assert r.status_code == 422 and "could not be decoded" in r.json()["detail"]
    assert (await client.post("/encode", data={"model": "faces"}, files={"image": ("x.png", whole, "image/png")})).status_code == 200
