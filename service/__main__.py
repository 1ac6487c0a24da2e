"""vae-serve / python -m service: run the HTTP service on the model repository."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service import log_writer, workers
from service.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vae-serve", description=__doc__)
    parser.add_argument("--model-dir", type=Path, help="model repository (VAE_MODEL_DIR)")
    parser.add_argument("--host", help="bind address (VAE_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (VAE_PORT, default 8000)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (VAE_DEVICE)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    settings = Settings(**overrides)
    log_writer.configure_logging(settings.log_level)
    if settings.workers > 1:
        return workers.supervise(settings, overrides)
    # imported only here: the VAE_WORKERS supervisor above loads neither torch nor the app (38 MiB resident, not 254)
    from service import server
    from service.app import create_app

    server.DrainingServer(server.config(create_app(settings), settings)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
