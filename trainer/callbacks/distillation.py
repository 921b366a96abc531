"""``Distillation``: the compressed network learns from the dense one (Hinton et al. 2015, arXiv 1503.02531).

Beyond the paper: Deep Compression retrains the pruned / quantized network on the labels alone. Here the
network as it is at ``epoch`` (in a one-fit pipeline, the end of the dense stage; with ``--weights`` and
``epoch: 0``, the pretrained dense model) is frozen as a *teacher*, and from then on every training step's
loss is

    (1 - alpha) · CE(student, y) + alpha · T² · KL(softmax(teacher / T) ‖ softmax(student / T))

(Hinton's eq. with the T² factor that keeps the soft term's gradients on the scale of the hard one's).
With ``mixup: a`` > 0 each training step first mixes its batch with a shuffled copy of itself, ``x' = λ x +
(1 - λ) x[perm]``, ``λ ~ Beta(a, a)`` one per batch (Zhang et al. 2018, arXiv 1710.09412), and both networks
see ``x'``: the teacher's soft targets on points between the training images are the extra signal
("function matching", Beyer et al. 2022, arXiv 2106.05237); the hard term becomes ``λ CE(y) + (1 - λ)
CE(y[perm])``. λ and perm come from torch's generator, which every checkpoint saves.

With ``teacher`` the teacher is another network instead (any of the zoo trained on the same data: e.g. a
LeNet-5 teaching a LeNet-300-100), handed over by the config layer (``builders.load_teacher``) as a
checkpoint, or a config that ``train.py`` trains first into ``<run>/teacher/``. A list of teachers is an
ensemble (Hinton et al. 2015 §2: the soft target is the arithmetic mean of the members' tempered
distributions); ``"self"`` in it stands for the network at ``epoch``. The teachers' weights are part of the
callback's checkpoint state, so ``train.py -r`` resumes with the same teachers; evaluation (val / test) and
the ``.dcz`` file never involve them.

With ``features`` (layer names) the student also matches the teacher's *outputs of those layers* (FitNets'
hints, Romero et al. 2015, arXiv 1412.6550, without a regressor: the teacher has the student's architecture),
each term normalised by the teacher output's mean square so that layers of any scale weigh alike:

    + beta · mean over layers l of ‖s_l − t_l‖² / ‖t_l‖²        (beta = ``feature_weight``)

The pruned network is then pulled back towards the dense one's intermediate representation, not only its
output distribution.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from pydantic import Field, field_validator, model_validator
from torch import nn
from typing_extensions import override

from compression.layers import resolve
from logger import get_logger
from trainer.callbacks.args import StrictArgs, validated
from utils import CheckpointError

if TYPE_CHECKING:
    from trainer.lit_model import LitClassifier

log = get_logger("distillation")


class DistillationArgs(StrictArgs):
    """The arguments of ``Distillation`` (``trainer.callbacks.Distillation`` in a config)."""

    epoch: int = Field(0, ge=0)  # the network at the start of this epoch becomes the teacher
    temperature: float = Field(4.0, gt=0)  # T: softens both distributions (Hinton: 2-20)
    alpha: float = Field(0.5, ge=0, le=1)  # weight of the soft (teacher) term; 1 - alpha on the labels
    mixup: float = Field(0.0, ge=0)  # Beta(a, a) of the mixing weight of the training batches; 0: no mixing
    # null: the network at `epoch`; else another one: a .ckpt, or a .json train.py trains; a list: an ensemble
    teacher: str | list[str] | None = None
    # layers (names or types) whose outputs the student matches to the teacher's; []: the logits only
    features: list[str] = Field(default_factory=list)
    feature_weight: float = Field(1.0, ge=0)  # beta: weight of the feature term (added to the loss above)

    @model_validator(mode="after")
    def _features_need_one_teacher(self) -> DistillationArgs:
        if self.features and len(teacher_members(self.teacher)) != 1:
            raise ValueError(f"features {self.features} need one teacher of the student's architecture, got "
                             f"{len(teacher_members(self.teacher))}: drop `features` or name one teacher")
        return self

    @field_validator("teacher")
    @classmethod
    def _checkpoints_or_configs(cls, value: str | list[str] | None) -> str | list[str] | None:
        members = [value] if isinstance(value, str) else value or []
        if isinstance(value, list) and not 1 <= len(value) <= MAX_TEACHERS:
            raise ValueError(f"a list of 1 to {MAX_TEACHERS} teachers, got {len(value)}")
        for member in members:
            if member != "self" and not member.endswith((".ckpt", ".json")):
                raise ValueError(f"{member!r}: expected null (the network itself at `epoch`), \"self\" (the same, "
                                 "in a list), a checkpoint (.ckpt) or a config (.json, trained first), or a list "
                                 "of these (an ensemble)")
        return value


MAX_TEACHERS = 8  # each member costs a forward pass per training step


def teacher_members(teacher: str | list[str] | None) -> list[str]:
    """``Distillation.teacher`` as the list of its members (``"self"``: the network at ``epoch``)."""
    if teacher is None:
        return ["self"]
    return [teacher] if isinstance(teacher, str) else list(teacher)


@dataclass
class Teacher:
    """What ``LitClassifier.training_step`` needs to add the soft term (not an ``nn.Module`` attribute:
    the teacher must not enter the student's state dict, optimizer or DDP wrapper)."""

    models: list[nn.Module]  # one, or the members of an ensemble
    temperature: float
    alpha: float
    mixup: float = 0.0
    feature_weight: float = 0.0  # beta of the feature term
    # Outputs of the `features` layers in the last training forward pass, by layer name (filled by hooks)
    student_out: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_out: dict[str, torch.Tensor] = field(default_factory=dict)

    def mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(λ x + (1 - λ) x[perm], y[perm], λ)``, or ``(x, y, 1.0)`` without ``mixup``."""
        if self.mixup <= 0 or len(x) < 2:
            return x, y, 1.0
        lam = float(torch.distributions.Beta(self.mixup, self.mixup).sample())
        perm = torch.randperm(len(x)).to(x.device)
        return lam * x + (1.0 - lam) * x[perm], y[perm], lam

    def loss(self, x: torch.Tensor, logits: torch.Tensor, hard_loss: torch.Tensor) -> torch.Tensor:
        """``(1 - alpha) · hard_loss + alpha · T² · KL(teacher ‖ student)`` on the batch ``x``; an ensemble's
        distribution is the mean of its members' (each at temperature T)."""
        with torch.no_grad():
            members = [F.log_softmax(m(x) / self.temperature, dim=1) for m in self.models]  # (N, classes) each
            target = members[0] if len(members) == 1 else (
                torch.logsumexp(torch.stack(members), dim=0) - math.log(len(members)))  # log of the mean
        soft = F.kl_div(F.log_softmax(logits / self.temperature, dim=1), target, log_target=True,
                        reduction="batchmean")
        loss = (1.0 - self.alpha) * hard_loss + self.alpha * self.temperature ** 2 * soft
        return loss + self.feature_weight * self.hint() if self.teacher_out else loss

    def hint(self) -> torch.Tensor:
        """Mean over the ``features`` layers of ``‖s − t‖² / ‖t‖²`` (student and teacher outputs of the batch
        just seen, each ``(N, ...)``).

        Raises:
            ValueError: a layer whose output has another shape in the teacher than in the student.
        """
        terms = []
        for name, t in self.teacher_out.items():
            s = self.student_out[name]
            if s.shape != t.shape:
                raise ValueError(f"Distillation.features: {name} outputs {tuple(s.shape)} in the student but "
                                 f"{tuple(t.shape)} in the teacher; name layers the two networks share")
            terms.append(F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12))
        return torch.stack(terms).mean()


def _keeper(store: dict[str, torch.Tensor], name: str, train_only: bool) -> Any:
    """A forward hook that puts its module's output in ``store[name]`` (only in training mode if ``train_only``)."""
    def hook(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        if module.training or not train_only:
            store[name] = output
    return hook


class Distillation(Callback):
    """Freezes the network at ``epoch`` as the teacher of every later training step.

    Args:
        epoch, temperature, alpha, mixup, teacher: see ``DistillationArgs``.

    Raises:
        ValueError: an argument out of range (``DistillationArgs``' message).
    """

    def __init__(self, **kwargs: Any) -> None:
        args = validated(DistillationArgs, kwargs, "Distillation")
        self.epoch, self.temperature, self.alpha = args.epoch, args.temperature, args.alpha
        self.mixup, self.members = args.mixup, teacher_members(args.teacher)
        self.features, self.feature_weight = args.features, args.feature_weight
        self.feature_layers: list[str] = []  # the full names `features` designates (check())
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.networks: dict[int, nn.Module] = {}  # the other networks of `teacher`, by member, once loaded (use())
        self._saved: list[dict[str, torch.Tensor]] | None = None  # the teachers' weights, from a resumed checkpoint

    def check(self, model: nn.Module, max_epochs: int) -> dict[str, int]:
        """Checks ``epoch`` against the run before anything trains; no layer is targeted (returns ``{}``).

        Raises:
            ValueError: ``epoch`` outside ``0..max_epochs - 1``, or a ``features`` layer the model lacks.
        """
        if not 0 <= self.epoch < max_epochs:
            raise ValueError(f"epoch {self.epoch} is outside the run's epochs 0..{max_epochs - 1} "
                             f"(trainer.max_epochs={max_epochs})")
        self.feature_layers = self._feature_layers(model)
        return {}

    def _feature_layers(self, model: nn.Module) -> list[str]:
        """The full layer names ``features`` designates (names or types, as the other callbacks take them)."""
        return list(dict.fromkeys(n for key in self.features for n in resolve(model, key, "Distillation.features")))

    def use(self, network: nn.Module, member: int = 0) -> None:
        """The other network that member ``member`` of ``teacher`` names, loaded with its weights (by the
        config layer)."""
        self.networks[member] = network

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: LitClassifier) -> None:
        if pl_module.teacher is not None or trainer.current_epoch < self.epoch:
            return
        models = []
        for i, member in enumerate(self.members):
            if member != "self" and i not in self.networks:
                raise RuntimeError(f"Distillation: teacher {member} was not loaded (call use() first)")
            source = pl_module.model if member == "self" else self.networks[i]
            models.append(copy.deepcopy(source).to(pl_module.device).eval().requires_grad_(False))
        if self._saved is not None:  # resumed after the teachers were taken: the same teachers again
            for model, state in zip(models, self._saved, strict=True):
                model.load_state_dict(state)
        else:
            who = ", ".join(f"the network at epoch {trainer.current_epoch}" if m == "self"
                            else f"{type(models[i]).__name__} from {m}" for i, m in enumerate(self.members))
            log.info(f"Distillation: {who} {'is the teacher' if len(models) == 1 else 'are the teachers'} from "
                     f"now on (T={self.temperature}, alpha={self.alpha}, mixup={self.mixup}"
                     + (f", features {', '.join(self.features)} x {self.feature_weight})" if self.features else ")"))
        pl_module.teacher = Teacher(models, self.temperature, self.alpha, self.mixup, self.feature_weight)
        if self.features:
            self.feature_layers = self.feature_layers or self._feature_layers(pl_module.model)
            self._hook_features(pl_module.model, models[0], pl_module.teacher)

    def _hook_features(self, student: nn.Module, teacher: nn.Module, into: Teacher) -> None:
        """Forward hooks that keep the ``features`` layers' outputs: the student's in training mode only (the
        validation passes need none), the teacher's always (it only runs inside ``Teacher.loss``).

        Raises:
            ValueError: the teacher lacks one of the layers.
        """
        mods_s, mods_t = dict(student.named_modules()), dict(teacher.named_modules())
        for name in self.feature_layers:
            if name not in mods_t:
                raise ValueError(f"Distillation.features: the teacher {type(teacher).__name__} has no layer "
                                 f"{name!r}; features need a teacher of the student's architecture")
            self._hooks += [mods_s[name].register_forward_hook(_keeper(into.student_out, name, train_only=True)),
                            mods_t[name].register_forward_hook(_keeper(into.teacher_out, name, train_only=False))]

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: LitClassifier) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if pl_module.teacher is not None:
            pl_module.teacher.student_out.clear()
            pl_module.teacher.teacher_out.clear()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: LitClassifier) -> None:
        self._lit = pl_module  # state_dict() is called without it

    @override
    def state_dict(self) -> dict[str, Any]:
        # In every checkpoint once the teacher exists: a resume must not take the resumed network instead.
        lit = getattr(self, "_lit", None)
        if lit is None or lit.teacher is None:
            return {}
        states = [m.state_dict() for m in lit.teacher.models]
        return {"teacher": states[0]} if len(states) == 1 else {"teachers": states}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("teachers") or ([state_dict["teacher"]] if "teacher" in state_dict else None)
        if saved is not None and len(saved) != len(self.members):
            raise CheckpointError(f"Distillation: the checkpoint holds {len(saved)} teachers, the config names "
                             f"{len(self.members)}: resume with the config the run was trained with")
        self._saved = saved
