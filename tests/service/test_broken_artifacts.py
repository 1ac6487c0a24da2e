"""Broken artifacts in the model repository: the service starts, serves the healthy models, and /readyz,
/models and the log say which model failed and why (once, in one line)."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import torch
from torch import Tensor, nn

from service.artifact import MANIFEST, read_artifact, sha256_file, write_artifact
from service.settings import Settings
from tests.conftest import serve


class FixedShapes(nn.Module):
    """A 'model' for a 1x28x28 image and a 2-d latent whose decode misbehaves on purpose."""

    def __init__(self, decoded_side: int = 28, first_row_only: bool = False) -> None:
        super().__init__()
        self.decoded_side, self.first_row_only = decoded_side, first_row_only

    @torch.jit.export
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu = x.flatten(1)[:, :2]
        return mu, torch.zeros_like(mu)

    @torch.jit.export
    def decode(self, z: Tensor) -> Tensor:
        rows = 1 if self.first_row_only else z.shape[0]  # a batch of B answered with a single image
        return torch.full((rows, 1, self.decoded_side, self.decoded_side), 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x)[0])


def export_fake(module: nn.Module, directory: Path) -> None:
    write_artifact(module, directory, {"name": directory.name, "image_shape": [1, 28, 28], "latent_dim": 2})


def edit_manifest(directory: Path, **changes: object) -> None:
    path = directory / MANIFEST
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def build_broken_repository(root: Path, healthy: Path) -> Path:
    """The tiny healthy `mnist`, and next to it one folder per way an artifact can be broken."""
    shutil.copytree(healthy / "mnist", root / "mnist")
    for name in ("corrupt", "tampered", "future", "escape", "garbled_manifest"):
        shutil.copytree(healthy / "mnist", root / name)
    weights = root / "corrupt" / "model.pt"  # truncated, and the manifest's checksum made to match
    weights.write_bytes(weights.read_bytes()[:2000])
    artifact = json.loads((root / "corrupt" / MANIFEST).read_text())["artifact"]
    edit_manifest(root / "corrupt", artifact={**artifact, "sha256": sha256_file(weights)})
    with (root / "tampered" / "model.pt").open("ab") as f:  # changed after export: the checksum no longer matches
        f.write(b"\0")
    edit_manifest(root / "future", format_version=99)
    edit_manifest(root / "escape", artifact={**artifact, "file": "../mnist/model.pt"})
    (root / "garbled_manifest" / MANIFEST).write_text('{"name": "garbled_manifest", ')
    (root / "no_manifest").mkdir()
    shutil.copy(healthy / "mnist" / "model.pt", root / "no_manifest" / "model.pt")
    export_fake(FixedShapes(decoded_side=14), root / "wrong_shape")
    return root


REASONS = {
    "corrupt": "model.pt is not a loadable TorchScript file: PytorchStreamReader failed",
    "tampered": "model.pt has sha256",
    "future": "format_version 99 is not supported (this service reads 1)",
    "escape": "artifact file '../mnist/model.pt' is missing",
    "garbled_manifest": "manifest.json is not valid JSON",
    "no_manifest": "no manifest.json in",
    "wrong_shape": "decode returned (1, 1, 14, 14), the manifest promises (1, (1, 28, 28))",
}


@pytest.fixture(scope="module")
def broken_repository(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Path:
    return build_broken_repository(tmp_path_factory.mktemp("broken"), tiny_models)


@pytest.fixture
async def client(broken_repository: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(Settings(model_dir=broken_repository)) as c:
        yield c


def test_the_broken_repository_is_as_described(broken_repository: Path) -> None:
    corrupt = broken_repository / "corrupt"
    assert read_artifact(corrupt).sha256 == sha256_file(corrupt / "model.pt")  # the checksum passes; loading fails
    assert read_artifact(broken_repository / "wrong_shape").image_shape == (1, 28, 28)


async def test_the_healthy_model_is_served_next_to_the_broken_ones(client: httpx.AsyncClient) -> None:
    r = await client.post("/sample", json={"model": "mnist", "n": 2})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"


async def test_readyz_is_503_in_strict_mode_and_says_which_model_failed_and_why(client: httpx.AsyncClient) -> None:
    r = await client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["status"] == "not ready"
    models = r.json()["models"]
    assert models.pop("mnist") == "ready"
    assert set(models) == set(REASONS)
    for name, reason in REASONS.items():
        assert models[name].startswith("failed: ") and reason in models[name], (name, models[name])


async def test_models_lists_every_model_ready_or_with_its_error(client: httpx.AsyncClient) -> None:
    models = {m["name"]: m for m in (await client.get("/models")).json()["models"]}
    assert models["mnist"]["ready"] and models["mnist"]["error"] is None
    for name, reason in REASONS.items():
        assert not models[name]["ready"] and reason in models[name]["error"]
        assert "\n" not in models[name]["error"] and len(models[name]["error"]) < 1000
    one = (await client.get("/models/tampered")).json()
    assert not one["ready"] and "the manifest says" in one["error"]


@pytest.mark.parametrize("name", sorted(REASONS))
async def test_a_request_to_a_failed_model_is_503_with_the_reason(client: httpx.AsyncClient, name: str) -> None:
    r = await client.post("/sample", json={"model": name})
    assert r.status_code == 503
    assert r.json()["detail"].startswith(f"model {name!r} is not available: ")
    assert REASONS[name] in r.json()["detail"]


async def test_with_strict_off_readyz_is_200_while_one_model_is_healthy(broken_repository: Path) -> None:
    async with serve(Settings(model_dir=broken_repository, strict=False)) as client:
        r = await client.get("/readyz")
        assert r.status_code == 200
        assert r.json()["models"]["corrupt"].startswith("failed: ")


async def test_with_strict_off_readyz_is_503_when_no_model_is_healthy(tmp_path: Path, tiny_models: Path) -> None:
    repository = build_broken_repository(tmp_path, tiny_models)
    shutil.rmtree(repository / "mnist")
    async with serve(Settings(model_dir=repository, strict=False)) as client:
        assert (await client.get("/readyz")).status_code == 503


async def test_each_failure_is_logged_once_in_one_line_naming_the_model(
    broken_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with serve(Settings(model_dir=broken_repository)):
        pass
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    for name, reason in REASONS.items():
        about = [r for r in errors if f"model {name} " in r.getMessage()]
        assert len(about) == 1, (name, [r.getMessage() for r in errors])
        message = about[0].getMessage()
        assert message.startswith(f"model {name} failed to load: ") and reason in message
        assert "\n" not in message and about[0].exc_info is None
    assert not any("model mnist " in r.getMessage() for r in errors)


async def test_a_model_that_answers_a_batch_with_the_wrong_number_of_rows_fails_that_batch(tmp_path: Path) -> None:
    # Warm-up decodes one latent, so this model passes it; only batches of several show the fault.
    export_fake(FixedShapes(first_row_only=True), tmp_path / "blind")
    async with serve(Settings(model_dir=tmp_path)) as client:
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.post("/decode", json={"model": "blind", "z": [[0, 0]]})).status_code == 200
        r = await client.post("/decode", json={"model": "blind", "z": [[0, 0], [1, 1], [2, 2]]})
        assert r.status_code == 500
        assert r.json()["detail"] == "model 'blind' failed on this batch: InvalidOutput"
