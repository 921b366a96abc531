"""The classifier LightningModule: loss, top-1/top-5 error (in %), optimizer and scheduler as typed parts.

One ``model_step`` serves train/val/test (lightning-hydra-template's shape). Errors are logged in
percent (``val/top1_err`` = 1.64 means 1.64 % misclassified) to compare directly with the papers. The module
reads no config: the config layer hands it a ``TrainingParts`` (``builders.training_parts``).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from logger import get_logger
from trainer.compression_state import CompressionState
from utils import CheckpointError

log = get_logger("train")
MODEL_ATTR = "model"  # the attribute holding the network: its weights are "model.*" in a checkpoint
METRICS = ("top1_err", "top5_err")  # the evaluation metrics, in % error

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits (N, C), labels (N,)) -> scalar
# A term a callback adds to the training loss: (inputs, logits, loss so far) -> the new loss (Distillation).
LossHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TrainingParts:
    """What the module trains and evaluates with, built by the config layer.

    Attributes:
        num_classes: Outputs of the network.
        loss: The training / evaluation loss.
        optimizer: Builds the optimizer from parameter groups (the codebooks' group sets its own lr).
        scheduler: Builds the learning-rate scheduler (stepped once per epoch); None: a constant rate.
        gradient_clip_val: Clip the total gradient norm to this before each step; None: no clipping.
        metrics: The error metrics logged at validation and test (a subset of ``METRICS``).
        checkpoint_config: Stored as it is in every checkpoint (so that a checkpoint alone rebuilds its run);
            never read here. None: the checkpoints hold no config.
    """

    num_classes: int
    loss: Loss = nn.functional.cross_entropy
    optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer] = torch.optim.SGD
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None
    gradient_clip_val: float | None = None
    metrics: tuple[str, ...] = METRICS
    checkpoint_config: dict[str, Any] | None = None


class TrainingDivergedError(RuntimeError):
    """The weights stopped being finite numbers: every later step would learn nothing."""


def network_state(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The plain ``nn.Module`` weights of a LitClassifier checkpoint (the ``model.`` prefix removed)."""
    prefix = MODEL_ATTR + "."
    return {k.removeprefix(prefix): v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}


def check_checkpoint(ckpt: Mapping[str, Any], path: str | Path) -> None:
    """A loaded checkpoint's network and compression state agree (``CompressionState.check``).

    Raises:
        CheckpointError: naming the file and the tensor.
    """
    try:
        CompressionState.check(ckpt, network_state(ckpt))
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"{path} is inconsistent: {err}; use another checkpoint (e.g. the run's "
                              f"best.ckpt or pruned.ckpt)") from None


def load_weights(model: nn.Module, ckpt: dict[str, Any], path: str | Path) -> None:
    """Copies the network weights of a loaded checkpoint into ``model`` (names and shapes must match), after
    ``check_checkpoint``.

    Raises:
        CheckpointError: an inconsistent checkpoint, or weights that do not fit ``model``.
    """
    check_checkpoint(ckpt, path)
    try:
        result = model.load_state_dict(network_state(ckpt), strict=False)
    except RuntimeError as err:  # shape mismatch
        raise CheckpointError(f"{path} does not fit {type(model).__name__}: {str(err)[:300]}") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{path} does not fit {type(model).__name__}: missing "
                              f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")


class LitClassifier(pl.LightningModule):
    """Wraps a plain ``nn.Module`` classifier.

    Args:
        model: The network (from ``models.MODELS``); exposed as ``self.model``.
        parts: Loss, optimizer and scheduler factories, clipping, metrics (``TrainingParts``).
    """

    def __init__(self, model: nn.Module, parts: TrainingParts) -> None:
        super().__init__()
        self.model = model
        self.parts = parts
        self.loss_fn = parts.loss
        num_classes = parts.num_classes
        self.metrics = list(parts.metrics)
        # One pair of accuracy meters per evaluation stage; top-5 needs at least 5 classes.
        self.acc = nn.ModuleDict({
            stage: nn.ModuleDict({
                "top1_err": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
                "top5_err": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
            }) for stage in ("val", "test")
        })
        # Pruning masks and codebooks, installed by the compression callbacks (or restored from a
        # checkpoint) and enforced at every step; see trainer/compression_state.py (its checkpoint keys
        # start with this attribute's name, STATE_ATTR).
        self.compression = CompressionState()
        self.codebook_lr: float | None = None  # learning rate of the codebooks (None: the optimizer's)
        self.loss_hook: LossHook | None = None  # set by a callback (Distillation) that adds a term to the loss
        # The optimizer step is written out in training_step (Lightning's manual optimization): the
        # automatic loop's closures and extra hooks cost ~0.2 ms a step, ~10 % of a LeNet step on CPU.
        self.automatic_optimization = False
        self.gradient_clip_val = parts.gradient_clip_val

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        # Read by DistributedDataParallel when it wraps this module. The codebooks get their gradients in
        # on_after_backward, from weight gradients DDP has already averaged, so DDP must neither expect an
        # autograd gradient for them (it would fail at the second step unless find_unused_parameters=True,
        # whatever the strategy's name) nor average them again.
        return self.compression.codebook_keys()

    def model_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor,
                                                                             torch.Tensor]:
        x, y = batch
        logits = self(x)  # (N, num_classes)
        return self.loss_fn(logits, y), logits, y

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # self.log costs ~1 ms per call on CPU, as much as a LeNet step: call it only on the steps the
        # loggers record anyway (Lightning writes when (global_step + 1) % log_every_n_steps == 0), deciding
        # before optimizer.step(), which increments global_step.
        log_now = (self.global_step + 1) % self.trainer.log_every_n_steps == 0
        optimizer = self.optimizers()
        loss, logits, _ = self.model_step(batch)
        if self.loss_hook is not None:
            loss = self.loss_hook(batch[0], logits, loss)
        optimizer.zero_grad()
        self.manual_backward(loss)  # then on_after_backward: masked gradients, codebook gradients
        optimizer.step()  # calls on_before_optimizer_step (gradient clipping) first, then updates
        self.compression.apply_(self.model)  # exact zeros and codebook values after every update
        if log_now:
            self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
            self._check_finite()
        return loss

    def _check_finite(self) -> None:
        """Stops a diverged run within ``log_every_n_steps`` steps, before it writes a checkpoint (one device
        sync on the steps that log anyway). Weights, not the loss: under 16-mixed a non-finite loss is a step
        the gradient scaler skips."""
        if bool(torch.stack([p.isfinite().all() for p in self.model.parameters()]).all()):
            return
        raise TrainingDivergedError(
            f"training diverged in epoch {self.current_epoch} (by step {self.global_step}): the weights are no longer "
            f"finite (NaN/inf), so the rest of the run would learn nothing; lower optimizer.args.lr or set "
            f"trainer.gradient_clip_val (e.g. 5.0) and start again (the checkpoints written so far are from before)")

    def _eval_step(self, stage: str, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        loss, logits, y = self.model_step(batch)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y),
                 sync_dist=True)
        for meter in self.acc[stage].values():
            meter.update(logits, y)

    def _eval_epoch_end(self, stage: str) -> None:
        values = {}
        for name in self.metrics:
            meter = self.acc[stage][name]
            values[name] = 100.0 * (1.0 - meter.compute())  # compute() sums the counts of every DDP rank
            # Equal on every rank already; sync_dist says so (and stops Lightning's warning that it might not be).
            self.log(f"{stage}/{name}", values[name], prog_bar=name == "top1_err", sync_dist=True)
            meter.reset()
        if stage == "val" and self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            summary = ", ".join(f"{stage}/{k} {float(v):.2f}%" for k, v in values.items())
            log.info(f"epoch {self.current_epoch}: {summary}")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # ------------------------------------------------------------------------------------- compression
    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Pruning masks by parameter name of ``self.model`` (True = kept)."""
        return self.compression.masks

    def set_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Installs pruning masks: zeroes the pruned weights and their optimizer state (momentum, Adam moments)."""
        self.compression.set_masks(self.model, masks)
        if self._trainer is not None:
            self.compression.clear_optimizer_state_(self.model, self.trainer.optimizers)

    def load_compression(self, checkpoint: Mapping[str, Any], resume: bool = True) -> None:
        """Installs the masks and codebooks stored in a checkpoint (before the optimizer is built).

        ``resume=False`` for a new run from the checkpoint's weights (see ``CompressionState.load_entries``).

        Raises:
            CheckpointError: the checkpoint's compression entries do not fit the model.
        """
        try:
            self.compression.load_entries(self.model, checkpoint, resume)
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            raise CheckpointError(f"compression state does not fit {type(self.model).__name__}: {err}") from None
        self.compression.apply_(self.model)

    def on_after_backward(self) -> None:
        self.compression.route_gradients_(self.model)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Here, not in training_step: under mixed precision the gradients are unscaled by now.
        if self.gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")

    def on_train_epoch_end(self) -> None:
        # Manual optimization steps the scheduler itself; validation has run by now (val/loss is fresh).
        scheduler = self.lr_schedulers()
        if scheduler is None:
            return
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if "val/loss" not in self.trainer.callback_metrics:  # parse_config rejects limit_val_batches 0
                raise RuntimeError("lr_scheduler ReduceLROnPlateau steps on val/loss, but no validation ran "
                                   f"in epoch {self.current_epoch}")
            scheduler.step(self.trainer.callback_metrics["val/loss"])
        else:
            scheduler.step()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.compression.load_entries(self.model, checkpoint)  # before the state dict is restored
        _carry_step_count_to_manual_(checkpoint)
        # A resumed fit draws the random numbers the interrupted one would have drawn next (DataLoader
        # shuffling and augmentation, dropout). Now, before Lightning builds the train iterator (which draws a
        # seed); the sanity-check validation in between runs under Lightning's isolate_rng.
        if "rng_states" in checkpoint and self._trainer is not None and self.trainer.state.fn == "fit":
            _set_rng_states(checkpoint["rng_states"])

    def configure_optimizers(self) -> Any:
        groups: list[dict[str, Any]] = [{"params": list(self.model.parameters())}]
        if len(self.compression.codebooks):  # trained from the first step they exist (paper §3.3)
            group = {"params": list(self.compression.codebooks.parameters()), "weight_decay": 0.0}
            if self.codebook_lr is not None:
                group["lr"] = self.codebook_lr
            groups.append(group)
        optimizer = self.parts.optimizer(groups)
        if self.parts.scheduler is None:
            return optimizer
        scheduler = self.parts.scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}  # stepped in on_train_epoch_end

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.parts.checkpoint_config is not None:
            checkpoint["config"] = self.parts.checkpoint_config  # plain JSON types: loadable with weights_only=True
        checkpoint.update(self.compression.checkpoint_entries())
        checkpoint["rng_states"] = _rng_states()


def _carry_step_count_to_manual_(checkpoint: dict[str, Any]) -> None:
    """Lets a checkpoint written under automatic optimization (before this class switched to manual
    optimization) resume with its step count: global_step is read from the manual loop's counter, which
    such a checkpoint saved as zeros. Runs before Lightning restores the loops from the same dict."""
    loops = checkpoint.get("loops", {}).get("fit_loop", {})
    automatic = loops.get("epoch_loop.automatic_optimization.optim_progress", {}).get("optimizer", {}).get("step")
    manual = loops.get("epoch_loop.manual_optimization.optim_step_progress")
    if automatic and manual and manual["total"]["completed"] == 0 and automatic["total"]["completed"] > 0:
        loops["epoch_loop.manual_optimization.optim_step_progress"] = copy.deepcopy(automatic)


def _rng_states() -> dict[str, Any]:
    """The global generators a training epoch draws from: torch (CPU, every CUDA device) and Python's
    ``random``. Tensors, tuples and ints only: loadable with weights_only=True."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate()}


def _set_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    random.setstate(states["python"])
