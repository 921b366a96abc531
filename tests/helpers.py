"""Test helpers shared by the test modules (imported as ``from helpers import ...``; fixtures live in conftest).

Tiny MNIST-format datasets written as real idx files, a matching config, run-folder and checkpoint
readers, script loading, and a callback that interrupts a fit like a killed job.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import struct
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

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
