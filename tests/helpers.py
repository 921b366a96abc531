"""Test helpers shared by the test modules (imported as ``from helpers import ...``; fixtures live in conftest).

Tiny MNIST-format datasets written as real idx files (and a tiny CIFAR-100 in torchvision's pickled form),
a matching config, run-folder and checkpoint readers, script loading, and a callback that interrupts a fit
like a killed job.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import struct
import sys
import zlib
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import numpy as np
import torch

if TYPE_CHECKING:
    import pytest

ROOT = Path(__file__).resolve().parents[1]


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    """Writes ``array`` (uint8) in the idx format MNIST ships in (magic 0x0000_08_<ndim>, big-endian dims)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def make_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n 28x28 images whose class is drawn as a bright horizontal band (learnable in a few epochs)."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
    for i, y in enumerate(labels):
        images[i, 2 + 2 * y: 4 + 2 * y, :] = 250
    return images, labels


def write_mnist_folder(folder: Path, n_train: int = 320, n_test: int = 80, gz: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = make_images(n, seed)
        write_idx(folder / f"{split}-images-idx3-ubyte", images, gz)
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels, gz)
    return folder


def tiny_config(idx_dir: Path, save_dir: Path, **trainer: Any) -> dict[str, Any]:
    return {
        "name": "tiny",
        "seed": 7,
        "arch": {"type": "LeNet300", "args": {}},
        "data_loader": {"type": "FashionMNIST", "args": {"data_dir": str(idx_dir), "download": False,
                                                         "batch_size": 32, "validation_split": 0.2}},
        "optimizer": {"type": "SGD", "args": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0005}},
        "lr_scheduler": {"type": "StepLR", "args": {"step_size": 1, "gamma": 0.5}},
        "trainer": {"max_epochs": 2, "save_dir": str(save_dir), "accelerator": "cpu", "devices": 1,
                    "progress_bar": "none", "log_every_n_steps": 1, **trainer},
    }


def load_script(name: str) -> ModuleType:
    """Imports a top-level script (``train.py``, ``test.py``) by path; ``test`` would clash with the stdlib."""
    spec = importlib.util.spec_from_file_location(f"dc_script_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class StopAfter(pl.Callback):
    """Interrupts a fit at the end of an epoch, as a killed job would after its last checkpoint."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def write_config(tmp_path: Path, idx_dir: Path, name: str, callbacks: dict[str, Any], **trainer: Any) -> Path:
    """A tiny config with ``trainer.callbacks`` set, saving runs under ``tmp_path/name``; returns its path."""
    cfg = tiny_config(idx_dir, tmp_path / name, **trainer)
    cfg["trainer"]["callbacks"] = callbacks
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def only_run(save_dir: Path) -> Path:
    """The one run folder of the ``tiny`` config under ``save_dir``."""
    (run,) = sorted((save_dir / "tiny").iterdir())
    return run


def load_ckpt(path: Path) -> dict[str, Any]:
    """A checkpoint as a dict, loaded safely on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)


def last_ckpt(save_dir: Path) -> dict[str, Any]:
    """``last.ckpt`` of the one run under ``save_dir``."""
    return load_ckpt(only_run(save_dir) / "last.ckpt")


def compress_like_the_paper(model: torch.nn.Module, keep: float, bits: int, seed: int = 0) -> dict[str, Any]:
    """Prunes every weight matrix to ``keep`` and quantizes it to ``bits`` (what the callbacks produce)."""
    from compression.kmeans import kmeans_1d
    from compression.pruning import magnitude_mask

    # (shared by the codec, hostile-file and reproduce tests)
    masks, codebooks, indices = {}, {}, {}
    for name, p in model.named_parameters():
        if not name.endswith("weight"):
            continue
        mask = magnitude_mask(p, keep)
        result = kmeans_1d(p.detach()[mask].double().numpy(), 2 ** bits, seed=seed)
        cb, idx = torch.from_numpy(result.centroids), torch.from_numpy(result.labels)
        with torch.no_grad():
            p.zero_()
            p[mask] = cb[idx]
        masks[name], codebooks[name], indices[name] = mask, cb, idx
    return {"masks": masks, "codebooks": codebooks, "indices": indices}


def write_cifar100(root: Path, monkeypatch: pytest.MonkeyPatch, n_train: int = 40, n_test: int = 10) -> Path:
    """A tiny CIFAR-100 in torchvision's on-disk form, read by the real loader (``data.CIFAR100``).

    Writes ``root/cifar-100-python/{train,test,meta}``: pickled dicts as the dataset ships them (``data``
    (N, 3072) uint8 rows of R, G, B planes, ``fine_labels``, ``coarse_labels``, ``filenames``; ``meta`` with
    ``fine_label_names``). torchvision checks each file's MD5 against the published archive's, which
    generated files cannot match, so the expected MD5s are set to these files' (``monkeypatch``, undone after
    the test); nothing else of the loader is replaced. Returns ``root`` (the ``data_dir``).
    """
    import hashlib
    import pickle

    from torchvision import datasets

    from data import CIFAR100

    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    md5 = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = [int(i % 100) for i in range(n)]
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        for row, label in zip(data, labels):
            row[(label % 3) * 1024:(label % 3 + 1) * 1024] = 2 * label  # a colour cast per class
        entry = {"filenames": [f"{split}_{i}.png" for i in range(n)], "batch_label": f"tiny {split}",
                 "fine_labels": labels, "coarse_labels": [label // 5 for label in labels], "data": data}
        (folder / split).write_bytes(pickle.dumps(entry))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": list(CIFAR100.classes),
                                                "coarse_label_names": [f"superclass{i}" for i in range(20)]}))
    for name in ("train", "test", "meta"):
        md5[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    monkeypatch.setattr(datasets.CIFAR100, "train_list", [["train", md5["train"]]])
    monkeypatch.setattr(datasets.CIFAR100, "test_list", [["test", md5["test"]]])
    monkeypatch.setattr(datasets.CIFAR100, "meta", {**datasets.CIFAR100.meta, "md5": md5["meta"]})
    return root


class RankDump(pl.Callback):
    """Under DDP, gathers every rank's compression state and validation figures and writes them per rank.

    After the compression callbacks' epoch-start hooks (add it after them): ``epoch<e>_start``, the masks,
    codebooks, assignments and weights each rank holds once that epoch's pruning / clustering step has run;
    ``epoch<e>_end``, the same after the epoch's updates; ``epoch<e>_val``, the ``val/*`` metrics each rank
    logged and a CRC32 of each validation image it saw (which shard it got). Each is ``all_gather``ed, so every
    rank's file ``<tag>_rank<r>.pt`` holds ``{"rank": r, "gathered": [what rank 0 had, what rank 1 had, ...]}``.
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.val_samples: list[int] = []

    @staticmethod
    def _state(pl_module: pl.LightningModule) -> dict[str, dict[str, torch.Tensor]]:
        comp = pl_module.compression
        return {"masks": {n: m.cpu().clone() for n, m in comp.masks.items()},
                "codebooks": {n: c.detach().cpu().clone() for n, c in comp.codebooks.items()},
                "index": {n: i.cpu().clone() for n, i in comp.index.items()},
                "weights": {n: t.detach().cpu().clone() for n, t in pl_module.model.state_dict().items()}}

    def _dump(self, trainer: pl.Trainer, tag: str, payload: Any) -> None:
        gathered = [payload]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, payload)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"rank": trainer.global_rank, "gathered": gathered},
                   self.out_dir / f"{tag}_rank{trainer.global_rank}.pt")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._dump(trainer, f"epoch{trainer.current_epoch}_start", self._state(pl_module))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._dump(trainer, f"epoch{trainer.current_epoch}_end", self._state(pl_module))

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self.val_samples += [zlib.crc32(image.cpu().numpy().tobytes()) for image in batch[0]]

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        samples, self.val_samples = self.val_samples, []
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self._dump(trainer, f"epoch{trainer.current_epoch}_val", {"metrics": metrics, "samples": samples})


# --------------------------------------------------------------------------- .dcz files edited by hand
def dcz_parts(path: Path) -> tuple[dict[str, Any], list[list[Any]], bytes]:
    """(header, section table ``[[name, length, CRC32], ...]``, the sections' data) of a format-3 or -4 ``.dcz``
    (the same framing), parsed independently of the reader (``compression.container`` documents the layout)."""
    from compression.container import HEADER_DICTIONARY

    data = path.read_bytes()
    version, length = struct.unpack_from("<HI", data, 8)
    assert version in (3, 4), f"{path}: format {version}, these helpers edit formats 3 and 4"
    inflate = zlib.decompressobj(-15, zdict=HEADER_DICTIONARY)
    header, _, table = inflate.decompress(data[18:18 + length]).partition(b"\n")
    return json.loads(header), json.loads(table), data[18 + length:]


def write_dcz_parts(path: Path, header: dict[str, Any], table: list[list[Any]], body: bytes, version: int = 3) -> None:
    """Writes a format-3 (or ``version``) file from its parts, with a correct header CRC (what a deliberate editor
    would do)."""
    from compression.container import HEADER_DICTIONARY, MAGIC

    deflate = zlib.compressobj(9, zlib.DEFLATED, -15, zdict=HEADER_DICTIONARY)
    raw = deflate.compress(json.dumps(header).encode() + b"\n" + json.dumps(table).encode()) + deflate.flush()
    path.write_bytes(MAGIC + struct.pack("<HII", version, len(raw), zlib.crc32(raw)) + raw + body)


def rewrite_header(path: Path, change: Any) -> None:
    """Edits the JSON header (``change(header)``) and recomputes its CRC."""
    header, table, body = dcz_parts(path)
    change(header)
    write_dcz_parts(path, header, table, body, path.read_bytes()[8])


def sections_of(path: Path) -> dict[str, tuple[int, int]]:
    """{name: (offset of its data in the file, length)} of a format-3 ``.dcz``."""
    _, table, body = dcz_parts(path)
    at, out = path.stat().st_size - len(body), {}
    for name, length, _ in table:
        out[name] = (at, length)
        at += length
    return out


def fix_crcs(path: Path, digest: bool = True) -> None:
    """Recomputes every section CRC (and, with ``digest``, the header's SHA-256): a file edited on purpose."""
    from compression.model_file import payload_digest

    header, table, body = dcz_parts(path)
    at, pairs = 0, []
    for item in table:
        name, length, _ = item
        item[2] = zlib.crc32(body[at:at + length])
        pairs.append((name, body[at:at + length]))
        at += length
    if digest:
        header["sha256"] = payload_digest(pairs)
    write_dcz_parts(path, header, table, body, path.read_bytes()[8])


# --------------------------------------------------------------------------- exact resume
def whole_and_cut_runs(tmp_path: Path, idx_dir: Path, monkeypatch: Any, callbacks: dict[str, Any], max_epochs: int,
                       stop_after: int, whole_callbacks: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Trains the tiny config with ``callbacks`` (or ``whole_callbacks``, meant to be equivalent) for ``max_epochs``
    in one go ("whole"), and again with ``callbacks``, killed after epoch ``stop_after`` as a job would be ("cut",
    not resumed yet); returns both run folders."""
    import builders
    import train

    whole = write_config(tmp_path, idx_dir, "whole", whole_callbacks or callbacks, max_epochs=max_epochs)
    assert train.main(["-c", str(whole)]) == 0
    cut = write_config(tmp_path, idx_dir, "cut", callbacks, max_epochs=max_epochs)
    original = builders.build_callbacks
    with monkeypatch.context() as patch:
        patch.setattr(builders, "build_callbacks",
                      lambda cfg, run_dir: original(cfg, run_dir) + [StopAfter(stop_after)])
        assert train.main(["-c", str(cut)]) == 0
    return only_run(tmp_path / "whole"), only_run(tmp_path / "cut")


def assert_resume_equals_whole(whole: Path, cut: Path,
                               ckpt: str = "last.ckpt") -> tuple[dict[str, Any], dict[str, Any]]:
    """Resumes ``cut`` from its ``ckpt`` and checks it ends as ``whole`` did: every tensor of the state and the
    masks equal, ``model.dcz`` byte for byte; returns both last checkpoints."""
    import train

    assert train.main(["-r", str(cut / ckpt)]) == 0
    a, b = load_ckpt(whole / "last.ckpt"), load_ckpt(cut / "last.ckpt")
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert a.get("masks", {}).keys() == b.get("masks", {}).keys()
    assert all(torch.equal(m, b["masks"][n]) for n, m in a.get("masks", {}).items())
    assert (whole / "model.dcz").read_bytes() == (cut / "model.dcz").read_bytes()
    return a, b
