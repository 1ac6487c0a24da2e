"""One screen of training configuration; the CLI overrides these defaults."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class TrainConfig:
    model: str  # "mnist" (fully connected) or "faces" (convolutional)
    data: Path  # MNIST: folder of the four IDX files; faces: folder or zip of images
    out: Path  # run folder: checkpoints, pictures, metrics, and the artifact in out/artifact
    name: str = ""  # the served model's name; defaults to `model`
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3  # Adam
    lr_schedule: str = "constant"  # or "cosine": anneal to lr * LR_FLOOR by the last epoch (a calmer final model)
    latent_dim: int = 2
    hidden_dim: int = 512  # MNIST hidden width; faces: the Linear before the latent heads
    image_size: int = 96  # faces only: 64, 96, 128 ... (a multiple of 32)
    loss: str = "bce"  # reconstruction term: bce (MNIST), mse or l1 (faces)
    beta: float = 1.0  # weight of the KL term
    kl_warmup_epochs: int = 0  # ramp beta linearly from 0 over this many epochs (0: off)
    val_share: float = 0.05  # faces: the seeded share held out for validation
    hflip: bool = True  # faces: random horizontal flips while training
    limit: int | None = None  # use at most this many images (quick runs, tests)
    seed: int = 0
    device: str = "auto"  # auto: CUDA when available, else CPU
    precision: str = "float32"  # or "bfloat16": the training passes autocast; weights, validation, artifact float32
    resume: bool = False  # continue from out/checkpoint.pt
    download: bool = False  # MNIST: fetch the IDX files into `data` first (md5-verified)
    mirror: str = ""  # MNIST download base URL; empty: the usual public mirror
    models_dir: Path | None = None  # also install the artifact as models_dir/<name>
    command: str = ""  # the command line that started the run, recorded in the manifest

    def __post_init__(self) -> None:
        self.name = self.name or self.model


DEFAULTS: dict[str, dict[str, object]] = {
    "mnist": {"epochs": 30, "batch_size": 128, "latent_dim": 2, "hidden_dim": 512, "loss": "bce"},
    "faces": {"epochs": 20, "batch_size": 64, "latent_dim": 128, "hidden_dim": 512, "loss": "mse"},
}
