"""The pictures of a run: samples, reconstructions, an interpolation strip, the latent map, loss curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt
import torch
from torch import Tensor, nn

from service.imaging import grid, png_bytes, to_uint8


def _save(images: Tensor, path: Path, columns: int | None = None) -> None:
    path.write_bytes(png_bytes(grid(to_uint8(images), columns), compress_level=6))


def _pca_2d(points: Tensor) -> Tensor:
    centred = points - points.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    projected = centred @ v[:2].T  # fewer than 2 columns for one point or a 1-d latent: pad with zeros
    return torch.nn.functional.pad(projected, (0, 2 - projected.shape[1]))


@torch.no_grad()
def write_report(
    model: nn.Module,
    images: Tensor,
    labels: Tensor | None,
    history: list[dict[str, float]],
    run_dir: Path,
    *,
    seed: int = 0,
) -> list[Path]:
    """Write the pictures for `model` (in eval mode) on held-out uint8 `images` into `run_dir`."""
    model.eval()
    device = next(model.parameters()).device
    latent_dim: int = model.config.latent_dim  # type: ignore[union-attr,assignment]
    x = images.float().div(255).to(device)
    gen = torch.Generator().manual_seed(seed)
    written: list[Path] = []

    z = torch.randn(64, latent_dim, generator=gen).to(device)
    _save(model.decode(z), run_dir / "samples.png", columns=8)
    written.append(run_dir / "samples.png")

    inputs = x[:16]
    recon = model.decode(model.encode(inputs)[0])
    _save(torch.cat([inputs, recon]), run_dir / "reconstructions.png", columns=16)  # top: inputs
    written.append(run_dir / "reconstructions.png")

    # The write-up's "3 -> 0" strip: between two held-out images, through their latent means.
    if labels is not None and (labels == 3).any() and (labels == 0).any():
        a, b = x[labels == 3][:1], x[labels == 0][:1]
    else:
        a, b = x[:1], x[1:2] if len(x) > 1 else x[:1]
    za, zb = model.encode(a)[0], model.encode(b)[0]
    t = torch.linspace(0, 1, 10, device=device)[:, None]
    _save(torch.cat([a, model.decode((1 - t) * za + t * zb), b]), run_dir / "interpolation.png", columns=12)
    written.append(run_dir / "interpolation.png")

    mu = torch.cat([model.encode(chunk)[0] for chunk in x.split(512)]).cpu()
    points = mu if latent_dim == 2 else _pca_2d(mu)
    fig, ax = plt.subplots(figsize=(7, 6))
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], s=2)
    else:
        fig.colorbar(ax.scatter(points[:, 0], points[:, 1], s=2, c=labels.cpu(), cmap="tab10"), ax=ax, label="digit")
    ax.set_title("latent means of held-out images" + ("" if latent_dim == 2 else " (PCA)"))
    fig.savefig(run_dir / "latent_map.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    written.append(run_dir / "latent_map.png")

    if history:
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        epochs = [h["epoch"] for h in history]
        for ax, key in zip(axes, ("neg_elbo", "reconstruction", "kl"), strict=False):
            ax.plot(epochs, [h[f"train_{key}"] for h in history], label="train")
            ax.plot(epochs, [h[f"val_{key}"] for h in history], label="validation")
            ax.set_xlabel("epoch")
            ax.set_title(f"{key} per image")
            ax.legend()
        fig.savefig(run_dir / "loss_curves.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(run_dir / "loss_curves.png")
    return written
