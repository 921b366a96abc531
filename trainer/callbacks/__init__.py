"""Callback registry: the names a config's ``trainer.callbacks`` may use.

Lightning's own callbacks (``ModelCheckpoint`` is trainer/lean.py's subclass of it: same behaviour, cheaper
per step) plus the compression callbacks (``IterativePruning``, ``Quantization``).
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor

from trainer.callbacks.pruning import IterativePruning
from trainer.callbacks.quantization import Quantization
from trainer.lean import ModelCheckpoint  # Lightning's, with its state key cached

CALLBACKS: dict[str, type[Callback]] = {
    "ModelCheckpoint": ModelCheckpoint,
    "EarlyStopping": EarlyStopping,
    "LearningRateMonitor": LearningRateMonitor,
    "IterativePruning": IterativePruning,
    "Quantization": Quantization,
}

__all__ = ["CALLBACKS", "IterativePruning", "Quantization"]
