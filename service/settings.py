"""The one settings object: every knob, read from VAE_* environment variables."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VAE_", extra="ignore")

    model_dir: Path = Field(Path("models"), description="the model repository: one folder per model")
    host: str = Field("127.0.0.1", description="bind address; 0.0.0.0 only inside a container")
    port: int = Field(8000, ge=0, le=65535)
    device: str = Field("auto", description="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    strict: bool = Field(True, description="any model that fails to load makes the service unready")
    workers: int = Field(
        1, ge=1, le=64, description="server processes on the port, each with every model: for GPU hosts (see README)"
    )
    torch_threads: int = Field(
        0, ge=0, description="intra-op threads for torch's CPU work; 0: on a GPU 1, on a CPU torch's default, at most "
        "the process's share of the CPUs it may use (its affinity and its container's CPU quota, divided among the workers)",
    )
    cpu_lanes: int = Field(
        0, ge=0, le=256,
        description="on a CPU, batches computed at once under load, one torch thread each; 0: 2 where torch runs 2 "
        "threads, else 1; 1: one batch at a time on every torch thread (see bench/README.md)",
    )
    precision: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="the models' weights and arithmetic; auto: float32 (see bench/README.md)"
    )
    cuda_graphs: bool = Field(True, description="on CUDA, replay batches from graphs captured at sizes 1, 2, 4, ...")
    png_compression: Literal["fast", "none"] = Field(
        "fast", description="the PNGs' deflate: fast (ISA-L's fastest level) or none (stored as they are: a faces image "
        "27.8 KB instead of about 15, for more images a second where bandwidth is cheaper than CPU)",
    )

    max_batch_size: int = Field(64, ge=1, description="most images in one encoder/decoder call")
    max_wait_ms: float = Field(2.0, ge=0, description="how long a model-thread batch waits for company, only while another active client could still bring some (never for a client alone); a lane's never waits")
    queue_size: int = Field(2048, ge=1, description="most images queued per model before 429")
    request_timeout_s: float = Field(30.0, gt=0, description="a request waiting longer gets 504")
    drain_timeout_s: float = Field(20.0, ge=0, description="on SIGTERM, how long admitted requests may finish")

    max_connections: int = Field(1000, ge=1, description="requests on connections beyond this many get 503 at once")
    read_timeout_s: float = Field(
        10.0, gt=0, description="a request's head is due within this long of its first byte (of the connection opening, "
        "for a first request), its body this long after the head plus 1 s per KiB; later ones get 408 and are closed",
    )
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="larger bodies get 413")
    max_body_bytes_in_flight: int = Field(
        64 * 1024 * 1024, ge=1024, description="request bodies held at once, all requests together (at least one of "
        "max_body_bytes); a body that would go over gets 503 with Retry-After",
    )
    max_image_pixels: int = Field(40_000_000, ge=1, description="larger uploads get 422 (decompression bombs)")
    max_images_per_request: int = Field(64, ge=1, description="images per /encode request")
    max_samples: int = Field(256, ge=1, description="most images per /sample or /decode request")
    max_steps: int = Field(64, ge=2, description="most images in one /interpolate strip")

    api_key: SecretStr | None = Field(None, description="require 'Authorization: Bearer <key>' when set")
    api_key_file: Path | None = Field(None, description="read the API key from this file (a mounted secret)")
    metrics_require_key: bool = Field(False, description="also require the API key on /metrics")
    cors_origins: str = Field(
        "", description="the origins whose web pages may call the API from a browser (CORS): comma-separated, as "
        "https://app.example.com or http://localhost:5173, or * for any; empty: none, and no CORS headers are sent",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @property
    def cors_origin_list(self) -> list[str]:
        """Lowercased, as browsers send an origin."""
        return [origin.strip().lower() for origin in self.cors_origins.split(",") if origin.strip()]

    @model_validator(mode="after")
    def _check_cors_origins(self) -> Settings:
        for origin in self.cors_origin_list:
            # A browser sends its page's origin as scheme://host[:port]; one written with a path or a trailing slash
            # would never match it, and every call from that page would fail in the browser with nothing in the log.
            if origin != "*" and not re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/?#\s]+", origin):
                raise ValueError(f"cors_origins: {origin[:100]!r} is not an origin: write scheme://host[:port], no path")
        return self

    @model_validator(mode="after")
    def _read_key_file(self) -> Settings:
        if self.api_key is not None and not self.api_key.get_secret_value().strip():
            self.api_key = None  # VAE_API_KEY="" means no key, never "the empty key"
        if self.api_key is None and self.api_key_file is not None:
            key = self.api_key_file.read_text().strip()
            if not key:
                raise ValueError(f"api_key_file {self.api_key_file} is empty")
            self.api_key = SecretStr(key)
        return self
