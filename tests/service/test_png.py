"""The service writes its PNGs itself: any decoder must read back exactly the pixels it was given."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from service.imaging import deflate_rows, png_bytes, png_files, png_from_parts, png_rows, stored_zlib


@pytest.mark.parametrize("shape", [(1, 1, 1), (28, 28, 1), (7, 2, 1), (1, 1, 3), (3, 5, 3), (96, 96, 3)])
def test_a_png_reads_back_as_the_same_pixels_in_greyscale_or_rgb(shape: tuple[int, int, int]) -> None:
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    data = png_bytes(pixels)
    Image.open(io.BytesIO(data)).verify()  # chunk CRCs and structure
    image = Image.open(io.BytesIO(data))
    assert image.mode == ("L" if shape[-1] == 1 else "RGB") and image.size == (shape[1], shape[0])
    assert np.array_equal(np.asarray(image).reshape(shape), pixels)


def test_any_memory_layout_and_compression_level_give_the_same_image() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (32, 24, 3), dtype=np.uint8)
    flipped = pixels[::-1, ::2]  # a strided view
    for level in (None, 0, 1, 9):  # the service's fast deflate, or zlib's levels
        data = png_bytes(flipped, level)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), flipped)
    smooth = np.tile(np.arange(64, dtype=np.uint8)[:, None, None], (1, 64, 3))
    assert len(png_bytes(smooth)) < smooth.size / 10  # the filter and the deflate do compress


@pytest.mark.parametrize("shape", [(5, 28, 28, 1), (3, 96, 96, 3), (1, 1, 1, 3), (2, 7, 2, 1)])
@pytest.mark.parametrize("level", [None, 0, 6])
def test_a_batch_s_pngs_are_each_the_png_of_its_image(shape: tuple[int, int, int, int], level: int | None) -> None:
    images = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    assert png_files(images, level) == [png_bytes(image, level) for image in images]
    assert png_files(images[::-1], level) == [png_bytes(image, level) for image in images[::-1]]  # a strided view


def _idat(png: bytes) -> bytes:
    """The concatenated IDAT data of a PNG file."""
    data, at = b"", 8
    while at < len(png):
        (length,), kind = struct.unpack(">I", png[at : at + 4]), png[at + 4 : at + 8]
        data += png[at + 8 : at + 8 + length] if kind == b"IDAT" else b""
        at += 12 + length
    return data


@pytest.mark.parametrize("parts", [1, 2, 5])
def test_rows_deflated_in_parts_join_into_one_valid_png(parts: int) -> None:
    """Large PNGs are compressed in parts on several threads: joined, they are one zlib stream, checksum included."""
    pixels = np.random.default_rng(parts).integers(0, 256, (61, 40, 3), dtype=np.uint8)
    pixels[20:40] = 7  # runs, which run-length deflate turns into matches
    rows = png_rows(pixels)
    chunks = np.array_split(rows, parts)
    deflated = [deflate_rows(chunk, last=i == parts - 1) for i, chunk in enumerate(chunks)]
    data = png_from_parts(pixels.shape, deflated, zlib.adler32(rows.data))
    Image.open(io.BytesIO(data)).verify()
    assert zlib.decompress(_idat(data)) == rows.tobytes()  # zlib checks the Adler-32 at the end
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels)
    if parts == 1:
        assert data == png_bytes(pixels)


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 200_000])
def test_stored_zlib_is_a_zlib_stream_of_the_bytes_in_blocks_of_at_most_64_kib(size: int) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    stream = stored_zlib(data)
    assert zlib.decompress(stream) == data  # the blocks, their lengths and the Adler-32
    assert len(stream) == 2 + 5 * max(1, -(-size // 65535)) + size + 4  # stored: nothing compressed


def test_level_0_stores_the_rows_and_any_decoder_reads_the_same_pixels() -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    stored = png_bytes(pixels, 0)
    Image.open(io.BytesIO(stored)).verify()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(stored))), pixels)
    assert len(stored) > pixels.size > len(png_bytes(np.zeros_like(pixels), 0)) - 200  # every row's bytes, as they are
