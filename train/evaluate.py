"""python -m train.evaluate ARTIFACT [ARTIFACT ...] --data PATH: compare artifacts on held-out data.

Each artifact is measured as the service runs it (its TorchScript encode and decode) on the images its
training held out (MNIST's test set; for faces the seeded holdout, --val-share and --seed as trained),
with the same posterior noise for every artifact: negative ELBO, reconstruction and KL per image, and
MSE per pixel of the reconstruction from the mean. A retrained model replaces a shipped one only when it
measures better here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch import Tensor

from service.artifact import Artifact, ArtifactError, read_artifact
from service.repository import pick_device
from train import data as datasets
from train.config import TrainConfig
from train.loop import load_data
from train.vae import NOISE_SEED, held_out_metrics

MNIST_ARCHITECTURE = "mnist_fc_vae"


def held_out_images(artifact: Artifact, data: Path, *, val_share: float, seed: int, limit: int | None) -> Tensor:
    """The uint8 images that `artifact`'s training validated on, read from `data` by training's own `load_data`."""
    model = "mnist" if artifact.manifest.get("architecture") == MNIST_ARCHITECTURE else "faces"
    config = TrainConfig(model=model, data=data, out=Path(), image_size=artifact.image_shape[1], val_share=val_share,
                         seed=seed, limit=limit)
    return load_data(config)[1].images


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", type=Path, nargs="+", help="artifact folders (models/faces, runs/x/artifact)")
    parser.add_argument("--data", type=Path, required=True, help="what they were trained on: MNIST folder, image folder or zip")
    parser.add_argument("--val-share", type=float, default=0.05, help="faces: the holdout share their training used")
    parser.add_argument("--seed", type=int, default=0, help="faces: the seed their training split with")
    parser.add_argument("--limit", type=int, default=None, help="the --limit their training used, if any")
    parser.add_argument("--noise-seed", type=int, default=NOISE_SEED, help="seed of the posterior noise, shared by all")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto ...")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = pick_device(args.device)
    print(f"{'artifact':40} {'-ELBO/image':>12} {'reconstruction':>15} {'KL':>9} {'MSE/pixel':>10}")
    images: dict[tuple[str, int], Tensor] = {}  # held-out sets by (architecture, size): read once for all
    for path in args.artifacts:
        try:
            artifact = read_artifact(path)
            key = (str(artifact.manifest.get("architecture")), artifact.image_shape[1])
            if key not in images:
                images[key] = held_out_images(artifact, args.data, val_share=args.val_share, seed=args.seed,
                                              limit=args.limit)
            loss = str(artifact.manifest.get("training", {}).get("loss", "mse"))
            result = held_out_metrics(artifact.load(device), images[key], loss, args.noise_seed)
        except (ArtifactError, datasets.DataError) as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            return 2
        except RuntimeError as exc:  # the model's input is not what --data holds, e.g. digits given faces
            print(f"error: {path} does not take the images in {args.data}: {exc}", file=sys.stderr)
            return 2
        print(f"{path!s:40} {result['neg_elbo']:12.2f} {result['reconstruction']:15.2f} "
              f"{result['kl']:9.2f} {result['mse_per_pixel']:10.6f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
