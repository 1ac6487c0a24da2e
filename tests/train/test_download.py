"""Downloading MNIST: every file md5-checked before it is kept, from a local stand-in for the mirror."""

from __future__ import annotations

import hashlib
import re
import socket
from pathlib import Path

import numpy as np
import pytest

from service.artifact import read_artifact
from tests.train.conftest import Mirror, idx_bytes, mnist_files
from train import data
from train.__main__ import main
from train.data import DataError, download_mnist, load_mnist


def test_the_four_files_are_fetched_verified_and_readable(
    tmp_path: Path, mirror: Mirror, published_mnist: dict[str, str]
) -> None:
    target = tmp_path / "mnist"  # created on the way
    download_mnist(target, mirror.url)
    assert sorted(p.name for p in target.iterdir()) == sorted(f"{stem}.gz" for stem in published_mnist)
    assert sorted(mirror.requests) == sorted(f"/mnist/{stem}.gz" for stem in published_mnist)
    assert len(load_mnist(target, "train").images) == 64 and len(load_mnist(target, "test").images) == 32


def test_files_already_there_and_intact_are_not_fetched_again(
    tmp_path: Path, mirror: Mirror, published_mnist: dict[str, str]
) -> None:
    target = tmp_path / "mnist"
    download_mnist(target, mirror.url.rstrip("/"))  # with or without the trailing slash
    mirror.requests.clear()
    (target / "t10k-labels-idx1-ubyte.gz").write_bytes(b"a damaged copy")
    download_mnist(target, mirror.url)
    assert mirror.requests == ["/mnist/t10k-labels-idx1-ubyte.gz"]  # only the damaged file again
    name = "t10k-labels-idx1-ubyte.gz"
    assert (target / name).read_bytes() == (mirror.root / name).read_bytes()


def test_a_checksum_mismatch_fails_naming_both_md5s_and_keeps_nothing(
    tmp_path: Path, mirror: Mirror, published_mnist: dict[str, str]
) -> None:
    altered = {**mnist_files(), "train-labels-idx1-ubyte": idx_bytes(np.ones(64, dtype=np.uint8))}
    served = mirror.publish(altered)["train-labels-idx1-ubyte"]  # the mirror now serves other bytes
    expected = published_mnist["train-labels-idx1-ubyte"]
    target = tmp_path / "mnist"
    with pytest.raises(DataError) as caught:
        download_mnist(target, mirror.url)
    message = str(caught.value)
    assert f"{mirror.url}train-labels-idx1-ubyte.gz has md5 {served}, expected {expected}" in message
    assert "refusing a corrupt or altered file" in message
    assert [p.name for p in target.iterdir()] == ["train-images-idx3-ubyte.gz"]  # fetched before it, and intact


def test_a_missing_file_on_the_mirror_fails_naming_the_url_and_keeps_nothing(
    tmp_path: Path, mirror: Mirror, published_mnist: dict[str, str]
) -> None:
    (mirror.root / "t10k-images-idx3-ubyte.gz").unlink()
    target = tmp_path / "mnist"
    url = re.escape(f"{mirror.url}t10k-images-idx3-ubyte.gz")
    with pytest.raises(DataError, match=rf"could not download {url}: .*404"):
        download_mnist(target, mirror.url)
    assert sorted(p.name for p in target.iterdir()) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]


def test_an_unreachable_mirror_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_proxy: None) -> None:
    monkeypatch.setattr(data, "MNIST_FILES", {"train-images-idx3-ubyte": "0" * 32})
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(DataError, match=re.escape(f"could not download {url}/train-images-idx3-ubyte.gz: ")):
        download_mnist(tmp_path, url)
    assert list(tmp_path.iterdir()) == []


# ---- the CLI: --download --mirror --------------------------------------------------------------------

CLI_ARGS = ["--epochs", "1", "--limit", "64", "--hidden-dim", "16", "--latent-dim", "2", "--device", "cpu"]


def test_the_cli_downloads_from_the_mirror_then_trains(
    tmp_path: Path, mirror: Mirror, published_mnist: dict[str, str]
) -> None:
    target = tmp_path / "mnist"
    argv = ["mnist", "--data", str(target), "--download", "--mirror", mirror.url, "--out", str(tmp_path / "run")]
    argv += CLI_ARGS
    assert main(argv) == 0
    assert len(mirror.requests) == 4
    manifest = read_artifact(tmp_path / "run" / "artifact").manifest
    assert manifest["training"]["mirror"] == mirror.url
    files = manifest["data"]["train"]["files"] | manifest["data"]["validation"]["files"]
    assert files == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in target.iterdir()}


def test_the_cli_refuses_a_file_with_the_wrong_md5(
    tmp_path: Path, mirror: Mirror, published_mnist: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    served = mirror.publish({"t10k-images-idx3-ubyte": idx_bytes(np.zeros((32, 28, 28), dtype=np.uint8))})
    target = tmp_path / "mnist"
    argv = ["mnist", "--data", str(target), "--download", "--mirror", mirror.url, "--out", str(tmp_path / "run")]
    argv += CLI_ARGS
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"has md5 {served['t10k-images-idx3-ubyte']}, expected {published_mnist['t10k-images-idx3-ubyte']}" in err
    assert not (target / "t10k-images-idx3-ubyte.gz").exists()
    assert not (tmp_path / "run" / "artifact").exists()
