"""The fully-connected MNIST VAE: shapes, value range, and one optimisation step."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.train.conftest import assert_trains
from train.mnist_vae import MnistVAE, MnistVAEConfig


def test_default_shapes_are_784_to_a_2d_latent_and_back() -> None:
    model = MnistVAE().eval()
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        mu, log_var = model.encode(x)
        recon, mu_f, log_var_f = model(x)
    assert mu.shape == log_var.shape == (5, 2)
    assert recon.shape == (5, 1, 28, 28)
    torch.testing.assert_close(mu_f, mu)
    torch.testing.assert_close(log_var_f, log_var)


def test_decoded_images_are_in_the_unit_range() -> None:
    model = MnistVAE(MnistVAEConfig(latent_dim=3, hidden_dim=16)).eval()
    with torch.no_grad():
        out = model.decode(torch.randn(8, 3) * 10)
    assert out.shape == (8, 1, 28, 28)
    assert out.min() >= 0 and out.max() <= 1


def test_one_optimisation_step_lowers_the_loss_and_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    model = MnistVAE(MnistVAEConfig(latent_dim=2, hidden_dim=32))
    assert_trains(model, torch.rand(16, 1, 28, 28), kind="bce")


def test_the_config_is_frozen_and_sets_the_widths() -> None:
    config = MnistVAEConfig(latent_dim=4, hidden_dim=24)
    model = MnistVAE(config)
    assert model.config is config
    assert model.to_mu.out_features == model.to_log_var.out_features == 4
    assert model.to_mu.in_features == 24
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.latent_dim = 8  # type: ignore[misc]
