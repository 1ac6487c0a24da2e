"""GET /models, /healthz, /readyz, /metrics and the OpenAPI docs."""

from __future__ import annotations

import asyncio

import httpx

from service.app import create_app
from service.repository import pick_device
from service.settings import Settings

DEVICE = str(pick_device("auto"))  # the tests' settings leave VAE_DEVICE at auto: CUDA where there is a GPU
GRAPHS = DEVICE.startswith("cuda")  # and there, batches replay from CUDA graphs


async def test_models_lists_shapes_versions_checksums_device_and_precision(client: httpx.AsyncClient) -> None:
    models = {m["name"]: m for m in (await client.get("/models")).json()["models"]}
    assert set(models) == {"mnist", "faces"}
    assert models["mnist"]["image_shape"] == [1, 28, 28] and models["mnist"]["latent_dim"] == 2
    assert models["faces"]["image_shape"] == [3, 32, 32] and models["faces"]["latent_dim"] == 8
    for m in models.values():
        assert m["ready"] and m["device"] == DEVICE and len(m["sha256"]) == 64 and m["version"]
        assert m["precision"] == "float32" and m["cuda_graphs"] == ([1, 2, 4, 8, 16, 32, 64] if GRAPHS else None)


async def test_one_model_and_an_unknown_one(client: httpx.AsyncClient) -> None:
    assert (await client.get("/models/faces")).json()["latent_dim"] == 8
    assert (await client.get("/models/nope")).status_code == 404


async def test_health_and_readiness_once_models_are_warm(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok", "models": {}}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["models"] == {"mnist": "ready", "faces": "ready"}


async def test_the_probes_answer_head_as_get_without_a_body(client: httpx.AsyncClient) -> None:
    """Uptime monitors often probe with HEAD."""
    for path in ("/healthz", "/readyz"):
        head, get = await client.head(path), await client.get(path)
        assert head.status_code == get.status_code == 200 and head.content == b""


async def test_readiness_is_503_until_the_models_have_loaded(settings: Settings) -> None:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            before = await client.get("/readyz")  # loading runs in a thread; the loop answers meanwhile
            await app.state.loading
            after = await client.get("/readyz")
    assert before.status_code == 503 and before.json()["status"] == "loading"
    assert after.status_code == 200


async def test_an_empty_repository_is_never_ready(tmp_path) -> None:  # type: ignore[no-untyped-def]
    app = create_app(Settings(model_dir=tmp_path))
    async with app.router.lifespan_context(app):
        await app.state.loading
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            assert (await client.get("/readyz")).status_code == 503


async def test_metrics_move_when_requests_are_served(client: httpx.AsyncClient) -> None:
    await asyncio.gather(*(client.post("/sample", json={"model": "faces", "n": 2}) for _ in range(4)))
    await client.post("/sample", json={"model": "faces", "n": 0})
    text = (await client.get("/metrics")).text
    assert 'vae_requests_total{endpoint="/sample",model="faces",status="200"} 4.0' in text
    assert 'vae_images_generated_total{model="faces"} 8.0' in text
    assert 'vae_failures_total{reason="invalid"} 1.0' in text
    assert 'vae_batch_size_images_count{model="faces",op="decode"}' in text
    assert 'vae_queue_wait_seconds_count{model="faces"}' in text
    assert 'vae_compute_seconds_count{model="faces",op="decode"}' in text
    assert 'vae_queue_depth_images{model="faces",op="decode"} 0.0' in text
    assert f'vae_model_info{{cuda_graphs="{str(GRAPHS).lower()}",device="{DEVICE}",model="faces",precision="float32"' in text
    assert "process_resident_memory_bytes" in text


async def test_client_chosen_model_names_do_not_become_metric_labels(client: httpx.AsyncClient) -> None:
    await client.post("/sample", json={"model": "x" * 90})
    text = (await client.get("/metrics")).text
    assert "x" * 90 not in text
    assert 'vae_requests_total{endpoint="/sample",model="unknown",status="404"} 1.0' in text


async def test_openapi_docs_have_an_example_for_every_request_body(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    assert (await client.get("/docs")).status_code == 200
    for path in ("/sample", "/decode", "/interpolate", "/encode"):
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        assert "application/json" in content
        dumped = str(content) + str(spec.get("components", {}))
        assert "example" in dumped, path


async def test_every_operation_in_the_openapi_docs_has_an_operation_id_of_its_own(client: httpx.AsyncClient) -> None:
    """Client generators (openapi-generator, openapi-typescript-codegen) refuse a schema that repeats one."""
    spec = (await client.get("/openapi.json")).json()
    ids = [operation["operationId"] for methods in spec["paths"].values() for operation in methods.values()]
    assert len(ids) == len(set(ids)) and {"/healthz", "/readyz"} <= set(spec["paths"])
