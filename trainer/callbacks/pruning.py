"""``IterativePruning``: prune during (re)training as in Han et al. 2015 (arXiv 1506.02626 §3).

The callback decides *when* (the schedule) and *what* (layers and targets); the masks come from
``compression.pruning`` and are installed in ``LitClassifier.set_masks``, which keeps pruned weights at
exactly zero through gradients, optimizer updates and weight decay, and saves the masks in every
checkpoint. Resuming (``train.py -r``) restores the masks and continues with the next scheduled step.

``splicing`` (beyond the paper: Dynamic Network Surgery, Guo et al. 2016, arXiv 1608.04493) lets a pruning
decision be undone while the schedule runs: the network computes with the pruned weights at zero, as always,
but each pruned weight keeps a shadow value that takes the plain gradient step of its position at every
update (the learning rate of its group; no momentum or weight decay). Each pruning step then chooses among all
weights, the shadows included, so a weight whose shadow has grown comes back with that value. From the last
step on the mask is final and the shadows are dropped. The shadows are saved in every checkpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from pydantic import model_validator
from torch import nn
from typing_extensions import Self, override

from compression.layers import per_layer, prunable_layers
from compression.pruning import CRITERIA, SCHEDULES, adjust_dropout_, check_block, schedule_epochs, step_masks
from logger import get_logger
from trainer.callbacks.args import StrictArgs, validated
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
    prune_bias: bool = False  # prune biases too, with their layer's target
    schedule: Literal[SCHEDULES] = "one_shot"  # type: ignore[valid-type]
    epochs: list[int] | None = None  # pruning epochs of schedule "epochs" (0-based)
    start_epoch: int = 0  # first pruning epoch
    end_epoch: int | None = None  # last pruning epoch of "every" / "gradual" (default: the last epoch)
    prune_every: int = 1  # epochs between pruning steps
    reset_weights: bool = False  # rewind survivors to their fit-start values after each step (lottery ticket)
    adjust_dropout: bool = False  # D_r = D_o * sqrt(C_ir / C_io) for the dropout feeding each pruned layer
    splicing: bool = False  # pruned weights keep learning in a shadow copy until the last step and may come back
    block: int | dict[str, int] = 1  # magnitude: keep/drop runs of this many consecutive weights of a row

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
        if self.splicing and (self.schedule == "one_shot" or self.reset_weights):
            raise ValueError("splicing lets later pruning steps bring weights back: it needs a schedule of several "
                             "steps ('every', 'gradual' or 'epochs'), not 'one_shot', and no reset_weights")
        blocks = self.block.values() if isinstance(self.block, dict) else [self.block]
        if any(b < 1 for b in blocks):
            raise ValueError(f"block must be >= 1 (1: weight by weight), got {self.block}")
        if any(b > 1 for b in blocks) and self.criterion != "magnitude":
            raise ValueError(f"block applies to criterion 'magnitude' (each layer to its keep_ratio), not "
                             f"{self.criterion!r}")
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
    prune_bias, schedule, epochs, start_epoch, end_epoch, prune_every, reset_weights, adjust_dropout, splicing,
    block).
    ``schedule``: ``one_shot`` (at ``start_epoch``), ``epochs`` (the list ``epochs``), ``every`` (from
    ``start_epoch`` every ``prune_every`` epochs up to ``end_epoch``) or ``gradual`` (same epochs, cubic
    schedule of Zhu & Gupta 2017). Multi-step schedules reach the target at the last step.

    Raises:
        ValueError: an argument out of range or inconsistent with the others (one message per problem).
    """

    def __init__(self, **kwargs: Any) -> None:
        self.args = args = validated(PruningArgs, kwargs, "IterativePruning")
        self.criterion, self.target, self.layers, self.prune_bias = (args.criterion, args.target, args.layers,
                                                                     args.prune_bias)
        self.schedule, self.epochs, self.start_epoch = args.schedule, args.epochs, args.start_epoch
        self.end_epoch, self.prune_every = args.end_epoch, args.prune_every
        self.reset_weights, self.adjust_dropout, self.splicing = args.reset_weights, args.adjust_dropout, args.splicing
        self.block = args.block
        self.blocks: dict[str, int] = {}  # {weight name: block length}, set by check()
        self.shadow: dict[str, torch.Tensor] = {}  # splicing: pruned weights' shadow values (0 where kept)
        self._grads: dict[str, torch.Tensor] = {}  # splicing: this step's gradients, before they are masked
        self.initial_state: dict[str, torch.Tensor] = {}  # for reset_weights
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
                ``max_epochs``, a criterion that cannot apply to a selected layer, or a block that does not
                split a layer's rows.
        """
        targets = per_layer(model, self.target, self.layers, "keep_ratio" if self.criterion != "std" else "sensitivity")
        if not targets:
            raise ValueError(f"no layer selected; prunable layers: {', '.join(prunable_layers(model))}")
        layers = prunable_layers(model)
        for name in targets:
            if self.criterion == "std" and layers[name].weight.numel() < 2:
                raise ValueError(f"criterion 'std' cannot apply to {name}: it has fewer than 2 weights")
        blocks = per_layer(model, self.block, None, "block") if isinstance(self.block, dict) else (
            dict.fromkeys(targets, self.block) if self.block > 1 else {})
        self.blocks = {}
        for name, block in blocks.items():
            if name not in targets:
                raise ValueError(f"block: {name} is not pruned (pruned layers: {', '.join(targets)})")
            try:
                check_block(layers[name].weight.shape, block)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
            self.blocks[f"{name}.weight"] = block
        self.steps = schedule_epochs(self.schedule, max_epochs, self.epochs, self.start_epoch, self.end_epoch,
                                     self.prune_every)
        if self.splicing and len(self.steps) < 2:
            raise ValueError(f"splicing needs at least two pruning steps (a weight can only come back at a later "
                             f"one); this schedule has {len(self.steps)}")
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
    def setup(self, trainer: pl.Trainer, pl_module: LitClassifier, stage: str) -> None:
        if stage != "fit":
            return
        self.targets = self.check(pl_module.model, trainer.max_epochs)
        if self.reset_weights and not self.initial_state:
            self.initial_state = {n: p.detach().clone() for n, (p, _) in
                                  self._params(pl_module.model, self.targets).items()}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: LitClassifier) -> None:
        if self.adjust_dropout and pl_module.masks:  # resumed: re-apply the adjusted dropout rates
            self._adjust_dropout(pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: LitClassifier) -> None:
        epoch = trainer.current_epoch
        if epoch in self.steps:
            self.prune(trainer, pl_module, self.steps.index(epoch))

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: LitClassifier) -> None:
        # Runs before LitClassifier's own hook, which masks the gradients: the shadows need them whole.
        if self.shadow:
            params = dict(pl_module.model.named_parameters())
            self._grads = {n: params[n].grad.detach().clone() for n in self.shadow if params[n].grad is not None}

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: LitClassifier,
                                 optimizer: torch.optim.Optimizer) -> None:
        if not self._grads:
            return
        params = dict(pl_module.model.named_parameters())
        lrs = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
        with torch.no_grad():
            for name, grad in self._grads.items():
                shadow = self.shadow[name] = self.shadow[name].to(grad.device)
                shadow.sub_(lrs[id(params[name])] * grad.masked_fill_(pl_module.masks[name].to(grad.device), 0.0))
        self._grads = {}

    def prune(self, trainer: pl.Trainer, pl_module: LitClassifier, step: int) -> None:
        """Runs pruning step ``step`` (0-based) of the schedule: new masks, optional rewind, report."""
        before = {n: int(pl_module.masks[n].sum()) if n in pl_module.masks else p.numel()
                  for n, (p, _) in self._params(pl_module.model, self.targets).items()}
        params = self._params(pl_module.model, self.targets)
        weights, current = {n: p.detach() for n, (p, _) in params.items()}, pl_module.masks
        if self.splicing:  # choose among every weight: a pruned one competes with its shadow value
            weights = {n: torch.where(current[n].to(w.device), w, self.shadow[n].to(w.device)) if n in self.shadow
                       else w.clone() for n, w in weights.items()}
            current = {}
        masks = step_masks(self.criterion, weights, {n: t for n, (_, t) in params.items()}, step, len(self.steps),
                           self.schedule == "gradual", current, self.blocks)
        if trainer.world_size > 1:  # identical on every rank by construction; broadcasting makes it certain
            masks = trainer.strategy.broadcast(masks, src=0)
        if self.reset_weights:
            with torch.no_grad():
                for name, (param, _) in self._params(pl_module.model, self.targets).items():
                    param.copy_(self.initial_state[name].to(param.device))
        revived = self._splice(pl_module, weights, masks, step) if self.splicing else {}
        if not self.splicing:
            pl_module.set_masks(masks)
        if self.adjust_dropout:
            self._adjust_dropout(pl_module)
        self._report(trainer, pl_module, before, step, revived)
        reset_best(trainer)  # best.ckpt must come from after this step

    def _splice(self, pl_module: LitClassifier, weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                step: int) -> dict[str, int]:
        """Installs ``masks`` with the kept weights at their (shadow) values and keeps the others' values as
        shadows, until the last step; returns how many weights came back in each tensor."""
        old = {n: pl_module.masks[n].to(w.device) if n in pl_module.masks else torch.ones_like(w, dtype=torch.bool)
               for n, w in weights.items()}
        pl_module.set_masks(masks)
        params, last = dict(pl_module.model.named_parameters()), step == len(self.steps) - 1
        with torch.no_grad():
            for name, weight in weights.items():
                mask = masks[name].to(weight.device)
                params[name].copy_(weight.masked_fill(~mask, 0.0))
                if not last:
                    self.shadow[name] = weight.masked_fill(mask, 0.0)
        if last:
            self.shadow = {}
        return {n: int((masks[n].to(w.device) & ~old[n]).sum()) for n, w in weights.items()}

    def _adjust_dropout(self, pl_module: LitClassifier) -> None:
        """Han 2015 §3.5 for every dropout feeding a pruned layer; records and logs the rates now in force."""
        adjust_dropout_(pl_module.model, pl_module.masks, self.dropout_p)
        modules = dict(pl_module.model.named_modules())
        adjusted = {name: float(modules[name].p) for name in self.dropout_p}
        for name, p in adjusted.items():
            if self.dropout_adjusted.get(name) != p:
                log.info(f"Dropout {name}: {self.dropout_p[name]:g} -> {p:.4g} (D_r = D_o * sqrt(C_ir / C_io))")
        self.dropout_adjusted = adjusted

    def _report(self, trainer: pl.Trainer, pl_module: LitClassifier, before: dict[str, int], step: int,
                revived: dict[str, int]) -> None:
        metrics, total_kept, total = {}, 0, 0
        for name, param in pl_module.model.named_parameters():
            if not name.endswith(".weight") or name.rsplit(".", 1)[0] not in prunable_layers(pl_module.model):
                continue
            kept = int(pl_module.masks[name].sum()) if name in pl_module.masks else param.numel()
            total_kept, total = total_kept + kept, total + param.numel()
            metrics[f"sparsity/{name.removesuffix('.weight')}"] = 100.0 * kept / param.numel()
            if name in before:
                back = f" ({revived[name]:,} spliced back)" if name in revived else ""
                log.info(f"Pruned {name}: {before[name]:,}/{param.numel():,} "
                         f"({100 * before[name] / param.numel():.2f}%) -> {kept:,}/{param.numel():,} "
                         f"({100 * kept / param.numel():.2f}%){back}")
                if name in revived:
                    metrics[f"spliced/{name.removesuffix('.weight')}"] = float(revived[name])
        metrics["sparsity/total"] = 100.0 * total_kept / max(total, 1)
        log.info(f"Pruning step {step + 1}/{len(self.steps)} at epoch {trainer.current_epoch}: "
                 f"{total_kept:,}/{total:,} prunable weights kept ({metrics['sparsity/total']:.2f}%, "
                 f"{total / max(total_kept, 1):.1f}x fewer)")
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"initial_state": self.initial_state, "dropout_p": self.dropout_p,
                "dropout_adjusted": self.dropout_adjusted, "shadow": {n: t.cpu() for n, t in self.shadow.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.initial_state = state_dict.get("initial_state", {})
        self.dropout_p = state_dict.get("dropout_p", {})
        self.dropout_adjusted = state_dict.get("dropout_adjusted", {})
        self.shadow = dict(state_dict.get("shadow", {}))
