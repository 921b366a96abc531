"""The optimizer step LitClassifier writes out itself (schedulers, clipping, step counts, logging), and the Trainer's
checkpoint and progress-bar callbacks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

from helpers import load_script, tiny_config
from parse_config import parse_config
from builders import TQDM_REFRESH_BATCHES, build_trainer

train = load_script("train")


def run(tmp_path: Path, idx_dir: Path, name: str, *args: str, **changes: Any) -> dict[str, Any]:
    """Trains the tiny config with ``changes`` merged in; returns its last.ckpt."""
    cfg = tiny_config(idx_dir, tmp_path / name)
    for key, value in changes.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and key != "lr_scheduler" else value
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    assert train.main(["-c", str(path), *args]) == 0
    (run_dir,) = sorted((tmp_path / name / "tiny").iterdir())
    return torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)


def scalars(save_dir: Path, tag: str) -> list[Any]:
    """The TensorBoard events of ``tag`` written by the only run under ``save_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = sorted((save_dir / "tiny").iterdir())
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return events.Scalars(tag)


def lr(ckpt: dict[str, Any]) -> float:
    return ckpt["optimizer_states"][0]["param_groups"][0]["lr"]


def test_step_lr_is_stepped_once_per_epoch_and_every_batch_is_one_step(tmp_path: Path, idx_dir: Path) -> None:
    ckpt = run(tmp_path, idx_dir, "steplr")  # StepLR(step_size=1, gamma=0.5), 2 epochs, lr 0.05
    # Stepped at the end of epochs 0 and 1, before last.ckpt is written: 0.05 * 0.5**2.
    assert lr(ckpt) == pytest.approx(0.0125)
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 2
    # 320 images, 20 % for validation: 256 / 32 = 8 batches per epoch, one optimizer step each.
    assert ckpt["global_step"] == 16


def test_reduce_on_plateau_reads_val_loss(tmp_path: Path, idx_dir: Path) -> None:
    # mode "max" with a 1000 % threshold: only the first epoch counts as an improvement of val/loss, so
    # with patience 0 the learning rate halves after epochs 1 and 2.
    plateau = {"type": "ReduceLROnPlateau",
               "args": {"mode": "max", "patience": 0, "factor": 0.5, "threshold": 10.0}}
    ckpt = run(tmp_path, idx_dir, "plateau", lr_scheduler=plateau, trainer={"max_epochs": 3})
    assert lr(ckpt) == pytest.approx(0.05 * 0.5 ** 2)
    # The scheduler's best is epoch 0's val/loss: it was given val/loss, not some other metric.
    assert ckpt["lr_schedulers"][0]["best"] == pytest.approx(scalars(tmp_path / "plateau", "val/loss")[0].value)


def update_norm(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    return float(torch.stack([(after[k] - before[k]).norm() for k in before if k.startswith("model.")]).norm())


def test_gradient_clip_val_bounds_the_update(tmp_path: Path, idx_dir: Path) -> None:
    # One plain SGD step (lr 1, no momentum or decay) from the same seeded init: the update is the
    # gradient, so its norm is the clipped gradient norm.
    sgd = {"type": "SGD", "args": {"lr": 1.0}}
    one_step = {"max_epochs": 1, "limit_train_batches": 1}
    start = run(tmp_path, idx_dir, "start", "--lr", "0", optimizer=sgd, trainer=one_step)["state_dict"]
    free = run(tmp_path, idx_dir, "free", optimizer=sgd, trainer=one_step)["state_dict"]
    clipped = run(tmp_path, idx_dir, "clipped", optimizer=sgd,
                  trainer={**one_step, "gradient_clip_val": 1e-3})["state_dict"]
    assert update_norm(start, free) > 0.05  # the unclipped gradient is far above the limit
    assert update_norm(start, clipped) == pytest.approx(1e-3, rel=1e-3)


def test_train_py_trainers_use_lightnings_own_checkpoints_and_a_bar_redrawn_every_n_batches(idx_dir: Path,
                                                                                            tmp_path: Path) -> None:
    cfg = parse_config(tiny_config(idx_dir, tmp_path / "runs"))
    checkpoints = [c for c in build_trainer(cfg, tmp_path).callbacks if isinstance(c, ModelCheckpoint)]
    assert [c.filename for c in checkpoints] == ["best", "last"] and checkpoints[1].monitor is None
    cfg.trainer.progress_bar = "tqdm"
    (bar,) = [c for c in build_trainer(cfg, tmp_path).callbacks if isinstance(c, TQDMProgressBar)]
    assert bar.refresh_rate == TQDM_REFRESH_BATCHES > 1


def test_train_loss_is_logged_on_the_loggers_steps(tmp_path: Path, idx_dir: Path) -> None:
    run(tmp_path, idx_dir, "every3", trainer={"log_every_n_steps": 3})
    # 16 steps, logged when (step + 1) % 3 == 0: the value of the step it is written under.
    assert [e.step for e in scalars(tmp_path / "every3", "train/loss")] == [2, 5, 8, 11, 14]


@pytest.mark.filterwarnings("ignore:Precision bf16-mixed is not supported by the model summary")
def test_gradient_clipping_under_bf16_mixed_precision(tmp_path: Path, idx_dir: Path) -> None:
    # Same single step under CPU autocast: clipping still bounds the update (weights stay float32).
    sgd = {"type": "SGD", "args": {"lr": 1.0}}
    one_step = {"max_epochs": 1, "limit_train_batches": 1, "precision": "bf16-mixed"}
    start = run(tmp_path, idx_dir, "start", "--lr", "0", optimizer=sgd, trainer=one_step)["state_dict"]
    clipped = run(tmp_path, idx_dir, "clipped", optimizer=sgd,
                  trainer={**one_step, "gradient_clip_val": 1e-3})["state_dict"]
    assert update_norm(start, clipped) == pytest.approx(1e-3, rel=1e-2)
    assert all(t.dtype == torch.float32 for t in clipped.values() if t.is_floating_point())


def test_plateau_scheduler_without_validation_is_a_config_error(tmp_path: Path, idx_dir: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config(idx_dir, tmp_path / "runs", limit_val_batches=0)
    cfg["lr_scheduler"] = {"type": "ReduceLROnPlateau", "args": {}}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    assert train.main(["-c", str(path)]) == 2
    assert "ReduceLROnPlateau steps on val/loss, but trainer.limit_val_batches is 0" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # refused before any run folder was made


def test_checkpoint_from_automatic_optimization_resumes_with_its_step_count(tmp_path: Path, idx_dir: Path) -> None:
    # Checkpoints written before LitClassifier switched to manual optimization kept the step count in
    # the automatic loop's progress; rewrite a fresh last.ckpt into that form and resume from it.
    cfg = tiny_config(idx_dir, tmp_path / "runs", max_epochs=1)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    assert train.main(["-c", str(path)]) == 0
    (run_dir,) = sorted((tmp_path / "runs" / "tiny").iterdir())
    ckpt = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)
    loops = ckpt["loops"]["fit_loop"]
    steps = loops["epoch_loop.manual_optimization.optim_step_progress"]
    assert steps["total"]["completed"] == 8  # 256 training images / batch 32
    loops["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]["step"] = steps
    loops["epoch_loop.manual_optimization.optim_step_progress"] = {
        "total": {"ready": 0, "completed": 0}, "current": {"ready": 0, "completed": 0}}
    torch.save(ckpt, run_dir / "last.ckpt")
    assert train.main(["-r", str(run_dir / "last.ckpt"), "--set", "trainer.max_epochs=2"]) == 0
    resumed = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["epoch"] == 1 and resumed["global_step"] == 16  # continued from 8, not from 0


def test_cosine_cycles_anneal_each_cycle_from_its_own_peak() -> None:
    from trainer.optim import CosineCycles

    params = [torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD(params, lr=0.05)
    scheduler = CosineCycles(optimizer, cycles=[3, 2], peaks=[1.0, 0.4])
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # cycle 1: 0.05 * (1 + cos(pi t / 3)) / 2 for t = 0, 1, 2; cycle 2 from 0.4 * 0.05; then 0
    assert rates == pytest.approx([0.05, 0.0375, 0.0125, 0.02, 0.01, 0.0])
    again = CosineCycles(torch.optim.SGD(params, lr=0.05), cycles=[3, 2], peaks=[1.0, 0.4])
    again.load_state_dict(scheduler.state_dict())  # a resumed run continues where it stopped
    assert again.last_epoch == 6 and again.get_last_lr() == pytest.approx([0.0])
    assert "cycles" not in scheduler.state_dict()  # the config says the cycles, also on resume
    with pytest.raises(ValueError, match=r"peaks must be 2 numbers >= 0 \(one per cycle\), got \[1\.0\]"):
        CosineCycles(optimizer, cycles=[3, 2], peaks=[1.0])
    with pytest.raises(ValueError, match="cycles must be a non-empty list of epoch counts >= 1"):
        CosineCycles(optimizer, cycles=[])


def test_auto_bar_is_tqdm_on_a_terminal_only_and_lightnings_banners_are_silenced(
        tmp_path: Path, idx_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    cfg = parse_config(tiny_config(idx_dir, tmp_path / "runs"))
    cfg.trainer.progress_bar = "auto"
    for tty, bars in ((False, 0), (True, 1)):
        monkeypatch.setattr(sys.stderr, "isatty", lambda tty=tty: tty)
        assert len([c for c in build_trainer(cfg, tmp_path).callbacks if isinstance(c, TQDMProgressBar)]) == bars
    monkeypatch.undo()
    import logging

    class Keep(logging.Handler):  # what Lightning's own console handler (made at import, before capture) receives
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    seen: list[str] = []
    handler = Keep()
    logging.getLogger("lightning.pytorch").addHandler(handler)
    try:
        run(tmp_path, idx_dir, "quiet", trainer={"progress_bar": "auto"})  # output captured: not a terminal
    finally:
        logging.getLogger("lightning.pytorch").removeHandler(handler)
    assert seen and not [m for m in seen if m.startswith(("💡 Tip:", "GPU available", "TPU available"))], seen
    out = capsys.readouterr()
    text = out.out + out.err
    assert "\r" not in text and "tiny: LeNet300" in text and ", cpu x 1; run folder" in text  # our own device line
    assert "epoch 1: val/top1_err" in text  # one line per epoch instead of a bar
