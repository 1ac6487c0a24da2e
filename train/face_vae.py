"""The convolutional face VAE: five stride-2 conv blocks down, five transposed-conv blocks up."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from torch import nn

from train.vae import VAE


@dataclass(frozen=True)
class FaceVAEConfig:
    latent_dim: int = 128
    image_size: int = 96  # a multiple of 32: five stride-2 blocks halve it five times
    channels: tuple[int, ...] = (32, 64, 128, 256, 512)
    hidden_dim: int = 512  # the Linear between the conv stack and the latent heads
    image_channels: int = 3

    def __post_init__(self) -> None:
        downsample = 2 ** len(self.channels)
        if self.image_size % downsample:
            raise ValueError(f"image_size must be a multiple of {downsample}, got {self.image_size}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_channels, self.image_size, self.image_size)

    @property
    def bottleneck_size(self) -> int:
        """k in the (B, C_last, k, k) map at the bottom of the encoder."""
        return self.image_size // 2 ** len(self.channels)


def _down(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(0.2),
    )


def _up(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, kernel_size=3, stride=2, padding=1, output_padding=1),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(0.2),
    )


class FaceVAE(VAE):
    def __init__(self, config: FaceVAEConfig = FaceVAEConfig()) -> None:
        super().__init__()
        self.config = config
        k = config.bottleneck_size
        widths = (config.image_channels, *config.channels)  # 3 -> 32 -> ... -> 512
        flat = config.channels[-1] * k * k

        self.encoder = nn.Sequential(
            *[_down(a, b) for a, b in itertools.pairwise(widths)],  # (B, 512, k, k)
            nn.Flatten(),
            nn.Linear(flat, config.hidden_dim),
        )
        self.to_mu = nn.Linear(config.hidden_dim, config.latent_dim)
        self.to_log_var = nn.Linear(config.hidden_dim, config.latent_dim)

        up_widths = widths[::-1]  # 512 -> 256 -> ... -> 32 -> 3
        self.decoder = nn.Sequential(
            nn.Linear(config.latent_dim, config.hidden_dim),
            nn.Linear(config.hidden_dim, flat),
            nn.Unflatten(1, (config.channels[-1], k, k)),  # (B, 512, k, k)
            # The last block maps to RGB, BatchNorm and LeakyReLU included, as in the write-up.
            *[_up(a, b) for a, b in itertools.pairwise(up_widths)],
            nn.Sigmoid(),  # (B, 3, H, W) in [0, 1]
        )
