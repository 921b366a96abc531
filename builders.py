"""Config -> objects: the model, data, callbacks, ``Trainer`` and evaluator of a run, from a ``Config``.

The config layer's other half (``parse_config`` validates; this builds). Scripts call these; nothing
below the config layer imports this module, so ``trainer/`` never depends on the config schema.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from logger import get_logger
from parse_config import METRICS, Config, ConfigError, instantiate, load_config
from trainer.callbacks import CALLBACKS, Distillation, IterativePruning, Quantization
from trainer.callbacks.stages import PipelineStages, plan_stages
from trainer.checkpoint_io import AtomicCheckpointIO
from trainer.lean import ModelCheckpoint, NullProfiler, TQDMProgressBar
from trainer.lit_model import LitClassifier, network_state
from utils import CheckpointError, load_checkpoint

Metrics = dict[str, float]  # {"top1_err": %, "top5_err": %, "loss": ...}


def build_model(cfg: Config) -> nn.Module:
    """The bare network named by ``arch``."""
    return instantiate(cfg.arch, "arch")


def build_datamodule(cfg: Config) -> pl.LightningDataModule:
    """The data module named by ``data_loader`` (reads nothing until ``setup``)."""
    return instantiate(cfg.data_loader, "data_loader")


def build_lit_model(cfg: Config, load_pretrained: bool = True) -> LitClassifier:
    """The LightningModule; with ``cfg.pretrained`` set, its weights (and pruning masks) start from that
    checkpoint, so a new run from a pruned checkpoint keeps its zeros."""
    model = build_model(cfg)
    lit_model = LitClassifier(model, cfg.model_dump())
    if cfg.pretrained and load_pretrained:
        ckpt = load_checkpoint(cfg.pretrained)
        load_weights(model, ckpt, cfg.pretrained)
        lit_model.load_compression(ckpt, resume=False)  # a new run: its own recipe sizes unused codebooks
    return lit_model


def load_weights(model: nn.Module, ckpt: dict[str, Any], path: str | Path) -> None:
    """Copies the network weights of a loaded checkpoint into ``model`` (names and shapes must match)."""
    try:
        result = model.load_state_dict(network_state(ckpt), strict=False)
    except RuntimeError as err:  # shape mismatch
        raise CheckpointError(f"{path} does not fit {type(model).__name__}: {str(err)[:300]}") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{path} does not fit {type(model).__name__}: missing "
                              f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")


def load_trained_model(ckpt_path: str | Path, config_path: str | Path | None,
                       overrides: list[tuple[str, Any]]) -> tuple[nn.Module, Config, dict[str, Any]]:
    """A checkpoint's network with its weights, its config (``config_path``, else the stored one, plus
    overrides) and the loaded checkpoint: what test.py and sensitivity.py evaluate."""
    ckpt = load_checkpoint(ckpt_path)
    cfg = load_config(config_path, ckpt_path, overrides)
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
            for i, member in enumerate(callback.members):
                if member == "self":
                    continue
                teacher = teacher_config(cfg, member)  # a config is trained by train.py, then loaded like a checkpoint
                if callback.features and (theirs := _arch_of(teacher)) != (mine := _arch_of(cfg)):
                    raise ConfigError(f"trainer.callbacks.Distillation.features: the teacher {member} is a "
                                      f"{theirs[0]} {theirs[1]}, this run trains a {mine[0]} {mine[1]}; features need a teacher of the student's architecture "
                                      "(its layers named and shaped alike): drop `features` or teach with that one")
                if member.endswith(".ckpt"):
                    callback.use(load_teacher(cfg, member), i)
        if isinstance(callback, IterativePruning) and callback.splicing and cfg.trainer.precision == "16-mixed":
            raise ConfigError("trainer.callbacks.IterativePruning: splicing steps the pruned weights' shadows with "
                              "the raw gradients, which precision '16-mixed' scales; use '32-true' or 'bf16-mixed'")
        callbacks.append(callback)
    _check_order(callbacks)
    return callbacks


def _arch_of(cfg: Config) -> tuple[str, dict]:
    """The architecture a config builds, up to ``num_classes`` (filled in from the data, checked separately)."""
    return cfg.arch.type, {k: v for k, v in cfg.arch.args.items() if k != "num_classes"}


def teacher_config(cfg: Config, path: str | Path) -> Config:
    """The config of ``Distillation.teacher`` (a .json, or the one stored with a .ckpt), checked against the run:
    the same dataset and number of classes, so that its outputs are soft labels of this run's inputs.

    Raises:
        ConfigError: no such file, a bad config, or another dataset / number of classes.
    """
    key = "trainer.callbacks.Distillation.teacher"
    if not Path(path).is_file():
        raise ConfigError(f"{key}: {path}: no such file (a checkpoint of the teacher, or its config to train it)")
    try:
        teacher = load_config(path, None, []) if str(path).endswith(".json") else load_config(None, path, [])
    except (ConfigError, CheckpointError) as err:
        raise ConfigError(f"{key}: {path}: {err}") from None
    mine = (cfg.data_loader.type, int(cfg.arch.args.get("num_classes", 10)))
    theirs = (teacher.data_loader.type, int(teacher.arch.args.get("num_classes", 10)))
    if mine != theirs:
        raise ConfigError(f"{key}: {path} is a teacher for {theirs[0]} with {theirs[1]} classes; this run trains "
                          f"on {mine[0]} with {mine[1]} classes: pass a teacher of the same data")
    return teacher


def load_teacher(cfg: Config, path: str | Path) -> nn.Module:
    """The network of a teacher checkpoint, with its weights (checked by ``teacher_config``).

    Raises:
        ConfigError: see ``teacher_config``; or the weights do not fit the network its config names.
    """
    teacher = teacher_config(cfg, path)
    try:
        model = build_model(teacher)
        load_weights(model, load_checkpoint(path), path)
    except CheckpointError as err:
        raise ConfigError(f"trainer.callbacks.Distillation.teacher: {err}") from None
    return model


def _check_order(callbacks: list[Callback]) -> None:
    """Quantization fixes each layer's mask, so every pruning step must come before it."""
    pruning = [c for c in callbacks if isinstance(c, IterativePruning)]
    quantization = [c for c in callbacks if isinstance(c, Quantization)]
    if pruning and quantization and max(pruning[0].steps) >= quantization[0].epoch:
        raise ConfigError(f"trainer.callbacks.Quantization.epoch: quantization at epoch {quantization[0].epoch} "
                          f"must come after the last pruning step (epoch {max(pruning[0].steps)})")


def pipeline_stages(cfg: Config, callbacks: list[Callback], run_dir: Path) -> PipelineStages | None:
    """The stage tracker of a fit that prunes and/or quantizes (None for a plain training run).

    Goes after the compression callbacks, so that its per-epoch line reports what they just did.
    """
    pruning = next((c for c in callbacks if isinstance(c, IterativePruning)), None)
    quantization = next((c for c in callbacks if isinstance(c, Quantization)), None)
    if pruning is None and quantization is None:
        return None
    stages = plan_stages(cfg.trainer.max_epochs, pruning.steps if pruning else [],
                         quantization.epoch if quantization else None)
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


def progress_bar(cfg: Config) -> list[Callback]:
    """The configured progress bar (tqdm writes to stderr, so --json output on stdout stays clean)."""
    if cfg.trainer.progress_bar == "rich":
        return [RichProgressBar()]
    if cfg.trainer.progress_bar == "tqdm":
        return [TQDMProgressBar()]  # trainer/lean.py: redrawn by time (5 a second), not every n batches
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
        enable_progress_bar=tc.progress_bar != "none",
        profiler=NullProfiler(),  # Lightning's default minus its per-hook cost (trainer/lean.py)
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
    try:
        return pl.Trainer(callbacks=callbacks, **kwargs)
    except (ValueError, TypeError, ImportError, MisconfigurationException) as err:  # e.g. an accelerator missing here
        raise ConfigError(f"trainer: {err}") from None


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
    config = {**cfg.model_dump(), "metrics": list(METRICS), "pretrained": None}  # both errors, always
    lit_model = LitClassifier(model, config)
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
