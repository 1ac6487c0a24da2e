"""Export: a TorchScript file and a manifest that says everything about it, and matches the eager model."""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from service.artifact import ArtifactError, read_artifact
from service.repository import load_model
from train.export import check_parity, export, install
from train.face_vae import FaceVAE, FaceVAEConfig
from train.mnist_vae import MnistVAE, MnistVAEConfig

FACE = FaceVAEConfig(latent_dim=8, image_size=64, channels=(4, 8, 8, 16, 16), hidden_dim=16)


def _export(model: nn.Module, directory: Path, **overrides: Any) -> Any:
    fields: dict[str, Any] = {
        "name": "tiny",
        "architecture": "test_vae",
        "data": {"name": "generated", "path": Path("/data/faces.zip")},
        "training": {"epochs": 1, "shape": (1, 2)},
        "metrics": {"validation_neg_elbo_per_image": 1.5},
        "extra": {"upload_normalization": "center_crop"},
    }
    return export(model, directory, **(fields | overrides))


def _trained_a_little(model: FaceVAE, x: torch.Tensor) -> FaceVAE:
    """A few steps so BatchNorm running statistics and weights are not their initial values."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(3):
        recon, _, _ = model(x)
        loss = (recon - x).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@pytest.mark.parametrize("kind", ["mnist", "faces"])
def test_the_reloaded_artifact_matches_the_eager_model(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(0)
    model: MnistVAE | FaceVAE
    if kind == "mnist":
        model, image_shape, latent_dim = MnistVAE(MnistVAEConfig(latent_dim=2, hidden_dim=16)), (1, 28, 28), 2
    else:
        model, image_shape, latent_dim = _trained_a_little(FaceVAE(FACE), torch.rand(4, 3, 64, 64)), (3, 64, 64), 8
    artifact = _export(model, tmp_path / "tiny")
    assert artifact.image_shape == image_shape and artifact.latent_dim == latent_dim

    scripted = read_artifact(tmp_path / "tiny").load("cpu")
    x, z = torch.rand(3, *image_shape), torch.randn(3, latent_dim)
    with torch.no_grad():
        for eager_out, scripted_out in zip(model.eval().encode(x), scripted.encode(x), strict=True):
            torch.testing.assert_close(scripted_out, eager_out)
        torch.testing.assert_close(scripted.decode(z), model.decode(z))
    assert check_parity(model, artifact) < 1e-5


def test_the_manifest_describes_the_model_its_data_training_and_file(tmp_path: Path) -> None:
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    artifact = _export(FaceVAE(FACE), tmp_path / "tiny")
    manifest = json.loads((tmp_path / "tiny" / "manifest.json").read_text())
    assert manifest == artifact.manifest

    assert manifest["name"] == "tiny" and manifest["architecture"] == "test_vae"
    assert manifest["architecture_config"] == {
        "latent_dim": 8, "image_size": 64, "channels": [4, 8, 8, 16, 16], "hidden_dim": 16, "image_channels": 3,
    }
    assert manifest["image_shape"] == [3, 64, 64] and manifest["latent_dim"] == 8
    assert manifest["value_range"] == [0.0, 1.0]
    assert manifest["data"] == {"name": "generated", "path": "/data/faces.zip"}  # made JSON-able
    assert manifest["training"] == {"epochs": 1, "shape": [1, 2]}
    assert manifest["metrics"] == {"validation_neg_elbo_per_image": 1.5}
    assert manifest["upload_normalization"] == "center_crop"  # extras sit at the top level
    assert manifest["format"] == "torchscript" and manifest["format_version"] == 1
    assert manifest["torch_version"] == torch.__version__

    model_file = tmp_path / "tiny" / "model.pt"
    assert manifest["artifact"] == {
        "file": "model.pt",
        "sha256": hashlib.sha256(model_file.read_bytes()).hexdigest(),
        "bytes": model_file.stat().st_size,
    }
    created = datetime.datetime.fromisoformat(manifest["created"])
    assert created.tzinfo is not None and before <= created <= datetime.datetime.now(datetime.UTC)
    assert re.fullmatch(r"\d{8}\.\d{6}", manifest["version"])
    assert manifest["version"] == created.strftime("%Y%m%d.%H%M%S")


def test_export_leaves_the_model_on_cpu_in_eval_mode(tmp_path: Path) -> None:
    model = FaceVAE(FACE).train()
    _export(model, tmp_path / "tiny")
    assert not model.training and next(model.parameters()).device.type == "cpu"


def test_a_tampered_model_file_fails_the_checksum_clearly(tmp_path: Path) -> None:
    artifact = _export(MnistVAE(MnistVAEConfig(hidden_dim=16)), tmp_path / "tiny")
    path = tmp_path / "tiny" / "model.pt"
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0x01
    path.write_bytes(bytes(content))
    actual = hashlib.sha256(bytes(content)).hexdigest()

    with pytest.raises(ArtifactError) as caught:
        read_artifact(tmp_path / "tiny")
    assert str(caught.value) == f"model.pt has sha256 {actual[:12]}…, the manifest says {artifact.sha256[:12]}…"
    assert read_artifact(tmp_path / "tiny", verify=False).sha256 == artifact.sha256  # the manifest itself is fine


def test_parity_fails_loudly_when_the_artifact_is_not_the_model(tmp_path: Path) -> None:
    model = MnistVAE(MnistVAEConfig(hidden_dim=16))
    artifact = _export(model, tmp_path / "tiny")
    with torch.no_grad():
        model.to_mu.bias.add_(1.0)
    with pytest.raises(RuntimeError, match=r"exported model differs from the eager one by 1\.00e\+00 \(> 1e-04\)"):
        check_parity(model, artifact)


def test_the_artifact_loads_and_warms_up_in_the_service(tmp_path: Path) -> None:
    _export(FaceVAE(FACE), tmp_path / "tiny")
    served = load_model(tmp_path / "tiny", torch.device("cpu"))
    assert served.error is None and served.ready
    assert served.image_shape == (3, 64, 64) and served.latent_dim == 8


def test_install_copies_the_artifact_into_the_repository_replacing_an_old_one(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "tiny").mkdir(parents=True)
    (models / "tiny" / "stale.txt").write_text("from an older install")
    artifact = _export(MnistVAE(MnistVAEConfig(hidden_dim=16)), tmp_path / "run" / "artifact")
    installed = install(artifact, models)
    assert installed == models / "tiny"
    assert sorted(p.name for p in installed.iterdir()) == ["manifest.json", "model.pt"]
    assert read_artifact(installed).sha256 == artifact.sha256
