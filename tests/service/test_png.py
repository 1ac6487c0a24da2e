"""The service writes its PNGs itself: any decoder must read back exactly the pixels it was given."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.imaging import png_bytes


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
    for level in (0, 1, 9):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(flipped, level)))), flipped)
    smooth = np.tile(np.arange(64, dtype=np.uint8)[:, None, None], (1, 64, 3))
    assert len(png_bytes(smooth)) < smooth.size / 10  # the filter and zlib do compress
