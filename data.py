"""LightningDataModules for MNIST, Fashion-MNIST, CIFAR-100 and Imagenette.

MNIST-family data is small enough to live in memory as one uint8 tensor: batches are sliced from it and
normalised after the transfer to the device, so an epoch costs no per-sample PIL or collate work. The four
idx files are looked for in ``data_dir``, then in a system folder, then downloaded (``find_idx_folder``);
``setup`` checks them (header, size, shape, dtype, labels) before any training and raises ``DataError``.
CIFAR-100 (torchvision) and Imagenette (``ImageFolder``) use ordinary ``DataLoader`` pipelines with the
standard augmentation.

The idx format itself (reading, validation) is ``idx.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms

from idx import (IDX_FILES, IMAGE_SIZE, MAX_IDX_BYTES, DataError, DataNotFoundError,  # noqa: F401 (re-exported)
                 check_images_and_labels, read_idx)
from logger import get_logger

IMAGENETTE_URL = "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2.tgz"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Searched after data_dir, before any download. Debian/Ubuntu: `apt-get install dataset-fashion-mnist`
# installs the four .gz files in /usr/share/datasets/fashion-mnist/; no Debian package ships MNIST.
SYSTEM_DATA_DIRS: dict[str, tuple[Path, ...]] = {
    "FashionMNIST": (Path("/usr/share/datasets/fashion-mnist"),),
    "MNIST": (),
}
_log = get_logger("data")

# Where the data is and whether to download it are the user's to say on the command line, never a file's (a
# ``.dcz`` header, a teacher's config): a file that named a folder would decide where we read and write.
MACHINE_KEYS = ("data_dir", "download")


def _find_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def idx_folders(data_dir: Path, name: str) -> tuple[list[Path], tuple[Path, ...]]:
    """Returns the folders in ``data_dir`` to search for dataset ``name``, and its system folders."""
    return [data_dir / name / "raw", data_dir / name, data_dir], SYSTEM_DATA_DIRS.get(name, ())


def find_idx_folder(data_dir: Path, name: str) -> tuple[Path | None, list[Path]]:
    """Returns the first folder holding all four idx files, and the folders that were searched.

    The order: ``data_dir/<name>/raw`` (torchvision's layout, where a download goes), ``data_dir/<name>``,
    ``data_dir``, then ``SYSTEM_DATA_DIRS[name]``; ``_MNISTFamily.prepare_data`` downloads only if none has them.
    """
    local, system = idx_folders(data_dir, name)
    searched = [*local, *system]
    for folder in searched:
        if all(_find_file(folder, f) for pair in IDX_FILES.values() for f in pair):
            return folder, searched
    return None, searched


class InMemoryBatches:
    """Iterates over (images, labels) batches sliced from tensors held in memory.

    The shuffle order depends only on ``seed`` and the epoch number, so a resumed run sees the same
    batches as an uninterrupted one. Under torch.distributed each rank takes an equal share.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool,
                 seed: int = 0, epoch_fn: Callable[[], int] | None = None) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.epoch_fn = epoch_fn or (lambda: 0)

    def _indices(self) -> torch.Tensor | None:
        n, order = len(self.labels), None
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch_fn())
            order = torch.randperm(n, generator=generator)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world, rank = dist.get_world_size(), dist.get_rank()
            order = torch.arange(n) if order is None else order
            order = order[: n - n % world][rank::world]
        return order

    def __len__(self) -> int:
        n = len(self.labels)
        if dist.is_available() and dist.is_initialized():
            n //= dist.get_world_size()
        return (n + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._indices()
        n = len(self.labels) if order is None else len(order)
        for start in range(0, n, self.batch_size):
            if order is None:
                yield self.images[start:start + self.batch_size], self.labels[start:start + self.batch_size]
            else:
                idx = order[start:start + self.batch_size]
                yield self.images[idx], self.labels[idx]


def _split(n: int, validation_split: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random split of range(n) into (train, val) indices."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * validation_split))
    return order[n_val:], order[:n_val]


class _BaseDataModule(pl.LightningDataModule):
    """Arguments shared by every data module (the keys of ``data_loader.args``)."""

    num_classes: int = 10
    classes: tuple[str, ...] = ()  # names in label order (written into the .dcz header)
    input_shape: tuple[int, ...] = (1, *IMAGE_SIZE)  # one sample as the model takes it, (C, H, W)
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    def __init__(self, data_dir: str = "data/", download: bool = False, batch_size: int = 128,
                 validation_split: float = 0.1, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 < validation_split < 1.0:  # validation drives best.ckpt and the schedules
            raise ValueError(f"validation_split must be in (0, 1), got {validation_split}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.data_dir, self.download = Path(data_dir).expanduser(), download
        self.batch_size, self.validation_split = batch_size, validation_split
        self.num_workers, self.seed = num_workers, seed

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0


class _MNISTFamily(_BaseDataModule):
    """In-memory MNIST-style data (28x28 grey images, 10 classes)."""

    folder = "MNIST"
    torchvision_cls: Any = datasets.MNIST
    system_package: str | None = None  # the Debian/Ubuntu package that installs SYSTEM_DATA_DIRS[folder]
    _download_error: str | None = None  # why prepare_data's download failed, for setup's message
    _loaded: str | None | bool = False  # the stage setup() last loaded (None: all of them); False: none yet

    def _missing_message(self) -> str:
        local, system = idx_folders(self.data_dir, self.folder)
        names = ", ".join(f for pair in IDX_FILES.values() for f in pair)
        where = f"then in the system folder {', '.join(map(str, system))}" if system else \
            f"there is no system folder for {self.folder}"
        if not self.download:
            download = "download was off (data_loader.args.download=false)"
        elif self._download_error:
            download = f"the download failed ({self._download_error})"
        else:
            download = "download=true, but prepare_data() (which downloads) did not run"
        apt = f"`sudo apt-get install {self.system_package}` (Debian/Ubuntu), " if self.system_package else ""
        return (f"{self.folder} not found: looked for its idx files ({names}, gzipped or not) in data_dir "
                f"({', '.join(map(str, local))}), {where}; {download}. Fix it with {apt}"
                f"`--set data_loader.args.download=true` (needs internet), or "
                f"`--set data_loader.args.data_dir=DIR` (a folder holding the four files).")

    def prepare_data(self) -> None:
        if find_idx_folder(self.data_dir, self.folder)[0] is not None or not self.download:
            return  # present, or setup() will explain what is missing
        try:  # torchvision writes <data_dir>/<Name>/raw, the first folder find_idx_folder searches
            for train in (True, False):
                self.torchvision_cls(str(self.data_dir), train=train, download=True)
        except Exception as err:  # torchvision raises RuntimeError/URLError/OSError when offline
            self._download_error = " ".join(str(err).split())  # torchvision's message spans several lines
            raise DataNotFoundError(self._missing_message()) from None

    def _load(self, folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Reads and checks one split's (images, labels): (N, 28, 28) uint8 and (N,) int64."""
        image_path, label_path = (_find_file(folder, f) for f in IDX_FILES[split])
        images, labels = read_idx(image_path), read_idx(label_path)
        check_images_and_labels(images, labels, image_path, label_path, self.num_classes)
        return images, labels.long()

    def setup(self, stage: str | None = None) -> None:
        """Finds the idx files (see ``find_idx_folder``), reads and checks the stage's splits.

        Raises:
            DataNotFoundError: No searched folder holds the four files.
            DataError: A file is corrupt or does not hold MNIST-style images and labels.
        """
        if self._loaded == stage:  # Lightning calls setup on every fit/validate/test
            return
        folder, _ = find_idx_folder(self.data_dir, self.folder)
        if folder is None:
            raise DataNotFoundError(self._missing_message())
        in_system = folder in SYSTEM_DATA_DIRS.get(self.folder, ())
        _log.info(f"{self.folder}: reading idx files from {'system folder ' if in_system else ''}{folder}")
        if stage in (None, "fit", "validate"):
            images, labels = self._load(folder, "train")
            train_idx, val_idx = _split(len(labels), self.validation_split, self.seed)
            self.train_set = (images[train_idx], labels[train_idx])
            self.val_set = (images[val_idx], labels[val_idx])
        if stage in (None, "test", "predict"):
            self.test_set = self._load(folder, "test")
        self._loaded = stage

    def train_dataloader(self) -> InMemoryBatches:
        return InMemoryBatches(*self.train_set, self.batch_size, shuffle=True, seed=self.seed,
                               epoch_fn=self._epoch)

    def val_dataloader(self) -> InMemoryBatches:
        return InMemoryBatches(*self.val_set, self.batch_size, shuffle=False)

    def test_dataloader(self) -> InMemoryBatches:
        return InMemoryBatches(*self.test_set, self.batch_size, shuffle=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels = batch  # (N, 28, 28) uint8, on the device already
        # (x / 255 - mean) / std as one multiply-add: one pass over the float batch fewer.
        scale, shift = 1.0 / (255 * self.std[0]), -self.mean[0] / self.std[0]
        x = images.unsqueeze(1).float().mul_(scale).add_(shift)
        # Lightning casts float inputs for the precision (e.g. 64-true) before this hook, when they were uint8.
        return (x if self.trainer is None else self.trainer.precision_plugin.convert_input(x)), labels


class MNIST(_MNISTFamily):
    folder, torchvision_cls = "MNIST", datasets.MNIST
    classes = tuple(datasets.MNIST.classes)
    mean, std = (0.1307,), (0.3081,)


class FashionMNIST(_MNISTFamily):
    folder, torchvision_cls = "FashionMNIST", datasets.FashionMNIST
    system_package = "dataset-fashion-mnist"
    classes = tuple(datasets.FashionMNIST.classes)
    mean, std = (0.2860,), (0.3530,)


class _FolderDataModule(_BaseDataModule):
    """Data held as a torchvision ``Dataset`` and served by ``DataLoader``s."""

    def _build(self, train_split: bool, augment: bool) -> Dataset:
        raise NotImplementedError

    def _missing_message(self, err: Exception) -> str:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        try:
            if stage in (None, "fit", "validate"):
                augmented, plain = self._build(True, augment=True), self._build(True, augment=False)
                train_idx, val_idx = _split(len(plain), self.validation_split, self.seed)
                self.train_set = Subset(augmented, train_idx.tolist())
                self.val_set = Subset(plain, val_idx.tolist())
            if stage in (None, "test", "predict"):
                self.test_set = self._build(False, augment=False)
        except (RuntimeError, FileNotFoundError) as err:  # torchvision's "not found" errors
            raise DataNotFoundError(self._missing_message(err)) from None

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


class CIFAR100(_FolderDataModule):
    """CIFAR-100 via torchvision, random crop (pad 4) + horizontal flip."""

    num_classes = 100
    # The fine labels in label order (the dataset's own `fine_label_names`, alphabetical).
    classes = tuple("""apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
        camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur
        dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard
        lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear
        pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark
        shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone
        television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split())
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    input_shape = (3, 32, 32)

    def prepare_data(self) -> None:
        if not self.download:
            return
        try:
            for train in (True, False):
                datasets.CIFAR100(str(self.data_dir), train=train, download=True)
        except Exception as err:  # offline: URLError/OSError
            raise DataNotFoundError(self._missing_message(err)) from None

    def _missing_message(self, err: Exception) -> str:
        return (f"CIFAR-100 not found in {self.data_dir / 'cifar-100-python'} ({err}). Extract "
                f"cifar-100-python.tar.gz there, point data_loader.args.data_dir at its parent folder, "
                f"or set data_loader.args.download=true (needs internet).")

    def _build(self, train_split: bool, augment: bool) -> Dataset:
        steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
        transform = transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)])
        return datasets.CIFAR100(str(self.data_dir), train=train_split, transform=transform)


class Imagenette(_FolderDataModule):
    """Imagenette (fast.ai's 10-class ImageNet subset) as an ``ImageFolder``: 224 px crops.

    ``data_dir`` is the extracted ``imagenette2`` folder with ``train/`` and ``val/``; the official
    ``val/`` is the test split and the validation split is carved out of ``train/``.
    """

    # Label order is ImageFolder's: the sorted WordNet ids n01440764, n02102040, ..., n03888605.
    classes = ("tench", "English springer", "cassette player", "chain saw", "church", "French horn",
               "garbage truck", "gas pump", "golf ball", "parachute")
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    input_shape = (3, 224, 224)

    def _missing_message(self, err: Exception) -> str:
        return (f"Imagenette not found: expected {self.data_dir / 'train'} and {self.data_dir / 'val'} ({err}). "
                f"Download {IMAGENETTE_URL}, extract it (tar xzf imagenette2.tgz) and set "
                f"data_loader.args.data_dir to the imagenette2 folder; it is not downloaded automatically.")

    def _build(self, train_split: bool, augment: bool) -> Dataset:
        if augment:
            steps = [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip()]
        else:
            steps = [transforms.Resize(256), transforms.CenterCrop(224)]
        transform = transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)])
        return datasets.ImageFolder(str(self.data_dir / ("train" if train_split else "val")), transform=transform)


# Explicit registry: the names a config's ``data_loader.type`` may use.
DATAMODULES: dict[str, type[_BaseDataModule]] = {
    "MNIST": MNIST, "FashionMNIST": FashionMNIST, "CIFAR100": CIFAR100, "Imagenette": Imagenette,
}
