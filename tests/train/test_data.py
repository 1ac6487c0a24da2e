"""Training data readers: MNIST IDX files, folders and zips of images, and the seeded holdout."""

from __future__ import annotations

import gzip
import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train.data
from service.imaging import prepare_upload
from tests.train.conftest import faces_zip, idx_bytes, image_bytes, mnist_arrays, write_mnist
from train.data import DataError, Dataset, available_memory, load_images, load_mnist, read_idx, split_holdout

# ---- IDX files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("gzipped", [True, False], ids=["gzip", "plain"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-7, 0, 70_000], dtype=">i4"),
        np.linspace(-1, 1, 6, dtype=">f4").reshape(3, 2),
    ],
    ids=["uint8-3d", "int32-1d", "float32-2d"],
)
def test_read_idx_returns_the_declared_type_and_shape(tmp_path: Path, gzipped: bool, array: np.ndarray) -> None:
    raw = idx_bytes(array)
    path = tmp_path / ("a.idx.gz" if gzipped else "a.idx")
    path.write_bytes(gzip.compress(raw) if gzipped else raw)
    out = read_idx(path)
    assert out.shape == array.shape and out.dtype == array.dtype
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("gzipped", [True, False], ids=["gzip", "plain"])
@pytest.mark.parametrize("dotted", [False, True], ids=["train-images-idx3-ubyte", "train-images.idx3-ubyte"])
def test_load_mnist_reads_both_file_name_spellings_gzipped_or_not(tmp_path: Path, gzipped: bool, dotted: bool) -> None:
    directory = write_mnist(tmp_path / "mnist", gzipped=gzipped, dotted=dotted, n_train=20, n_test=10)
    train, test = load_mnist(directory, "train"), load_mnist(directory, "test")

    images, labels = mnist_arrays(20, seed=1)
    assert train.images.shape == (20, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels is not None and train.labels.dtype == torch.int64
    np.testing.assert_array_equal(train.images[:, 0].numpy(), images)
    np.testing.assert_array_equal(train.labels.numpy(), labels)
    assert test.images.shape == (10, 1, 28, 28)

    stem = "train-images.idx3-ubyte" if dotted else "train-images-idx3-ubyte"
    name = stem + (".gz" if gzipped else "")
    assert train.source["name"] == "MNIST" and train.source["split"] == "train" and train.source["images"] == 20
    assert train.source["files"][name] == hashlib.sha256((directory / name).read_bytes()).hexdigest()  # type: ignore[index]
    assert test.source["split"] == "test"


def test_missing_mnist_files_point_at_download(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\[\.gz\] not found in .*--download"):
        load_mnist(tmp_path, "train")


def test_images_and_labels_of_different_lengths_do_not_match(tmp_path: Path) -> None:
    directory = write_mnist(tmp_path, gzipped=False, n_train=20)
    (directory / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(19, dtype=np.uint8)))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte \(20, 28, 28\) and train-labels-idx1-ubyte \(19,\)"):
        load_mnist(directory, "train")


UINT8_1D, THREE = b"\x00\x00\x08\x01", (3).to_bytes(4, "big")  # magic of a 1-d uint8 file; a size of 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (UINT8_1D, "truncated: 4 bytes, its header alone needs 8"),
        (UINT8_1D + THREE + b"\x01\x02", "holds 2 bytes of data, its header promises 3"),
        (UINT8_1D + THREE + b"\x01\x02\x03\x04", "holds 4 bytes of data, its header promises 3"),
        (b"\x1f\x00\x08\x01" + THREE + b"\x01\x02\x03", "not an IDX file"),
        (b"\x00\x00\x07\x01" + THREE + b"\x01\x02\x03", "not an IDX file"),  # there is no type 0x07
        (b"", "not an IDX file"),
    ],
    ids=["cut-in-header", "cut-in-data", "too-long", "bad-magic", "unknown-type", "empty"],
)
def test_a_malformed_idx_file_raises_data_error_saying_what_is_wrong(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_idx(path)


def test_a_cut_short_or_corrupt_gzip_raises_data_error(tmp_path: Path) -> None:
    compressed = gzip.compress(idx_bytes(np.zeros((10, 28, 28), dtype=np.uint8)), mtime=0)
    flipped = bytearray(compressed)
    flipped[len(flipped) // 2] ^= 0xFF
    for name, content in [("cut", compressed[:-12]), ("flipped", bytes(flipped)), ("not-gzip", b"\x00\x00\x08\x01")]:
        path = tmp_path / f"{name}.gz"
        path.write_bytes(content)
        with pytest.raises(DataError, match=f"{name}.gz could not be read"):
            read_idx(path)


def test_a_bad_mnist_file_is_named_in_the_error(tmp_path: Path) -> None:
    directory = write_mnist(tmp_path, gzipped=True)
    (directory / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x08\x03\x00\x00"))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz is not an IDX file \(bad magic number\)"):
        load_mnist(directory, "test")


# ---- folders and zips of images --------------------------------------------------------------------


def _png(image: Image.Image, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **params)
    return buffer.getvalue()


def _stripes(w: int, h: int) -> bytes:
    """Red | green | blue thirds along the long side: the center crop keeps only green."""
    pixels = np.zeros((h, w, 3), dtype=np.uint8)
    long_side = max(w, h)
    for i in range(3):
        cut = slice(i * long_side // 3, (i + 1) * long_side // 3)
        if w >= h:
            pixels[:, cut, i] = 255
        else:
            pixels[cut, :, i] = 255
    return _png(Image.fromarray(pixels))


def test_images_of_any_size_and_mode_become_square_rgb_uint8(tmp_path: Path) -> None:
    folder = tmp_path / "faces"
    (folder / "nested").mkdir(parents=True)
    for name, content in {
        "a.png": image_bytes((60, 40), "RGB"),
        "b.JPG": image_bytes((40, 70), "RGB", "JPEG"),
        "c.png": image_bytes((33, 33), "L"),
        "d.png": image_bytes((50, 50), "RGBA"),
        "e.gif": image_bytes((20, 30), "P", "GIF"),
        "nested/f.bmp": image_bytes((16, 16), "RGB", "BMP"),
        "g.webp": image_bytes((24, 36), "LA", "WEBP"),
    }.items():
        (folder / name).write_bytes(content)
    (folder / "notes.txt").write_text("not an image: ignored, not counted")

    data = load_images(folder, 32)
    assert data.images.shape == (7, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.labels is None
    assert data.source == {"name": "faces", "images": 7, "skipped_unreadable": 0, "files": {}}


def test_non_square_images_are_center_cropped(tmp_path: Path) -> None:
    (tmp_path / "wide.png").write_bytes(_stripes(90, 30))
    (tmp_path / "tall.png").write_bytes(_stripes(30, 90))
    images = load_images(tmp_path, 16).images.int()
    for image in images:  # only the green middle third survives (the resize may blur the very edge)
        assert (image[1, :, 2:-2] > 250).all()
        assert (image[[0, 2], :, 2:-2] < 5).all()


def test_grayscale_becomes_three_equal_channels_and_transparency_is_laid_on_white(tmp_path: Path) -> None:
    (tmp_path / "gray.png").write_bytes(_png(Image.new("L", (8, 8), 100)))
    half = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    half.paste((10, 20, 30, 255), (0, 0, 8, 4))  # the top half opaque, the bottom half transparent
    (tmp_path / "rgba.png").write_bytes(_png(half))
    gray, rgba = load_images(tmp_path, 8).images  # sorted by name
    assert (gray == 100).all()
    assert rgba[:, 0, 0].tolist() == [10, 20, 30] and rgba[:, 7, 7].tolist() == [255, 255, 255]


def test_a_photo_is_turned_upright_by_its_exif_orientation(tmp_path: Path) -> None:
    upright = Image.new("RGB", (8, 16), (0, 0, 0))
    upright.paste((255, 0, 0), (0, 0, 8, 8))  # red on top, as the camera's owner saw it
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored pixels are to be turned 90 degrees clockwise to be upright
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a phone held sideways stores
    (tmp_path / "phone.png").write_bytes(_png(stored, exif=exif))
    (image,) = load_images(tmp_path, 8).images  # the centred square: the middle of the upright 8x16, half red
    assert image[:, 0, 4].tolist() == [255, 0, 0] and image[:, 7, 4].tolist() == [0, 0, 0]


def test_training_sees_the_pixels_the_service_gives_the_model_for_the_same_file(tmp_path: Path) -> None:
    files = {
        "wide.jpg": image_bytes((90, 40), "RGB", "JPEG", seed=1),
        "tall.png": image_bytes((30, 70), "RGBA", "PNG", seed=2),
        "gray.png": image_bytes((50, 50), "L", "PNG", seed=3),
        "big.jpg": image_bytes((400, 300), "RGB", "JPEG", seed=4),  # JPEG's reduced-size decode: the same in both
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    rows = load_images(tmp_path, 24).images
    served = [prepare_upload(files[name], (3, 24, 24), max_pixels=10**7) for name in sorted(files)]
    assert torch.equal(rows, torch.from_numpy(np.stack(served) * 255).round().to(torch.uint8))


def test_a_folder_s_images_come_in_path_order_which_fixes_the_seeded_holdout(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b.png").write_bytes(_png(Image.new("L", (8, 8), 1)))
    (tmp_path / "a-c.png").write_bytes(_png(Image.new("L", (8, 8), 2)))  # "a-c.png" < "a/b.png" as strings; as paths "a" comes first
    assert load_images(tmp_path, 8).images[:, 0, 0, 0].tolist() == [1, 2]


def test_unreadable_files_are_skipped_and_counted(tmp_path: Path) -> None:
    (tmp_path / "good.png").write_bytes(image_bytes())
    (tmp_path / "garbage.jpg").write_bytes(b"this is not a JPEG")
    (tmp_path / "cut.png").write_bytes(image_bytes()[:100])
    (tmp_path / "empty.png").write_bytes(b"")
    data = load_images(tmp_path, 16)
    assert len(data.images) == 1
    assert data.source["skipped_unreadable"] == 3


def test_a_zip_reads_like_a_folder_and_records_its_checksum(tmp_path: Path) -> None:
    path = faces_zip(tmp_path / "faces.zip", n=12)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("__MACOSX/faces/._0000.png", b"resource fork, not an image")
        archive.writestr("faces/readme.txt", "ignored")
        archive.writestr("faces/broken.png", b"broken")
    data = load_images(path, 32)
    assert data.images.shape == (12, 3, 32, 32)
    assert data.source == {
        "name": "faces.zip",
        "images": 12,
        "skipped_unreadable": 1,
        "files": {"faces.zip": hashlib.sha256(path.read_bytes()).hexdigest()},
    }


def test_a_zip_member_that_fails_its_checksum_is_skipped_and_counted(tmp_path: Path) -> None:
    path = faces_zip(tmp_path / "faces.zip", n=6)
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("faces/0002.png")
    raw = bytearray(path.read_bytes())
    raw[info.header_offset + 30 + len(info.filename) + 100] ^= 0xFF  # one byte of its data: a corrupt download
    path.write_bytes(raw)
    data = load_images(path, 16)
    assert len(data.images) == 5 and data.source["skipped_unreadable"] == 1


def test_the_same_images_read_the_same_from_a_folder_or_a_zip(tmp_path: Path) -> None:
    path = faces_zip(tmp_path / "faces.zip", n=8)
    with zipfile.ZipFile(path) as archive:
        archive.extractall(tmp_path / "folder")
    torch.testing.assert_close(load_images(path, 32).images, load_images(tmp_path / "folder", 32).images)


def test_limit_stops_after_that_many_readable_images(tmp_path: Path) -> None:
    data = load_images(faces_zip(tmp_path / "faces.zip", n=12), 32, limit=5)
    assert len(data.images) == 5 and data.source["images"] == 5


def test_decoding_on_several_threads_gives_the_rows_and_the_skips_of_one(tmp_path: Path) -> None:
    path = faces_zip(tmp_path / "faces.zip", n=40)
    with zipfile.ZipFile(path, "a") as archive:
        for i in (0, 17, 29):  # each sorts just before its good namesake: the first file of all is one of them
            archive.writestr(f"faces/{i:04d}-broken.png", b"broken")
    one = load_images(path, 16, threads=1)
    many = load_images(path, 16, threads=3)
    assert torch.equal(many.images, one.images) and many.source == one.source
    assert one.source["images"] == 40 and one.source["skipped_unreadable"] == 3

    limited = load_images(path, 16, limit=20, threads=3)  # stops at the 20th good image, past 2 broken ones
    assert torch.equal(limited.images, one.images[:20]) and limited.source["skipped_unreadable"] == 2


def test_no_images_is_a_data_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"no readable images in .*empty \(looked for .*\.jpg.*\.png"):
        load_images(empty, 32)
    (empty / "broken.png").write_bytes(b"broken")
    with pytest.raises(DataError, match="no readable images"):
        load_images(empty, 32)


def test_a_missing_path_or_a_file_that_is_not_a_zip_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_images(tmp_path / "nowhere", 32)
    (tmp_path / "faces.tar").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"faces\.tar is neither a folder nor a zip of images"):
        load_images(tmp_path / "faces.tar", 32)


def test_images_that_cannot_fit_in_memory_fail_before_decoding_with_a_limit_that_fits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = faces_zip(tmp_path / "faces.zip", n=12)  # 12 images at 32x32: 3 KiB each decoded
    monkeypatch.setattr(train.data, "available_memory", lambda: 8 * 3 * 32 * 32)
    with pytest.raises(DataError, match=r"12 images at 32x32 take 0\.0 GiB decoded.*pass --limit 6 \(or fewer\)"):
        load_images(path, 32)
    assert len(load_images(path, 32, limit=8).images) == 8  # what fits is decoded
    monkeypatch.setattr(train.data, "available_memory", lambda: None)  # not known (macOS): no check
    assert len(load_images(path, 32).images) == 12


def test_available_memory_is_the_kernel_s_capped_by_a_container_s_limit(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemAvailable:   16000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert available_memory(meminfo, cgroup) == 16_000_000 * 1024  # no cgroup files: a bare host
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("1000\n")
    assert available_memory(meminfo, cgroup) == 16_000_000 * 1024  # v2, no limit
    (cgroup / "memory.max").write_text(f"{2 * 2**30}\n")  # docker run --memory 2g
    assert available_memory(meminfo, cgroup) == 2 * 2**30 - 1000
    (cgroup / "memory.current").write_text("5000\n")
    (cgroup / "memory.stat").write_text("anon 1000\nactive_file 1000\ninactive_file 3000\n")  # page cache it reclaims
    assert available_memory(meminfo, cgroup) == 2 * 2**30 - 2000
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{2**63 - 4096}\n")  # v1's "no limit"
    (v1 / "memory" / "memory.usage_in_bytes").write_text("1000\n")
    assert available_memory(meminfo, v1) == 16_000_000 * 1024
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{2**30}\n")
    (v1 / "memory" / "memory.stat").write_text("cache 800\ntotal_inactive_file 500\n")
    assert available_memory(meminfo, v1) == 2**30 - 500
    assert available_memory(tmp_path / "no-meminfo", tmp_path / "no-cgroup") is None  # macOS


# ---- the holdout -----------------------------------------------------------------------------------


def _numbered(n: int) -> Dataset:
    """Image i is filled with i, label i is i: easy to tell apart after a shuffle."""
    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 3, 2, 2).clone()
    return Dataset(images, torch.arange(n), {"name": "numbered"})


def _ids(data: Dataset) -> list[int]:
    return data.images[:, 0, 0, 0].tolist()


def test_the_holdout_is_disjoint_covers_everything_and_has_the_share() -> None:
    train, val = split_holdout(_numbered(100), 0.1, seed=0)
    assert len(val.images) == 10 and len(train.images) == 90
    assert not set(_ids(train)) & set(_ids(val))
    assert sorted(_ids(train) + _ids(val)) == list(range(100))
    assert train.labels is not None and _ids(train) == train.labels.tolist()  # labels follow their images
    assert train.source == {"name": "numbered", "split": "train"} and val.source["split"] == "validation"


def test_the_holdout_is_the_seeded_permutation_s_first_share_and_copies_no_image() -> None:
    data = _numbered(100)
    storage = data.images.untyped_storage().data_ptr()
    order = torch.randperm(100, generator=torch.Generator().manual_seed(3)).tolist()
    train, val = split_holdout(data, 0.1, seed=3)
    assert _ids(val) == order[:10] and _ids(train) == order[10:]  # the split every shipped model was trained on
    assert val.labels is not None and val.labels.tolist() == order[:10]
    for split in (train, val):  # views of the loaded rows, put in that order where they were
        assert split.images.untyped_storage().data_ptr() == storage and split.images.is_contiguous()


def test_the_holdout_is_fixed_by_the_seed() -> None:
    first, again, other = (split_holdout(_numbered(100), 0.1, seed=s)[1] for s in (0, 0, 1))
    assert _ids(first) == _ids(again)
    assert _ids(first) != _ids(other)


def test_head_keeps_the_first_examples_and_counts_only_those() -> None:
    head = _numbered(10).head(4)
    assert _ids(head) == [0, 1, 2, 3] and head.labels is not None and head.labels.tolist() == [0, 1, 2, 3]
    assert head.source == {"name": "numbered", "images": 4}
    assert _numbered(3).head(5).source["images"] == 3


def test_the_holdout_keeps_at_least_one_image_when_there_are_two() -> None:
    train, val = split_holdout(_numbered(2), 0.05, seed=0)
    assert len(train.images) == 1 and len(val.images) == 1
