"""What every VAE here shares: the encode/decode interface, the reparameterization trick, the KL term and the loss.

Kingma & Welling, "Auto-Encoding Variational Bayes" (2013), Appendix B gives the closed-form KL.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def reparameterize(mu: Tensor, log_var: Tensor) -> Tensor:
    """z = mu + sigma * eps, so gradients flow through mu and log_var."""
    return mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)


class VAE(nn.Module):
    """A VAE as the artifact exports it: `encode(x) -> (mu, log_var)` and `decode(z) -> x`, and the training pass.

    Subclasses build `encoder` (images to a hidden vector), the linear heads `to_mu` and `to_log_var`, and
    `decoder` (latents to images in [0, 1])."""

    @torch.jit.export
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(x)
        return self.to_mu(h), self.to_log_var(h)

    @torch.jit.export
    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, log_var = self.encode(x)
        return self.decode(reparameterize(mu, log_var)), mu, log_var


def kl_divergence(mu: Tensor, log_var: Tensor) -> Tensor:
    """KL(q(z|x) || N(0, I)) per example, summed over latent dimensions: shape (B,)."""
    return -0.5 * torch.sum(1 + log_var - mu.pow(2) - log_var.exp(), dim=1)


class LossTerms(NamedTuple):
    loss: Tensor  # what the optimizer minimises: sum over the batch of recon + beta * KL
    reconstruction: Tensor  # summed over the batch
    kl: Tensor  # summed over the batch


RECONSTRUCTION_LOSSES = ("bce", "mse", "l1")


def reconstruction_loss(recon: Tensor, x: Tensor, kind: str) -> Tensor:
    """Summed over pixels and batch (the write-up's choice of sum reduction)."""
    if kind == "bce":
        return F.binary_cross_entropy(recon, x, reduction="sum")
    if kind == "mse":
        return F.mse_loss(recon, x, reduction="sum")
    if kind == "l1":
        return F.l1_loss(recon, x, reduction="sum")
    raise ValueError(f"unknown reconstruction loss {kind!r}; choose one of {RECONSTRUCTION_LOSSES}")


def vae_loss(
    recon: Tensor, x: Tensor, mu: Tensor, log_var: Tensor, *, kind: str, beta: float = 1.0
) -> LossTerms:
    """Negative ELBO (for beta = 1): reconstruction + beta * KL, summed over the batch."""
    rec = reconstruction_loss(recon, x, kind)
    kl = kl_divergence(mu, log_var).sum()
    return LossTerms(rec + beta * kl, rec, kl)


class EncodesAndDecodes(Protocol):
    """A VAE in training (`VAE`) or as exported and loaded (its TorchScript module)."""

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]: ...
    def decode(self, z: Tensor) -> Tensor: ...
    def parameters(self) -> Iterator[nn.Parameter]: ...


NOISE_SEED = 123  # the posterior noise of every measurement: epochs, runs and artifacts compare on the same draws


def as_input(images: Tensor, device: torch.device) -> Tensor:
    """uint8 images (N, C, H, W), as stored for training, -> the model's float input in [0, 1] on `device`."""
    return images.to(device, non_blocking=True).float().div_(255)


@torch.inference_mode()
def held_out_metrics(
    model: EncodesAndDecodes, images: Tensor, loss: str, noise_seed: int = NOISE_SEED
) -> dict[str, float]:
    """Per-image negative ELBO (beta = 1), reconstruction and KL with one posterior sample drawn from `noise_seed`, and
    MSE per pixel of the reconstruction from the mean, over uint8 `images`. The noise is drawn on the CPU, so it is
    the same on any device and for any model: training's validation, the manifest's metrics and `train.evaluate`
    measure alike. A model in training must be in eval mode."""
    device = next(iter(model.parameters())).device
    noise = torch.Generator().manual_seed(noise_seed)
    rec = kl = sq = 0.0
    for batch in images.split(256):
        x = as_input(batch, device)
        mu, log_var = model.encode(x)
        z = mu + torch.exp(0.5 * log_var) * torch.randn(mu.shape, generator=noise).to(device)
        terms = vae_loss(model.decode(z), x, mu, log_var, kind=loss)
        rec, kl = rec + float(terms.reconstruction), kl + float(terms.kl)
        sq += float((model.decode(mu) - x).pow(2).sum())
    n = len(images)
    return {"neg_elbo": (rec + kl) / n, "reconstruction": rec / n, "kl": kl / n, "mse_per_pixel": sq / images.numel()}
