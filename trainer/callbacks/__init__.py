"""Callback registry: the names a config's ``trainer.callbacks`` may use.

Lightning's own callbacks plus the compression callbacks (``IterativePruning``, ...).
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint

from trainer.callbacks.pruning import IterativePruning

CALLBACKS: dict[str, type[Callback]] = {
    "ModelCheckpoint": ModelCheckpoint,
    "EarlyStopping": EarlyStopping,
    "LearningRateMonitor": LearningRateMonitor,
    "IterativePruning": IterativePruning,
}

__all__ = ["CALLBACKS", "IterativePruning"]
