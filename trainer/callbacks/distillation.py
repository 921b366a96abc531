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
from collections.abc import Callable
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
    cache: bool = False  # the teacher's outputs computed once over a training set held in memory (MNIST family)

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
        self.cache = args.cache
        self.outputs: TeacherOutputs | None = None  # the cached outputs, when `cache` and the data allow it
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
            teacher = self.model(x) if self.outputs is None else self.outputs.lookup(x)  # type: ignore[misc]
            target = F.log_softmax(teacher / self.temperature, dim=1)  # (N, classes)
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
        data = getattr(trainer, "datamodule", None)
        train_set = getattr(data, "train_set", None)
        if self.cache and isinstance(train_set, tuple) and torch.is_tensor(train_set[0]):
            def fed(start: int, stop: int) -> torch.Tensor:  # the inputs as training batches reach the model
                chunk = (train_set[0][start:stop].to(pl_module.device), train_set[1][start:stop].to(pl_module.device))
                return data.on_after_batch_transfer(chunk, 0)[0]  # type: ignore[union-attr]

            self.outputs = TeacherOutputs(self.model, fed, len(train_set[0]))
            log.info(f"Distillation: the teacher's outputs on the {len(train_set[0]):,} training inputs are computed "
                     f"once and looked up")
        elif self.cache:
            log.info("Distillation: cache is on, but the training data are not held in memory as they are fed "
                     "(augmentation, or read from files): the teacher runs on every batch")
        pl_module.loss_hook = self.loss

    @override
    def state_dict(self) -> dict[str, Any]:
        # In every checkpoint once the teacher exists: a resume must not take the resumed network instead.
        return {} if self.model is None else {"teacher": self.model.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved = state_dict.get("teacher")


class TeacherOutputs:
    """The teacher's outputs on every input of a training set held in memory, computed once in a fixed order
    (chunks of ``CHUNK``), so that an interrupted and resumed run looks up the same values as an uninterrupted one.

    A batch's inputs are found by content: an exact integer hash of each input's floating-point bits (a dot product in
    int64 arithmetic, which wraps: no rounding, order-free), so the loader needs no change. Equal inputs have equal
    outputs; an input not found (never, for a loader that slices the set) is run through the teacher.
    """

    CHUNK = 1024

    def __init__(self, teacher: nn.Module, fed: Callable[[int, int], torch.Tensor], n: int) -> None:
        """``fed(start, stop)``: inputs ``start .. stop - 1`` of the set, as a training batch reaches the model."""
        self.teacher = teacher
        self.weights: torch.Tensor | None = None
        keys, outputs = [], []
        with torch.no_grad():
            for start in range(0, n, self.CHUNK):
                chunk = fed(start, min(start + self.CHUNK, n))
                keys.append(self._keys(chunk))
                outputs.append(teacher(chunk))
        keys_all = torch.cat(keys)
        self.keys, order = torch.sort(keys_all)
        self.values = torch.cat(outputs)[order]

    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1).contiguous()  # its bits as integers of its width (float16 .. float64)
        bits = flat.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]).to(torch.int64)
        if self.weights is None:
            generator = torch.Generator().manual_seed(0)
            self.weights = torch.randint(1, 1 << 62, (bits.shape[1],), generator=generator).to(x.device) | 1
        return (bits * self.weights).sum(1)

    def lookup(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's outputs on the batch ``x`` (N, ...)."""
        keys = self._keys(x)
        at = torch.searchsorted(self.keys, keys).clamp_max(len(self.keys) - 1)
        found = self.keys[at] == keys
        if bool(found.all()):
            return self.values[at]
        out = self.values[at].clone()
        out[~found] = self.teacher(x[~found])
        return out
