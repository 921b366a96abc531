"""Data modules on idx files written by the tests: layouts, gz or not, splits, batches, missing data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_images, write_idx, write_mnist_folder
from data import DATAMODULES, CIFAR100, DataNotFoundError, FashionMNIST, Imagenette, InMemoryBatches, MNIST, read_idx


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
