"""The artifact format shared by `train` (writes) and `service` (reads).

One folder per model: the TorchScript file and `manifest.json`. Reading and writing live here and
only here, so another format (torch.export) can be added behind the same two functions.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TORCHSCRIPT_FILE = "model.pt"
SUPPORTED_FORMATS = ("torchscript",)


class ArtifactError(Exception):
    """An artifact that cannot be served: the message says what is wrong with it."""


@contextmanager
def quiet_torchscript() -> Iterator[None]:
    """TorchScript is deprecated upstream but is our format; hide only that warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*TorchScript.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*", category=DeprecationWarning)
        yield


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Artifact:
    """A verified artifact on disk; `load` puts its module on a device."""

    directory: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.manifest["image_shape"]
        return int(c), int(h), int(w)

    @property
    def latent_dim(self) -> int:
        return int(self.manifest["latent_dim"])

    @property
    def sha256(self) -> str:
        return str(self.manifest["artifact"]["sha256"])

    def load(self, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
        """Load the module onto `device` in eval mode (after `read_artifact` verified its checksum)."""
        path = self.directory / self.manifest["artifact"]["file"]
        try:
            with quiet_torchscript():
                module = torch.jit.load(str(path), map_location=device)
        except Exception as exc:  # torch raises RuntimeError and friends for a corrupt file
            raise ArtifactError(f"{path.name} is not a loadable TorchScript file: {exc}") from exc
        module.eval()
        return module


_REQUIRED = ("name", "format_version", "format", "image_shape", "latent_dim", "artifact")


def read_artifact(directory: Path, *, verify: bool = True) -> Artifact:
    """Read and validate `directory/manifest.json`; with `verify`, check the file's sha256."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"no {MANIFEST} in {directory}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{MANIFEST} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{MANIFEST} must hold a JSON object")
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise ArtifactError(f"{MANIFEST} lacks {', '.join(missing)}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ArtifactError(
            f"format_version {manifest['format_version']!r} is not supported (this service reads {FORMAT_VERSION})"
        )
    if manifest["format"] not in SUPPORTED_FORMATS:
        raise ArtifactError(f"format {manifest['format']!r} is not one of {SUPPORTED_FORMATS}")
    try:
        shape = [int(v) for v in manifest["image_shape"]]
        latent = int(manifest["latent_dim"])
        file_name = str(manifest["artifact"]["file"])
        expected = str(manifest["artifact"]["sha256"])
    except (TypeError, ValueError, KeyError) as exc:
        raise ArtifactError(f"{MANIFEST} has a malformed field: {exc!r}") from exc
    if len(shape) != 3 or shape[0] not in (1, 3) or min(shape) < 1 or latent < 1:
        raise ArtifactError(f"image_shape {shape} / latent_dim {latent} are not a (C in 1|3, H, W) image model")
    path = directory / file_name
    if Path(file_name).name != file_name or not path.is_file():
        raise ArtifactError(f"artifact file {file_name!r} is missing from {directory}")
    if verify:
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(f"{file_name} has sha256 {actual[:12]}…, the manifest says {expected[:12]}…")
    return Artifact(directory=directory, manifest=manifest)


def write_artifact(module: torch.nn.Module, directory: Path, manifest: dict[str, Any]) -> Artifact:
    """Script `module` (which must export `encode` and `decode`), save it and its manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / TORCHSCRIPT_FILE
    with quiet_torchscript():
        scripted = torch.jit.script(module.eval())
        scripted.save(str(path))
    full = {
        **manifest,
        "format_version": FORMAT_VERSION,
        "format": "torchscript",
        "artifact": {"file": TORCHSCRIPT_FILE, "sha256": sha256_file(path), "bytes": path.stat().st_size},
        "torch_version": torch.__version__,
    }
    (directory / MANIFEST).write_text(json.dumps(full, indent=2) + "\n")
    return read_artifact(directory)
