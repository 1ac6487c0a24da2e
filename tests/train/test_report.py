"""The pictures of a run, including for the smallest validation sets and latent sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import decode_png
from train.face_vae import FaceVAE, FaceVAEConfig
from train.mnist_vae import MnistVAE, MnistVAEConfig
from train.report import write_report

KEYS = [f"{split}_{term}" for split in ("train", "val") for term in ("neg_elbo", "reconstruction", "kl")]
HISTORY = [{"epoch": epoch, **dict.fromkeys(KEYS, 1.0 / epoch)} for epoch in (1, 2)]


def test_an_mnist_report_has_all_five_pictures(tmp_path: Path) -> None:
    model = MnistVAE(MnistVAEConfig(latent_dim=2, hidden_dim=16))
    images = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8)
    written = write_report(model, images, torch.arange(40) % 10, HISTORY, tmp_path)
    assert [p.name for p in written] == [
        "samples.png", "reconstructions.png", "interpolation.png", "latent_map.png", "loss_curves.png",
    ]
    samples = decode_png((tmp_path / "samples.png").read_bytes())
    assert samples.mode == "L" and samples.size == (8 * 30 + 2, 8 * 30 + 2)  # 64 samples, 8 columns of 28 px
    assert decode_png((tmp_path / "interpolation.png").read_bytes()).size == (12 * 30 + 2, 30 + 2)


@pytest.mark.parametrize(("n_images", "latent_dim"), [(1, 8), (2, 8), (5, 1)])
def test_a_report_works_with_one_validation_image_or_a_1d_latent(
    tmp_path: Path, n_images: int, latent_dim: int
) -> None:
    # A faces run with --limit under 30 holds out one image; its latent map used to fail in the PCA.
    model = FaceVAE(FaceVAEConfig(latent_dim=latent_dim, image_size=32, channels=(4, 4, 4, 4, 4), hidden_dim=8))
    images = torch.randint(0, 256, (n_images, 3, 32, 32), dtype=torch.uint8)
    written = write_report(model, images, None, [], tmp_path)
    assert [p.name for p in written] == ["samples.png", "reconstructions.png", "interpolation.png", "latent_map.png"]
    assert decode_png((tmp_path / "samples.png").read_bytes()).mode == "RGB"
