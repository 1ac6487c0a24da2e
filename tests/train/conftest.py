"""Shared by the `train/` tests: generated IDX files, images and zips, a local MNIST mirror, a training-step check."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import math
import struct
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train import data
from train.vae import vae_loss

_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}


def idx_bytes(array: np.ndarray) -> bytes:
    """`array` in the IDX format: two zero bytes, the type code, the rank, big-endian sizes, then the data."""
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    header = bytes([0, 0, _IDX_CODES[dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(dtype).tobytes()


def mnist_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` random 28x28 uint8 "digits" and labels cycling through 0..9 (so 3 and 0 both occur)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), (np.arange(n) % 10).astype(np.uint8)


def mnist_files(n_train: int = 64, n_test: int = 32) -> dict[str, bytes]:
    """The four MNIST files as {canonical stem: uncompressed IDX bytes}."""
    train_images, train_labels = mnist_arrays(n_train, seed=1)
    test_images, test_labels = mnist_arrays(n_test, seed=2)
    return {
        "train-images-idx3-ubyte": idx_bytes(train_images),
        "train-labels-idx1-ubyte": idx_bytes(train_labels),
        "t10k-images-idx3-ubyte": idx_bytes(test_images),
        "t10k-labels-idx1-ubyte": idx_bytes(test_labels),
    }


def write_mnist(
    directory: Path, *, gzipped: bool = True, dotted: bool = False, n_train: int = 64, n_test: int = 32
) -> Path:
    """The four files in `directory`, gzipped or not, named "train-images-idx3-ubyte" or (dotted)
    "train-images.idx3-ubyte"."""
    directory.mkdir(parents=True, exist_ok=True)
    for stem, raw in mnist_files(n_train, n_test).items():
        name = stem.replace("-idx", ".idx") if dotted else stem
        if gzipped:
            (directory / f"{name}.gz").write_bytes(gzip.compress(raw, mtime=0))
        else:
            (directory / name).write_bytes(raw)
    return directory


def image_bytes(size: tuple[int, int] = (40, 40), mode: str = "RGB", fmt: str = "PNG", seed: int = 0) -> bytes:
    """An encoded image of random pixels; `size` is (width, height) as PIL has it."""
    w, h = size
    pixels = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


def faces_zip(path: Path, n: int = 64) -> Path:
    """A zip of `n` small images of assorted sizes, modes and formats, as a downloaded face set might be."""
    kinds = [((48, 40), "RGB", "PNG"), ((40, 56), "RGB", "JPEG"), ((36, 36), "L", "PNG"), ((44, 40), "RGBA", "PNG")]
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(n):
            size, mode, fmt = kinds[i % len(kinds)]
            archive.writestr(f"faces/{i:04d}.{'jpg' if fmt == 'JPEG' else 'png'}", image_bytes(size, mode, fmt, seed=i))
    return path


@dataclass
class Mirror:
    """A local HTTP server standing in for the MNIST mirror: serves `root`, records the paths asked for."""

    url: str
    root: Path
    requests: list[str] = field(default_factory=list)

    def publish(self, files: dict[str, bytes]) -> dict[str, str]:
        """Serve `{stem: raw IDX}` as `stem.gz`; returns `{stem: md5 of the gzip}` for `data.MNIST_FILES`."""
        md5s = {}
        for stem, raw in files.items():
            compressed = gzip.compress(raw, mtime=0)
            (self.root / f"{stem}.gz").write_bytes(compressed)
            md5s[stem] = hashlib.md5(compressed).hexdigest()
        return md5s


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib honours http_proxy: a CI machine's proxy must not sit between the tests and 127.0.0.1."""
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


@pytest.fixture
def mirror(tmp_path: Path, no_proxy: None) -> Iterator[Mirror]:
    served = tmp_path / "mirror"
    root = served / "mnist"  # a path under the host, as real mirrors have
    root.mkdir(parents=True)
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

        def log_message(self, format: str, *args: object) -> None:  # keep the test output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Mirror(url=f"http://127.0.0.1:{server.server_port}/mnist/", root=root, requests=requests)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def published_mnist(mirror: Mirror, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The generated MNIST files on the mirror, and `train.data.MNIST_FILES` holding their md5s."""
    md5s = mirror.publish(mnist_files())
    monkeypatch.setattr(data, "MNIST_FILES", md5s)
    return md5s


def assert_trains(model: torch.nn.Module, x: torch.Tensor, kind: str, steps: int = 3) -> None:
    """Adam steps on one generated batch: every parameter gets a finite gradient, and the loss
    (with the same noise each time) is finite and goes down."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(steps + 1):
        torch.manual_seed(0)  # the same eps each time, so only the step changes the loss
        recon, mu, log_var = model(x)
        terms = vae_loss(recon, x, mu, log_var, kind=kind)
        optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"no finite gradient for {name}"
        first = next(model.parameters())  # the encoder's first layer: the gradient crosses the whole model
        assert first.grad is not None and first.grad.abs().sum() > 0
        losses.append(terms.loss.item())
        optimizer.step()
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0], losses
