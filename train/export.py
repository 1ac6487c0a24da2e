"""Export a trained VAE as a self-describing TorchScript artifact and check it against the eager model."""

from __future__ import annotations

import dataclasses
import datetime
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from service.artifact import Artifact, write_artifact


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


@torch.no_grad()
def check_parity(eager: nn.Module, artifact: Artifact, atol: float = 1e-4) -> float:
    """Load the artifact back and compare encode/decode with the eager model; returns the max error."""
    eager = eager.eval().cpu()
    scripted = artifact.load("cpu")
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, *artifact.image_shape, generator=gen)
    z = torch.randn(4, artifact.latent_dim, generator=gen)
    pairs = [
        *zip(eager.encode(x), scripted.encode(x), strict=False),
        (eager.decode(z), scripted.decode(z)),
    ]
    error = max(float((a - b).abs().max()) for a, b in pairs)
    if error > atol:
        raise RuntimeError(f"exported model differs from the eager one by {error:.2e} (> {atol:.0e})")
    return error


def export(
    model: nn.Module,
    directory: Path,
    *,
    name: str,
    architecture: str,
    data: dict[str, Any],
    training: dict[str, Any],
    metrics: dict[str, float],
    extra: dict[str, Any] | None = None,
) -> Artifact:
    """Write `directory/model.pt` and `manifest.json` from a trained model (moved to CPU, eval mode)."""
    model = model.eval().cpu()
    config: Any = model.config  # each architecture's frozen config dataclass
    created = datetime.datetime.now(datetime.UTC)
    manifest = {
        "name": name,
        "version": created.strftime("%Y%m%d.%H%M%S"),
        "architecture": architecture,
        "architecture_config": _jsonable(config),
        "image_shape": list(config.image_shape),
        "latent_dim": config.latent_dim,
        "value_range": [0.0, 1.0],
        "data": _jsonable(data),
        "training": _jsonable(training),
        "metrics": metrics,
        "created": created.isoformat(timespec="seconds"),
        **_jsonable(extra or {}),
    }
    artifact = write_artifact(model, directory, manifest)
    check_parity(model, artifact)
    return artifact


def install(artifact: Artifact, models_dir: Path) -> Path:
    """Copy the artifact folder into a model repository as models_dir/<name>."""
    target = models_dir / artifact.name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(artifact.directory, target)
    return target
