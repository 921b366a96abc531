"""Callback registry: the names a config's ``trainer.callbacks`` may use.

The compression callbacks (``IterativePruning``, ``Quantization``) register here as they land.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint

CALLBACKS: dict[str, type[Callback]] = {
    "ModelCheckpoint": ModelCheckpoint,
    "EarlyStopping": EarlyStopping,
    "LearningRateMonitor": LearningRateMonitor,
}

__all__ = ["CALLBACKS"]
