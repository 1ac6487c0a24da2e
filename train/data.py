"""Training data: the MNIST IDX files (read, or download and verify), and folders or zips of images."""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import struct
import urllib.request
import zipfile
import zlib
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from service import imaging
from service.artifact import sha256_file
from service.cpus import CGROUP, affinity_cpus

MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
# The gzip files of the original distribution and their published md5s.
MNIST_FILES = {
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
CHUNK = 16  # images a decoding thread takes at a time: one at a time, handing them over took longer than decoding
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class DataError(Exception):
    """Training data that is missing or malformed: the message says what to fix."""


@dataclass
class Dataset:
    """Images as uint8 (N, C, H, W), optional labels, and where they came from."""

    images: torch.Tensor
    labels: torch.Tensor | None
    source: dict[str, object] = field(default_factory=dict)

    def head(self, n: int) -> Dataset:
        """The first `n` examples; `source` then counts only those (what the manifest should report)."""
        labels = None if self.labels is None else self.labels[:n]
        return Dataset(self.images[:n], labels, {**self.source, "images": len(self.images[:n])})


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzip or not) into an array of its declared type and shape."""
    opener: Callable[..., io.BufferedIOBase] = gzip.open if path.suffix == ".gz" else open  # type: ignore[assignment]
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # not gzip, cut short or corrupt: gzip raises all three
        raise DataError(f"{path} could not be read: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: {len(raw)} bytes, its header alone needs {header}")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path} holds {len(raw) - header} bytes of data, its header promises {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find_idx(directory: Path, stem: str) -> Path:
    # Accept both the canonical names and the "train-images.idx3-ubyte" spelling, gzipped or not.
    for name in (stem, stem.replace("-idx", ".idx")):
        for suffix in (".gz", ""):
            if (directory / (name + suffix)).is_file():
                return directory / (name + suffix)
    raise DataError(f"{stem}[.gz] not found in {directory}; pass --download to fetch MNIST")


def load_mnist(directory: Path, split: str) -> Dataset:
    """The 60k training or 10k test split from the four standard IDX files in `directory`."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = _find_idx(directory, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(directory, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{images_path.name} {images.shape} and {labels_path.name} {labels.shape} do not match")
    return Dataset(
        images=torch.from_numpy(images.copy()).unsqueeze(1),  # (N, 1, 28, 28)
        labels=torch.from_numpy(labels.astype(np.int64)),
        source={
            "name": "MNIST",
            "split": split,
            "images": len(images),
            "files": {p.name: sha256_file(p) for p in (images_path, labels_path)},
        },
    )


def download_mnist(directory: Path, mirror: str = MNIST_MIRROR) -> None:
    """Fetch the four gzip files into `directory`, checking each md5 before keeping it."""
    directory.mkdir(parents=True, exist_ok=True)
    for stem, md5 in MNIST_FILES.items():
        target = directory / f"{stem}.gz"
        if target.is_file() and hashlib.md5(target.read_bytes()).hexdigest() == md5:
            continue
        url = mirror.rstrip("/") + f"/{stem}.gz"
        partial = target.with_suffix(".gz.part")
        try:
            with urllib.request.urlopen(url, timeout=60) as response, partial.open("wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise DataError(f"could not download {url}: {exc}") from exc
        actual = hashlib.md5(partial.read_bytes()).hexdigest()
        if actual != md5:
            partial.unlink()
            raise DataError(f"{url} has md5 {actual}, expected {md5}: refusing a corrupt or altered file")
        partial.replace(target)


@contextmanager
def _image_files(path: Path) -> Iterator[tuple[list[str], Callable[[str], bytes]]]:
    """(every image in a folder, recursively, as paths relative to it, or in a zip, in sorted order; a function that
    reads one of them: no bytes where it cannot be read, e.g. a zip's member that fails its CRC), with the zip open
    meanwhile."""
    if path.is_dir():
        # sorted as paths (by their parts), not as strings: the order seeded holdouts have always been drawn over
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        yield [str(file.relative_to(path)) for file in files], _or_nothing(lambda name: (path / name).read_bytes())
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = (n for n in archive.namelist() if not n.startswith("__MACOSX"))
            yield sorted(n for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES), _or_nothing(archive.read)
    else:
        raise DataError(f"{path} is neither a folder nor a zip of images")


def _or_nothing(read: Callable[[str], bytes]) -> Callable[[str], bytes]:
    """`read`, with no bytes (an unreadable image, skipped and counted) where the file cannot be read."""

    def reading(name: str) -> bytes:
        try:
            return read(name)
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error):
            return b""

    return reading


def _decoded(data: bytes, size: int) -> np.ndarray | None:
    """One image's bytes as a training row, uint8 (3, size, size), made as the service makes an upload the model's input
    (`imaging.rgb_pixels`: upright by its EXIF, alpha onto white, the centred square resized); None where they are not
    a readable image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return imaging.rgb_pixels(image, size, size).transpose(2, 0, 1)
    except (OSError, ValueError, Image.DecompressionBombError):  # imaging.ImageError is a ValueError
        return None


def _decoded_chunk(chunk: list[bytes], size: int) -> list[np.ndarray | None]:
    return [_decoded(data, size) for data in chunk]


def decode_threads() -> int:
    """Threads that decode training images: one a core this process may use, up to 16. Pillow lets go of the GIL
    while it decodes and resizes, so they run in parallel."""
    return min(16, affinity_cpus())


def _decoded_in_order(files: Iterable[bytes], size: int, threads: int) -> Generator[np.ndarray | None, None, None]:
    """`_decoded` of each of `files`, in their order, decoded on `threads` in parts of CHUNK, a bounded few parts
    ahead (memory) of the one taken: read on the caller's thread, in order."""
    with ThreadPoolExecutor(threads, "decode") as pool:
        pending: deque[Future[list[np.ndarray | None]]] = deque()
        try:
            remaining = iter(files)
            for chunk in iter(lambda: list(islice(remaining, CHUNK)), []):
                pending.append(pool.submit(_decoded_chunk, chunk, size))
                if len(pending) > 2 * threads:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:  # the caller has what it needs (or failed): what has not begun is not decoded
            for future in pending:
                future.cancel()


def load_images(
    path: Path, size: int, *, limit: int | None = None, progress: bool = False, threads: int | None = None
) -> Dataset:
    """Decode every image under `path` once, made a size x size RGB input as the service makes an upload (`_decoded`),
    each straight into its row of one array: the decoded set is held once, not also as a list of images to stack
    (FFHQ's 70,000 thumbnails at 128x128 are 3.4 GB). Decoded on `threads` (`decode_threads()`), taken in the files'
    order: the rows, and the files skipped as unreadable, are those of one thread."""
    if not path.exists():
        raise DataError(f"{path} does not exist")
    with _image_files(path) as (names, read):
        shape = (len(names) if limit is None else min(len(names), limit), 3, size, size)
        _check_memory(shape)
        images = np.empty(shape, dtype=np.uint8)
        count = skipped = 0
        rows = _decoded_in_order(map(read, names), size, threads or decode_threads())
        bar = tqdm(rows, desc=f"decoding {path.name}", total=len(names), unit="img", leave=False, disable=not progress)
        with closing(rows), bar:
            for row in bar:
                if row is None:
                    skipped += 1
                    continue
                images[count] = row
                count += 1
                if count == len(images):  # every row filled: --limit reached, or no image left to read
                    break
    if count == 0:
        raise DataError(f"no readable images in {path} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return Dataset(
        images=torch.from_numpy(images[:count]),  # (N, 3, size, size) uint8
        labels=None,
        source={
            "name": path.name,
            "images": count,
            "skipped_unreadable": skipped,
            "files": {path.name: sha256_file(path)} if path.is_file() else {},
        },
    )


def available_memory(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = CGROUP) -> int | None:
    """Bytes this process can still take: the kernel's MemAvailable, capped by its cgroup's memory limit less the
    cgroup's working set (a container's `docker run --memory`, a Kubernetes limit, which MemAvailable does not see;
    the working set as cAdvisor counts it: usage less the inactive file cache, which the kernel reclaims first);
    None where neither is known (macOS)."""
    known = [kib * 1024 for kib in _fields(meminfo, "MemAvailable:")]
    for limit, usage, stat, cache in (
        ("memory.max", "memory.current", "memory.stat", "inactive_file"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat", "total_inactive_file"),
    ):
        try:
            cap = (cgroup / limit).read_text().strip()
            used = int((cgroup / usage).read_text())
        except (OSError, ValueError):
            continue
        if cap.isdigit() and int(cap) < 2**60:  # "max", or v1's "no limit": a number near 2**63
            known.append(max(0, int(cap) - used + sum(_fields(cgroup / stat, cache + " "))))
        break
    return min(known) if known else None


def _fields(path: Path, key: str) -> list[int]:
    """The number after `key` on the line that starts with it, as a one-item list; [] where there is none."""
    try:
        return [int(line.split()[1]) for line in path.read_text().splitlines() if line.startswith(key)][:1]
    except (OSError, ValueError, IndexError):
        return []


def _check_memory(shape: tuple[int, ...]) -> None:
    """Fail before decoding, not minutes into it at the kernel's OOM kill, where the decoded images cannot fit."""
    count, per_image = shape[0], int(np.prod(shape[1:]))
    free = available_memory()
    if free is None or count * per_image <= free:
        return
    fit = free * 3 // 4 // per_image  # a quarter left for training itself: the model, its batches, the optimiser
    raise DataError(
        f"{count:,} images at {shape[-1]}x{shape[-1]} take {count * per_image / 2**30:.1f} GiB decoded, and "
        f"{free / 2**30:.1f} GiB of memory is available: pass --limit {fit:,} (or fewer), or a smaller --image-size"
    )


def split_holdout(data: Dataset, share: float, seed: int) -> tuple[Dataset, Dataset]:
    """A fixed, seeded (train, validation) split: validation the images `randperm(n, seed)` puts first, training
    the rest, in that order. `data`'s own rows are put in that order (`_reorder`) and the two splits are views of
    them: splitting copies no image, so the set is never held twice."""
    n = len(data.images)
    n_val = max(1, round(n * share)) if n > 1 else 0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    for rows in (data.images, data.labels):
        if rows is not None:
            _reorder(rows, order)
    images, labels = data.images, data.labels
    return (
        Dataset(images[n_val:], None if labels is None else labels[n_val:], {**data.source, "split": "train"}),
        Dataset(images[:n_val], None if labels is None else labels[:n_val], {**data.source, "split": "validation"}),
    )


def _reorder(rows: torch.Tensor, order: torch.Tensor) -> None:
    """`rows[i] = rows[order[i]]` for every i at once (`order` a permutation), with one row's copy aside: each cycle of
    the permutation is followed from a row set aside to the row that takes it (about a second for 70,000 rows
    of 128x128)."""
    source = order.tolist()
    done = [False] * len(source)
    for start in range(len(source)):
        if done[start] or source[start] == start:
            continue
        first = rows[start].clone()
        at = start
        while source[at] != start:
            rows[at] = rows[source[at]]
            done[at] = True
            at = source[at]
        rows[at] = first
        done[at] = True
