"""Request and response bodies. Validation happens here, at the edge, with messages that say what to fix."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ModelName = Annotated[str, Field(min_length=1, max_length=100, examples=["faces"], description="a served model")]
# A latent row. Its length is checked against the model later; the bound here stops absurd arrays early.
Latent = Annotated[list[float], Field(min_length=1, max_length=4096)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _finite(rows: list[list[float]]) -> list[list[float]]:
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            if not math.isfinite(value):
                raise ValueError(f"z[{i}][{j}] is {value}: every latent must be a finite number")
    return rows


class SampleRequest(_Strict):
    """Draw `n` latents from the prior N(0, temperature^2 I) and decode them."""

    model: ModelName
    n: int = Field(1, ge=1, description="how many images (up to the server's limit)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="same seed, same images; random if absent")
    temperature: float = Field(1.0, gt=0, le=10, description="scales the prior's standard deviation")
    columns: int | None = Field(None, ge=1, le=256, description="grid columns for n > 1 (default: square)")

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"model": "faces", "n": 16, "seed": 7, "temperature": 0.8}]}
    )


class DecodeRequest(_Strict):
    """Decode the given latents: one image per row."""

    model: ModelName
    z: Annotated[list[Latent], Field(min_length=1, description="rows of the model's latent size")]
    columns: int | None = Field(None, ge=1, le=256)

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"model": "mnist", "z": [[0.0, 0.0], [1.5, -0.5]]}]})

    @field_validator("z")
    @classmethod
    def _finite_rows(cls, rows: list[list[float]]) -> list[list[float]]:
        return _finite(rows)


class EncodeJSONRequest(_Strict):
    """Encode base64 images (PNG, JPEG, ...) to the mean and log-variance of q(z|x)."""

    model: ModelName
    images: Annotated[list[str], Field(min_length=1, description="base64-encoded image files")]
    invert: bool | None = Field(None, description="invert light-on-dark; default: auto for one-channel models")

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"model": "mnist", "images": ["iVBORw0KGgo..."]}]}
    )


class Endpoint(_Strict):
    """One end of an interpolation: a latent, or an image encoded to its mean."""

    z: Latent | None = None
    image: str | None = Field(None, description="a base64-encoded image file")

    @model_validator(mode="after")
    def _one_of(self) -> Endpoint:
        if (self.z is None) == (self.image is None):
            raise ValueError("give exactly one of 'z' or 'image'")
        if self.z is not None:
            _finite([self.z])
        return self


class InterpolateRequest(_Strict):
    """Walk from `start` to `end` (both included) in latent space and decode each step."""

    model: ModelName
    start: Endpoint
    end: Endpoint
    steps: int = Field(8, ge=2, description="images in the strip, start and end included")
    method: Literal["lerp", "slerp"] = "lerp"
    invert: bool | None = None

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"model": "mnist", "start": {"z": [-1.0, 0.5]}, "end": {"z": [1.0, -0.5]}, "steps": 8}]
        },
    )


class ImagesResponse(BaseModel):
    model: str
    seed: int | None = None
    latents: list[list[float]]
    images: list[str] = Field(description="base64-encoded PNGs")


class EncodeResponse(BaseModel):
    model: str
    latent_dim: int
    mu: list[list[float]]
    log_var: list[list[float]]


class ModelInfo(BaseModel):
    name: str
    ready: bool
    device: str
    error: str | None = None
    version: str | None = None
    architecture: str | None = None
    image_shape: list[int] | None = None
    latent_dim: int | None = None
    value_range: list[float] | None = None
    sha256: str | None = None
    data: dict[str, object] | None = None
    metrics: dict[str, object] | None = None
    created: str | None = None


class ModelList(BaseModel):
    models: list[ModelInfo]


class Health(BaseModel):
    status: str
    models: dict[str, str] = Field(default_factory=dict, description="model -> ready, or why it is not")
