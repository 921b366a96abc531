"""Callback registry: the names a config's ``trainer.callbacks`` may use, and their argument models.

Lightning's own callbacks plus the compression callbacks (``IterativePruning``, ``Quantization``,
``Distillation``), whose arguments are typed models (``PruningArgs``, ``QuantizationArgs``, ``DistillationArgs``) that the config
schema uses as they are.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint

from trainer.callbacks.distillation import Distillation, DistillationArgs
from trainer.callbacks.pruning import IterativePruning, PruningArgs
from trainer.callbacks.quantization import Quantization, QuantizationArgs

CALLBACKS: dict[str, type[Callback]] = {
    "IterativePruning": IterativePruning,
    "Quantization": Quantization,
    "Distillation": Distillation,
    "ModelCheckpoint": ModelCheckpoint,
    "EarlyStopping": EarlyStopping,
    "LearningRateMonitor": LearningRateMonitor,
}
COMPRESSION_ARGS = {"IterativePruning": PruningArgs, "Quantization": QuantizationArgs,
                    "Distillation": DistillationArgs}

__all__ = ["CALLBACKS", "COMPRESSION_ARGS", "Distillation", "DistillationArgs", "IterativePruning", "PruningArgs",
           "Quantization", "QuantizationArgs"]
