"""``IterativePruning``: prune during (re)training as in Han et al. 2015 (arXiv 1506.02626 §3).

The callback decides *when* (the schedule) and *what* (layers and targets); the masks come from
``compression.pruning`` and are installed in ``LitClassifier.set_masks``, which keeps pruned weights at
exactly zero through gradients, optimizer updates and weight decay, and saves the masks in every
checkpoint. Resuming (``train.py -r``) restores the masks and continues with the next scheduled step.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from compression.pruning import (SCHEDULES, adjusted_dropout, global_magnitude_masks, keep_ratio_at,
                                 magnitude_mask, progress, schedule_epochs, std_threshold_mask)
from logger import get_logger
from trainer.callbacks.best import reset_best
from trainer.callbacks.layers import per_layer, prunable_layers

CRITERIA = ("magnitude", "std", "global")
log = get_logger("pruning")


class IterativePruning(Callback):
    """Prunes the selected layers at the scheduled epochs.

    Args:
        criterion: ``magnitude`` (keep a fraction of each layer), ``std`` (Han's threshold
            ``|w| < s × std(w)`` per layer) or ``global`` (one magnitude threshold over all selected layers).
        keep_ratio: Target fraction kept: one number, or ``{layer name or type: fraction}``
            (``{"fc1": 0.08, "fc2": 0.09, "fc3": 0.26}``); for ``magnitude`` and ``global``.
        sensitivity: The quality parameter ``s`` of the ``std`` criterion, global or per layer.
        layers: Layer names or types to prune (default: every Linear and Conv2d, or the keys of a dict).
        prune_bias: Prune biases too, with their layer's target.
        schedule: ``one_shot`` (at ``start_epoch``), ``epochs`` (the list ``epochs``), ``every`` (from
            ``start_epoch`` every ``prune_every`` epochs up to ``end_epoch``) or ``gradual`` (same epochs,
            cubic schedule of Zhu & Gupta 2017). Multi-step schedules reach the target at the last step.
        epochs: Pruning epochs for ``schedule="epochs"`` (0-based).
        start_epoch: First pruning epoch.
        end_epoch: Last pruning epoch for ``every`` / ``gradual`` (default: the last epoch).
        prune_every: Epochs between pruning steps.
        reset_weights: After each step, reset surviving weights to their values at fit start (lottery
            ticket rewinding); off by default, as in the paper.
        adjust_dropout: Scale the dropout feeding each pruned layer by ``sqrt(keep ratio)`` (§3.5).
    """

    def __init__(self, criterion: Literal["magnitude", "std", "global"] = "magnitude",
                 keep_ratio: float | dict[str, float] | None = None,
                 sensitivity: float | dict[str, float] | None = None, layers: list[str] | None = None,
                 prune_bias: bool = False, schedule: Literal["one_shot", "epochs", "every", "gradual"] = "one_shot",
                 epochs: list[int] | None = None, start_epoch: int = 0, end_epoch: int | None = None,
                 prune_every: int = 1, reset_weights: bool = False, adjust_dropout: bool = False) -> None:
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        target, name = (sensitivity, "sensitivity") if criterion == "std" else (keep_ratio, "keep_ratio")
        other = "keep_ratio" if criterion == "std" else "sensitivity"
        if target is None:
            raise ValueError(f"criterion {criterion!r} needs {name}")
        if (keep_ratio if criterion == "std" else sensitivity) is not None:
            raise ValueError(f"criterion {criterion!r} takes {name}, not {other}")
        if criterion == "global" and isinstance(keep_ratio, dict):
            raise ValueError("criterion 'global' takes one keep_ratio for all layers, not a dict")
        for key, value in (target.items() if isinstance(target, dict) else [(name, target)]):
            if criterion != "std" and not 0.0 < value <= 1.0:
                raise ValueError(f"keep_ratio {key}: must be in (0, 1], got {value}")
            if criterion == "std" and value < 0:
                raise ValueError(f"sensitivity {key}: must be >= 0, got {value}")
        if schedule == "epochs" and not epochs:
            raise ValueError("schedule 'epochs' needs a non-empty 'epochs' list")
        self.criterion, self.target, self.layers, self.prune_bias = criterion, target, layers, prune_bias
        self.schedule, self.epochs, self.start_epoch = schedule, epochs, start_epoch
        self.end_epoch, self.prune_every = end_epoch, prune_every
        self.reset_weights, self.adjust_dropout = reset_weights, adjust_dropout
        self.initial_state: dict[str, torch.Tensor] = {}  # for reset_weights
        self.dropout_p: dict[str, float] = {}  # original rate of each adjusted dropout
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
        out = {}
        for name, value in targets.items():
            out[f"{name}.weight"] = (layers[name].weight, value)
            if self.prune_bias and layers[name].bias is not None:
                out[f"{name}.bias"] = (layers[name].bias, value)
        return out

    # ------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.targets = self.check(pl_module.model, trainer.max_epochs)
        if self.reset_weights and not self.initial_state:
            self.initial_state = {n: p.detach().clone() for n, (p, _) in
                                  self._params(pl_module.model, self.targets).items()}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.adjust_dropout and pl_module.masks:  # resumed: re-apply the adjusted dropout rates
            self._adjust_dropout(pl_module.model, pl_module.masks)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch in self.steps:
            self.prune(trainer, pl_module, self.steps.index(epoch))

    def _step_masks(self, pl_module: pl.LightningModule, step: int) -> dict[str, torch.Tensor]:
        params = self._params(pl_module.model, self.targets)
        n, gradual = len(self.steps), self.schedule == "gradual"
        if self.criterion == "global":
            keep = keep_ratio_at(step, n, float(self.target), gradual)
            return global_magnitude_masks({k: p for k, (p, _) in params.items()}, keep, pl_module.masks)
        masks = {}
        for name, (param, target) in params.items():
            if self.criterion == "std":
                masks[name] = std_threshold_mask(param, target * progress(step, n), pl_module.masks.get(name))
            else:
                masks[name] = magnitude_mask(param, keep_ratio_at(step, n, target, gradual), pl_module.masks.get(name))
        return masks

    def prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """Runs pruning step ``step`` (0-based) of the schedule: new masks, optional rewind, report."""
        before = {n: int(pl_module.masks[n].sum()) if n in pl_module.masks else p.numel()
                  for n, (p, _) in self._params(pl_module.model, self.targets).items()}
        masks = self._step_masks(pl_module, step)
        if trainer.world_size > 1:  # identical on every rank by construction; broadcasting makes it certain
            masks = trainer.strategy.broadcast(masks, src=0)
        if self.reset_weights:
            with torch.no_grad():
                for name, (param, _) in self._params(pl_module.model, self.targets).items():
                    param.copy_(self.initial_state[name].to(param.device))
        pl_module.set_masks(masks)
        if self.adjust_dropout:
            self._adjust_dropout(pl_module.model, masks)
        self._report(trainer, pl_module, before, step)
        reset_best(trainer)  # best.ckpt must come from after this step

    def _adjust_dropout(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
        for parent_name, parent in model.named_modules():
            children = list(parent.named_children())
            for (drop_name, drop), (layer_name, _) in zip(children, children[1:]):
                weight = f"{parent_name}.{layer_name}.weight".lstrip(".")
                if isinstance(drop, nn.Dropout) and weight in masks:
                    key = f"{parent_name}.{drop_name}".lstrip(".")
                    self.dropout_p.setdefault(key, drop.p)
                    keep = float(masks[weight].float().mean())
                    drop.p = adjusted_dropout(self.dropout_p[key], keep)

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, before: dict[str, int], step: int) -> None:
        metrics, total_kept, total = {}, 0, 0
        for name, param in pl_module.model.named_parameters():
            if not name.endswith(".weight") or name.rsplit(".", 1)[0] not in prunable_layers(pl_module.model):
                continue
            kept = int(pl_module.masks[name].sum()) if name in pl_module.masks else param.numel()
            total_kept, total = total_kept + kept, total + param.numel()
            metrics[f"sparsity/{name.removesuffix('.weight')}"] = 100.0 * kept / param.numel()
            if name in before:
                log.info(f"Pruned {name}: {before[name]:,}/{param.numel():,} ({100 * before[name] / param.numel():.2f}%)"
                         f" -> {kept:,}/{param.numel():,} ({100 * kept / param.numel():.2f}%)")
        metrics["sparsity/total"] = 100.0 * total_kept / max(total, 1)
        log.info(f"Pruning step {step + 1}/{len(self.steps)} at epoch {trainer.current_epoch}: "
                 f"{total_kept:,}/{total:,} prunable weights kept ({metrics['sparsity/total']:.2f}%, "
                 f"{total / max(total_kept, 1):.1f}x fewer)")
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"initial_state": self.initial_state, "dropout_p": self.dropout_p}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.initial_state = state_dict.get("initial_state", {})
        self.dropout_p = state_dict.get("dropout_p", {})
