"""Image conversions for the service: tensors to PNG and grids, uploads to model input."""

from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from isal import isal_zlib
from PIL import Image, ImageOps, UnidentifiedImageError

_T = TypeVar("_T")


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Float (N, C, H, W) in [0, 1] -> contiguous uint8 (N, H, W, C) on the same device: what PNG encoding takes.

    The service runs this once per batch on the batch's thread, not per request on the event loop; on a GPU, a
    quarter of the bytes then cross to the host."""
    pixels = images.detach().float().clamp(0, 1).mul_(255).round_().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float (N, C, H, W) in [0, 1] -> uint8 (N, H, W, C) numpy."""
    return quantize(images).cpu().numpy()


def grid(images: np.ndarray, columns: int | None = None, padding: int = 2) -> np.ndarray:
    """uint8 (N, H, W, C) -> one (H', W', C) image, row-major, `padding` black pixels between tiles."""
    n, h, w, c = images.shape
    columns = max(1, min(n, columns or math.ceil(math.sqrt(n))))
    rows = math.ceil(n / columns)
    out = np.zeros((rows * (h + padding) + padding, columns * (w + padding) + padding, c), dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        out[top : top + h, left : left + w] = image
    return out


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    # ISA-L's CRC: 0.9 us for a faces image's IDAT against zlib's 11.5, and it keeps the GIL, which zlib's lets go of
    # above 5 KiB (a hand-over a PNG on the lane that encodes it: bench/README.md, *Fewer GIL hand-overs per batch*)
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", isal_zlib.crc32(data, isal_zlib.crc32(kind)))


_PNG_COLOR_TYPE = {1: 0, 3: 2}  # channels -> PNG colour type: greyscale, RGB
_PNG_FILTER_UP = 2
_FAST_LEVEL = 1  # ISA-L's level for the service's PNGs, whole (png_bytes) or in parts (deflate_rows): see png_bytes
_ZLIB_HEADER = b"\x78\x5e"  # deflate with a 32 KiB window, a fast level: as ISA-L writes it at _FAST_LEVEL
_PNG_END = _png_chunk(b"IEND", b"")


def png_bytes(image: np.ndarray, compress_level: int | None = None) -> bytes:
    """uint8 (H, W, C) with C in 1|3 -> PNG bytes, every row with the "Up" filter.

    Written here rather than by Pillow: Pillow tries every filter on every row, which for a 96x96 decoder
    output takes 0.65 ms; one fixed filter and a fast deflate take a fraction of that. The deflate is ISA-L's
    (`isal`), which releases the GIL and, on the shipped models' outputs, is 2.7x faster than zlib's fastest
    choice at about the same size (16 of each, one thread: a faces image 249 -> 92 us, 14.8 -> 15.0 KB, against
    zlib level 1 in run-length mode, which had beaten zlib's plain level 1 in time and size; a digit 11 -> 8 us).
    Where size matters more than time, pass a zlib `compress_level` (1-9) instead. Level 0 stores the rows as they are
    (`stored_zlib`): a faces image 27.8 KB instead of about 15, written at memory speed."""
    return _png_file(_png_head(*image.shape), _zlib_stream(png_rows(image), compress_level))


def png_files(images: np.ndarray, compress_level: int | None = None) -> list[bytes]:
    """uint8 (N, H, W, C) -> one PNG each, as `png_bytes` writes it: the rows of all of them filtered in one set of numpy
    calls, their header made once. 64 digits 15.7 -> 12.0 us each, 64 faces images 106 -> 101 (one thread)."""
    _, height, width, channels = images.shape
    head = _png_head(height, width, channels)
    return [_png_file(head, _zlib_stream(rows, compress_level)) for rows in png_rows(images)]


def _zlib_stream(rows: np.ndarray, compress_level: int | None) -> bytes:
    """An image's `png_rows` deflated at `png_bytes`' `compress_level`: the PNG's IDAT."""
    if compress_level is None:
        return isal_zlib.compress(rows.data, _FAST_LEVEL)
    if compress_level == 0:
        return stored_zlib(rows.data)
    return zlib.compress(rows.data, compress_level)


def png_level(compression: str) -> int | None:
    """`png_bytes`' level for a VAE_PNG_COMPRESSION value: "fast", ISA-L's deflate (None); "none", rows stored (0)."""
    return None if compression == "fast" else 0


_STORED_BLOCK = 65535  # the most a stored deflate block holds


def stored_zlib(data: memoryview | bytes) -> bytes:
    """A zlib stream of `data` in stored (uncompressed) deflate blocks. Unlike zlib's level 0, it never lets go of the
    GIL: for the few microseconds a PNG takes, a hand-over would cost a busy thread more (bench/README.md, *Fewer GIL
    hand-overs per batch*)."""
    view = memoryview(data).cast("B")
    parts: list[bytes | memoryview] = [b"\x78\x01"]
    for start in range(0, max(len(view), 1), _STORED_BLOCK):
        block = view[start : start + _STORED_BLOCK]
        last = start + _STORED_BLOCK >= len(view)
        parts += [struct.pack("<BHH", last, len(block), len(block) ^ 0xFFFF), block]
    parts.append(struct.pack(">I", isal_zlib.adler32(view)))
    return b"".join(parts)


def png_rows(images: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, C) -> each image's PNG scanlines, (..., H, 1 + W * C): each row's filter byte, then the row
    "Up"-filtered."""
    *images_shape, height, width, channels = images.shape
    rows = np.ascontiguousarray(images).reshape(*images_shape, height, width * channels)
    scanlines = np.empty((*images_shape, height, 1 + width * channels), dtype=np.uint8)
    scanlines[..., 0] = _PNG_FILTER_UP
    scanlines[..., 0, 1:] = rows[..., 0, :]  # the row above the first is zeros
    np.subtract(rows[..., 1:, :], rows[..., :-1, :], out=scanlines[..., 1:, 1:])  # modulo 256, as the filter is defined
    return scanlines


def deflate_rows(rows: np.ndarray, last: bool) -> bytes:
    """Some consecutive scanlines of `png_rows`, compressed as `png_bytes` compresses them, for `png_from_parts`. Each
    part but the last ends on a byte boundary without ending the stream (a sync flush), so that parts compressed
    apart, on several threads at once, join into one deflate stream."""
    deflate = isal_zlib.compressobj(_FAST_LEVEL, isal_zlib.DEFLATED, -isal_zlib.MAX_WBITS)  # raw: no header or checksum
    return deflate.compress(rows.data) + deflate.flush(isal_zlib.Z_FINISH if last else isal_zlib.Z_SYNC_FLUSH)


def png_from_parts(shape: tuple[int, ...], parts: list[bytes], adler: int) -> bytes:
    """The PNG of an image of `shape` (H, W, C) from its `deflate_rows` parts in order, and `adler`, the Adler-32
    of all its `png_rows`."""
    return _png_file(_png_head(*shape), b"".join((_ZLIB_HEADER, *parts, struct.pack(">I", adler))))


def _png_file(head: bytes, idat: bytes) -> bytes:
    """A PNG from its `_png_head` and its deflated rows."""
    return b"".join((head, _png_chunk(b"IDAT", idat), _PNG_END))


def _png_head(height: int, width: int, channels: int) -> bytes:
    """A PNG's signature and header chunk: 8-bit pixels, no interlace."""
    header = struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOR_TYPE[channels], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)


class ImageError(ValueError):
    """An upload that cannot be used: the message says what is wrong (answered with 422)."""


# Formats a browser, a phone or a script is likely to send. Pillow never parses SVG or PDF.
ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")


def open_upload(data: bytes, max_pixels: int) -> Image.Image:
    """Uploaded bytes -> a Pillow image of its header alone: the pixels are decoded later, and only where there are at
    most `max_pixels` of them."""
    if not data:
        raise ImageError("the image is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"the image has too many pixels: {exc}") from None
    except UnidentifiedImageError:  # Pillow's own message names a Python object's address, no use to a client
        raise ImageError(f"not a readable image: the bytes are none of {', '.join(ALLOWED_FORMATS)}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"not a readable image ({', '.join(ALLOWED_FORMATS)}): {exc}") from None
    w, h = image.size
    if w * h > max_pixels:  # checked from the header, before any pixel is decoded
        raise ImageError(f"the image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
    return image


def _to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Any mode -> 8-bit L or RGB; transparency composited on white, 16-bit scaled down."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        # A 16-bit mode is 16-bit by definition (a dark image stays dark); for 32-bit ones, guess from the values.
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        gray = np.clip(values / top * 255.0, 0, 255).round().astype(np.uint8)
        image = Image.fromarray(gray, mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Pasted through its own alpha onto white (the image its own mask, as Pillow's docs suggest): the same pixels as
        # alpha_composite over an opaque white RGBA image, without the two full-size RGBA images that takes, nor a copy
        # of the alpha channel (a 40-megapixel RGBA PNG: 342 -> 304 MiB at its peak without that copy; bench/README.md).
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(rgba, mask=rgba)
        image = white
    mode = "L" if channels == 1 else "RGB"
    return image if image.mode == mode else image.convert(mode)


def _center_box(size: tuple[int, int], height: int, width: int) -> tuple[int, int, int, int]:
    """The largest centred box of an image of `size` with the model's aspect ratio: (left, top, right, bottom)."""
    w, h = size
    target = width / height
    if w / h > target:
        new_w = max(1, round(h * target))
        left = (w - new_w) // 2
        return left, 0, left + new_w, h
    new_h = max(1, round(w / target))
    top = (h - new_h) // 2
    return 0, top, w, top + new_h


def _fit_digits(grays: np.ndarray, size: int) -> np.ndarray:
    """MNIST's own normalisation of (N, H, W) uint8 digits -> (N, size, size): each digit's bounding box into 20/28 of
    the frame, centred by mass.

    The boxes and centres of all of them in one set of numpy calls, integer pixels throughout, and plain Python for
    the scalars: for a 28x28 digit each numpy call costs more than its arithmetic (np.clip on two Python numbers alone
    10 us), so a batch's digits cost 22 us each here against 40 one at a time."""
    n, height, width = grays.shape
    out = np.zeros((n, size, size), dtype=np.uint8)
    peaks = grays.max(axis=(1, 2))
    mask = grays > (0.25 * peaks)[:, None, None]
    # The box from each row's and column's any(): np.nonzero(mask) would list every inked pixel, 635 MB of indices for
    # a 40-megapixel upload that compresses to 52 KB. A digit with ink has a row and a column of it (its peak's).
    rows, cols = mask.any(axis=2), mask.any(axis=1)
    tops, bottoms = rows.argmax(axis=1).tolist(), (height - rows[:, ::-1].argmax(axis=1)).tolist()
    lefts, rights = cols.argmax(axis=1).tolist(), (width - cols[:, ::-1].argmax(axis=1)).tolist()
    box = round(size * 20 / 28)
    boxed = np.zeros((n, box, box), dtype=np.uint8)  # each digit resized into its top left corner
    sizes: list[tuple[int, int] | None] = []
    for i, peak in enumerate(peaks.tolist()):
        if peak == 0:  # nothing inked: the whole frame, resized
            out[i] = _pixels(Image.fromarray(grays[i]).resize((size, size), Image.Resampling.LANCZOS))
            sizes.append(None)
            continue
        crop = grays[i, tops[i] : bottoms[i], lefts[i] : rights[i]]
        scale = box / max(crop.shape)
        h, w = max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))
        boxed[i, :h, :w] = _pixels(Image.fromarray(crop).resize((w, h), Image.Resampling.LANCZOS))
        sizes.append((h, w))
    totals = boxed.sum(axis=(1, 2), dtype=np.int64).tolist()
    row_mass = (boxed.sum(axis=2, dtype=np.int64) @ np.arange(box)).tolist()
    col_mass = (boxed.sum(axis=1, dtype=np.int64) @ np.arange(box)).tolist()
    for i, hw in enumerate(sizes):
        if hw is None:
            continue
        h, w = hw
        cy = row_mass[i] / totals[i] if totals[i] else h / 2
        cx = col_mass[i] / totals[i] if totals[i] else w / 2
        top = min(max(round(size / 2 - cy), 0), size - h)
        left = min(max(round(size / 2 - cx), 0), size - w)
        out[i, top : top + h, left : left + w] = boxed[i, :h, :w]
    return out


def _pixels(image: Image.Image) -> np.ndarray:
    """A Pillow image's 8-bit pixels as a read-only array, (H, W) or (H, W, C): what np.asarray gives, without the array
    interface's own costs (11 us for 28x28). Both copy the pixels once (the interface through tobytes, too)."""
    w, h = image.size
    bands = len(image.getbands())
    return np.frombuffer(image.tobytes(), dtype=np.uint8).reshape((h, w, bands) if bands > 1 else (h, w))


def prepare_upload(
    data: bytes | Image.Image,
    shape: tuple[int, int, int],
    *,
    max_pixels: int,
    invert: bool | None = None,
    digit: bool = False,
) -> np.ndarray:
    """Uploaded bytes, or what `open_upload` made of them -> float32 (C, H, W) in [0, 1] for a model of `shape`.

    EXIF rotation is applied and only the first frame of an animation is used. `invert` None means
    auto: for single-channel models, a light background (a photo of ink on paper) is inverted to the
    light-on-dark that MNIST-like models saw. `digit` applies MNIST's size-and-centre normalisation.
    Raises ImageError for an upload that is no image, or too large a one.
    """
    channels, height, width = shape
    image = _decoded(data if isinstance(data, Image.Image) else open_upload(data, max_pixels), channels, height, width)
    if channels != 1:
        return _resized(image, height, width).transpose(2, 0, 1)
    return _gray_inputs(_pixels(image)[None], (height, width), invert, digit)[0]


def prepare_uploads(
    uploads: Sequence[bytes | Image.Image],
    shape: tuple[int, int, int],
    *,
    max_pixels: int,
    invert: bool | None = None,
    digit: bool = False,
) -> list[np.ndarray | Exception]:
    """`prepare_upload` of several uploads: each one's input, or what it raised (an ImageError where the upload is at
    fault), so that one upload's failure is its own.

    Made stage by stage for all of them, not upload by upload, and single-channel ones in one set of numpy calls for
    all of a size: a small image's work is mostly Python's and numpy's per call, and the same calls in a row run
    faster (the interpreter's and the CPU's caches warm). 64 MNIST digits took 62 us each against 120 one by one, 8 of
    them 70 us each (in-process, 2 cores; bench/README.md, *A batch's uploads prepared together*)."""
    if len(uploads) == 1:  # no stages to share: the shorter way
        return [_attempt(prepare_upload, uploads[0], shape, max_pixels=max_pixels, invert=invert, digit=digit)]
    channels, height, width = shape
    opened = [upload if isinstance(upload, Image.Image) else _attempt(open_upload, upload, max_pixels) for upload in uploads]
    made = [x if isinstance(x, Exception) else _attempt(_decoded, x, channels, height, width) for x in opened]
    images = [(i, x) for i, x in enumerate(made) if isinstance(x, Image.Image)]
    if channels != 1:
        for i, image in images:
            made[i] = _resized(image, height, width).transpose(2, 0, 1)
        return made  # type: ignore[return-value]  # every image made an array
    while images:  # those of one size at a time: usually all of them
        size = images[0][1].size
        group = [(i, image) for i, image in images if image.size == size]
        images = [(i, image) for i, image in images if image.size != size] if len(group) < len(images) else []
        grays = np.stack([_pixels(image) for _, image in group])
        for (i, _), array in zip(group, _gray_inputs(grays, (height, width), invert, digit), strict=True):
            made[i] = array
    return made  # type: ignore[return-value]


def _gray_inputs(grays: np.ndarray, size: tuple[int, int], invert: bool | None, digit: bool) -> np.ndarray:
    """(N, H, W) uint8 pixels of single-channel uploads -> the model's float32 (N, 1, height, width) inputs: inverted
    where asked or where the border is light, then fitted as a digit or resized."""
    flips = [invert] * len(grays)
    if invert is None:
        border = np.concatenate([grays[:, 0], grays[:, -1], grays[:, :, 0], grays[:, :, -1]], axis=1)
        flips = (border.mean(axis=1) > 127.5).tolist()
    if all(flips):
        grays = 255 - grays
    elif any(flips):
        grays = np.where(np.array(flips)[:, None, None], 255 - grays, grays)
    if digit:
        return (_fit_digits(grays, size[0]).astype(np.float32) / 255.0)[:, None]
    return np.stack([_resized(Image.fromarray(gray), *size) for gray in grays])[:, None]


def _attempt(make: Callable[..., _T], *args: Any, **kwargs: Any) -> _T | Exception:
    """What `make` returns, or what it raised: one upload's failure, its own."""
    try:
        return make(*args, **kwargs)
    except Exception as exc:
        return exc


def _decoded(image: Image.Image, channels: int, height: int, width: int) -> Image.Image:
    """An upload's first frame, its pixels decoded, turned upright by its EXIF, in 8-bit L or RGB."""
    try:
        image.seek(0)
        image.draft("RGB" if channels == 3 else "L", (width * 2, height * 2))  # JPEG: decode at reduced size
        # in place: otherwise an image with nothing to turn comes back as a full-size copy (a 40-megapixel RGB PNG:
        # 304 -> 153 MiB at its peak)
        ImageOps.exif_transpose(image, in_place=True)
        image.load()
        return _to_mode(image, channels)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"the image could not be decoded: {exc}") from None


def _resized(image: Image.Image, height: int, width: int) -> np.ndarray:
    """An 8-bit image -> float32 (height, width[, C]) in [0, 1]: `_fitted`."""
    return np.asarray(_fitted(image, height, width), dtype=np.float32) / 255.0


def _fitted(image: Image.Image, height: int, width: int) -> Image.Image:
    """An 8-bit image's largest centred box of the model's aspect ratio, resized to height x width.

    It stays a Pillow image till it is small, and one of the model's shape is not cropped: no full-size copy is made (a
    square 40-megapixel PNG of 131 KB took 1.05 s and 416 MiB with three, 0.65 s and 151 MiB without).
    `resize(box=...)` would spare the crop's copy too, but it filters across the box's edges: other pixels."""
    box = _center_box(image.size, height, width)
    if box != (0, 0, *image.size):
        image = image.crop(box)
    return image.resize((width, height), Image.Resampling.LANCZOS, reducing_gap=3.0)


def rgb_pixels(image: Image.Image, height: int, width: int) -> np.ndarray:
    """An opened image as a three-channel model is given it, in 8 bits: uint8 (height, width, 3), what `prepare_upload`
    makes of it before the scaling to [0, 1] (its first frame, upright by its EXIF, alpha onto white, the centred box
    resized). Training reads its images through this, so that a model learns from the pixels it will be served.
    Raises ImageError where the pixels cannot be decoded."""
    return _pixels(_fitted(_decoded(image, 3, height, width), height, width))
