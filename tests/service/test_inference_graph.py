"""On a CPU a model is served rewritten for inference (BatchNorm folded into the transposed convolution before it,
linear layers with nothing non-linear between them composed into one, a transposed convolution to a few channels
computed as matmul + col2im, activations in place), and answers as the model as saved; one the rewrites do not fit is served as saved."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from service.artifact import read_artifact
from service.imaging import quantize
from service.inference_graph import check, for_inference, rewrite
from service.repository import load_model


class Net(nn.Module):
    """A model with both ops, each one stack of layers."""

    def __init__(self, decoder: nn.Module, encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.decoder, self.encoder = decoder, encoder if encoder is not None else nn.Identity()

    @torch.jit.export
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return h, -h

    @torch.jit.export
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)


class Residual(nn.Module):
    """BatchNorm of a transposed convolution whose output is used again: folding would change that use."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.ConvTranspose2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.norm(y) + y


def trained_norm(channels: int, affine: bool = True) -> nn.BatchNorm2d:
    """A BatchNorm whose running statistics and affine parameters are not the identity."""
    norm = nn.BatchNorm2d(channels, affine=affine)
    norm.running_mean.uniform_(-1, 1)
    norm.running_var.uniform_(0.5, 2)
    if affine:
        nn.init.uniform_(norm.weight, 0.5, 2)
        nn.init.uniform_(norm.bias, -1, 1)
    return norm.eval()


def scripted(decoder: nn.Module) -> torch.jit.ScriptModule:
    torch.manual_seed(0)
    return torch.jit.script(Net(decoder).eval())


def frozen_decode_graph(module: torch.jit.ScriptModule, probe: torch.Tensor) -> tuple[torch.jit.ScriptModule, str]:
    served = for_inference("test", module, {"encode": probe.new_zeros(1, 1), "decode": probe})
    return served, str(served.decode.graph)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_is_folded_into_the_transposed_convolution_before_it(bias: bool, affine: bool) -> None:
    torch.manual_seed(0)
    module = scripted(nn.Sequential(nn.ConvTranspose2d(8, 16, 3, stride=2, padding=1, bias=bias), trained_norm(16, affine),
                                    nn.LeakyReLU(0.2)))
    z = torch.randn(3, 8, 5, 5)
    served, graph = frozen_decode_graph(module, z)
    assert "aten::batch_norm" not in graph and "aten::conv_transpose2d" in graph
    with torch.inference_mode():
        torch.testing.assert_close(served.decode(z), module.decode(z), rtol=1e-5, atol=1e-5)


def test_a_transposed_convolution_whose_output_is_used_again_keeps_its_batch_norm() -> None:
    module = scripted(Residual())
    for layer in module.decoder.modules():  # running statistics that are not the identity
        if hasattr(layer, "running_var"):
            layer.running_var.fill_(2.0)
    z = torch.randn(2, 4, 6, 6)
    served, graph = frozen_decode_graph(module, z)
    assert "aten::batch_norm" in graph
    with torch.inference_mode():
        torch.testing.assert_close(served.decode(z), module.decode(z))


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "output_padding", "dilation"),
    [(3, 2, 1, 1, 1), (3, 1, 0, 0, 1), (4, 2, 1, 0, 1), (3, 3, 1, 2, 1), (3, 2, 2, 1, 2), (5, 2, 2, 1, 1)],
)
def test_a_transposed_convolution_to_a_few_channels_runs_as_matmul_and_col2im(
    kernel: int, stride: int, padding: int, output_padding: int, dilation: int
) -> None:
    conv = nn.ConvTranspose2d(16, 3, kernel, stride, padding, output_padding, dilation=dilation)
    module = scripted(nn.Sequential(conv, nn.Sigmoid()))
    z = torch.randn(4, 16, 7, 9).contiguous(memory_format=torch.channels_last)
    served, graph = frozen_decode_graph(module, z)
    assert "aten::conv_transpose2d" not in graph and "aten::col2im" in graph
    with torch.inference_mode():
        expected = module.decode(z)
        torch.testing.assert_close(served.decode(z), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(served.decode(z[0]), expected[0], rtol=1e-5, atol=1e-5)  # unbatched (C, H, W)


def test_wide_transposed_convolutions_stay_as_they_are() -> None:
    module = scripted(nn.ConvTranspose2d(8, 16, 3, stride=2, padding=1))
    _, graph = frozen_decode_graph(module, torch.randn(2, 8, 4, 4))
    assert "aten::conv_transpose2d" in graph and "aten::col2im" not in graph


def test_the_served_faces_model_is_rewritten_and_decodes_within_a_level_of_the_bytes_it_was_saved_to(tiny_models: Path) -> None:
    served = load_model(tiny_models / "faces", torch.device("cpu"))
    as_saved = read_artifact(tiny_models / "faces").load(torch.device("cpu"))
    graph = str(served.module.decode.graph)
    assert "aten::batch_norm" not in graph and "aten::col2im" in graph and graph.count("aten::linear") == 1
    z = torch.randn(64, served.latent_dim, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        got, expected = quantize(served.module.decode(z)).int(), quantize(as_saved.decode(z)).int()
        assert (got - expected).abs().max() <= 1
        assert (got != expected).float().mean() < 1e-3
        x = torch.rand(4, *served.image_shape)
        for got_part, expected_part in zip(served.module.encode(x), as_saved.encode(x), strict=True):
            torch.testing.assert_close(got_part, expected_part, rtol=1e-4, atol=1e-4)


def test_a_rewritten_model_that_answers_otherwise_is_served_as_saved(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    module = scripted(nn.Sequential(nn.ConvTranspose2d(8, 3, 3), nn.Sigmoid()))
    otherwise = scripted(nn.Sequential(nn.ConvTranspose2d(8, 3, 3), nn.Sigmoid()))
    with torch.no_grad():
        otherwise.decoder[0].bias.add_(0.5)
    monkeypatch.setattr(torch.jit, "freeze", lambda module, preserved_attrs: otherwise)
    probes = {"encode": torch.zeros(1, 1), "decode": torch.randn(2, 8, 4, 4)}
    with caplog.at_level(logging.WARNING):
        assert for_inference("odd", module, probes) is module
    assert "model odd is served as saved, not rewritten for inference (ValueError: decode answered" in caplog.text


def test_a_model_that_cannot_be_frozen_is_served_as_saved(caplog: pytest.LogCaptureFixture) -> None:
    eager = Net(nn.Sigmoid()).eval()  # not TorchScript
    with caplog.at_level(logging.WARNING):
        assert for_inference("eager", eager, {"encode": torch.zeros(1, 1), "decode": torch.zeros(1, 1)}) is eager
    assert "model eager is served as saved" in caplog.text


def test_answers_that_differ_by_more_than_rounding_are_refused() -> None:
    x = torch.rand(2, 3)
    check("decode", x, x + 1e-6)
    check("encode", (x, x), (x, x.clone()))
    with pytest.raises(ValueError, match="differently"):
        check("decode", x, x + 1e-2)
    with pytest.raises(ValueError, match="differently"):
        check("decode", x, x[:1])
    with pytest.raises(ValueError, match="2 tensors instead of 1"):
        check("encode", x, (x, x))


def test_linear_layers_with_nothing_non_linear_between_them_are_composed_into_one() -> None:
    module = scripted(nn.Sequential(nn.Linear(6, 32), nn.Linear(32, 64 * 2 * 2), nn.Unflatten(1, (64, 2, 2)),
                                    nn.ConvTranspose2d(64, 16, 3, stride=2, padding=1, output_padding=1), trained_norm(16),
                                    nn.LeakyReLU(0.2), nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1)))
    z = torch.randn(5, 6)
    served, graph = frozen_decode_graph(module, z)
    assert graph.count("aten::linear") == 1 and graph.count("aten::conv_transpose2d") == 1  # the second is after LeakyReLU
    assert "aten::movedim" in graph  # (C, H, W) comes out of the composed layer laid out channels-last
    with torch.inference_mode():
        torch.testing.assert_close(served.decode(z), module.decode(z), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "layers",
    [
        pytest.param(lambda: [nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 8)], id="non-linear between"),
        pytest.param(lambda: [nn.Linear(64, 8), nn.Linear(8, 64)], id="one layer would cost more"),
        pytest.param(lambda: [nn.Linear(6, 32)], id="a single layer"),
    ],
)
def test_linear_layers_are_left_as_they_are_where_composing_does_not_pay(layers: Callable[[], list[nn.Module]]) -> None:
    stack = layers()
    module = scripted(nn.Sequential(*stack))
    _, graph = frozen_decode_graph(module, torch.randn(3, stack[0].in_features))
    assert graph.count("aten::linear") == sum(isinstance(layer, nn.Linear) for layer in stack)


def test_a_chain_of_linear_layers_becomes_one_linear_layer() -> None:
    module = scripted(nn.Sequential(nn.Linear(6, 32), nn.Linear(32, 48), nn.Linear(48, 40)))
    z = torch.randn(4, 6)
    served, graph = frozen_decode_graph(module, z)
    assert graph.count("aten::linear") == 1
    with torch.inference_mode():
        torch.testing.assert_close(served.decode(z), module.decode(z), rtol=1e-5, atol=1e-5)


class ReusedActivationInput(nn.Module):
    """An activation whose input is used again afterwards: overwriting it would change that use."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.relu(y) + y


def test_an_activation_whose_input_nothing_else_uses_overwrites_it() -> None:
    module = scripted(nn.Sequential(nn.ConvTranspose2d(8, 8, 3), nn.LeakyReLU(0.2), nn.Sigmoid()))
    z = torch.randn(2, 8, 5, 5)
    served, graph = frozen_decode_graph(module, z)
    assert "aten::leaky_relu_" in graph and "aten::sigmoid_" in graph
    with torch.inference_mode():
        torch.testing.assert_close(served.decode(z), module.decode(z))


@pytest.mark.parametrize("layers", [nn.Sigmoid, ReusedActivationInput], ids=["the model's input", "used again"])
def test_an_activation_keeps_an_input_that_is_the_callers_or_used_again(layers: Callable[[], nn.Module]) -> None:
    module = scripted(layers())
    x = torch.randn(2, 3, 4, 4)
    served, graph = frozen_decode_graph(module, x)
    assert "_(" not in graph
    with torch.inference_mode():
        before = x.clone()
        torch.testing.assert_close(served.decode(x), module.decode(x))
        assert torch.equal(x, before)


def test_rewrite_reports_what_it_changed() -> None:
    module = scripted(nn.Sequential(nn.ConvTranspose2d(8, 8, 3), trained_norm(8), nn.ConvTranspose2d(8, 1, 3)))
    frozen = torch.jit.freeze(module, preserved_attrs=["decode", "encode"])
    assert rewrite(frozen.decode.graph) == [
        "1 BatchNorm folded into transposed convolutions", "1 narrow transposed convolutions as matmul + col2im"
    ]  # no linear layers to compose
    assert rewrite(frozen.decode.graph) == []  # nothing left to change
