"""Find, verify, load and warm up every artifact in the model repository."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from service.artifact import Artifact, ArtifactError, read_artifact

log = logging.getLogger("vae_serve.repository")


@dataclass
class ServedModel:
    """A model the service knows of: loaded and warmed up, or failed with a reason."""

    name: str
    directory: Path
    artifact: Artifact | None = None
    module: Any = None  # torch.jit.ScriptModule; called only from the model thread
    error: str | None = None
    device: str = "cpu"
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.module is not None and self.error is None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        assert self.artifact is not None
        return self.artifact.image_shape

    @property
    def latent_dim(self) -> int:
        assert self.artifact is not None
        return self.artifact.latent_dim


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.inference_mode()
def warm_up(module: Any, artifact: Artifact, device: torch.device) -> None:
    """One dummy encode and decode: checks the declared shapes and pays one-off costs before ready."""
    x = torch.full((1, *artifact.image_shape), 0.5, device=device)
    mu, log_var = module.encode(x)
    if tuple(mu.shape) != (1, artifact.latent_dim) or tuple(log_var.shape) != (1, artifact.latent_dim):
        raise ArtifactError(f"encode returned {tuple(mu.shape)}, the manifest promises (1, {artifact.latent_dim})")
    out = module.decode(mu)
    if tuple(out.shape) != (1, *artifact.image_shape):
        raise ArtifactError(f"decode returned {tuple(out.shape)}, the manifest promises (1, {artifact.image_shape})")
    if not torch.isfinite(out).all():
        raise ArtifactError("decode of the warm-up latent is not finite")


def load_model(directory: Path, device: torch.device) -> ServedModel:
    """Verify and load one model folder; failures are recorded on the result, never raised."""
    served = ServedModel(name=directory.name, directory=directory, device=str(device))
    try:
        artifact = read_artifact(directory)
        if artifact.name != directory.name:
            log.info("model folder %s serves manifest name %r under the folder's name", directory.name, artifact.name)
        served.artifact = artifact
        module = artifact.load(device)
        warm_up(module, artifact, device)
        served.module = module
    except ArtifactError as exc:
        served.error = str(exc)
    except Exception as exc:  # a broken artifact must not take the service down
        served.error = f"{type(exc).__name__}: {exc}"
    if served.error:
        log.error("model %s failed to load: %s", served.name, served.error)
    else:
        log.info("model %s ready on %s (%s)", served.name, device, served.artifact.sha256[:12] if served.artifact else "")
    return served


def discover(model_dir: Path) -> list[Path]:
    """Every sub-folder of the repository is a model (hidden folders excepted)."""
    if not model_dir.is_dir():
        return []
    return sorted(p for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def describe(model: ServedModel) -> dict[str, Any]:
    """What /models says of a model."""
    out: dict[str, Any] = {"name": model.name, "ready": model.ready, "device": model.device, "error": model.error}
    if model.artifact is not None:
        m = model.artifact.manifest
        out |= {
            "version": m.get("version"),
            "architecture": m.get("architecture"),
            "image_shape": list(model.image_shape),
            "latent_dim": model.latent_dim,
            "value_range": m.get("value_range", [0.0, 1.0]),
            "sha256": model.artifact.sha256,
            "data": m.get("data", {}),
            "metrics": m.get("metrics", {}),
            "created": m.get("created"),
        }
    return out
