"""The training loop's batches, and the BatchNorm statistics an exported model keeps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from train.config import TrainConfig
from train.face_vae import FaceVAE, FaceVAEConfig
from train.loop import _batches, check_precision, recalibrate_batchnorm, train_epoch
from train.mnist_vae import MnistVAE

SMALL = FaceVAEConfig(image_size=32, channels=(4, 8, 8, 16, 16), hidden_dim=16, latent_dim=8)


def _config(batch_size: int) -> TrainConfig:
    return TrainConfig(model="faces", data=Path("unused"), out=Path("unused"), batch_size=batch_size, hflip=False)


def test_an_epoch_takes_whole_batches_only_so_no_step_rests_on_a_leftover_few() -> None:
    assert [len(b) for b in _batches(torch.randperm(65), 16)] == [16, 16, 16, 16, 1]
    epoch = _batches(torch.randperm(65), 16, whole_only=True)
    assert [len(b) for b in epoch] == [16, 16, 16, 16]
    assert len(set(torch.cat(epoch).tolist())) == 64  # a different image left out each epoch, by the shuffle
    assert [len(b) for b in _batches(torch.randperm(5), 16, whole_only=True)] == [5]  # fewer than a batch


def test_the_exported_batchnorm_statistics_are_the_training_images_own_not_the_last_batches() -> None:
    torch.manual_seed(0)
    model = FaceVAE(SMALL)
    images = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8)
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 3, 32, 32) * 3)  # running averages that lean on one odd batch
    first = model.encoder[0][1]

    assert recalibrate_batchnorm(model, images, _config(batch_size=48))

    with torch.no_grad():
        conv = model.encoder[0][0](images.float() / 255)
    assert torch.allclose(first.running_mean, conv.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(first.running_var, conv.transpose(0, 1).flatten(1).var(dim=1), rtol=1e-4)
    assert int(first.num_batches_tracked) == 1
    assert first.momentum == 0.1 and not model.training  # ready to export, or to train on


def test_the_statistics_average_every_batch_alike() -> None:
    torch.manual_seed(0)
    model = FaceVAE(SMALL)
    images = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8)
    recalibrate_batchnorm(model, images, _config(batch_size=16))
    first = model.encoder[0][1]
    assert int(first.num_batches_tracked) == 3
    # The 48 images in a shuffled order: the mean of three equal batches' means is the mean of them all.
    with torch.no_grad():
        conv = model.encoder[0][0](images.float() / 255)
    assert torch.allclose(first.running_mean, conv.mean(dim=(0, 2, 3)), atol=1e-5)


def test_a_model_without_batchnorm_is_left_as_it_was() -> None:
    model = MnistVAE().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not recalibrate_batchnorm(model, torch.zeros(4, 1, 28, 28, dtype=torch.uint8), _config(batch_size=4))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_bfloat16_runs_the_training_passes_in_mixed_precision_and_keeps_the_weights_float32(precision: str) -> None:
    torch.manual_seed(0)
    model = FaceVAE(SMALL)
    seen: list[torch.dtype] = []
    model.encoder[0][0].register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    config = TrainConfig(model="faces", data=Path("unused"), out=Path("unused"), batch_size=16, precision=precision)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    metrics = train_epoch(model, images, optimizer, config, beta=1.0, desc="test")

    assert seen == [torch.bfloat16 if precision == "bfloat16" else torch.float32] * 2  # the convolutions, both batches
    assert all(p.dtype == torch.float32 for p in model.parameters())  # what the artifact is made of
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())


def test_bfloat16_on_a_cpu_without_its_instructions_says_it_is_emulated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu sse2 avx2 avx512f\n")
    check_precision("bfloat16", torch.device("cpu"), cpuinfo)
    assert "no bfloat16 instructions" in capsys.readouterr().out
    cpuinfo.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    check_precision("bfloat16", torch.device("cpu"), cpuinfo)
    check_precision("float32", torch.device("cpu"), tmp_path / "none")
    check_precision("bfloat16", torch.device("cpu"), tmp_path / "none")  # no /proc/cpuinfo: nothing to tell
    assert capsys.readouterr().out == ""
