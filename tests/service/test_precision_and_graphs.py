"""How models run: VAE_PRECISION (their dtype), VAE_CUDA_GRAPHS (replaying batches from captured graphs on a GPU), and
their weights' layout on a CPU."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from service.graphs import GraphedOp, batch_sizes
from service.repository import capture_graphs, load_model
from service.settings import Settings
from tests.conftest import decode_png, serve

CUDA = torch.device("cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_graphs_are_captured_at_powers_of_two_up_to_the_largest_batch() -> None:
    assert batch_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_sizes(48) == (1, 2, 4, 8, 16, 32, 48)
    assert batch_sizes(1) == (1,)


async def test_a_model_served_in_bfloat16_answers_close_to_float32(settings: Settings) -> None:
    request = {"model": "faces", "n": 4, "seed": 3}
    answers = {}
    for precision in ("float32", "bfloat16"):
        async with serve(settings.model_copy(update={"precision": precision})) as client:
            assert (await client.get("/models/faces")).json()["precision"] == precision
            r = await client.post("/sample", json=request)
            assert r.status_code == 200
            answers[precision] = np.asarray(decode_png(r.content), dtype=float)
    assert abs(answers["bfloat16"] - answers["float32"]).mean() < 2  # of 255 levels


def test_a_model_whose_operations_cannot_be_captured_is_served_without_graphs(
    tiny_models: Path, caplog: pytest.LogCaptureFixture
) -> None:
    served = load_model(tiny_models / "faces", torch.device("cpu"))
    with caplog.at_level(logging.WARNING):
        assert capture_graphs(served, torch.device("cpu"), (1, 2)) == {}  # there is no CUDA stream on a CPU
    assert "serving it without them" in caplog.text
    assert served.predictor("decode")(torch.zeros(2, 8)).shape == (2, 3, 32, 32)


@needs_cuda
@pytest.mark.parametrize("op", ["encode", "decode"])
def test_graph_replays_answer_what_the_module_answers_for_any_batch(tiny_models: Path, op: str) -> None:
    eager = load_model(tiny_models / "faces", CUDA)
    graphed = load_model(tiny_models / "faces", CUDA, graph_sizes=(1, 2, 4, 8))
    assert set(graphed.graphs) == {"encode", "decode"} and graphed.graphs[op].sizes == [1, 2, 4, 8]
    shape = (3, 32, 32) if op == "encode" else (8,)
    with torch.inference_mode():
        for n in (1, 3, 8, 11):  # captured, padded, the largest, larger than any graph
            x = torch.rand(n, *shape)
            want = eager.predictor(op)(x)
            got = graphed.predictor(op)(x)
            for w, g in zip(*((t,) if isinstance(t, torch.Tensor) else t for t in (want, got)), strict=True):
                assert g.shape == w.shape and torch.allclose(g, w, atol=1e-5), (op, n)


@needs_cuda
async def test_a_service_on_a_gpu_answers_the_same_with_and_without_graphs(settings: Settings) -> None:
    request = {"model": "faces", "n": 5, "seed": 11}
    answers = {}
    for graphs in (False, True):
        async with serve(settings.model_copy(update={"device": "cuda", "cuda_graphs": graphs})) as client:
            info = (await client.get("/models/faces")).json()
            assert info["cuda_graphs"] == ([1, 2, 4, 8, 16, 32, 64] if graphs else None)
            r = await client.post("/sample", json=request)
            assert r.status_code == 200
            answers[graphs] = np.asarray(decode_png(r.content), dtype=int)
    assert abs(answers[True] - answers[False]).max() <= 1  # rounding to 8 bits may differ by one level


@needs_cuda
async def test_a_model_served_in_float16_on_a_gpu_answers_close_to_float32(settings: Settings) -> None:
    request = {"model": "faces", "n": 4, "seed": 3}
    answers = {}
    for precision in ("float32", "float16"):
        async with serve(settings.model_copy(update={"device": "cuda", "precision": precision})) as client:
            r = await client.post("/sample", json=request)
            assert r.status_code == 200
            answers[precision] = np.asarray(decode_png(r.content), dtype=float)
            mu = (await client.post("/encode", files={"image": r.content}, data={"model": "faces"})).json()["mu"]
            assert all(v == v for v in mu[0])  # finite floats, not NaN
    assert abs(answers["float16"] - answers["float32"]).mean() < 1


@needs_cuda
def test_a_graphed_op_that_syncs_with_the_host_is_refused_at_capture() -> None:
    def needs_the_host(x: torch.Tensor) -> torch.Tensor:
        return x * 2 if bool(x.sum() > -1e9) else x  # reads a GPU value on the CPU: not capturable

    with pytest.raises(RuntimeError):
        GraphedOp(needs_the_host, torch.zeros(1, 4, device=CUDA), (1, 2))
    torch.cuda.synchronize()  # the failed capture left the device usable
    assert GraphedOp(lambda x: x * 2, torch.zeros(1, 4, device=CUDA), (1, 2))(torch.ones(2, 4)).sum().item() == 16
