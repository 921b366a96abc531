"""Callback registry: the names a config's ``trainer.callbacks`` may use, and their argument models.

Lightning's own callbacks (``ModelCheckpoint`` is trainer/lean.py's subclass of it: same behaviour, cheaper
per step) plus the compression callbacks (``IterativePruning``, ``Quantization``, ``Distillation``), whose
arguments are typed models (``PruningArgs``, ``QuantizationArgs``, ``DistillationArgs``) that the config
schema uses as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor

from trainer.callbacks.distillation import Distillation, DistillationArgs
from trainer.callbacks.pruning import IterativePruning, PruningArgs
from trainer.callbacks.quantization import Quantization, QuantizationArgs
from trainer.lean import ModelCheckpoint  # Lightning's, with its state key cached

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

PRUNE_EPOCH = 0  # a sensitivity proposal prunes one-shot at the start of the first epoch...
QUANTIZE_EPOCH = 1  # ...and clusters one epoch later, so pruning gets one epoch of retraining first


def proposal_callbacks(keep_ratio: Mapping[str, float], bits: Mapping[str, int], init: str | None,
                       seed: int = 0) -> dict[str, dict[str, Any]]:
    """The ``trainer.callbacks`` entries that apply per-layer targets (a sensitivity proposal): one-shot
    magnitude pruning at epoch ``PRUNE_EPOCH``, then k-means at epoch ``QUANTIZE_EPOCH`` (epoch 0 when
    nothing is pruned). The run needs ``trainer.max_epochs`` of at least 2 with both (1 with one of them).
    """
    out: dict[str, dict[str, Any]] = {}
    if keep_ratio:
        out["IterativePruning"] = {"criterion": "magnitude", "keep_ratio": dict(keep_ratio),
                                   "schedule": "one_shot", "start_epoch": PRUNE_EPOCH}
    if bits:
        out["Quantization"] = {"bits": dict(bits), "init": init, "epoch": QUANTIZE_EPOCH if keep_ratio else 0}
        if seed:
            out["Quantization"]["seed"] = seed
    return out


__all__ = ["CALLBACKS", "COMPRESSION_ARGS", "Distillation", "DistillationArgs", "IterativePruning", "PruningArgs",
           "Quantization", "QuantizationArgs", "proposal_callbacks"]
