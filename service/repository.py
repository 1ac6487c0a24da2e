"""Find, verify, load and warm up every artifact in the model repository."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from service import inference_graph
from service.artifact import Artifact, ArtifactError, read_artifact
from service.graphs import GraphedOp

log = logging.getLogger("vae_serve.repository")


@dataclass
class ServedModel:
    """A model the service knows of: loaded and warmed up, or failed with a reason."""

    name: str
    directory: Path
    artifact: Artifact | None = None
    module: Any = None  # torch.jit.ScriptModule; called only from the model thread and, on a CPU, the lanes
    error: str | None = None
    device: str = "cpu"
    dtype: torch.dtype = torch.float32  # what the module's weights are and what its inputs are cast to
    graphs: dict[str, GraphedOp] = field(default_factory=dict)  # "encode"/"decode" -> the op as CUDA graphs

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

    @property
    def precision(self) -> str:
        return str(self.dtype).removeprefix("torch.")  # "float32", as VAE_PRECISION spells it

    def predictor(self, op: str) -> Callable[[torch.Tensor], Any]:
        """What the batcher calls with a batch on the host ("encode" or "decode"): the op's CUDA graphs, or the
        module's method on the batch moved to the model's device and dtype."""
        if op in self.graphs:
            return self.graphs[op]
        method, device, dtype = getattr(self.module, op), self.device, self.dtype
        # `to` only where it changes something: each torch call lets go of the GIL (batcher.all_finite)
        return lambda inputs: method(inputs if inputs.dtype == dtype and inputs.device == device else inputs.to(device, dtype))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(precision: str) -> torch.dtype:
    """Settings.precision -> the dtype models run in. auto is float32: see bench/README.md for the measurements."""
    return torch.float32 if precision == "auto" else getattr(torch, precision)


@torch.inference_mode()
def warm_up(module: Any, artifact: Artifact, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
    """One dummy encode and decode: checks the declared shapes and pays one-off costs before ready."""
    x = torch.full((1, *artifact.image_shape), 0.5, device=device, dtype=dtype)
    mu, log_var = module.encode(x)
    if tuple(mu.shape) != (1, artifact.latent_dim) or tuple(log_var.shape) != (1, artifact.latent_dim):
        raise ArtifactError(f"encode returned {tuple(mu.shape)}, the manifest promises (1, {artifact.latent_dim})")
    out = module.decode(mu)
    if tuple(out.shape) != (1, *artifact.image_shape):
        raise ArtifactError(f"decode returned {tuple(out.shape)}, the manifest promises (1, {artifact.image_shape})")
    if not torch.isfinite(out).all():
        raise ArtifactError("decode of the warm-up latent is not finite")


def probes(artifact: Artifact, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Inputs a rewritten model must answer as the model as loaded does (inference_graph.for_inference)."""
    generator = torch.Generator().manual_seed(0)
    return {
        "encode": torch.rand((2, *artifact.image_shape), generator=generator).to(device, dtype),
        "decode": torch.randn((2, artifact.latent_dim), generator=generator).to(device, dtype),
    }


# On a CPU, oneDNN runs the convolutions faster with their weights channels-last, and their outputs follow:
# faces decode at batch 1 with 2 threads 3.0 -> 1.7 ms, batch 64 52 -> 45 ms, batch 19 with 1 thread 29 -> 27 ms,
# with the same bytes out (encode differs by ~1e-6). Linear-only models (mnist) have no 4-D weights to change.
CPU_LAYOUT = torch.channels_last


def load_model(
    directory: Path, device: torch.device, dtype: torch.dtype = torch.float32, graph_sizes: Sequence[int] = ()
) -> ServedModel:
    """Verify and load one model folder in `dtype`; on CUDA, capture its operations as graphs at `graph_sizes`.
    Failures are recorded on the result, never raised."""
    served = ServedModel(name=directory.name, directory=directory, device=str(device), dtype=dtype)
    try:
        artifact = read_artifact(directory)
        if artifact.name != directory.name:
            log.info("model folder %s serves manifest name %r under the folder's name", directory.name, artifact.name)
        served.artifact = artifact
        module = artifact.load(device).to(dtype)
        if device.type == "cpu":
            module = module.to(memory_format=CPU_LAYOUT)
        warm_up(module, artifact, device, dtype)
        if device.type == "cpu":  # not measured on a GPU yet, where CUDA graphs already replay the ops
            module = inference_graph.for_inference(served.name, module, probes(artifact, device, dtype))
        served.module = module
    except ArtifactError as exc:
        served.error = str(exc)
    except Exception as exc:  # a broken artifact must not take the service down
        served.error = f"{type(exc).__name__}: {exc}"
    if served.error:
        log.error("model %s failed to load: %s", served.name, served.error)
        return served
    if graph_sizes and device.type == "cuda":
        served.graphs = capture_graphs(served, device, graph_sizes)
    log.info("model %s ready on %s in %s%s (%s)", served.name, device, served.precision,
             " with CUDA graphs" if served.graphs else "", served.artifact.sha256[:12] if served.artifact else "")
    return served


def capture_graphs(model: ServedModel, device: torch.device, sizes: Sequence[int]) -> dict[str, GraphedOp]:
    """Both operations as CUDA graphs; a model whose operations cannot be captured is served without them."""
    module, dtype = model.module, model.dtype
    try:
        return {
            "encode": GraphedOp(module.encode, torch.full((1, *model.image_shape), 0.5, device=device, dtype=dtype), sizes),
            "decode": GraphedOp(module.decode, torch.zeros(1, model.latent_dim, device=device, dtype=dtype), sizes),
        }
    except Exception as exc:  # e.g. an op that synchronises with the host: fine to run, impossible to capture
        log.warning("model %s cannot be captured as CUDA graphs (%s: %s): serving it without them",
                    model.name, type(exc).__name__, exc)
        return {}


def discover(model_dir: Path) -> list[Path]:
    """Every sub-folder of the repository is a model (hidden folders excepted)."""
    if not model_dir.is_dir():
        return []
    return sorted(p for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def describe(model: ServedModel) -> dict[str, Any]:
    """What /models says of a model."""
    out: dict[str, Any] = {
        "name": model.name, "ready": model.ready, "device": model.device, "error": model.error,
        "precision": model.precision,
        "cuda_graphs": model.graphs["decode"].sizes if model.graphs else None,
    }
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
