"""Callback registry: the names a config's ``trainer.callbacks`` may use, and their argument models.

Lightning's own callbacks plus the compression callbacks (``StructuredPruning``, ``IterativePruning``,
``Quantization``, ``Distillation``), whose arguments are typed models (``StructuredArgs``, ``PruningArgs``,
``QuantizationArgs``, ``DistillationArgs``) that the config schema uses as they are.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint

from trainer.callbacks.distillation import Distillation, DistillationArgs
from trainer.callbacks.pruning import IterativePruning, PruningArgs
from trainer.callbacks.quantization import Quantization, QuantizationArgs
from trainer.callbacks.structured import StructuredArgs, StructuredPruning

CALLBACKS: dict[str, type[Callback]] = {
    "StructuredPruning": StructuredPruning,
    "IterativePruning": IterativePruning,
    "Quantization": Quantization,
    "Distillation": Distillation,
    "ModelCheckpoint": ModelCheckpoint,
    "EarlyStopping": EarlyStopping,
    "LearningRateMonitor": LearningRateMonitor,
}
COMPRESSION_ARGS = {"IterativePruning": PruningArgs, "Quantization": QuantizationArgs,
                    "Distillation": DistillationArgs, "StructuredPruning": StructuredArgs}

__all__ = ["CALLBACKS", "COMPRESSION_ARGS", "Distillation", "DistillationArgs", "IterativePruning", "PruningArgs",
           "Quantization", "QuantizationArgs", "StructuredArgs", "StructuredPruning"]
