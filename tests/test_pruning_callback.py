"""IterativePruning in real fits: exact targets, zeros that stay zero, checkpoints, resume, config errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import builders as trainer_module
from helpers import ROOT, StopAfter, load_ckpt, load_script, only_run, tiny_config, write_config

train = load_script("train")
test = load_script("test")


def write_pruning(tmp_path: Path, idx_dir: Path, name: str, pruning: dict[str, Any], **trainer: Any) -> Path:
    return write_config(tmp_path, idx_dir, name, {"IterativePruning": pruning}, **trainer)


PAPER_LENET300 = {"fc1": 0.08, "fc2": 0.09, "fc3": 0.26}  # Han 2015 Table 2


def test_paper_ratios_reached_exactly_and_zeros_stay_zero(tmp_path: Path, idx_dir: Path) -> None:
    # Prune at epoch 0 and 1 (geometric steps), then one more epoch of retraining with momentum + weight decay.
    path = write_pruning(tmp_path, idx_dir, "p", {"keep_ratio": PAPER_LENET300, "schedule": "epochs", "epochs": [0, 1]},
                 max_epochs=3)
    assert train.main(["-c", str(path)]) == 0
    ckpt = load_ckpt(only_run(tmp_path / "p") / "last.ckpt")
    weights, masks = ckpt["state_dict"], ckpt["masks"]
    for layer, keep in PAPER_LENET300.items():
        w, mask = weights[f"model.{layer}.weight"], masks[f"{layer}.weight"]
        assert int(mask.sum()) == round(keep * w.numel())  # to the element
        assert torch.count_nonzero(w[~mask]) == 0  # pruned weights are exactly zero after ~16 SGD steps
        assert torch.count_nonzero(w[mask]) == int(mask.sum())  # survivors kept training
        momentum = ckpt["optimizer_states"][0]["state"]
        assert all(torch.count_nonzero(s["momentum_buffer"][~masks[n]]) == 0
                   for n, s in zip(["fc1.weight"], [momentum[0]]))  # parameter 0 is fc1.weight
    assert ckpt["state_dict"]["model.fc1.bias"].count_nonzero() > 0  # biases are not pruned by default


def test_zeros_stay_zero_under_adam(tmp_path: Path, idx_dir: Path) -> None:
    path = write_pruning(tmp_path, idx_dir, "adam", {"keep_ratio": 0.1}, max_epochs=2)
    cfg = json.loads(path.read_text())
    cfg["optimizer"] = {"type": "Adam", "args": {"lr": 0.01, "weight_decay": 0.001}}
    path.write_text(json.dumps(cfg))
    assert train.main(["-c", str(path)]) == 0
    ckpt = load_ckpt(only_run(tmp_path / "adam") / "last.ckpt")
    for name, mask in ckpt["masks"].items():
        assert torch.count_nonzero(ckpt["state_dict"][f"model.{name}"][~mask]) == 0


def test_std_criterion_and_global_criterion_run(tmp_path: Path, idx_dir: Path) -> None:
    path = write_pruning(tmp_path, idx_dir, "std", {"criterion": "std", "sensitivity": {"Linear": 1.0, "fc3": 0.5}},
                 max_epochs=1)
    assert train.main(["-c", str(path)]) == 0
    masks = load_ckpt(only_run(tmp_path / "std") / "last.ckpt")["masks"]
    assert set(masks) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    # Pruned at the start of epoch 0, on PyTorch's uniform init U(-a, a) whose std is a/sqrt(3):
    # |w| >= s*std keeps 1 - s/sqrt(3) of a layer: 42.3 % for s = 1 (fc1), 71.1 % for s = 0.5 (fc3).
    assert float(masks["fc1.weight"].float().mean()) == pytest.approx(1 - 1 / 3 ** 0.5, abs=0.01)
    assert float(masks["fc3.weight"].float().mean()) == pytest.approx(1 - 0.5 / 3 ** 0.5, abs=0.03)

    path = write_pruning(tmp_path, idx_dir, "global", {"criterion": "global", "keep_ratio": 0.1, "layers": ["fc1", "fc2"]},
                 max_epochs=1)
    assert train.main(["-c", str(path)]) == 0
    masks = load_ckpt(only_run(tmp_path / "global") / "last.ckpt")["masks"]
    kept = int(masks["fc1.weight"].sum() + masks["fc2.weight"].sum())
    assert set(masks) == {"fc1.weight", "fc2.weight"} and kept == round(0.1 * (235_200 + 30_000))


def test_sparsity_is_logged_to_tensorboard(tmp_path: Path, idx_dir: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = write_pruning(tmp_path, idx_dir, "tb", {"keep_ratio": PAPER_LENET300}, max_epochs=1)
    assert train.main(["-c", str(path)]) == 0
    events = EventAccumulator(str(only_run(tmp_path / "tb")))
    events.Reload()
    assert events.Scalars("sparsity/fc1")[-1].value == pytest.approx(8.0)
    total = (0.08 * 235_200 + 0.09 * 30_000 + 0.26 * 1_000) / 266_200
    assert events.Scalars("sparsity/total")[-1].value == pytest.approx(100 * total, rel=1e-4)



def test_resume_in_a_new_process_keeps_masks_and_prunes_on_schedule(
        tmp_path: Path, idx_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pruning = {"keep_ratio": PAPER_LENET300, "schedule": "epochs", "epochs": [0, 2]}
    straight = write_pruning(tmp_path, idx_dir, "straight", pruning, max_epochs=4)
    assert train.main(["-c", str(straight)]) == 0

    interrupted = write_pruning(tmp_path, idx_dir, "interrupted", pruning, max_epochs=4)
    original = trainer_module.build_callbacks
    monkeypatch.setattr(trainer_module, "build_callbacks", lambda cfg, run_dir: original(cfg, run_dir) + [StopAfter(1)])
    assert train.main(["-c", str(interrupted)]) == 0
    monkeypatch.undo()
    run = only_run(tmp_path / "interrupted")
    after_one = load_ckpt(run / "last.ckpt")
    assert after_one["epoch"] == 1
    first_masks = after_one["masks"]
    assert int(first_masks["fc1.weight"].sum()) == round(0.08 ** 0.5 * 235_200)  # step 1 of 2 only

    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "-r", str(run / "last.ckpt")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed, expected = load_ckpt(run / "last.ckpt"), load_ckpt(only_run(tmp_path / "straight") / "last.ckpt")
    assert resumed["epoch"] == 3
    for name, mask in resumed["masks"].items():
        assert int(mask.sum()) == round(PAPER_LENET300[name.split(".")[0]] * mask.numel())  # step 2 happened
        assert not (mask & ~first_masks[name]).any()  # nothing grew back
        assert torch.equal(mask, expected["masks"][name])
    for key, value in expected["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key  # bit-identical to the uninterrupted run


def test_pruned_checkpoint_in_test_py_and_as_new_run_weights(tmp_path: Path, idx_dir: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = write_pruning(tmp_path, idx_dir, "p", {"keep_ratio": PAPER_LENET300}, max_epochs=1)
    assert train.main(["-c", str(path)]) == 0
    ckpt_path = only_run(tmp_path / "p") / "last.ckpt"
    capsys.readouterr()
    assert test.main(["-r", str(ckpt_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    kept = {row["name"]: row["nonzero"] for row in out["layers"]}
    assert kept == {"fc1": 18_816, "fc2": 2_700, "fc3": 260}

    # A new run from the pruned weights, with no pruning callback at all, keeps every zero.
    dense = tmp_path / "dense.json"
    dense.write_text(json.dumps(tiny_config(idx_dir, tmp_path / "retrain", max_epochs=1)))
    assert train.main(["-c", str(dense), "--weights", str(ckpt_path)]) == 0
    retrained = load_ckpt(only_run(tmp_path / "retrain") / "last.ckpt")
    source = load_ckpt(ckpt_path)
    for name, mask in source["masks"].items():
        w = retrained["state_dict"][f"model.{name}"]
        assert torch.count_nonzero(w[~mask]) == 0
        assert not torch.equal(w, source["state_dict"][f"model.{name}"])  # it did train


@pytest.mark.parametrize(("pruning", "match"), [
    ({"keep_ratio": {"fc9": 0.1}}, r"IterativePruning: keep_ratio: 'fc9' is not a prunable layer of LeNet300; "
                                   r"prunable layers: fc1, fc2, fc3"),
    ({"keep_ratio": 1.5}, r"keep_ratio keep_ratio: must be in \(0, 1\], got 1.5"),
    ({"keep_ratio": {"fc1": 0.0}}, r"keep_ratio fc1: must be in \(0, 1\], got 0.0"),
    ({"keep_ratio": 0.1, "schedule": "epochs", "epochs": [0, 5]}, r"pruning epochs \[5\] are outside the run's "
                                                                  r"epochs 0\.\.1 \(trainer.max_epochs=2\)"),
    ({"keep_ratio": 0.1, "layers": ["BatchNorm2d"]}, r"'BatchNorm2d' is not a prunable layer"),
    ({"criterion": "std", "keep_ratio": 0.1}, r"criterion 'std' needs sensitivity"),
    ({"criterion": "global", "keep_ratio": {"fc1": 0.1}}, r"criterion 'global' takes one keep_ratio"),
    ({"criterion": "l1", "keep_ratio": 0.1}, r"IterativePruning\.criterion: must be one of 'magnitude', 'std' or 'global' \(got \"l1\"\)"),
    ({"keep_ratio": 0.1, "schedule": "epochs"}, r"schedule 'epochs' needs a non-empty 'epochs' list"),
    ({"keep_ratio": 0.1, "amount": 0.5}, r"IterativePruning\.amount: unknown key; valid keys here: criterion, keep_ratio"),
])
def test_pruning_config_errors_before_training(tmp_path: Path, idx_dir: Path, pruning: dict[str, Any], match: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = write_pruning(tmp_path, idx_dir, "bad", pruning, max_epochs=2)
    assert train.main(["-c", str(path)]) == 2
    assert __import__("re").search(match, capsys.readouterr().err)
    assert not (tmp_path / "bad").exists()  # rejected before any run folder was made


def test_best_checkpoint_comes_from_after_the_last_pruning_step(tmp_path: Path, idx_dir: Path) -> None:
    # Epoch 0 at 28 % kept has the best validation error so far; best.ckpt must still be fully pruned.
    path = write_pruning(tmp_path, idx_dir, "best", {"keep_ratio": PAPER_LENET300, "schedule": "epochs", "epochs": [0, 2]},
                 max_epochs=3)
    assert train.main(["-c", str(path)]) == 0
    best = load_ckpt(only_run(tmp_path / "best") / "best.ckpt")
    assert best["epoch"] == 2
    assert int(best["state_dict"]["model.fc1.weight"].count_nonzero()) == 18_816
