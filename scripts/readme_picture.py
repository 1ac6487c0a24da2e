"""Make docs/samples.png: random samples from the shipped models, as /sample draws them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from service.artifact import read_artifact
from service.imaging import grid, to_uint8


def samples(name: str, n: int, columns: int, seed: int) -> np.ndarray:
    artifact = read_artifact(Path("models") / name)
    z = torch.randn(n, artifact.latent_dim, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        tiles = to_uint8(artifact.load().decode(z))
    if tiles.shape[-1] == 1:
        tiles = np.repeat(tiles, 3, axis=-1)
    return grid(tiles, columns)


faces = samples("faces", 16, 8, seed=7)  # 2 rows of 96 px
digits = samples("mnist", 48, 24, seed=7)  # 2 rows of 28 px
digits = np.asarray(Image.fromarray(digits).resize((faces.shape[1], faces.shape[1] * digits.shape[0] // digits.shape[1]), Image.Resampling.NEAREST))
Image.fromarray(np.concatenate([faces, digits])).save("docs/samples.png", optimize=True)
