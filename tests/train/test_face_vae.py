"""The convolutional face VAE: the documented shapes, every supported image size, and the size rule."""

from __future__ import annotations

import pytest
import torch

from tests.train.conftest import assert_trains
from train.face_vae import FaceVAE, FaceVAEConfig

SMALL = {"channels": (4, 8, 8, 16, 16), "hidden_dim": 16, "latent_dim": 8}  # fast, same depth as the default


def test_the_default_model_at_96_px_has_the_documented_shapes() -> None:
    model = FaceVAE().eval()
    assert model.config == FaceVAEConfig(latent_dim=128, image_size=96)
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        bottom = model.encoder[:-2](x)  # the conv stack, before Flatten and the Linear
        mu, log_var = model.encode(x)
        recon = model.decode(mu)
    assert bottom.shape == (2, 512, 3, 3)
    assert mu.shape == log_var.shape == (2, 128)
    assert recon.shape == (2, 3, 96, 96)
    assert recon.min() >= 0 and recon.max() <= 1


@pytest.mark.parametrize("size", [64, 96, 128])
def test_one_optimisation_step_at_each_image_size(size: int) -> None:
    torch.manual_seed(0)
    model = FaceVAE(FaceVAEConfig(image_size=size, **SMALL))  # type: ignore[arg-type]
    x = torch.rand(4, 3, size, size)
    with torch.no_grad():
        assert model.eval().encoder[:-2](x).shape == (4, 16, size // 32, size // 32)
        assert model.decode(torch.zeros(4, 8)).shape == (4, 3, size, size)
    assert_trains(model, x, kind="mse")


def test_l1_loss_trains_too() -> None:
    torch.manual_seed(0)
    assert_trains(FaceVAE(FaceVAEConfig(image_size=64, **SMALL)), torch.rand(4, 3, 64, 64), kind="l1")  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [100, 48, 16])
def test_an_image_size_not_a_multiple_of_32_is_refused_clearly(size: int) -> None:
    with pytest.raises(ValueError, match=f"image_size must be a multiple of 32, got {size}"):
        FaceVAEConfig(image_size=size)


def test_fewer_conv_blocks_need_a_smaller_multiple() -> None:
    config = FaceVAEConfig(image_size=48, channels=(4, 8, 8, 16), hidden_dim=16, latent_dim=4)
    assert config.bottleneck_size == 3 and config.image_shape == (3, 48, 48)
    with pytest.raises(ValueError, match="multiple of 16, got 40"):
        FaceVAEConfig(image_size=40, channels=(4, 8, 8, 16))
