"""``IterativePruning``: prune during (re)training as in Han et al. 2015 (arXiv 1506.02626 §3).

The callback decides *when* (the schedule) and *what* (layers and targets); the masks come from
``compression.pruning`` and are installed in ``LitClassifier.set_masks``, which keeps pruned weights at
exactly zero through gradients, optimizer updates and weight decay, and saves the masks in every
checkpoint. Resuming (``train.py -r``) restores the masks and continues with the next scheduled step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from pydantic import model_validator
from torch import nn
from typing_extensions import Self, override

from compression.layers import per_layer, prunable_layers
from compression.pruning import CRITERIA, SCHEDULES, adjust_dropout_, schedule_epochs, step_masks
from logger import get_logger
from strict_args import StrictArgs, validated
from trainer.callbacks.best import reset_best

if TYPE_CHECKING:  # the module this callback works on (its .model, .masks, .set_masks)
    from trainer.lit_model import LitClassifier

log = get_logger("pruning")


class PruningArgs(StrictArgs):
    """The arguments of ``IterativePruning`` (``trainer.callbacks.IterativePruning`` in a config)."""

    criterion: Literal[CRITERIA] = "magnitude"  # type: ignore[valid-type]  # how each step picks what survives
    keep_ratio: float | dict[str, float] | None = None  # fraction kept at the end: one, or {name or type: r}
    sensitivity: float | dict[str, float] | None = None  # Han's quality parameter s of criterion "std"
    layers: list[str] | None = None  # layer names or types (default: every Linear/Conv2d, or the dict's keys)
    # one_shot, epochs, every, gradual (Zhu & Gupta's cubic)
    schedule: Literal[SCHEDULES] = "one_shot"  # type: ignore[valid-type]
    epochs: list[int] | None = None  # pruning epochs of schedule "epochs" (0-based)
    start_epoch: int = 0  # first pruning epoch
    end_epoch: int | None = None  # last pruning epoch of "every" / "gradual" (default: the last epoch)
    prune_every: int = 1  # epochs between pruning steps
    adjust_dropout: bool = False  # D_r = D_o * sqrt(C_ir / C_io) for the dropout feeding each pruned layer

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        name = "sensitivity" if self.criterion == "std" else "keep_ratio"
        target, other = (self.sensitivity, self.keep_ratio) if name == "sensitivity" else (self.keep_ratio,
                                                                                          self.sensitivity)
        if target is None:
            raise ValueError(f"criterion {self.criterion!r} needs {name}")
        if other is not None:
            raise ValueError(f"criterion {self.criterion!r} takes {name}, not "
                             f"{'keep_ratio' if name == 'sensitivity' else 'sensitivity'}")
        if self.criterion == "global" and isinstance(target, dict):
            raise ValueError("criterion 'global' takes one keep_ratio for all layers, not a dict")
        for key, value in (target.items() if isinstance(target, dict) else [(name, target)]):
            if name == "keep_ratio" and not 0.0 < value <= 1.0:
                raise ValueError(f"keep_ratio {key}: must be in (0, 1], got {value}")
            if name == "sensitivity" and value < 0:
                raise ValueError(f"sensitivity {key}: must be >= 0, got {value}")
        if self.schedule == "epochs" and not self.epochs:
            raise ValueError("schedule 'epochs' needs a non-empty 'epochs' list")
        if self.start_epoch < 0 or self.prune_every < 1:
            raise ValueError(f"start_epoch must be >= 0 and prune_every >= 1, got {self.start_epoch} and "
                             f"{self.prune_every}")
        return self

    @property
    def target(self) -> float | dict[str, float]:
        """The keep ratio, or the sensitivity of criterion ``std``."""
        return self.sensitivity if self.criterion == "std" else self.keep_ratio  # type: ignore[return-value]


class IterativePruning(Callback):
    """Prunes the selected layers at the scheduled epochs.

    Takes the keyword arguments of ``PruningArgs`` (criterion, keep_ratio or sensitivity, layers,
    schedule, epochs, start_epoch, end_epoch, prune_every, adjust_dropout).
    ``schedule``: ``one_shot`` (at ``start_epoch``), ``epochs`` (the list ``epochs``), ``every`` (from
    ``start_epoch`` every ``prune_every`` epochs up to ``end_epoch``) or ``gradual`` (same epochs, cubic
    schedule of Zhu & Gupta 2017). Multi-step schedules reach the target at the last step.

    Raises:
        ValueError: an argument out of range or inconsistent with the others (one message per problem).
    """

    def __init__(self, **kwargs: Any) -> None:
        self.args = args = validated(PruningArgs, kwargs, "IterativePruning")
        self.criterion, self.target, self.layers = args.criterion, args.target, args.layers
        self.schedule, self.epochs, self.start_epoch = args.schedule, args.epochs, args.start_epoch
        self.end_epoch, self.prune_every = args.end_epoch, args.prune_every
        self.adjust_dropout = args.adjust_dropout
        self.dropout_p: dict[str, float] = {}  # original rate of each adjusted dropout (D_o)
        self.dropout_adjusted: dict[str, float] = {}  # the rate it retrains with now (D_r), saved for inspection
        self.steps: list[int] = []

    # ------------------------------------------------------------------------------- validation
    def check(self, model: nn.Module, max_epochs: int) -> dict[str, float]:
        """Validates the layer names and the schedule against the model and the run length.

        Returns:
            The per-layer target ({full layer name: keep ratio or sensitivity}).

        Raises:
            ValueError: unknown or ambiguous layer names (listing the prunable ones), epochs beyond
                ``max_epochs``, or a criterion that cannot apply to a selected layer.
        """
        targets = per_layer(model, self.target, self.layers, "keep_ratio" if self.criterion != "std" else "sensitivity")
        if not targets:
            raise ValueError(f"no layer selected; prunable layers: {', '.join(prunable_layers(model))}")
        layers = prunable_layers(model)
        for name in targets:
            if self.criterion == "std" and layers[name].weight.numel() < 2:
                raise ValueError(f"criterion 'std' cannot apply to {name}: it has fewer than 2 weights")
        self.steps = schedule_epochs(self.schedule, max_epochs, self.epochs, self.start_epoch, self.end_epoch,
                                     self.prune_every)
        return targets

    def _params(self, model: nn.Module, targets: dict[str, float]) -> dict[str, tuple[nn.Parameter, float]]:
        layers = prunable_layers(model)
        return {f"{name}.weight": (layers[name].weight, value) for name, value in targets.items()}

    # ------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: LitClassifier, stage: str) -> None:
        if stage != "fit":
            return
        self.targets = self.check(pl_module.model, trainer.max_epochs)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: LitClassifier) -> None:
        if self.adjust_dropout and pl_module.masks:  # resumed: re-apply the adjusted dropout rates
            self._adjust_dropout(pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: LitClassifier) -> None:
        epoch = trainer.current_epoch
        if epoch in self.steps:
            self.prune(trainer, pl_module, self.steps.index(epoch))

    def prune(self, trainer: pl.Trainer, pl_module: LitClassifier, step: int) -> None:
        """Runs pruning step ``step`` (0-based) of the schedule: new masks, report."""
        before = {n: int(pl_module.masks[n].sum()) if n in pl_module.masks else p.numel()
                  for n, (p, _) in self._params(pl_module.model, self.targets).items()}
        params = self._params(pl_module.model, self.targets)
        weights = {n: p.detach() for n, (p, _) in params.items()}
        masks = step_masks(self.criterion, weights, {n: t for n, (_, t) in params.items()}, step, len(self.steps),
                           self.schedule == "gradual", pl_module.masks)
        if trainer.world_size > 1:  # identical on every rank by construction; broadcasting makes it certain
            masks = trainer.strategy.broadcast(masks, src=0)
        pl_module.set_masks(masks)
        if self.adjust_dropout:
            self._adjust_dropout(pl_module)
        self._report(trainer, pl_module, before, step)
        reset_best(trainer)  # best.ckpt must come from after this step

    def _adjust_dropout(self, pl_module: LitClassifier) -> None:
        """Han 2015 §3.5 for every dropout feeding a pruned layer; records and logs the rates now in force."""
        adjust_dropout_(pl_module.model, pl_module.masks, self.dropout_p)
        modules = dict(pl_module.model.named_modules())
        adjusted = {name: float(modules[name].p) for name in self.dropout_p}
        for name, p in adjusted.items():
            if self.dropout_adjusted.get(name) != p:
                log.info(f"Dropout {name}: {self.dropout_p[name]:g} -> {p:.4g} (D_r = D_o * sqrt(C_ir / C_io))")
        self.dropout_adjusted = adjusted

    def _report(self, trainer: pl.Trainer, pl_module: LitClassifier, before: dict[str, int], step: int) -> None:
        metrics, total_kept, total = {}, 0, 0
        for name, param in pl_module.model.named_parameters():
            if not name.endswith(".weight") or name.rsplit(".", 1)[0] not in prunable_layers(pl_module.model):
                continue
            kept = int(pl_module.masks[name].sum()) if name in pl_module.masks else param.numel()
            total_kept, total = total_kept + kept, total + param.numel()
            metrics[f"sparsity/{name.removesuffix('.weight')}"] = 100.0 * kept / param.numel()
            if name in before:
                log.info(f"Pruned {name}: {before[name]:,}/{param.numel():,} "
                         f"({100 * before[name] / param.numel():.2f}%) -> {kept:,}/{param.numel():,} "
                         f"({100 * kept / param.numel():.2f}%)")
        metrics["sparsity/total"] = 100.0 * total_kept / max(total, 1)
        log.info(f"Pruning step {step + 1}/{len(self.steps)} at epoch {trainer.current_epoch}: "
                 f"{total_kept:,}/{total:,} prunable weights kept ({metrics['sparsity/total']:.2f}%, "
                 f"{total / max(total_kept, 1):.1f}x fewer)")
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"dropout_p": self.dropout_p, "dropout_adjusted": self.dropout_adjusted}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.dropout_p = state_dict.get("dropout_p", {})
        self.dropout_adjusted = state_dict.get("dropout_adjusted", {})
