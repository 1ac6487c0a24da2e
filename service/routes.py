"""Thin handlers: validate, call the runtime, answer. Errors are mapped to HTTP in app.py."""

from __future__ import annotations

import base64
import binascii
import contextlib
import math
import random
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service import multipart_form
from service.batcher import NotServing
from service.imaging import ImageError
from service.latents import Prior
from service.runtime import Runtime
from service.schemas import (
    DecodeRequest,
    EncodeJSONRequest,
    EncodeResponse,
    Health,
    ImagesResponse,
    InterpolateRequest,
    ModelInfo,
    ModelList,
    SampleRequest,
    float32_json,
    images_json,
)

PNG = "image/png"
_IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "a PNG (a grid for several images), or JSON with `Accept: application/json`",
        "content": {PNG: {"schema": {"type": "string", "format": "binary"}}, "application/json": {"schema": ImagesResponse.model_json_schema()}},
    }
}


# async: a plain def dependency would cost every request a trip through the thread pool
async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:  # the lifespan is still loading the models
        raise NotServing("the models are still loading")
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
_SEEDS = random.Random()  # seeded from os.urandom once: a seed per request without a system call per request


def wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "application/json" in accept and PNG not in accept


def unprocessable(message: str) -> HTTPException:
    return HTTPException(status_code=422, detail=message)


async def images_response(
    request: Request, runtime: Runtime, model: str, z: torch.Tensor | Prior, *, columns: int | None = None,
    seed: int | None = None,
) -> Response:
    """Decode `z` and answer: one PNG (a grid for several images), or JSON with a PNG per image."""
    headers = {"X-Seed": str(seed)} if seed is not None else {}
    as_json = wants_json(request)
    if len(z) == 1 and not as_json:
        return Response(await runtime.decode_png(model, z), media_type=PNG, headers=headers)
    z = z if isinstance(z, torch.Tensor) else z()
    if as_json:
        pngs = await runtime.decode_base64_pngs(model, z)
        return Response(images_json(model, seed, z.numpy(), pngs), media_type="application/json", headers=headers)
    images = await runtime.decode(model, z)
    return Response(await runtime.grid_png(images, columns), media_type=PNG, headers=headers)


def check_latents(runtime: Runtime, model: str, rows: list[list[float]], what: str = "z") -> torch.Tensor:
    latent_dim = runtime.model(model).latent_dim
    for i, row in enumerate(rows):
        if len(row) != latent_dim:
            raise unprocessable(f"{what}[{i}] has {len(row)} numbers; model {model!r} takes latents of size {latent_dim}")
    return torch.tensor(rows, dtype=torch.float32)


def decode_base64(value: str, index: int) -> bytes:
    try:
        return base64.b64decode(value.split(",", 1)[-1] if value.startswith("data:") else value, validate=True)
    except (binascii.Error, ValueError):
        raise unprocessable(f"images[{index}] is not valid base64") from None


router = APIRouter()


@router.post("/sample", responses=_IMAGE_RESPONSES, response_class=Response, tags=["generate"])
async def sample(body: SampleRequest, request: Request, runtime: RuntimeDep) -> Response:
    """Draw images from the model's prior; the same seed gives the same images."""
    request.state.model = body.model
    runtime.model(body.model)
    if body.n > runtime.settings.max_samples:
        raise unprocessable(f"n is {body.n}; this server returns at most {runtime.settings.max_samples} images")
    seed = body.seed if body.seed is not None else _SEEDS.getrandbits(31)
    # Latents come from the request's own generator, so batching with other requests cannot change them.
    prior = Prior(seed, body.n, runtime.model(body.model).latent_dim, body.temperature)
    return await images_response(request, runtime, body.model, prior, columns=body.columns, seed=seed)


@router.post("/decode", responses=_IMAGE_RESPONSES, response_class=Response, tags=["generate"])
async def decode(body: DecodeRequest, request: Request, runtime: RuntimeDep) -> Response:
    """Decode latents to images: one image per row of `z`."""
    request.state.model = body.model
    if len(body.z) > runtime.settings.max_samples:
        raise unprocessable(f"z has {len(body.z)} rows; this server decodes at most {runtime.settings.max_samples}")
    z = check_latents(runtime, body.model, body.z)
    return await images_response(request, runtime, body.model, z, columns=body.columns)


_ENCODE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["model", "image"],
                    "properties": {
                        "model": {"type": "string", "example": "mnist"},
                        "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "invert": {
                            "type": "string", "enum": ["auto", "true", "false"], "default": "auto",
                            "description": "invert a light background to the light-on-dark digits MNIST-like models saw; "
                            "auto: for one-channel models, where the image's border is light (yes/no, on/off, 1/0 too)",
                        },
                    },
                    "additionalProperties": False,
                }
            },
            "application/json": {"schema": EncodeJSONRequest.model_json_schema(), "example": {"model": "mnist", "images": ["iVBORw0KGgo..."]}},
        },
    }
}


def media_type(content_type: str) -> str:
    """A Content-Type header's media type, lowercased, without its parameters (RFC 9110: case-insensitive)."""
    return content_type.partition(";")[0].strip().lower()


def is_json(media: str) -> bool:
    """Whether a media type is one FastAPI reads as JSON: application/json, or application/...+json."""
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_encode_request(request: Request, max_images: int) -> tuple[str, list[bytes], bool | None]:
    """(model, image files, invert) from a multipart form or a JSON body."""
    content_type = request.headers.get("content-type", "")
    media = media_type(content_type)
    if media == "multipart/form-data":
        try:
            items = await form_items(request, content_type, max_images)
        except (HTTPException, ClientDisconnect):  # the app's own: 413 and 503 from the body's limits, a client gone
            raise
        except StarletteHTTPException as exc:  # Starlette's parser: a malformed form, or one over its limits
            raise unprocessable(f"could not read the multipart form: {exc.detail}") from None
        except Exception as exc:
            raise unprocessable(f"could not read the multipart form: {exc}") from None
        return form_fields(items)
    if is_json(media) or not media:
        try:
            body = EncodeJSONRequest.model_validate_json(await request.body())
        except ValidationError as exc:  # answered like every other invalid body: bounded, input never echoed
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
        if len(body.images) > max_images:
            raise unprocessable(f"{len(body.images)} images; this server encodes at most {max_images} per request")
        return body.model, [decode_base64(v, i) for i, v in enumerate(body.images)], body.invert
    raise HTTPException(status_code=415, detail="send multipart/form-data with 'image' files, or JSON with base64 'images'")


FORM_FIELDS = ("model", "image", "invert")
_BOOLEAN = TypeAdapter(bool)  # what the JSON body's `invert` takes as text too: true/false, yes/no, on/off, 1/0, ...


def form_fields(items: list[multipart_form.Item]) -> tuple[str, list[bytes], bool | None]:
    """(model, image files, invert) from a form's items; 422 for a form that does not say one thing: a field the form
    does not take (as the JSON body refuses one), `model` or `invert` given twice, an image sent as text."""
    names = [name for name, _ in items]
    if unknown := [name for name in names if name not in FORM_FIELDS]:
        raise unprocessable(f"the form has a field {unknown[0][:100]!r}; it takes 'model', 'image' files and 'invert'")
    for name in ("model", "invert"):
        if (count := names.count(name)) > 1:
            raise unprocessable(f"the form has {count} {name!r} fields; give one")
    fields = dict(items)
    model, invert = fields.get("model"), fields.get("invert")
    if not isinstance(model, str) or not model:
        raise unprocessable("the form needs a 'model' field naming a served model")
    images = [value for name, value in items if name == "image"]
    if not images:
        raise unprocessable("the form needs at least one file in an 'image' field")
    files = [image for image in images if isinstance(image, bytes)]
    if len(files) < len(images):
        raise unprocessable("an 'image' field holds text, not a file: send each image as a file (curl -F image=@photo.jpg)")
    return model, files, form_invert(invert)


def form_invert(value: str | bytes | None) -> bool | None:
    """The form's `invert`: absent, empty or "auto" is None (auto); else a boolean, read as in the JSON body."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        return None
    if isinstance(value, str):  # not a file
        with contextlib.suppress(ValidationError):
            return _BOOLEAN.validate_python(value.strip())
    raise unprocessable("the form's 'invert' field is true, false or auto (or left out: auto)")


async def form_items(request: Request, content_type: str, max_files: int) -> list[multipart_form.Item]:
    """A multipart body's (name, text or file bytes) items: split at once where it is a plain form, else parsed by
    Starlette (from the body already read), whose errors and limits then apply."""
    items = multipart_form.parse(await request.body(), content_type, max_files=max_files, max_fields=16)
    if items is not None:
        return items
    form = await request.form(max_files=max_files, max_fields=16)
    return [(name, await value.read() if isinstance(value, UploadFile) else value) for name, value in form.multi_items()]


@router.post("/encode", response_model=EncodeResponse, openapi_extra=_ENCODE_BODY, tags=["encode"])
async def encode(request: Request, runtime: RuntimeDep) -> Response:
    """Encode images to the mean and log-variance of q(z|x), one row per image."""
    name, files, invert = await read_encode_request(request, runtime.settings.max_images_per_request)
    request.state.model = name
    model = runtime.model(name)
    if len(files) > runtime.settings.max_images_per_request:
        raise unprocessable(f"{len(files)} images; this server encodes at most {runtime.settings.max_images_per_request}")
    try:
        mu, log_var = await runtime.encode_uploads(model, files, invert)
    except ImageError as exc:
        raise unprocessable(str(exc)) from None
    fields = {"model": name, "latent_dim": model.latent_dim, "mu": mu.numpy(), "log_var": log_var.numpy()}  # EncodeResponse
    return Response(float32_json(fields), media_type="application/json")


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation (Shoemake); falls back to lerp for (anti)parallel endpoints."""
    cos = torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1, 1))
    if omega.abs() < 1e-6 or (math.pi - omega).abs() < 1e-6:
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


@router.post("/interpolate", responses=_IMAGE_RESPONSES, response_class=Response, tags=["generate"])
async def interpolate(body: InterpolateRequest, request: Request, runtime: RuntimeDep) -> Response:
    """A strip from `start` to `end`, both included; images are encoded to their means first."""
    request.state.model = body.model
    model = runtime.model(body.model)
    if body.steps > runtime.settings.max_steps:
        raise unprocessable(f"steps is {body.steps}; this server draws at most {runtime.settings.max_steps}")
    ends = []
    for label, end in (("start", body.start), ("end", body.end)):
        if end.z is not None:
            ends.append(check_latents(runtime, body.model, [end.z], f"{label}.z")[0])
            continue
        assert end.image is not None
        try:
            mu, _ = await runtime.encode_uploads(model, [decode_base64(end.image, 0)], body.invert)
        except ImageError as exc:
            raise unprocessable(f"{label}.image: {exc}") from None
        ends.append(mu[0])
    t = torch.linspace(0, 1, body.steps)[:, None]
    a, b = ends
    z = slerp(a, b, t) if body.method == "slerp" else (1 - t) * a + t * b
    return await images_response(request, runtime, body.model, z, columns=body.steps)


@router.get("/models", response_model=ModelList, tags=["models"])
async def list_models(runtime: RuntimeDep) -> ModelList:
    """Every model in the repository: shapes, version, checksum, training data and metrics."""
    return ModelList(models=[ModelInfo(**m) for m in runtime.describe()])


@router.get("/models/{name}", response_model=ModelInfo, tags=["models"])
async def get_model(name: str, runtime: RuntimeDep) -> ModelInfo:
    """One model, also one that failed to load (with the reason)."""
    for m in runtime.describe():
        if m["name"] == name:
            return ModelInfo(**m)
    raise HTTPException(status_code=404, detail=f"no model named {name[:100]!r}; served: {', '.join(sorted(runtime.models))}")


probes = APIRouter(tags=["operations"])


# HEAD too: uptime monitors (UptimeRobot's default among them) probe with it. A route of its own, out of the OpenAPI
# schema: one route for both methods gave the two operations one operationId, which client generators refuse.
@probes.head("/healthz", include_in_schema=False)
@probes.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is alive and its event loop answers."""
    return Health(status="ok")


@probes.head("/readyz", include_in_schema=False)
@probes.get("/readyz", response_model=Health, responses={503: {"model": Health}})
async def readyz(request: Request) -> JSONResponse:
    """200 once every model has loaded and passed warm-up (see strict mode); 503 with the reason otherwise."""
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:
        return JSONResponse(Health(status="loading").model_dump(), status_code=503)
    ready, models = runtime.readiness()
    status = "ready" if ready else ("draining" if runtime.draining else "not ready")
    return JSONResponse(Health(status=status, models=models).model_dump(), status_code=200 if ready else 503)


metrics_router = APIRouter(tags=["operations"])


@metrics_router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus metrics in the text exposition format."""
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
