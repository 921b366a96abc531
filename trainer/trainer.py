"""Builds the model, data and ``Trainer`` of a run from a validated ``Config``."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import (Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint,
                                         RichProgressBar, TQDMProgressBar)
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from parse_config import Config, ConfigError, instantiate
from trainer.callbacks import CALLBACKS
from trainer.lit_model import LitClassifier
from utils import load_checkpoint, model_state


def build_model(cfg: Config) -> nn.Module:
    """The bare network named by ``arch``."""
    return instantiate(cfg.arch, "arch")


def build_datamodule(cfg: Config) -> pl.LightningDataModule:
    """The data module named by ``data_loader`` (reads nothing until ``setup``)."""
    return instantiate(cfg.data_loader, "data_loader")


def build_lit_model(cfg: Config) -> LitClassifier:
    """The LightningModule; with ``cfg.pretrained`` set, its weights start from that checkpoint."""
    model = build_model(cfg)
    if cfg.pretrained:
        load_weights(model, cfg.pretrained)
    return LitClassifier(model, cfg.model_dump())


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Copies the network weights of a checkpoint into ``model`` (strict: shapes and names must match)."""
    state = model_state(load_checkpoint(path))
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(f"pretrained: {path} does not fit {type(model).__name__}: missing "
                          f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")


def build_callbacks(cfg: Config, run_dir: Path) -> list[Callback]:
    """Checkpointing (best + last), LR monitor, early stopping, progress bar and the configured callbacks."""
    tc = cfg.trainer
    callbacks: list[Callback] = [
        ModelCheckpoint(dirpath=run_dir, filename="best", monitor=tc.monitor_metric, mode=tc.monitor_mode,
                        auto_insert_metric_name=False, enable_version_counter=False),
        # A separate, unmonitored checkpoint rewritten every epoch: Lightning's save_last only follows
        # epochs in which the best checkpoint improved, which would make resuming lose epochs.
        ModelCheckpoint(dirpath=run_dir, filename="last", monitor=None, save_top_k=1, enable_version_counter=False),
    ]
    if "LearningRateMonitor" not in tc.callbacks:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    if tc.early_stop > 0:
        callbacks.append(EarlyStopping(monitor=tc.monitor_metric, mode=tc.monitor_mode, patience=tc.early_stop))
    if tc.progress_bar == "rich":
        callbacks.append(RichProgressBar())
    elif tc.progress_bar == "tqdm":
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    for name, args in tc.callbacks.items():
        try:
            callbacks.append(CALLBACKS[name](**args))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"trainer.callbacks.{name}: {err}") from None
    return callbacks


def build_trainer(cfg: Config, run_dir: Path | None, **overrides: Any) -> pl.Trainer:
    """A ``Trainer`` from ``cfg.trainer``; ``run_dir=None`` builds one for evaluation only (no logging)."""
    # The run folder always holds config.json before the first checkpoint: that is by design.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # Lightning vs torch 2.14
    tc = cfg.trainer
    kwargs: dict[str, Any] = dict(
        max_epochs=tc.max_epochs, min_epochs=tc.min_epochs, accelerator=tc.accelerator, devices=tc.devices,
        strategy=tc.strategy, precision=tc.precision, gradient_clip_val=tc.gradient_clip_val,
        log_every_n_steps=tc.log_every_n_steps, deterministic=tc.deterministic,
        limit_train_batches=tc.limit_train_batches, limit_val_batches=tc.limit_val_batches,
        enable_progress_bar=tc.progress_bar != "none",
    )
    if run_dir is None:
        kwargs.update(logger=False, enable_checkpointing=False, default_root_dir=None)
        callbacks: list[Callback] = []
    else:
        kwargs.update(logger=TensorBoardLogger(save_dir=str(run_dir), name="", version=""),
                      default_root_dir=str(run_dir))
        callbacks = build_callbacks(cfg, run_dir)
    kwargs.update(overrides)
    callbacks += kwargs.pop("callbacks", [])
    try:
        return pl.Trainer(callbacks=callbacks, **kwargs)
    except (ValueError, TypeError, MisconfigurationException) as err:  # e.g. an accelerator this machine lacks
        raise ConfigError(f"trainer: {err}") from None
