"""Forgetting the "best" epoch when a compression step changes the model.

A model pruned further or just quantized is a different model: ``best.ckpt`` and early stopping must
compare only epochs after the last compression step, or ``best.ckpt`` would be a half-pruned model.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint


def reset_best(trainer: pl.Trainer) -> None:
    """Clears the monitored history of every ``ModelCheckpoint`` and ``EarlyStopping`` of ``trainer``."""
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.monitor is not None:
            worst = math.inf if callback.mode == "min" else -math.inf
            callback.best_k_models, callback.kth_best_model_path = {}, ""
            callback.best_model_score, callback.best_model_path = None, ""
            callback.kth_value = torch.tensor(worst)
        elif isinstance(callback, EarlyStopping):
            callback.wait_count = 0
            callback.best_score = torch.tensor(math.inf if callback.mode == "min" else -math.inf)
