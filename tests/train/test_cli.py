"""`python -m train mnist|faces`: a short run on tiny generated data, end to end to a served artifact."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from service.artifact import read_artifact
from service.repository import load_model
from tests.conftest import decode_png
from tests.train.conftest import faces_zip, write_mnist
from train.__main__ import main, parse_args
from train.evaluate import main as evaluate_main
from train.loop import LR_FLOOR, learning_rate

PICTURES = ["interpolation.png", "latent_map.png", "loss_curves.png", "reconstructions.png", "samples.png"]
# One short epoch on 64 images with narrow layers: a few seconds on one CPU core.
SHORT = ["--epochs", "1", "--limit", "64", "--hidden-dim", "16", "--device", "cpu"]
MNIST_ARGS = [*SHORT, "--latent-dim", "2", "--batch-size", "32"]
FACES_ARGS = [*SHORT, "--latent-dim", "8", "--batch-size", "16"]


@dataclass
class Run:
    data: Path
    out: Path
    models: Path
    argv: list[str]


def _history(run_dir: Path) -> list[dict[str, float]]:
    return json.loads((run_dir / "history.json").read_text())


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("mnist-run")
    data = write_mnist(root / "mnist", n_train=96, n_test=80)  # more than --limit 64
    argv = ["mnist", "--data", str(data), "--out", str(root / "run"), "--name", "digits",
            "--models-dir", str(root / "models"), *MNIST_ARGS]
    assert main(argv) == 0
    return Run(data, root / "run", root / "models", argv)


@pytest.fixture(scope="module")
def faces_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("faces-run")
    data = faces_zip(root / "faces.zip", n=80)  # more than --limit 64
    argv = ["faces", "--data", str(data), "--out", str(root / "run"), "--image-size", "64", *FACES_ARGS]
    assert main(argv) == 0
    return Run(data, root / "run", root / "models", argv)


# ---- MNIST -----------------------------------------------------------------------------------------


def test_an_mnist_run_writes_its_pictures_history_checkpoint_and_artifact(mnist_run: Run) -> None:
    assert sorted(p.name for p in mnist_run.out.iterdir()) == sorted(
        [*PICTURES, "history.json", "checkpoint.pt", "artifact"]
    )
    for picture in PICTURES:
        assert decode_png((mnist_run.out / picture).read_bytes()).size > (1, 1)
    (row,) = _history(mnist_run.out)
    assert row["epoch"] == 1 and row["beta"] == 1.0
    assert {"train_reconstruction", "train_kl", "train_neg_elbo", "val_neg_elbo", "val_mse_per_pixel"} <= row.keys()


def test_the_mnist_artifact_is_accepted_installed_and_served(mnist_run: Run) -> None:
    artifact = read_artifact(mnist_run.out / "artifact")
    installed = mnist_run.models / "digits"
    assert read_artifact(installed).sha256 == artifact.sha256
    served = load_model(installed, torch.device("cpu"))
    assert served.ready and served.error is None
    assert served.image_shape == (1, 28, 28) and served.latent_dim == 2


def test_the_mnist_manifest_records_data_training_and_metrics(mnist_run: Run) -> None:
    manifest = read_artifact(mnist_run.out / "artifact").manifest
    assert manifest["name"] == "digits" and manifest["architecture"] == "mnist_fc_vae"
    assert manifest["image_shape"] == [1, 28, 28] and manifest["latent_dim"] == 2
    assert manifest["architecture_config"] == {"latent_dim": 2, "hidden_dim": 16, "image_shape": [1, 28, 28]}
    assert manifest["data"]["train"]["name"] == "MNIST"
    assert manifest["data"]["train"]["images"] == manifest["data"]["validation"]["images"] == 64  # --limit 64
    assert manifest["data"]["validation"]["split"] == "test"
    assert set(manifest["data"]["train"]["files"]) == {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"}
    training = manifest["training"]
    assert training["epochs"] == 1 and training["hidden_dim"] == 16 and training["limit"] == 64
    assert training["commands"] == ["python -m train " + " ".join(mnist_run.argv)]
    assert not {"resume", "download", "models_dir", "command"} & training.keys()
    assert manifest["metrics"]["epochs"] == 1
    last_epoch = _history(mnist_run.out)[-1]
    assert manifest["metrics"]["validation_neg_elbo_per_image"] == pytest.approx(last_epoch["val_neg_elbo"], abs=1e-4)
    assert manifest["upload_normalization"] == "digit"
    assert sorted(manifest["label_centroids"], key=int) == [str(d) for d in range(10)]
    assert all(len(c) == 2 for c in manifest["label_centroids"].values())


def test_resume_continues_where_the_run_stopped_as_if_it_never_had(
    mnist_run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    resumed = tmp_path / "resumed"
    shutil.copytree(mnist_run.out, resumed)
    two_epochs = ["--epochs", "2"]
    argv = ["mnist", "--data", str(mnist_run.data), "--out", str(resumed), *MNIST_ARGS, *two_epochs, "--resume"]
    assert main(argv) == 0
    assert f"resumed from {resumed / 'checkpoint.pt'} after epoch 1" in capsys.readouterr().out

    straight = tmp_path / "straight"
    assert main(["mnist", "--data", str(mnist_run.data), "--out", str(straight), *MNIST_ARGS, *two_epochs]) == 0

    def without_timing(rows: list[dict[str, float]]) -> list[dict[str, float]]:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    assert [row["epoch"] for row in _history(resumed)] == [1, 2]
    assert _history(resumed)[0] == _history(mnist_run.out)[0]
    assert without_timing(_history(resumed)) == without_timing(_history(straight))
    manifest = read_artifact(resumed / "artifact").manifest
    assert manifest["metrics"]["epochs"] == 2
    assert len(manifest["training"]["commands"]) == 2 and manifest["training"]["commands"][-1].endswith("--resume")


def test_without_resume_a_run_starts_over(mnist_run: Run, tmp_path: Path) -> None:
    again = tmp_path / "again"
    shutil.copytree(mnist_run.out, again)
    assert main(["mnist", "--data", str(mnist_run.data), "--out", str(again), *MNIST_ARGS]) == 0
    assert [row["epoch"] for row in _history(again)] == [1]


# ---- faces -----------------------------------------------------------------------------------------


def test_a_faces_run_on_a_tiny_zip_gives_a_served_artifact(faces_run: Run) -> None:
    assert {*PICTURES, "history.json", "checkpoint.pt"} <= {p.name for p in faces_run.out.iterdir()}
    artifact = read_artifact(faces_run.out / "artifact")
    manifest = artifact.manifest
    assert manifest["name"] == "faces" and manifest["architecture"] == "face_conv_vae"
    assert artifact.image_shape == (3, 64, 64) and artifact.latent_dim == 8
    assert manifest["architecture_config"]["channels"] == [32, 64, 128, 256, 512]
    assert manifest["data"]["train"]["split"] == "train" and manifest["data"]["validation"]["split"] == "validation"
    assert manifest["data"]["train"]["name"] == "faces.zip"
    assert manifest["data"]["train"]["images"] == 64  # --limit 64, counted before the holdout (61 + 3)
    assert manifest["upload_normalization"] == "center_crop" and "label_centroids" not in manifest
    assert manifest["training"]["loss"] == "mse" and manifest["training"]["hflip"] is True
    served = load_model(faces_run.out / "artifact", torch.device("cpu"))
    assert served.ready and served.image_shape == (3, 64, 64)


def test_a_faces_run_in_bfloat16_gives_a_float32_artifact_that_records_it(faces_run: Run, tmp_path: Path) -> None:
    argv = ["faces", "--data", str(faces_run.data), "--out", str(tmp_path / "run"), "--image-size", "64",
            *FACES_ARGS, "--precision", "bfloat16"]
    assert main(argv) == 0
    artifact = read_artifact(tmp_path / "run" / "artifact")
    assert artifact.manifest["training"]["precision"] == "bfloat16"
    assert all(v.dtype == torch.float32 for v in artifact.load("cpu").state_dict().values() if v.is_floating_point())
    served = load_model(tmp_path / "run" / "artifact", torch.device("cpu"))
    assert served.ready and served.precision == "float32"


def test_an_image_size_not_a_multiple_of_32_is_refused_before_reading_any_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["faces", "--data", str(tmp_path / "not-read.zip"), "--out", str(tmp_path / "run"), "--image-size", "100"]
    assert main(argv) == 2
    assert "error: image_size must be a multiple of 32, got 100" in capsys.readouterr().err


# ---- arguments and errors --------------------------------------------------------------------------


def test_missing_mnist_files_exit_2_pointing_at_download(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mnist", "--data", str(tmp_path), "--out", str(tmp_path / "run"), *MNIST_ARGS]) == 2
    err = capsys.readouterr().err
    assert f"error: train-images-idx3-ubyte[.gz] not found in {tmp_path}; pass --download" in err


def test_non_positive_sizes_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["mnist", "--data", "mnist", "--epochs", "0"])
    assert caught.value.code == 2
    assert "--epochs, --batch-size, --latent-dim and --hidden-dim must be positive" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["mnist", "--data", "mnist", "--limit", "0"], "--limit must be positive (leave it out to use every image)"),
        (["faces", "--data", "faces.zip", "--val-share", "1"], "--val-share must be between 0 and 1, e.g. 0.05"),
        (["faces", "--data", "faces.zip", "--val-share", "0"], "--val-share must be between 0 and 1, e.g. 0.05"),
    ],
)
def test_a_limit_of_no_images_or_a_holdout_of_none_or_all_is_a_usage_error(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_defaults_per_model_and_the_run_folder_by_name() -> None:
    mnist = parse_args(["mnist", "--data", "d"])
    assert (mnist.epochs, mnist.batch_size, mnist.latent_dim, mnist.hidden_dim, mnist.loss) == (30, 128, 2, 512, "bce")
    assert mnist.out == Path("runs/mnist") and mnist.name == "mnist"
    faces = parse_args(["faces", "--data", "d.zip", "--name", "celeba", "--no-hflip", "--loss", "l1"])
    assert (faces.epochs, faces.batch_size, faces.latent_dim, faces.image_size) == (20, 64, 128, 96)
    assert faces.out == Path("runs/celeba") and not faces.hflip and faces.loss == "l1"
    assert faces.command == "python -m train faces --data d.zip --name celeba --no-hflip --loss l1"


def test_the_cosine_schedule_anneals_from_lr_to_one_percent_of_it_and_constant_stays_put() -> None:
    cosine = parse_args(["faces", "--data", "d.zip", "--epochs", "5", "--lr", "0.002", "--lr-schedule", "cosine"])
    rates = [learning_rate(cosine, epoch) for epoch in range(1, 6)]
    assert rates[0] == pytest.approx(0.002) and rates[-1] == pytest.approx(0.002 * LR_FLOOR)
    assert rates[2] == pytest.approx(0.002 * (1 + LR_FLOOR) / 2)  # halfway
    assert rates == sorted(rates, reverse=True)
    constant = parse_args(["faces", "--data", "d.zip", "--epochs", "5"])
    assert {learning_rate(constant, epoch) for epoch in range(1, 6)} == {1e-3}


def test_each_epoch_records_its_learning_rate(mnist_run: Run) -> None:
    assert [row["lr"] for row in _history(mnist_run.out)] == [1e-3]


# ---- python -m train.evaluate ----------------------------------------------------------------------


def _evaluated(capsys: pytest.CaptureFixture[str], argv: list[str]) -> list[list[str]]:
    assert evaluate_main(argv) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["artifact", "-ELBO/image", "reconstruction", "KL", "MSE/pixel"]
    return [row.split() for row in rows]


def test_evaluate_measures_artifacts_on_the_images_their_training_held_out(
    faces_run: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    artifact = faces_run.out / "artifact"
    rows = _evaluated(capsys, [str(artifact), str(artifact), "--data", str(faces_run.data), "--limit", "64"])
    assert rows[0] == rows[1]  # the same noise for every artifact named
    name, neg_elbo, reconstruction, kl, _ = rows[0]
    assert name == str(artifact) and float(neg_elbo) == pytest.approx(float(reconstruction) + float(kl), abs=0.02)
    # The training run measured its model the same way, with the same noise, on the same 3 held-out faces.
    assert [float(v) for v in rows[0][1:]] == _as_measured(read_artifact(artifact).manifest)


def test_evaluate_reads_mnist_s_test_set_for_an_mnist_artifact(mnist_run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    (row,) = _evaluated(capsys, [str(mnist_run.out / "artifact"), "--data", str(mnist_run.data), "--limit", "64"])
    assert [float(v) for v in row[1:]] == _as_measured(read_artifact(mnist_run.out / "artifact").manifest)


def _as_measured(manifest: dict[str, Any]) -> list[Any]:
    """A manifest's validation metrics, to compare with what `train.evaluate` prints (2 decimals; 6 for MSE)."""
    metrics = manifest["metrics"]
    per_image = [metrics[f"validation_{name}_per_image"] for name in ("neg_elbo", "reconstruction", "kl")]
    return [*(pytest.approx(float(v), abs=0.006) for v in per_image), pytest.approx(metrics["validation_mse_per_pixel"], abs=2e-6)]


def test_evaluate_names_what_is_wrong_and_exits_2(
    mnist_run: Run, faces_run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert evaluate_main([str(tmp_path), "--data", str(faces_run.data)]) == 2
    assert f"error: {tmp_path}: no manifest.json in {tmp_path}" in capsys.readouterr().err
    assert evaluate_main([str(faces_run.out / "artifact"), "--data", str(tmp_path / "nowhere.zip")]) == 2
    assert "nowhere.zip does not exist" in capsys.readouterr().err
    assert evaluate_main([str(mnist_run.out / "artifact"), "--data", str(faces_run.data)]) == 2
    assert "error:" in capsys.readouterr().err
