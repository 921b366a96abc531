"""Config -> objects: the model, data, callbacks, ``Trainer`` and evaluator of a run, from a ``Config``.

The config layer's other half (``parse_config`` validates; this builds). Scripts call these; nothing
below the config layer imports this module, so ``trainer/`` never depends on the config schema.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import (Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint, RichProgressBar,
                                         TQDMProgressBar)
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from logger import get_logger
from compression.sensitivity import Metrics
from parse_config import Config, ConfigError, ExportConfig, instantiate, load_config
from teacher import use_teacher
from trainer.callbacks import CALLBACKS, Distillation, IterativePruning, Quantization, StructuredPruning
from trainer.callbacks.stages import PipelineStages, plan_stages
from data import DATAMODULES, MACHINE_KEYS
from trainer.checkpoint_io import AtomicCheckpointIO
from trainer.export import encode_checkpoint
from trainer.lit_model import METRICS, LitClassifier, TrainingParts, load_weights
from trainer.optim import LOSSES
from utils import load_checkpoint

TQDM_REFRESH_BATCHES = 25  # Lightning redraws its tqdm bar every n batches: each redraw of a LeNet epoch costs ~1 %


def build_model(cfg: Config) -> nn.Module:
    """The bare network named by ``arch``."""
    return instantiate(cfg.arch, "arch")


def build_datamodule(cfg: Config) -> pl.LightningDataModule:
    """The data module named by ``data_loader`` (reads nothing until ``setup``)."""
    return instantiate(cfg.data_loader, "data_loader")


def training_parts(cfg: Config, metrics: tuple[str, ...] | None = None) -> TrainingParts:
    """The typed parts ``LitClassifier`` trains with: loss, optimizer and scheduler factories, clipping."""
    scheduler = cfg.lr_scheduler
    return TrainingParts(
        num_classes=int(cfg.arch.args["num_classes"]), loss=LOSSES[cfg.loss],
        optimizer=functools.partial(cfg.optimizer.target, **cfg.optimizer.args),
        scheduler=functools.partial(scheduler.target, **scheduler.args) if scheduler is not None else None,
        gradient_clip_val=cfg.trainer.gradient_clip_val, metrics=tuple(metrics or cfg.metrics),
        checkpoint_config=cfg.model_dump())


def build_lit_model(cfg: Config, load_pretrained: bool = True) -> LitClassifier:
    """The LightningModule; with ``cfg.pretrained`` set, its weights (and pruning masks) start from that
    checkpoint, so a new run from a pruned checkpoint keeps its zeros."""
    model = build_model(cfg)
    lit_model = LitClassifier(model, training_parts(cfg))
    if cfg.pretrained and load_pretrained:
        ckpt = load_checkpoint(cfg.pretrained)
        load_weights(model, ckpt, cfg.pretrained)
        lit_model.load_compression(ckpt, resume=False)  # a new run: its own recipe sizes unused codebooks
    return lit_model


def check_model_and_machine(cfg: Config) -> None:
    """What only a run would find out, found before its folder exists: the network takes the data's inputs (a
    forward pass on the meta device: shapes, no memory) and gives one output per class; the CPU can hold as many
    processes as ``trainer.devices`` asks for (more would wait forever for the process group to form).

    Raises:
        ConfigError: naming the key and the fix.
    """
    shape = DATAMODULES[cfg.data_loader.type].input_shape  # one sample, (C, H, W)
    try:
        with torch.device("meta"):
            out = build_model(cfg)(torch.zeros(2, *shape))
    except (RuntimeError, ValueError, TypeError) as err:
        raise ConfigError(f"arch.args: {cfg.arch.type} {cfg.arch.args} does not take {cfg.data_loader.type}'s "
                          f"inputs of shape {tuple(shape)} ({str(err).splitlines()[0][:120]}); drop the argument "
                          f"or set it to fit the data") from None
    if tuple(out.shape) != (2, cfg.arch.args["num_classes"]):
        raise ConfigError(f"arch.args: {cfg.arch.type} gives outputs of shape {tuple(out.shape[1:])} for "
                          f"{cfg.arch.args['num_classes']} classes")
    tc = cfg.trainer
    on_cpu = tc.accelerator == "cpu" or (tc.accelerator == "auto" and not torch.cuda.is_available())
    count = tc.devices if isinstance(tc.devices, int) else len(tc.devices) if isinstance(tc.devices, list) else (
        int(tc.devices) if str(tc.devices).isdigit() else 1)
    if on_cpu and count > (os.cpu_count() or 1):
        raise ConfigError(f"trainer.devices: {count} processes on the CPU, but this machine has {os.cpu_count()} "
                          f"cores; use at most that many (or a machine with accelerators)")


def load_trained_model(ckpt_path: str | Path, config_path: str | Path | None,
                       overrides: list[tuple[str, Any]]) -> tuple[nn.Module, Config, dict[str, Any]]:
    """A checkpoint's network with its weights, its config (``config_path``, else the stored one, plus
    overrides) and the loaded checkpoint: what test.py and sensitivity.py evaluate."""
    ckpt = load_checkpoint(ckpt_path)
    cfg = load_config(config_path, ckpt_path, overrides, training=False)
    model = build_model(cfg)
    load_weights(model, ckpt, ckpt_path)
    return model, cfg, ckpt


def build_config_callbacks(cfg: Config, model: nn.Module, quantized: Collection[str] = (),
                           start_epoch: int = 0) -> list[Callback]:
    """The callbacks named in ``trainer.callbacks``, checked against the model before anything runs.

    Args:
        quantized: Parameters already quantized when the run starts (from ``pretrained`` or the resumed
            checkpoint): their masks are fixed, so no pruning step from ``start_epoch`` on may select them.
        start_epoch: The first epoch this call will train (a resumed checkpoint's epoch; 0 for a new run).

    Raises:
        ConfigError: bad arguments, or (compression callbacks) layer names or epochs that do not fit.
    """
    callbacks = []
    for name, args in cfg.trainer.callbacks.items():
        try:
            callback = CALLBACKS[name](**args)
            targets = callback.check(model, cfg.trainer.max_epochs) if hasattr(callback, "check") else {}
        except (TypeError, ValueError, MisconfigurationException) as err:  # Lightning's own callbacks raise the last
            raise ConfigError(f"trainer.callbacks.{name}: {err}") from None
        fixed = sorted(f"{t}.weight" for t in targets if f"{t}.weight" in quantized)
        if isinstance(callback, IterativePruning) and fixed and max(callback.steps, default=-1) >= start_epoch:
            raise ConfigError(f"trainer.callbacks.IterativePruning: {', '.join(fixed)} are already quantized, so "
                              f"their masks are fixed; prune from an unquantized checkpoint or select other layers "
                              f"with `layers`")
        if isinstance(callback, Distillation):
            use_teacher(cfg, callback)  # a checkpoint now; a config once train.py has trained it
        if isinstance(callback, Quantization) and callback.auto:  # its trial files are the run's model.dcz
            callback.export_with(codec=cfg.export.codec, raw_dtype=cfg.export.raw_dtype,
                                 index_bits=cfg.export.index_bits, metadata=file_metadata(cfg),
                                 arch={"type": cfg.arch.type, "args": dict(cfg.arch.args)})
        callbacks.append(callback)
    _check_order(callbacks)
    return callbacks


def _check_order(callbacks: list[Callback]) -> None:
    """Quantization fixes each layer's mask, so every pruning step must come before it."""
    quantization = [c for c in callbacks if isinstance(c, Quantization)]
    for pruning in (c for c in callbacks if isinstance(c, (IterativePruning, StructuredPruning))):
        if quantization and max(pruning.steps) >= quantization[0].epoch:
            raise ConfigError(f"trainer.callbacks.Quantization.epoch: quantization at epoch {quantization[0].epoch} "
                              f"must come after the last {type(pruning).__name__} step (epoch {max(pruning.steps)})")


def pipeline_stages(cfg: Config, callbacks: list[Callback], run_dir: Path) -> PipelineStages | None:
    """The stage tracker of a fit that prunes and/or quantizes (None for a plain training run).

    Goes after the compression callbacks, so that its per-epoch line reports what they just did.
    """
    steps = [e for c in callbacks if isinstance(c, (IterativePruning, StructuredPruning)) for e in c.steps]
    quantization = next((c for c in callbacks if isinstance(c, Quantization)), None)
    if not steps and quantization is None:
        return None
    stages = plan_stages(cfg.trainer.max_epochs, steps, quantization.epoch if quantization else None)
    return PipelineStages(stages, run_dir)


def build_callbacks(cfg: Config, run_dir: Path) -> list[Callback]:
    """Checkpointing (best + last), LR monitor, early stopping and the progress bar."""
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
    return callbacks + progress_bar(cfg)


def bar_kind(cfg: Config) -> str:
    """``trainer.progress_bar`` resolved: ``auto`` is ``tqdm`` on a terminal and ``none`` when the output goes to a
    file or a CI log, where a redrawn bar is a line of carriage returns."""
    kind = cfg.trainer.progress_bar
    return ("tqdm" if sys.stderr.isatty() else "none") if kind == "auto" else kind


def progress_bar(cfg: Config) -> list[Callback]:
    """The configured progress bar (tqdm writes to stderr, so --json output on stdout stays clean)."""
    kind = bar_kind(cfg)
    if kind == "rich":
        return [RichProgressBar()]
    if kind == "tqdm":
        return [TQDMProgressBar(refresh_rate=TQDM_REFRESH_BATCHES)]
    return []


def one_device(cfg: Config) -> dict[str, Any]:
    """Trainer overrides for evaluating on one device of the configured kind: under DDP every rank would
    print its own figures, and the in-memory loaders give each rank an equal share, dropping the rest."""
    devices = cfg.trainer.devices
    if isinstance(devices, str) and "," in devices:  # Lightning reads "1,2" as device ids
        devices = [int(d) for d in devices.split(",") if d.strip().isdigit()]
    return {"devices": devices[:1] if isinstance(devices, list) and devices else 1, "strategy": "auto"}


def build_trainer(cfg: Config, run_dir: Path | None, **overrides: Any) -> pl.Trainer:
    """A ``Trainer`` from ``cfg.trainer``; ``run_dir=None`` builds one for evaluation only (no logging)."""
    # The run folder always holds config.json before the first checkpoint: that is by design.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # Lightning vs torch 2.14
    tc = cfg.trainer
    kwargs: dict[str, Any] = dict(
        max_epochs=tc.max_epochs, min_epochs=tc.min_epochs, accelerator=tc.accelerator, devices=tc.devices,
        num_nodes=tc.num_nodes, strategy=tc.strategy, precision=tc.precision,
        log_every_n_steps=tc.log_every_n_steps,
        deterministic=tc.deterministic,  # no gradient_clip_val: LitClassifier clips (manual optimization)
        limit_train_batches=tc.limit_train_batches, limit_val_batches=tc.limit_val_batches,
        enable_progress_bar=bar_kind(cfg) != "none",
        plugins=[AtomicCheckpointIO()],  # a crash or a full disk never truncates a checkpoint
    )
    if run_dir is None:
        kwargs.update(logger=False, enable_checkpointing=False, default_root_dir=None)
        callbacks: list[Callback] = progress_bar(cfg)
    else:
        kwargs.update(logger=TensorBoardLogger(save_dir=str(run_dir), name="", version=""),
                      default_root_dir=str(run_dir))
        callbacks = build_callbacks(cfg, run_dir)
    kwargs.update(overrides)
    callbacks += kwargs.pop("callbacks", [])
    _check_checkpoint_callbacks(callbacks)
    try:
        return pl.Trainer(callbacks=callbacks, **kwargs)
    except (ValueError, TypeError, ImportError, MisconfigurationException) as err:  # e.g. an accelerator missing here
        raise ConfigError(f"trainer: {err}") from None
    except RuntimeError as err:  # e.g. two stateful callbacks that would save the same state (trainer.callbacks)
        raise ConfigError(f"trainer.callbacks: {str(err).splitlines()[0][:300]}") from None


def _check_checkpoint_callbacks(callbacks: list[Callback]) -> None:
    """A ``ModelCheckpoint`` of ``trainer.callbacks`` that would save the state of one of the run's own (Lightning
    keeps one state per monitor, mode and interval) is refused before the run starts, not at the first save.

    Raises:
        ConfigError: naming the clash and what to change.
    """
    keys = [c.state_key for c in callbacks if isinstance(c, ModelCheckpoint)]
    if len(set(keys)) < len(keys):
        raise ConfigError("trainer.callbacks.ModelCheckpoint: it saves on the same monitor, mode and interval as the "
                          "run's own best.ckpt (trainer.monitor) or last.ckpt (every epoch); give it another "
                          "monitor, mode or every_n_epochs, or drop it")


def make_evaluator(cfg: Config, model: nn.Module, split: str, limit_batches: int | float | None = None,
                   quiet: bool = True) -> Callable[[], Metrics]:
    """One Trainer and one data module, reused: the returned function evaluates ``model`` as it is now.

    What test.py runs once and sensitivity.py hundreds of times. Lightning moves the model to the
    accelerator for each call and back to the CPU afterwards, so a caller may change weights between
    calls. One device, no DDP (every rank would print its own figures).

    Args:
        split: ``val`` or ``test``.
        limit_batches: Batches to evaluate (a count or a fraction; None: the whole split, whatever smoke-run
            limit the training config had).
        quiet: No progress bar and no per-call log lines (for sweeps).

    Raises:
        DataNotFoundError: the data is missing (raised here, before any output).
        ConfigError: an empty validation split, or a Trainer setting Lightning refuses.
    """
    lit_model = LitClassifier(model, training_parts(cfg, metrics=METRICS))  # both errors, always
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()  # read the data now: missing data fails here, before any output...
    datamodule.setup("validate" if split == "val" else "test")
    # ...and only once: a sweep calls validate() hundreds of times, and each would read it again.
    datamodule.prepare_data = datamodule.setup = lambda *args, **kwargs: None  # type: ignore[method-assign]
    if split == "val" and len(datamodule.val_dataloader()) == 0:
        raise ConfigError("the validation split is empty (data_loader.args.validation_split is 0): use --split test")
    if quiet:
        cfg = cfg.model_copy(deep=True)
        cfg.trainer.progress_bar = "none"
    limit = 1.0 if limit_batches is None else limit_batches
    trainer = build_trainer(cfg, run_dir=None, enable_model_summary=False, limit_val_batches=limit,
                            limit_test_batches=limit, num_nodes=1, **one_device(cfg))
    run = trainer.validate if split == "val" else trainer.test
    # Each call would log "epoch 0: val/top1_err ..." and, on a GPU, the visible devices, through the bar.
    chatty = [get_logger("train"), logging.getLogger("lightning.pytorch.accelerators.cuda")] if quiet else []

    def evaluate() -> Metrics:
        levels = [logger.level for logger in chatty]
        for logger in chatty:
            logger.setLevel(logging.WARNING)
        try:
            metrics = run(lit_model, datamodule=datamodule, verbose=False)[0]
        finally:
            for logger, level in zip(chatty, levels):
                logger.setLevel(level)
        return {name: float(metrics[f"{split}/{name}"]) for name in ("top1_err", "top5_err", "loss")}

    return evaluate


# ------------------------------------------------------------------- the .dcz file's evaluation metadata
def file_metadata(cfg: Config) -> dict[str, Any]:
    """Header fields beside the tensors: class count and names, input normalisation, and what test.py
    needs to evaluate the file (the dataset it was trained on, without ``MACHINE_KEYS``); the training
    settings stay out."""
    datamodule = DATAMODULES[cfg.data_loader.type]
    args = {k: v for k, v in cfg.data_loader.args.items() if k not in MACHINE_KEYS}
    evaluation = {"name": cfg.name, "loss": cfg.loss, "metrics": list(cfg.metrics),
                  "data_loader": {"type": cfg.data_loader.type, "args": args}}
    return {"num_classes": cfg.arch.args.get("num_classes"), "class_names": list(datamodule.classes),
            "eval": evaluation, "input": {"mean": list(datamodule.mean), "std": list(datamodule.std),
                                          "shape": list(datamodule.input_shape)}}


def evaluation_config(header: dict[str, Any]) -> dict[str, Any] | None:
    """A raw config to evaluate a .dcz file with: its architecture and the dataset ``file_metadata`` stored.

    Where the data is and whether to download come from the command line only (``--set
    data_loader.args.data_dir=...``; default ``data/``, then the system folder): a file never decides
    where we read or write, whatever its header says.
    """
    evaluation = header.get("eval")
    loader = evaluation.get("data_loader") if isinstance(evaluation, dict) else None
    if not isinstance(loader, dict) or not isinstance(loader.get("args", {}), dict):
        return None
    args = {k: v for k, v in loader.get("args", {}).items() if k not in MACHINE_KEYS}
    # The optimizer is required by the schema but unused by evaluation.
    return {"name": "dcz", **evaluation, "data_loader": {**loader, "args": args}, "arch": header["arch"],
            "optimizer": {"type": "SGD", "args": {"lr": 0.0}}}


def encode_run_checkpoint(ckpt_path: str | Path, out: str | Path | None, cfg: Config,
                          options: ExportConfig | None = None) -> tuple[Path, dict[str, Any]]:
    """``model.dcz`` + reports of a checkpoint of the run ``cfg`` describes, with ``options`` (default:
    ``cfg.export``); see ``trainer.export.encode_checkpoint``.

    Raises:
        CheckpointError: a missing, damaged or inconsistent checkpoint. ValueError: weights that do not fit.
    """
    options = options or cfg.export
    return encode_checkpoint(ckpt_path, out, {"type": cfg.arch.type, "args": cfg.arch.args}, file_metadata(cfg),
                             options.index_bits, options.codec, options.raw_dtype)
