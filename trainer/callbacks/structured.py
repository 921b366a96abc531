"""``StructuredPruning``: remove whole units (neurons, conv channels) and input features during training.

Beyond Deep Compression, which prunes single weights: the groups of ``compression.structured`` (a unit's row, its
bias and the next layer's inputs reading it; a first-layer input's column) are ranked by their norm and the
weakest removed on a schedule (``one_shot``, ``every`` or Zhu & Gupta's ``gradual``) until ``units`` (the fraction
of each named layer's outputs kept) and ``inputs`` (the fraction of the first layer's input features kept) are
reached. The removals are masks (``LitClassifier.set_masks``): exact zeros from then on, saved in every
checkpoint, so ``train.py -r`` resumes exactly; the file stores the smaller shape (``compression.model_codec``).
Magnitude pruning (``IterativePruning``) may follow in the same fit, among the units that remain.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from pydantic import Field, model_validator
from torch import nn
from typing_extensions import Self, override

from compression.layers import per_layer, prunable_layers
from compression.pruning import keep_ratio_at, schedule_epochs
from compression.structured import input_mask, input_norms, top_groups, unit_chain, unit_masks, unit_norms
from logger import get_logger
from strict_args import StrictArgs, validated
from trainer.callbacks.best import reset_best

if TYPE_CHECKING:
    from trainer.lit_model import LitClassifier

log = get_logger("structured")


class StructuredArgs(StrictArgs):
    """The arguments of ``StructuredPruning`` (``trainer.callbacks.StructuredPruning`` in a config)."""

    units: dict[str, float] | None = None  # {hidden layer: fraction of its output units kept at the end}
    inputs: float | None = None  # fraction of the first layer's input features (a conv: input channels) kept
    schedule: Literal["one_shot", "every", "gradual"] = "gradual"  # one_shot, every, gradual (Zhu & Gupta's cubic)
    start_epoch: int = Field(0, ge=0)  # first removal
    end_epoch: int | None = None  # last removal of "every" / "gradual" (default: the run's last epoch)
    prune_every: int = Field(1, ge=1)  # epochs between removals

    @model_validator(mode="after")
    def _targets(self) -> Self:
        if not self.units and self.inputs is None:
            raise ValueError("name what to remove: units ({layer: fraction kept}) and/or inputs (fraction kept)")
        for key, value in {**(self.units or {}), **({} if self.inputs is None else {"inputs": self.inputs})}.items():
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{key}: the fraction kept must be in (0, 1], got {value}")
        return self


class StructuredPruning(Callback):
    """Removes the weakest units / input features at the scheduled epochs (see the module docstring).

    Raises:
        ValueError: an argument out of range or a network whose units cannot be removed (one message each).
    """

    def __init__(self, **kwargs: Any) -> None:
        self.args = validated(StructuredArgs, kwargs, "StructuredPruning")
        self.steps: list[int] = []
        self.chain: dict = {}
        self.first: str | None = None  # the first layer's weight, when inputs are removed

    def check(self, model: nn.Module, max_epochs: int) -> dict[str, float]:
        """Resolves the layers and the schedule against the model and the run; returns ``{}`` (no weight-level
        targets).

        Raises:
            ValueError: unknown layers, the last layer named, a network that is not a plain chain, epochs
                outside the run.
        """
        a = self.args
        targets = per_layer(model, a.units, None, "units") if a.units else {}
        self.chain = unit_chain(model, list(targets))
        self.targets = targets
        self.first = f"{next(iter(prunable_layers(model)))}.weight" if a.inputs is not None else None
        self.steps = schedule_epochs(a.schedule, max_epochs, None, a.start_epoch, a.end_epoch, a.prune_every)
        return {}

    # ------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: LitClassifier, stage: str) -> None:
        if stage == "fit":
            self.check(pl_module.model, trainer.max_epochs)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: LitClassifier) -> None:
        if trainer.current_epoch in self.steps:
            self.remove(trainer, pl_module, self.steps.index(trainer.current_epoch))

    def remove(self, trainer: pl.Trainer, pl_module: LitClassifier, step: int) -> None:
        """Removal step ``step`` (0-based): masks for the weakest groups, merged with the installed ones."""
        a, n = self.args, len(self.steps)
        params = dict(pl_module.model.named_parameters())
        current = pl_module.masks
        masks: dict[str, torch.Tensor] = {}

        def merge(name: str, mask: torch.Tensor) -> None:
            base = masks.get(name, current.get(name))
            masks[name] = mask if base is None else base.to(mask.device) & mask

        lines = []
        for name, units in self.chain.items():
            bias = f"{name}.bias"
            alive = current[bias].clone() if bias in current else torch.ones(units.count, dtype=torch.bool)
            keep_ratio = keep_ratio_at(step, n, self.targets[name], a.schedule == "gradual")
            alive = alive.to(params[bias].device)
            keep = top_groups(unit_norms(params, units), alive, round(keep_ratio * units.count))
            for param, mask in unit_masks(params, units, keep).items():
                merge(param, mask)
            lines.append(f"{name} {int(alive.sum())} -> {int(keep.sum())}/{units.count} units")
        if self.first is not None:
            weight = params[self.first]
            mask = masks.get(self.first, current.get(self.first))
            alive = (mask.transpose(0, 1).flatten(1).any(1) if mask is not None
                     else torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device))
            keep_ratio = keep_ratio_at(step, n, a.inputs, a.schedule == "gradual")  # type: ignore[arg-type]
            keep = top_groups(input_norms(weight), alive.to(weight.device), round(keep_ratio * weight.shape[1]))
            merge(self.first, input_mask(weight, keep))
            lines.append(f"{self.first.removesuffix('.weight')} {int(alive.sum())} -> {int(keep.sum())}/"
                         f"{weight.shape[1]} inputs")
        if trainer.world_size > 1:  # identical on every rank by construction; broadcasting makes it certain
            masks = trainer.strategy.broadcast(masks, src=0)
        pl_module.set_masks(masks)
        reset_best(trainer)  # best.ckpt must come from after this step
        log.info(f"Structured pruning step {step + 1}/{n} at epoch {trainer.current_epoch}: {'; '.join(lines)}")
