"""Data modules on idx files written by the tests: layouts, lookup order, gz or not, splits, batches, missing
and bad data."""

from __future__ import annotations

import gzip
import logging
import struct
import tracemalloc
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

import data
from helpers import load_script, make_images, write_idx, write_mnist_folder
from data import (DATAMODULES, CIFAR100, IDX_FILES, DataError, DataNotFoundError, FashionMNIST, Imagenette,
                  InMemoryBatches, MNIST, read_idx)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    images, labels = make_images(12, seed=3)
    write_idx(tmp_path / "img", images, gz)
    write_idx(tmp_path / "lbl", labels, gz)
    suffix = ".gz" if gz else ""
    assert torch.equal(read_idx(tmp_path / f"img{suffix}"), torch.from_numpy(images))
    assert torch.equal(read_idx(tmp_path / f"lbl{suffix}"), torch.from_numpy(labels))


def test_read_idx_rejects_truncated_and_foreign_files(tmp_path: Path) -> None:
    images, _ = make_images(4, seed=0)
    write_idx(tmp_path / "img", images, gz=False)
    data = (tmp_path / "img").read_bytes()
    (tmp_path / "short").write_bytes(data[:-10])
    (tmp_path / "foreign").write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(tmp_path / "short")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(tmp_path / "foreign")


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_finds_flat_and_torchvision_layouts(tmp_path: Path, layout: str) -> None:
    folder = tmp_path if layout == "flat" else tmp_path / "MNIST" / "raw"
    write_mnist_folder(folder, n_train=50, n_test=20, gz=layout == "flat")
    dm = MNIST(str(tmp_path), validation_split=0.2, batch_size=16)
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_set[1]) == 40 and len(dm.val_set[1]) == 10 and len(dm.test_set[1]) == 20


def test_setup_without_a_stage_loads_every_split(idx_dir: Path) -> None:
    dm = FashionMNIST(str(idx_dir), validation_split=0.25)
    dm.setup(None)  # Lightning's "all stages"; it once returned early, as if already loaded
    assert (len(dm.train_set[1]), len(dm.val_set[1]), len(dm.test_set[1])) == (240, 80, 80)


def test_validation_split_is_seeded_and_disjoint(idx_dir: Path) -> None:
    a, b, c = (FashionMNIST(str(idx_dir), seed=s) for s in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup("fit")
    assert torch.equal(a.val_set[0], b.val_set[0])
    assert not torch.equal(a.val_set[0], c.val_set[0])
    # Every training image appears exactly once across train + val.
    assert len(a.train_set[1]) + len(a.val_set[1]) == 320


def test_in_memory_batches_cover_each_sample_once_and_depend_on_epoch() -> None:
    images, labels = torch.arange(10).view(10, 1), torch.arange(10)
    epoch = [0]
    loader = InMemoryBatches(images, labels, batch_size=4, shuffle=True, seed=5, epoch_fn=lambda: epoch[0])
    first = torch.cat([y for _, y in loader])
    again = torch.cat([y for _, y in loader])
    epoch[0] = 1
    second = torch.cat([y for _, y in loader])
    assert len(loader) == 3
    assert sorted(first.tolist()) == list(range(10))
    assert torch.equal(first, again)  # same epoch -> same order (what resume relies on)
    assert not torch.equal(first, second)


def test_batches_are_normalised_after_transfer(idx_dir: Path) -> None:
    dm = FashionMNIST(str(idx_dir), batch_size=64)
    dm.setup("fit")
    x, y = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    sample = next(iter(InMemoryBatches(*dm.train_set, batch_size=2, shuffle=False)))
    x2, _ = dm.on_after_batch_transfer(sample, 0)
    expected = (sample[0].float() / 255 - FashionMNIST.mean[0]) / FashionMNIST.std[0]
    assert torch.allclose(x2[:, 0], expected)


def test_missing_mnist_says_where_it_looked_and_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"looked for its idx files.*FashionMNIST/raw.*download=true"):
        FashionMNIST(str(tmp_path)).setup("fit")


def test_missing_cifar_and_imagenette_messages(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="CIFAR-100 not found.*data_loader.args.data_dir"):
        CIFAR100(str(tmp_path)).setup("fit")
    with pytest.raises(DataNotFoundError, match="Imagenette not found.*imagenette2.tgz"):
        Imagenette(str(tmp_path)).setup("test")


def test_imagenette_reads_image_folders(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("n01440764", "n02102040"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((40, 50, 3), 40 * i, dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    dm = Imagenette(str(tmp_path), batch_size=4, validation_split=0.25)
    dm.setup("fit")
    dm.setup("test")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 224, 224) and len(dm.val_set) == 2 and len(dm.test_set) == 8


@pytest.mark.parametrize("name", sorted(DATAMODULES))
def test_every_dataset_names_its_classes_in_label_order(name: str) -> None:
    module = DATAMODULES[name]
    assert len(module.classes) == len(set(module.classes)) == module.num_classes
    if name == "CIFAR100":  # its fine_label_names are alphabetical
        assert list(module.classes) == sorted(module.classes) and module.classes[-1] == "worm"


# --- Lookup order: data_dir, then the system folder, then a download ---------------------------------------

REAL_SYSTEM_DATA_DIRS = dict(data.SYSTEM_DATA_DIRS)  # before the fixture below replaces it


@pytest.fixture(autouse=True)
def no_system_folders(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see no system folder unless they set one: the machine's /usr/share/datasets must not leak in."""
    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", {"FashionMNIST": (), "MNIST": ()})


class FakeTorchvision:
    """Stands in for torchvision's dataset class: records download calls, writes the files or fails."""

    calls: ClassVar[list[bool]] = []  # the `train` argument of each call
    error: ClassVar[Exception | None] = None

    def __init__(self, root: str, train: bool, download: bool) -> None:
        FakeTorchvision.calls.append(train)
        if FakeTorchvision.error is not None:
            raise FakeTorchvision.error
        write_mnist_folder(Path(root) / "FashionMNIST" / "raw", n_train=30, n_test=10)  # torchvision's layout


@pytest.fixture()
def fake_download(monkeypatch: pytest.MonkeyPatch) -> type[FakeTorchvision]:
    monkeypatch.setattr(FakeTorchvision, "calls", [])
    monkeypatch.setattr(FakeTorchvision, "error", None)
    monkeypatch.setattr(FashionMNIST, "torchvision_cls", FakeTorchvision)
    return FakeTorchvision


def test_system_folders_are_debians() -> None:
    assert REAL_SYSTEM_DATA_DIRS == {"FashionMNIST": (Path("/usr/share/datasets/fashion-mnist"),), "MNIST": ()}


def test_data_dir_comes_before_the_system_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture,
                                                 fake_download: type[FakeTorchvision]) -> None:
    system = write_mnist_folder(tmp_path / "system", n_train=30, n_test=10)
    monkeypatch.setitem(data.SYSTEM_DATA_DIRS, "FashionMNIST", (system,))
    monkeypatch.setattr(logging.getLogger("deep_compression"), "propagate", True)  # setup_logging turns it off
    local = write_mnist_folder(tmp_path / "local", n_train=50, n_test=10)
    sizes = {}
    for name, data_dir in (("local", local), ("system", tmp_path / "empty")):
        dm = FashionMNIST(str(data_dir), validation_split=0.2, download=True)
        dm.prepare_data()  # found: nothing is downloaded
        with caplog.at_level(logging.INFO, logger="deep_compression.data"):
            dm.setup("fit")
        sizes[name] = len(dm.train_set[1]) + len(dm.val_set[1])
    assert sizes == {"local": 50, "system": 30} and fake_download.calls == []
    assert f"reading idx files from {local}" in caplog.text
    assert f"reading idx files from system folder {system}" in caplog.text


def test_download_only_when_nothing_is_found(tmp_path: Path, fake_download: type[FakeTorchvision]) -> None:
    dm = FashionMNIST(str(tmp_path), download=True, validation_split=0.2)
    dm.prepare_data()
    dm.setup("fit")
    assert fake_download.calls == [True, False] and len(dm.train_set[1]) == 24
    dm.prepare_data()  # now in data_dir/FashionMNIST/raw
    assert fake_download.calls == [True, False]


def test_missing_data_message_names_every_place_and_every_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              fake_download: type[FakeTorchvision]) -> None:
    system = tmp_path / "usr_share_datasets"
    monkeypatch.setitem(data.SYSTEM_DATA_DIRS, "FashionMNIST", (system,))
    with pytest.raises(DataNotFoundError) as off:
        FashionMNIST(str(tmp_path)).setup("fit")
    fake_download.error = RuntimeError("Error downloading train-images-idx3-ubyte.gz:\n  Tried https://x: offline")
    with pytest.raises(DataNotFoundError) as failed:
        FashionMNIST(str(tmp_path), download=True).prepare_data()
    failed_note = "the download failed (Error downloading train-images-idx3-ubyte.gz: Tried https://x: offline)"
    for err, download in ((off, "download was off"), (failed, failed_note)):
        message = str(err.value)
        local = f"{tmp_path}/FashionMNIST/raw, {tmp_path}/FashionMNIST, {tmp_path})"
        for part in (local, f"system folder {system}",
                     download, "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu)",
                     "`--set data_loader.args.download=true`", "`--set data_loader.args.data_dir=DIR`"):
            assert part in message, part


def test_mnist_has_no_system_folder_and_no_package_to_suggest(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="there is no system folder for MNIST; download was off") as err:
        MNIST(str(tmp_path)).setup("test")
    assert "apt-get" not in str(err.value) and "--set data_loader.args.data_dir=DIR" in str(err.value)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_reads_debians_fashion_mnist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", REAL_SYSTEM_DATA_DIRS)
    dm = FashionMNIST(str(tmp_path))
    dm.setup("test")  # the 10,000 test images: quicker than the training set
    assert dm.test_set[0].shape == (10_000, 28, 28) and sorted(dm.test_set[1].unique().tolist()) == list(range(10))


# --- Bad files: one DataError naming the file and what was expected -----------------------------------------

TRAIN_IMAGES, TRAIN_LABELS = IDX_FILES["train"]
IMAGES, LABELS = make_images(10, seed=0)  # (10, 28, 28) and (10,) uint8


def idx_bytes(array: np.ndarray, type_byte: int = 0x08, shape: tuple[int, ...] | None = None) -> bytes:
    """An idx file's bytes; ``shape`` replaces the dimensions the header declares (a forged header)."""
    shape = array.shape if shape is None else shape
    return struct.pack(">4B", 0, 0, type_byte, len(shape)) + struct.pack(f">{len(shape)}i", *shape) + array.tobytes()


def corrupt_gzip(payload: bytes) -> bytes:
    packed = bytearray(gzip.compress(payload))
    packed[len(packed) // 2] ^= 0xFF  # a flipped byte inside the deflate stream
    return bytes(packed)


def bad_folder(root: Path, files: dict[str, bytes]) -> Path:
    """Four valid idx files (10 train, 10 test samples) with ``files`` (name -> raw bytes) written over them."""
    folder = write_mnist_folder(root / "data", n_train=10, n_test=10, gz=False)
    for name, payload in files.items():
        (folder / name.removesuffix(".gz")).unlink()
        (folder / name).write_bytes(payload)
    return folder


NAN_IMAGES = IMAGES.astype(">f4")
NAN_IMAGES[3, 4, 5] = np.nan
BAD_FILES = {  # case -> (files written over the good ones, the file the message names, what it says)
    "empty": ({TRAIN_IMAGES: b""}, TRAIN_IMAGES, "is empty: expected an idx file"),
    "wrong magic": ({TRAIN_IMAGES: b"PK\x03\x04" + idx_bytes(IMAGES)[4:]}, TRAIN_IMAGES,
                    r"not an idx file \(bad magic number 504b0304\): expected 0000"),
    "header cut short": ({TRAIN_IMAGES: idx_bytes(IMAGES)[:10]}, TRAIN_IMAGES, "header ends before its 3 dimensions"),
    "truncated images": ({TRAIN_IMAGES: idx_bytes(IMAGES)[:-100]}, TRAIN_IMAGES,  # 10 * 28 * 28 - 100 bytes
                         r"header says shape \(10, 28, 28\) \(7,840 data bytes\), but only 7,740"),
    "trailing bytes": ({TRAIN_IMAGES: idx_bytes(IMAGES) + b"\0"}, TRAIN_IMAGES, "but more than 7,840 data bytes"),
    "negative dimension": ({TRAIN_IMAGES: idx_bytes(IMAGES, shape=(-1, 28, 28))}, TRAIN_IMAGES,
                           r"corrupt header: negative dimension in shape \(-1, 28, 28\)"),
    "absurd dimension": ({TRAIN_IMAGES: idx_bytes(IMAGES, shape=(2**31 - 1, 28, 28))}, TRAIN_IMAGES,
                         "would be 1,683,627,179,248 bytes, more than the 2,147,483,648 an idx file may hold"),
    "absurd dimension, gz": ({f"{TRAIN_IMAGES}.gz": gzip.compress(idx_bytes(IMAGES, shape=(2**31 - 1, 28, 28)))},
                             f"{TRAIN_IMAGES}.gz", "more than the 2,147,483,648 an idx file may hold"),
    "large header, small file": ({TRAIN_IMAGES: idx_bytes(IMAGES, shape=(10**6, 28, 28))}, TRAIN_IMAGES,
                                 r"\(784,000,000 data bytes\), but only 7,840"),
    "not gzip": ({f"{TRAIN_IMAGES}.gz": idx_bytes(IMAGES)}, f"{TRAIN_IMAGES}.gz", "is not a valid gzip file"),
    "gzip cut short": ({f"{TRAIN_LABELS}.gz": gzip.compress(idx_bytes(LABELS))[:-12]}, f"{TRAIN_LABELS}.gz",
                       "is not a valid gzip file"),
    "gzip flipped byte": ({f"{TRAIN_IMAGES}.gz": corrupt_gzip(idx_bytes(IMAGES))}, f"{TRAIN_IMAGES}.gz",
                          "is not a valid gzip file"),
    "more labels": ({TRAIN_LABELS: idx_bytes(np.arange(12, dtype=np.uint8) % 10)}, TRAIN_LABELS,
                    "holds 12 labels but .*train-images-idx3-ubyte holds 10 images: expected one label per image"),
    "fewer labels": ({TRAIN_LABELS: idx_bytes(LABELS[:8])}, TRAIN_LABELS, "holds 8 labels but .* holds 10 images"),
    "labels file holds images": ({TRAIN_LABELS: idx_bytes(IMAGES)}, TRAIN_LABELS,
                                 r"holds a 3-d array of shape \(10, 28, 28\): expected labels of shape \(N,\)"),
    "images file holds labels": ({TRAIN_IMAGES: idx_bytes(LABELS)}, TRAIN_IMAGES,
                                 r"holds a 1-d array of shape \(10,\): expected images of shape \(N, 28, 28\)"),
    "32x32 images": ({TRAIN_IMAGES: idx_bytes(np.zeros((10, 32, 32), np.uint8))}, TRAIN_IMAGES,
                     "holds 32x32 images: the models expect 28x28"),
    "label 10": ({TRAIN_LABELS: idx_bytes(np.array([0, 1, 2, 10, 4, 5, 6, 7, 8, 9], np.uint8))}, TRAIN_LABELS,
                 r"holds label 10 \(sample 3\): expected labels in 0..9"),
    "no images": ({TRAIN_IMAGES: idx_bytes(IMAGES[:0]), TRAIN_LABELS: idx_bytes(LABELS[:0])}, TRAIN_IMAGES,
                  "holds 0 images: expected at least one"),
    "float with NaN": ({TRAIN_IMAGES: idx_bytes(NAN_IMAGES, type_byte=0x0D)}, TRAIN_IMAGES,
                       r"holds torch.float32 values \(some non-finite: NaN/inf\): expected uint8 images"),
    "float": ({TRAIN_IMAGES: idx_bytes(IMAGES.astype(">f4"), type_byte=0x0D)}, TRAIN_IMAGES,
              r"holds torch.float32 values: expected uint8 images of shape \(N, 28, 28\) \(idx type 0x08\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_give_one_message_naming_the_file(tmp_path: Path, case: str) -> None:
    files, named, match = BAD_FILES[case]
    folder = bad_folder(tmp_path, files)
    with pytest.raises(DataError, match=match) as err:
        FashionMNIST(str(folder)).setup("fit")
    assert str(err.value).startswith(f"{folder / named} ")


def test_test_split_is_checked_when_testing(tmp_path: Path) -> None:
    folder = bad_folder(tmp_path, {"t10k-labels-idx1-ubyte": idx_bytes(LABELS[:9])})
    FashionMNIST(str(folder)).setup("fit")  # the training files are fine
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte holds 9 labels but .*t10k-images"):
        FashionMNIST(str(folder)).setup("test")


def test_gzip_bomb_is_decompressed_no_further_than_the_header_declares(tmp_path: Path) -> None:
    # 10 images declared, 32 MiB of zeros behind them (a 32 KiB .gz): refused after reading 7,841 bytes.
    path = tmp_path / "bomb.gz"
    path.write_bytes(gzip.compress(idx_bytes(IMAGES) + bytes(32 << 20), compresslevel=1))
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="but more than 7,840 data bytes follow"):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak {peak:,} bytes"


def test_bad_data_is_a_user_error_of_train_py(config_file: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert issubclass(DataError, DataNotFoundError) and issubclass(DataError, ValueError)
    folder = bad_folder(tmp_path, {TRAIN_LABELS: idx_bytes(LABELS[:8])})
    train = load_script("train")
    assert train.main(["-c", str(config_file), "--set", f"data_loader.args.data_dir={folder}"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # info lines may come before it
    assert len(errors) == 1 and errors[0].startswith(f"error: {folder / TRAIN_LABELS} holds 8 labels")
    assert "Traceback" not in err
    assert not list((config_file.parent / "runs").glob("tiny/*"))  # refused before the run folder is made
