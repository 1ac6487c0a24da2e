"""What every VAE shares: the reparameterization trick, the closed-form KL and the loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal
from torch.distributions import kl_divergence as distributions_kl

from train.vae import kl_divergence, reconstruction_loss, reparameterize, vae_loss


def test_kl_matches_the_closed_form_for_diagonal_gaussians() -> None:
    gen = torch.Generator().manual_seed(0)
    mu, log_var = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    expected = distributions_kl(Normal(mu, (0.5 * log_var).exp()), Normal(0.0, 1.0)).sum(dim=1)
    kl = kl_divergence(mu, log_var)
    assert kl.shape == (5,)
    torch.testing.assert_close(kl, expected)


def test_kl_of_one_example_by_hand() -> None:
    # KL(N(1, e^1) || N(0, 1)) + KL(N(0, e^-1) || N(0, 1)) = -1/2 [(1 + 1 - 1 - e) + (1 - 1 - 0 - e^-1)]
    kl = kl_divergence(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, -1.0]]))
    assert kl.item() == pytest.approx(0.5 * (math.e - 1 + math.exp(-1)), rel=1e-6)


def test_kl_is_zero_at_the_prior_and_positive_elsewhere() -> None:
    assert kl_divergence(torch.zeros(3, 4), torch.zeros(3, 4)).tolist() == [0.0, 0.0, 0.0]
    assert (kl_divergence(torch.full((3, 4), 0.1), torch.full((3, 4), -0.2)) > 0).all()


def test_reparameterize_draws_with_mean_mu_and_variance_exp_log_var() -> None:
    torch.manual_seed(0)
    n = 200_000
    mu = torch.tensor([1.0, -2.0, 0.0]).expand(n, 3)
    log_var = torch.tensor([math.log(4.0), math.log(0.25), 0.0]).expand(n, 3)
    z = reparameterize(mu, log_var)
    torch.testing.assert_close(z.mean(0), torch.tensor([1.0, -2.0, 0.0]), atol=0.02, rtol=0)
    torch.testing.assert_close(z.var(0), torch.tensor([4.0, 0.25, 1.0]), atol=0, rtol=0.02)


def test_gradients_flow_through_mu_and_log_var() -> None:
    mu = torch.zeros(4, 2, requires_grad=True)
    log_var = torch.zeros(4, 2, requires_grad=True)
    torch.manual_seed(0)
    z = reparameterize(mu, log_var)
    z.sum().backward()
    assert mu.grad is not None and log_var.grad is not None
    torch.testing.assert_close(mu.grad, torch.ones(4, 2))  # dz/dmu = 1
    torch.testing.assert_close(log_var.grad, 0.5 * z.detach())  # dz/dlog_var = sigma * eps / 2 = z / 2 here


@pytest.mark.parametrize(
    ("kind", "reference"),
    [("bce", F.binary_cross_entropy), ("mse", F.mse_loss), ("l1", F.l1_loss)],
)
def test_reconstruction_losses_are_sums_over_pixels_and_batch(kind: str, reference: object) -> None:
    gen = torch.Generator().manual_seed(0)
    recon, x = torch.rand(3, 1, 4, 4, generator=gen), torch.rand(3, 1, 4, 4, generator=gen)
    expected = reference(recon, x, reduction="mean") * x.numel()  # type: ignore[operator]
    torch.testing.assert_close(reconstruction_loss(recon, x, kind), expected)


def test_an_unknown_reconstruction_loss_is_refused_naming_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown reconstruction loss 'huber'.*bce.*mse.*l1"):
        reconstruction_loss(torch.zeros(1), torch.zeros(1), "huber")


def test_the_loss_is_reconstruction_plus_beta_times_kl_over_the_batch() -> None:
    gen = torch.Generator().manual_seed(0)
    recon, x = torch.rand(3, 8, generator=gen), torch.rand(3, 8, generator=gen)
    mu, log_var = torch.randn(3, 2, generator=gen), torch.randn(3, 2, generator=gen)
    terms = vae_loss(recon, x, mu, log_var, kind="mse", beta=0.25)
    torch.testing.assert_close(terms.reconstruction, F.mse_loss(recon, x, reduction="sum"))
    torch.testing.assert_close(terms.kl, kl_divergence(mu, log_var).sum())
    torch.testing.assert_close(terms.loss, terms.reconstruction + 0.25 * terms.kl)
