"""The fully-connected MNIST VAE: 784 -> hidden -> (mu, log_var); the decoder mirrors it."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from train.vae import VAE


@dataclass(frozen=True)
class MnistVAEConfig:
    latent_dim: int = 2  # 2 lets the latent space be drawn as a map
    hidden_dim: int = 512
    image_shape: tuple[int, int, int] = (1, 28, 28)


class MnistVAE(VAE):
    def __init__(self, config: MnistVAEConfig = MnistVAEConfig()) -> None:
        super().__init__()
        self.config = config
        c, h, w = config.image_shape
        pixels = c * h * w
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(pixels, config.hidden_dim), nn.ReLU())
        self.to_mu = nn.Linear(config.hidden_dim, config.latent_dim)
        self.to_log_var = nn.Linear(config.hidden_dim, config.latent_dim)
        self.decoder = nn.Sequential(
            nn.Linear(config.latent_dim, config.hidden_dim),
            nn.ReLU(),
            nn.Linear(config.hidden_dim, pixels),
            nn.Sigmoid(),
            nn.Unflatten(1, config.image_shape),  # (B, 1, 28, 28)
        )
