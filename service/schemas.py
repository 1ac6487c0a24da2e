"""Request and response bodies. Validation happens here, at the edge, with messages that say what to fix."""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

ModelName = Annotated[str, Field(min_length=1, max_length=100, examples=["faces"], description="a served model")]
# One latent coordinate: finite and bounded, so that float32 holds it and slerp's norms cannot overflow
# (prior samples lie within a few units of 0). NaN and Infinity are refused as "not a finite number".
LatentValue = Annotated[float, Field(ge=-1e4, le=1e4, allow_inf_nan=False)]
# A latent row. Its length is checked against the model later; the bound here stops absurd arrays early.
# fail_fast: a huge array of bad values gets one error, not millions of them (memory).
Latent = Annotated[list[LatentValue], Field(min_length=1, max_length=4096, fail_fast=True)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SampleRequest(_Strict):
    """Draw `n` latents from the prior N(0, temperature^2 I) and decode them."""

    model: ModelName
    n: int = Field(1, ge=1, description="how many images (up to the server's limit)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="same seed, same images; random if absent")
    temperature: float = Field(1.0, gt=0, le=10, allow_inf_nan=False, description="scales the prior's standard deviation")
    columns: int | None = Field(None, ge=1, le=256, description="grid columns for n > 1 (default: square)")

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"model": "faces", "n": 16, "seed": 7, "temperature": 0.8}]}
    )


class DecodeRequest(_Strict):
    """Decode the given latents: one image per row."""

    model: ModelName
    z: Annotated[list[Latent], Field(min_length=1, fail_fast=True, description="rows of the model's latent size")]
    columns: int | None = Field(None, ge=1, le=256)

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"model": "mnist", "z": [[0.0, 0.0], [1.5, -0.5]]}]})


class EncodeJSONRequest(_Strict):
    """Encode base64 images (PNG, JPEG, ...) to the mean and log-variance of q(z|x)."""

    model: ModelName
    images: Annotated[list[str], Field(min_length=1, fail_fast=True, description="base64-encoded image files")]
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
    images: list[str] = Field(description="base64-encoded PNGs")  # last, as images_json writes it


def images_json(model: str, seed: int | None, latents: np.ndarray, base64_pngs: list[bytes]) -> bytes:
    """An ImagesResponse as JSON. The images come base64-encoded from the threads that encoded the PNGs and are joined
    in as bytes: base64 needs no escaping, and pydantic validating and writing 64 strings of 20 KB cost the event loop
    2.6 ms for an n=64 `faces` answer. The latents are written as `float32_json` writes them."""
    head = float32_json({"model": model, "seed": seed, "latents": latents, "images": []})
    if not base64_pngs:
        return head
    # one join over the images, the JSON around them in the first and last: 1.3 MB copied once, not twice as by a join
    # inside another (n=64 faces: 0.22 -> 0.12 ms)
    parts = list(base64_pngs)
    parts[0] = head.removesuffix(b"]}") + b'"' + parts[0]
    parts[-1] += b'"]}'
    return b'","'.join(parts)


def float32_json(fields: dict[str, object]) -> bytes:
    """`fields` as compact JSON, their arrays as float32: each number the shortest decimal that reads back as the same
    float32 (0.80327606, where pydantic wrote the float64 it becomes in Python, 0.8032760620117188). Sent back, a
    latent is the model's own value to the bit; the numbers take about half the bytes; and orjson writes them from the array in
    C: 8,192 of them (an n=64 `faces` answer) in 0.3 ms of the event loop against 0.6-1.3 ms by pydantic."""
    return orjson.dumps(
        {k: np.ascontiguousarray(v, np.float32) if isinstance(v, np.ndarray) else v for k, v in fields.items()},
        option=orjson.OPT_SERIALIZE_NUMPY,
    )


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
    precision: str = Field("float32", description="the dtype the model runs in")
    cuda_graphs: list[int] | None = Field(None, description="batch sizes replayed as CUDA graphs; null when none")
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


class Issue(BaseModel):
    type: str
    loc: list[str | int] = Field(description="where in the request, e.g. ['body', 'z', 0, 1]")
    msg: str


class Problem(BaseModel):
    """Every error answer: a message, or for an invalid request a list of what is wrong and where."""

    detail: str | list[Issue]
