"""``Distillation``: the compressed network learns from a dense one (Hinton et al. 2015, arXiv 1503.02531).

Beyond the paper: Deep Compression retrains the pruned / quantized network on the labels alone. Here a
frozen *teacher* adds a soft term to every training step's loss from ``epoch`` on:

    (1 - alpha) · CE(student, y) + alpha · T² · KL(softmax(teacher / T) ‖ softmax(student / T))

(Hinton's eq. with the T² factor that keeps the soft term's gradients on the scale of the hard one's).
The teacher is the network itself as it is at the start of ``epoch`` (in a one-fit pipeline, the end of the
dense stage; with ``--weights`` and ``epoch: 0``, the pretrained dense model), or another network of the zoo
trained on the same data (``teacher``: a checkpoint, or a config that ``train.py`` trains first; see
``teacher.py``), e.g. a LeNet-5 teaching a LeNet-300-100. The callback fills ``LitClassifier.loss_hook``; its
teacher's weights are its checkpoint state, so ``train.py -r`` resumes with the same teacher. Evaluation
(val / test) and the ``.dcz`` file never involve it.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from pydantic import Field, field_validator
from torch import nn
from typing_extensions import override

from logger import get_logger
from strict_args import StrictArgs, validated

if TYPE_CHECKING:
    from trainer.lit_model import LitClassifier

log = get_logger("distillation")


class DistillationArgs(StrictArgs):
    """The arguments of ``Distillation`` (``trainer.callbacks.Distillation`` in a config)."""

    epoch: int = Field(0, ge=0)  # the teacher teaches from the start of this epoch on
    temperature: float = Field(4.0, gt=0)  # T: softens both distributions (Hinton: 2-20)
    alpha: float = Field(0.5, ge=0, le=1)  # weight of the soft (teacher) term; 1 - alpha on the labels
    teacher: str | None = None  # null: the network itself at `epoch`; a .ckpt; or a .json config trained first

    @field_validator("teacher")
    @classmethod
    def _checkpoint_or_config(cls, value: str | None) -> str | None:
        if value is not None and not value.endswith((".ckpt", ".json")):
            raise ValueError(f"{value!r}: expected null (the network itself at `epoch`), a checkpoint (.ckpt) or a "
                             "config (.json, trained first)")
        return value


class Distillation(Callback):
    """Freezes a teacher at ``epoch`` and adds its soft term to every later training step's loss.

    Args:
        epoch, temperature, alpha, teacher: see ``DistillationArgs``.

    Raises:
        ValueError: an argument out of range (``DistillationArgs``' message).
    """

    def __init__(self, **kwargs: Any) -> None:
        args = validated(DistillationArgs, kwargs, "Distillation")
        self.epoch, self.temperature, self.alpha, self.teacher = args.epoch, args.temperature, args.alpha, args.teacher
        self.network: nn.Module | None = None  # the network `teacher` names, once loaded (use())
        self.model: nn.Module | None = None  # the frozen teacher, from `epoch` on
        self._saved: dict[str, torch.Tensor] | None = None  # its weights, from a resumed checkpoint

    def check(self, model: nn.Module, max_epochs: int) -> dict[str, float]:
        """Checks ``epoch`` against the run before anything trains; no layer is targeted (returns ``{}``).

        Raises:
            ValueError: ``epoch`` outside ``0..max_epochs - 1``.
        """
        if not 0 <= self.epoch < max_epochs:
            raise ValueError(f"epoch {self.epoch} is outside the run's epochs 0..{max_epochs - 1} "
                             f"(trainer.max_epochs={max_epochs})")
        return {}

    def use(self, network: nn.Module) -> None:
        """The other network ``teacher`` names, with its weights (loaded by the config layer, ``teacher.py``)."""
        self.network = network

    def loss(self, x: torch.Tensor, logits: torch.Tensor, hard_loss: torch.Tensor) -> torch.Tensor:
        """``(1 - alpha) · hard_loss + alpha · T² · KL(teacher ‖ student)`` on the batch ``x`` (N, ...)."""
        with torch.no_grad():
            target = F.log_softmax(self.model(x) / self.temperature, dim=1)  # type: ignore[misc]  # (N, classes)
        soft = F.kl_div(F.log_softmax(logits / self.temperature, dim=1), target, log_target=True,
                        reduction="batchmean")
        return (1.0 - self.alpha) * hard_loss + self.alpha * self.temperature ** 2 * soft

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: LitClassifier) -> None:
        if self.model is not None or trainer.current_epoch < self.epoch:
            return
        if self.teacher is not None and self.network is None:
            raise RuntimeError(f"Distillation: teacher {self.teacher} was not loaded (call use() first)")
        source = pl_module.model if self.teacher is None else self.network
        self.model = copy.deepcopy(source).to(pl_module.device).eval().requires_grad_(False)
        if self._saved is not None:  # resumed after the teacher was taken: the same teacher again
            self.model.load_state_dict(self._saved)
        else:
            who = (f"the network at epoch {trainer.current_epoch}" if self.teacher is None
                   else f"{type(self.model).__name__} from {self.teacher}")
            log.info(f"Distillation: {who} is the teacher from now on (T={self.temperature}, alpha={self.alpha})")
        pl_module.loss_hook = self.loss

    @override
    def state_dict(self) -> dict[str, Any]:
        # In every checkpoint once the teacher exists: a resume must not take the resumed network instead.
        return {} if self.model is None else {"teacher": self.model.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved = state_dict.get("teacher")
