"""The stages of a one-fit Deep Compression pipeline: named, logged, timed, each one's checkpoint kept.

A recipe with ``IterativePruning`` and ``Quantization`` in one config trains in one fit: epochs before the
first pruning step are the **dense** stage, pruning steps and their retraining the **prune** stage, epochs
from the clustering epoch on the **quantize** stage (Han 2016 Fig. 1: train connectivity, prune, train
weights; cluster, fine-tune the codebook). This callback decides nothing about the model: it tells the
user where the run is (stage, epoch, weights kept, bits) and, at the last epoch of every stage but the
final one, saves ``dense.ckpt`` / ``pruned.ckpt`` in the run folder, so each stage's model stays available
(to evaluate, or to start another recipe from with ``--weights``). ``-r last.ckpt`` resumes any stage, and so
does ``-r`` of a stage checkpoint: it is written where ``last.ckpt`` is (Lightning runs ``Checkpoint`` callbacks'
``on_train_epoch_end`` after the module's, so the epoch's scheduler step is in it) and after it (it comes later
in the callback list), so a run resumed from it continues exactly as the run did from there.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint
from typing_extensions import override

from compression.layers import prunable_layers
from logger import get_logger

if TYPE_CHECKING:
    from trainer.lit_model import LitClassifier

log = get_logger("pipeline")
CHECKPOINT_NAMES = {"dense": "dense.ckpt", "prune": "pruned.ckpt"}  # the final stage's model is best.ckpt


@dataclass
class Stage:
    name: str  # "dense", "prune" or "quantize"
    first_epoch: int
    last_epoch: int
    wall_s: float = 0.0  # training time spent in this stage so far (validation included)


def plan_stages(max_epochs: int, pruning_epochs: list[int], quantize_epoch: int | None) -> list[Stage]:
    """The stages of a fit from its compression schedule (a stage with no epoch is left out)."""
    bounds = [("dense", 0)]
    if pruning_epochs:
        bounds.append(("prune", min(pruning_epochs)))
    if quantize_epoch is not None:
        bounds.append(("quantize", quantize_epoch))
    stages = []
    for (name, first), (_, nxt) in zip(bounds, bounds[1:] + [("", max_epochs)]):
        if nxt > first:
            stages.append(Stage(name, first, nxt - 1))
    return stages


class PipelineStages(Checkpoint):  # a Checkpoint, so that its saves see the epoch's scheduler step (see above)
    """Logs each epoch's stage, times the stages and saves the model at the end of each non-final stage.

    Args:
        stages: From ``plan_stages``.
        run_dir: Where ``dense.ckpt`` / ``pruned.ckpt`` go.
    """

    def __init__(self, stages: list[Stage], run_dir: str | Path) -> None:
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        self.stages, self.run_dir = stages, Path(run_dir)
        self._epoch_start = 0.0
        self.earlier_s = 0.0  # stage time spent by the processes before a resume (restored with the state)

    def stage_of(self, epoch: int) -> Stage:
        return next(s for s in self.stages if s.first_epoch <= epoch <= s.last_epoch)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: LitClassifier) -> None:
        # Runs after the compression callbacks' hooks (it is added after them): the figures are this epoch's.
        self._epoch_start = time.monotonic()
        epoch, stage = trainer.current_epoch, self.stage_of(trainer.current_epoch)
        layers = prunable_layers(pl_module.model)
        total = sum(m.weight.numel() for m in layers.values())
        kept = sum(int(pl_module.masks[f"{n}.weight"].sum()) if f"{n}.weight" in pl_module.masks
                   else m.weight.numel() for n, m in layers.items())
        books = {n.replace("__", "."): len(b) for n, b in pl_module.compression.codebooks.items()}
        bits = sorted({math.ceil(math.log2(k)) for n, k in books.items() if n in pl_module.compression.index})
        bits_text = f", {'/'.join(map(str, bits))} bits" if bits else ""
        log.info(f"stage {stage.name} (epoch {epoch}, {epoch - stage.first_epoch + 1}/"
                 f"{stage.last_epoch - stage.first_epoch + 1} of this stage; run epoch {epoch + 1}/"
                 f"{trainer.max_epochs}): {100.0 * kept / max(total, 1):.2f}% of weights kept{bits_text}")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: LitClassifier) -> None:
        epoch, stage = trainer.current_epoch, self.stage_of(trainer.current_epoch)
        stage.wall_s += time.monotonic() - self._epoch_start
        if epoch == stage.last_epoch and stage is not self.stages[-1]:
            path = self.run_dir / CHECKPOINT_NAMES[stage.name]
            trainer.save_checkpoint(path, weights_only=False)  # the full state: -r resumes from it
            log.info(f"stage {stage.name} done after {stage.wall_s:.0f} s: its model is {path}")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"stages": [asdict(s) for s in self.stages]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = {s["name"]: s["wall_s"] for s in state_dict.get("stages", [])}
        for stage in self.stages:  # the plan comes from the config; only the time spent is carried over
            stage.wall_s = float(saved.get(stage.name, 0.0))
        self.earlier_s = sum(s.wall_s for s in self.stages)
