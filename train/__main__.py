"""python -m train mnist|faces --data PATH [options]: train a VAE and export a served artifact."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from train.config import DEFAULTS, TrainConfig
from train.data import DataError


def parse_args(argv: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser(prog="vae-train", description=__doc__)
    sub = parser.add_subparsers(dest="model", required=True)
    for model, help_text in (
        ("mnist", "fully-connected VAE on the MNIST IDX files (--data DIR)"),
        ("faces", "convolutional VAE on a folder or zip of face images (--data PATH)"),
    ):
        p = sub.add_parser(model, help=help_text)
        defaults = DEFAULTS[model]
        p.add_argument("--data", type=Path, required=True, help="MNIST: folder of IDX files; faces: folder or .zip")
        p.add_argument("--out", type=Path, default=None, help="run folder (default runs/<name>)")
        p.add_argument("--name", default=model, help="name the model is served under")
        p.add_argument("--epochs", type=int, default=defaults["epochs"])
        p.add_argument("--batch-size", type=int, default=defaults["batch_size"])
        p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
        p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                       help="cosine: anneal the learning rate to 1%% of --lr by the last epoch")
        p.add_argument("--latent-dim", type=int, default=defaults["latent_dim"])
        p.add_argument("--hidden-dim", type=int, default=defaults["hidden_dim"])
        p.add_argument("--beta", type=float, default=1.0, help="weight of the KL term")
        p.add_argument("--kl-warmup-epochs", type=int, default=0, help="ramp beta from 0 over N epochs")
        p.add_argument("--limit", type=int, default=None, help="use at most N images")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ...")
        p.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                       help="bfloat16: the training passes in mixed precision (a CPU with avx512_bf16 or amx_bf16, "
                            "or a GPU with bfloat16); the weights, validation and the artifact stay float32")
        p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
        p.add_argument("--models-dir", type=Path, default=None, help="also install the artifact as DIR/<name>")
        if model == "mnist":
            p.add_argument("--download", action="store_true", help="fetch the IDX files into --data (md5-checked)")
            p.add_argument("--mirror", default="", help="base URL to download from")
            p.add_argument("--loss", choices=("bce",), default="bce")
        else:
            p.add_argument("--image-size", type=int, default=96, help="a multiple of 32: 64, 96, 128")
            p.add_argument("--loss", choices=("mse", "l1"), default="mse")
            p.add_argument("--val-share", type=float, default=0.05, help="seeded share held out for validation")
            p.add_argument("--no-hflip", dest="hflip", action="store_false", help="no random horizontal flips")
    args = vars(parser.parse_args(argv))
    if args["epochs"] < 1 or args["batch_size"] < 1 or args["latent_dim"] < 1 or args["hidden_dim"] < 1:
        parser.error("--epochs, --batch-size, --latent-dim and --hidden-dim must be positive")
    if args["limit"] is not None and args["limit"] < 1:
        parser.error("--limit must be positive (leave it out to use every image)")
    if "val_share" in args and not 0 < args["val_share"] < 1:  # faces only
        parser.error("--val-share must be between 0 and 1, e.g. 0.05")
    args["out"] = args["out"] or Path("runs") / args["name"]
    args["command"] = shlex.join(["python", "-m", "train", *argv])
    return TrainConfig(**args)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(sys.argv[1:] if argv is None else argv)
    from train.loop import train  # torch is imported only once the arguments are good

    try:
        train(config)
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
