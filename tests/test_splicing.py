"""``IterativePruning.splicing``: pruned weights keep learning in shadows and can come back, until the last step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import assert_resume_equals_whole, load_ckpt, whole_and_cut_runs, write_config
from test_callbacks_trainer import fit, tiny_module

import builders
from dcz import read_compressed
from parse_config import ConfigError, parse_config
from trainer.callbacks import IterativePruning

PRUNING = {"keep_ratio": 0.1, "schedule": "gradual", "start_epoch": 0, "end_epoch": 3, "prune_every": 1,
           "splicing": True}
CALLBACKS = {"IterativePruning": PRUNING, "Quantization": {"bits": 3, "epoch": 4}}


class MaskLog(pl.Callback):
    """The fc1 mask at the end of every epoch (after that epoch's pruning step and training)."""

    def __init__(self) -> None:
        self.masks: list[torch.Tensor] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.masks.append(pl_module.masks["fc1.weight"].clone())


def test_masks_only_shrink_without_splicing() -> None:
    log = MaskLog()
    fit(tiny_module(), [IterativePruning(**{**PRUNING, "splicing": False}), log], epochs=5)
    for a, b in zip(log.masks, log.masks[1:]):
        assert not (b & ~a).any()


def test_a_pruned_weight_whose_shadow_grew_comes_back_with_that_value() -> None:
    module, pruning, log, seen = tiny_module(), IterativePruning(**PRUNING), MaskLog(), {}

    class Grow(pl.Callback):  # before the pruning callback: at epoch 1, one pruned weight's shadow grows large
        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            if trainer.current_epoch == 1:
                seen["at"] = at = int(torch.nonzero(~pl_module.masks["fc1.weight"].flatten())[0])
                pruning.shadow["fc1.weight"].view(-1)[at] = 5.0

    class Look(pl.Callback):  # after it: the weight as the step left it
        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            if trainer.current_epoch == 1:
                seen["mask"] = bool(pl_module.masks["fc1.weight"].flatten()[seen["at"]])
                seen["weight"] = float(pl_module.model.fc1.weight.detach().flatten()[seen["at"]])

    fit(module, [Grow(), pruning, Look(), log], epochs=5)
    assert seen["mask"] and seen["weight"] == 5.0
    assert torch.equal(log.masks[3], log.masks[4])  # the last step (epoch 3) is final ...
    assert pruning.shadow == {}  # ... and the shadows are gone
    weight = module.model.fc1.weight
    assert int(log.masks[-1].sum()) == round(0.1 * weight.numel())
    assert torch.equal(weight != 0, log.masks[-1])  # pruned weights are exact zeros, kept ones are not


def test_a_shadow_takes_the_plain_gradient_step_of_its_position() -> None:
    module, pruning, seen = tiny_module(), IterativePruning(**{**PRUNING, "end_epoch": 2}), []

    class Probe(pl.Callback):  # after the pruning callback: sees its kept gradient, then its updated shadow
        def on_after_backward(self, trainer: pl.Trainer, pl_module: Any) -> None:
            if pruning.shadow:
                seen.append([pruning.shadow["fc1.weight"].clone(), pruning._grads["fc1.weight"].clone()])

        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
            if pruning.shadow:
                seen[-1] += [pruning.shadow["fc1.weight"].clone(), optimizer.param_groups[0]["lr"],
                             pl_module.masks["fc1.weight"].clone()]

    fit(module, [pruning, Probe()], epochs=3)
    assert len(seen) == 8  # the four steps of epochs 0 and 1: after the first pruning step, before the last
    for before, grad, after, lr, mask in seen:
        assert torch.allclose(after, before - lr * grad.masked_fill(mask, 0.0))
        assert not after[mask].any() and (after != before).any()


def test_resume_between_splicing_steps_equals_an_uninterrupted_run(tmp_path: Path, idx_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # killed after epoch 1: two of four steps done, shadows in last.ckpt
    whole, run = whole_and_cut_runs(tmp_path, idx_dir, monkeypatch, CALLBACKS, max_epochs=6, stop_after=1)
    stored = next(v for k, v in load_ckpt(run / "last.ckpt")["callbacks"].items() if "IterativePruning" in k)
    assert set(stored["shadow"]) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    assert_resume_equals_whole(whole, run)
    decoded, _ = read_compressed(run / "model.dcz")  # and the file is the model it was written from, bit for bit
    best = load_ckpt(run / "best.ckpt")
    for name, value in decoded.state_dict().items():
        assert torch.equal(value.view(torch.int32), best["state_dict"][f"model.{name}"].view(torch.int32)), name


@pytest.mark.parametrize(("pruning", "trainer", "match"), [
    ({**PRUNING, "schedule": "one_shot"}, {}, "splicing .* needs a schedule of several steps"),
    ({**PRUNING, "reset_weights": True}, {}, "no reset_weights"),
    ({**PRUNING, "schedule": "epochs", "epochs": [2]}, {}, "splicing needs at least two pruning steps"),
    (PRUNING, {"precision": "16-mixed"}, "splicing .* precision '16-mixed' scales; use '32-true'"),
])
def test_splicing_is_checked_when_the_config_is_read(tmp_path: Path, idx_dir: Path, pruning: dict[str, Any],
                                                      trainer: dict[str, Any], match: str) -> None:
    path = write_config(tmp_path, idx_dir, "bad", {"IterativePruning": pruning}, max_epochs=4, **trainer)
    with pytest.raises(ConfigError, match=match):
        cfg = parse_config(json.loads(path.read_text()))
        builders.build_config_callbacks(cfg, builders.build_model(cfg))
