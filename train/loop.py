"""Training and evaluation: read top to bottom, from data to exported artifact."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from service.repository import pick_device
from train import data as datasets
from train.config import TrainConfig
from train.export import export, install
from train.face_vae import FaceVAE, FaceVAEConfig
from train.mnist_vae import MnistVAE, MnistVAEConfig
from train.report import write_report
from train.vae import VAE, as_input, held_out_metrics, vae_loss

CHECKPOINT = "checkpoint.pt"
LR_FLOOR = 0.01  # the cosine schedule ends at this share of the initial learning rate
BATCHNORM_IMAGES = 10_000  # training images whose statistics the exported model's BatchNorm layers keep


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """The learning rate of `epoch` (1-based); a function of the epoch alone, so a resumed run continues it."""
    if config.lr_schedule == "constant":
        return config.lr
    progress = (epoch - 1) / max(1, config.epochs - 1)
    return config.lr * (LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_model(config: TrainConfig) -> tuple[VAE, str]:
    """The architecture for `config.model` and its name in the manifest."""
    if config.model == "mnist":
        return MnistVAE(MnistVAEConfig(latent_dim=config.latent_dim, hidden_dim=config.hidden_dim)), "mnist_fc_vae"
    if config.model == "faces":
        arch = FaceVAEConfig(latent_dim=config.latent_dim, image_size=config.image_size, hidden_dim=config.hidden_dim)
        return FaceVAE(arch), "face_conv_vae"
    raise ValueError(f"unknown model {config.model!r}: choose mnist or faces")


def load_data(config: TrainConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, validation): MNIST validates on the official test set, faces on a seeded holdout."""
    if config.model == "mnist":
        if config.download:
            datasets.download_mnist(config.data, config.mirror or datasets.MNIST_MIRROR)
        train, val = datasets.load_mnist(config.data, "train"), datasets.load_mnist(config.data, "test")
        if config.limit:
            train, val = train.head(config.limit), val.head(config.limit)
        return train, val
    everything = datasets.load_images(config.data, config.image_size, limit=config.limit, progress=True)
    if skipped := everything.source["skipped_unreadable"]:
        print(f"{config.data}: {skipped} files that are not readable images were skipped")
    return datasets.split_holdout(everything, config.val_share, config.seed)


def _batches(order: Tensor, batch_size: int, whole_only: bool = False) -> list[Tensor]:
    """The indices in `order`, in batches (indices, so that only the batch at hand is copied out of the images);
    `whole_only` drops a short last batch (an epoch's leftover after the shuffle), which would otherwise take a full
    optimiser step, and set BatchNorm's statistics, on a handful of images."""
    parts = list(order.split(batch_size))
    if whole_only and len(parts) > 1 and len(parts[-1]) < batch_size:
        parts.pop()
    return parts


def _flips(config: TrainConfig) -> bool:
    """Whether training inputs are flipped at random: faces only, unless --no-hflip."""
    return config.hflip and config.model == "faces"


def _to_input(batch: Tensor, device: torch.device, hflip: bool) -> Tensor:
    x = as_input(batch, device)
    if hflip:
        flip = torch.rand(len(x), device=device) < 0.5
        x[flip] = x[flip].flip(-1)
    return x


def train_epoch(
    model: VAE, images: Tensor, optimizer: torch.optim.Optimizer, config: TrainConfig, beta: float, desc: str
) -> dict[str, float]:
    model.train()
    device = next(model.parameters()).device
    totals = {"loss": 0.0, "reconstruction": 0.0, "kl": 0.0}
    seen = 0
    batches = _batches(torch.randperm(len(images)), config.batch_size, whole_only=True)
    bar = tqdm(batches, desc=desc, unit="batch", leave=False)
    for idx in bar:
        x = _to_input(images[idx], device, hflip=_flips(config))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bfloat16"):
            recon, mu, log_var = model(x)
        terms = vae_loss(recon.float(), x, mu.float(), log_var.float(), kind=config.loss, beta=beta)  # sums in float32
        optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        optimizer.step()
        seen += len(x)
        for key, value in zip(totals, terms, strict=False):
            totals[key] += float(value.detach())
        bar.set_postfix(loss=f"{totals['loss'] / seen:.2f}", refresh=False)
    return {
        "reconstruction": totals["reconstruction"] / seen,
        "kl": totals["kl"] / seen,
        "neg_elbo": (totals["reconstruction"] + totals["kl"]) / seen,
    }


def evaluate(model: VAE, images: Tensor, config: TrainConfig) -> dict[str, float]:
    """Per-image reconstruction, KL and negative ELBO (beta = 1) with one posterior sample, the same noise every
    epoch, and MSE per pixel from the mean: what `train.evaluate` measures of the exported artifact."""
    model.eval()
    return held_out_metrics(model, images, config.loss)


@torch.no_grad()
def recalibrate_batchnorm(model: VAE, images: Tensor, config: TrainConfig) -> bool:
    """Give every BatchNorm layer the plain average of the training images' batch statistics (up to
    BATCHNORM_IMAGES of them, with the model's weights as they end), in place of the running averages
    that training leaves, which lean on its last few batches: on a 60-epoch faces run whose epochs each
    ended on a batch of one image, validation negative ELBO 457.7 -> 434.1. False, and nothing done,
    when the model has no BatchNorm."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return False
    device = next(model.parameters()).device
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average: every batch counts the same
    model.train()
    for idx in _batches(torch.randperm(len(images))[:BATCHNORM_IMAGES], config.batch_size, whole_only=True):
        model(_to_input(images[idx], device, hflip=_flips(config)))
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
    model.eval()
    return True


@torch.no_grad()
def label_centroids(model: VAE, data: datasets.Dataset, device: torch.device) -> dict[str, list[float]]:
    """Mean latent mean per label: where each class sits in the latent space (for maps and checks)."""
    model.eval()
    assert data.labels is not None
    mu = torch.cat([model.encode(_to_input(b, device, hflip=False))[0].cpu() for b in data.images.split(512)])
    return {str(int(label)): [round(float(v), 4) for v in mu[data.labels == label].mean(0)] for label in data.labels.unique()}


def check_precision(precision: str, device: torch.device, cpu_flags: Path = Path("/proc/cpuinfo")) -> None:
    """Refuse bfloat16 where the device cannot run it; say so where a CPU would only emulate it (slower than float32).
    The mixed-precision passes took `faces` 351 -> 198 ms a batch of 64 on a Zen 4 core pair with avx512_bf16."""
    if precision != "bfloat16":
        return
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{torch.cuda.get_device_name(device)} has no bfloat16: train with --precision float32")
    if device.type == "cpu":
        try:
            flags = set(cpu_flags.read_text().split())
        except OSError:
            return  # not Linux: nothing to tell
        if not flags & {"avx512_bf16", "amx_bf16"}:
            print("note: this CPU has no bfloat16 instructions (avx512_bf16, amx_bf16): torch emulates them, "
                  "usually slower than --precision float32")


def train(config: TrainConfig) -> Path:
    """Train, write the run's pictures and metrics, export the artifact; returns the artifact folder."""
    torch.manual_seed(config.seed)
    device = pick_device(config.device)
    check_precision(config.precision, device)
    config.out.mkdir(parents=True, exist_ok=True)
    model, architecture = build_model(config)  # first: a bad --image-size fails before the data is decoded
    train_set, val_set = load_data(config)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    history: list[dict[str, float]] = []
    commands = [config.command]  # every invocation that contributed to this run, resumes included

    checkpoint_path = config.out / CHECKPOINT
    if config.resume and checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history = json.loads(state["history"])
        torch.set_rng_state(state["rng"].cpu())  # map_location put it on `device`; the CPU generator needs it back
        commands = [*state.get("commands", []), config.command]
        print(f"resumed from {checkpoint_path} after epoch {len(history)}")

    print(
        f"{config.model}: {len(train_set.images)} training / {len(val_set.images)} validation images, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, device {device}"
    )
    for epoch in range(len(history) + 1, config.epochs + 1):
        started = time.perf_counter()
        beta = config.beta * (min(1.0, epoch / config.kl_warmup_epochs) if config.kl_warmup_epochs else 1.0)
        lr = learning_rate(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_metrics = train_epoch(model, train_set.images, optimizer, config, beta, f"epoch {epoch}/{config.epochs}")
        val_metrics = evaluate(model, val_set.images, config)
        if not all(math.isfinite(v) for v in (*train_metrics.values(), *val_metrics.values())):
            raise RuntimeError(f"the loss diverged in epoch {epoch}: try a lower --lr")
        row = {"epoch": epoch, "seconds": round(time.perf_counter() - started, 1), "beta": beta, "lr": lr}
        row |= {f"train_{k}": v for k, v in train_metrics.items()} | {f"val_{k}": v for k, v in val_metrics.items()}
        history.append(row)
        print(
            f"epoch {epoch:3d}  train rec {train_metrics['reconstruction']:.2f} kl {train_metrics['kl']:.2f} "
            f"-elbo {train_metrics['neg_elbo']:.2f} | val rec {val_metrics['reconstruction']:.2f} "
            f"kl {val_metrics['kl']:.2f} -elbo {val_metrics['neg_elbo']:.2f} "
            f"mse/px {val_metrics['mse_per_pixel']:.5f}  lr {lr:.2g}  ({row['seconds']}s)",
            flush=True,
        )
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "history": json.dumps(history),
                "rng": torch.get_rng_state(),
                "commands": commands,
            },
            checkpoint_path,
        )

    final = {k.removeprefix("val_"): v for k, v in history[-1].items() if k.startswith("val_")} if history else (
        evaluate(model, val_set.images, config)
    )
    if recalibrate_batchnorm(model, train_set.images, config):
        before, final = final["neg_elbo"], evaluate(model, val_set.images, config)
        print(f"BatchNorm statistics recomputed over the training images: val -elbo {before:.2f} -> {final['neg_elbo']:.2f}")

    (config.out / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    write_report(model, val_set.images[:2000], val_set.labels[:2000] if val_set.labels is not None else None, history, config.out)

    metrics: dict[str, float] = {
        "validation_reconstruction_per_image": round(final["reconstruction"], 4),
        "validation_kl_per_image": round(final["kl"], 4),
        "validation_neg_elbo_per_image": round(final["neg_elbo"], 4),
        "validation_mse_per_pixel": round(final["mse_per_pixel"], 6),
    }
    metrics["epochs"] = len(history)
    training = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("resume", "download", "models_dir", "command")}
    training["commands"] = commands
    data_info = {"train": train_set.source, "validation": val_set.source}
    extra: dict[str, object] = {
        # How the service should turn an upload into model input: MNIST's digit normalisation, or a crop.
        "upload_normalization": "digit" if config.model == "mnist" else "center_crop",
    }
    if val_set.labels is not None:
        extra["label_centroids"] = label_centroids(model, val_set, device)
    artifact = export(
        model, config.out / "artifact", name=config.name, architecture=architecture,
        data=data_info, training=training, metrics=metrics, extra=extra,
    )
    print(f"artifact: {artifact.directory} (sha256 {artifact.sha256[:12]}…)")
    if config.models_dir is not None:
        print(f"installed: {install(artifact, config.models_dir)}")
    return artifact.directory
