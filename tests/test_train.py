"""Whole runs of train.py and test.py on generated idx data: checkpoints, resume, --weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import builders as trainer_module
from helpers import load_script, tiny_config
from data import DATAMODULES, FashionMNIST

train = load_script("train")
test = load_script("test")


def run_dirs(save_dir: Path) -> list[Path]:
    return sorted((save_dir / "tiny").iterdir())


def final_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def test_train_then_test_json(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train.main(["-c", str(config_file)]) == 0
    (run_dir,) = run_dirs(config_file.parent / "runs")
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.json", "best.ckpt", "last.ckpt", "info.log"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    ckpt = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["config"]["name"] == "tiny"

    capsys.readouterr()
    assert test.main(["-r", str(run_dir / "best.ckpt"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"] == 266_610 and out["nonzero"] == 266_610 and out["split"] == "test"
    assert 0.0 <= out["top1_err"] <= 100.0 and 0.0 <= out["top5_err"] <= out["top1_err"]
    # The generated bands are easy: two epochs must beat chance (90 % error) by a wide margin.
    assert out["top1_err"] < 50.0

    assert test.main(["-r", str(run_dir / "best.ckpt")]) == 0
    text = capsys.readouterr().out
    assert "top1_err" in text and "266,610" in text

    # A config for two devices is still evaluated on one: every sample, one set of figures.
    assert test.main(["-r", str(run_dir / "best.ckpt"), "--json", "--set", "trainer.devices=2"]) == 0
    assert json.loads(capsys.readouterr().out)["top1_err"] == out["top1_err"]


def test_tensorboard_gets_the_documented_keys(config_file: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert train.main(["-c", str(config_file), "--set", "trainer.max_epochs=1"]) == 0
    (run_dir,) = run_dirs(config_file.parent / "runs")
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/top1_err", "val/top5_err", "lr-SGD"} <= tags


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path: Path, idx_dir: Path) -> None:
    # Uninterrupted: 2 epochs. Interrupted: 1 epoch, then -r last.ckpt up to 2 epochs in a fresh call.
    for name in ("straight", "interrupted"):
        cfg = tiny_config(idx_dir, tmp_path / name, max_epochs=2 if name == "straight" else 1)
        (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
        assert train.main(["-c", str(tmp_path / f"{name}.json")]) == 0
    (straight,) = run_dirs(tmp_path / "straight")
    (interrupted,) = run_dirs(tmp_path / "interrupted")
    assert torch.load(interrupted / "last.ckpt", weights_only=True)["epoch"] == 0

    assert train.main(["-r", str(interrupted / "last.ckpt"), "--set", "trainer.max_epochs=2"]) == 0
    resumed = torch.load(interrupted / "last.ckpt", weights_only=True)
    expected = torch.load(straight / "last.ckpt", weights_only=True)
    assert resumed["epoch"] == 1 and resumed["global_step"] == expected["global_step"]
    for key, value in expected["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    # The optimizer's momentum and the scheduler's position were restored too.
    assert resumed["lr_schedulers"][0]["last_epoch"] == expected["lr_schedulers"][0]["last_epoch"]
    assert json.loads((interrupted / "config.json").read_text())["trainer"]["max_epochs"] == 2
    assert len(run_dirs(tmp_path / "interrupted")) == 1  # resumed in place, no new run folder


class DrawsRandom(pl.Callback):
    """Records each training batch's labels and a draw from torch's global generator (as dropout draws)."""

    def __init__(self) -> None:
        self.seen: dict[int, list[tuple[list[int], float]]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.seen.setdefault(trainer.current_epoch, []).append((batch[1].tolist(), torch.rand(1).item()))


class ShuffledByDataLoader(FashionMNIST):
    """Fashion-MNIST served the way CIFAR-100 and Imagenette are: a DataLoader shuffling with the global
    generator (whose iterator also draws a seed from it when it is created)."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.train_set), batch_size=self.batch_size, shuffle=True)


def test_resume_draws_the_random_numbers_the_interrupted_run_would_have(
        tmp_path: Path, idx_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recorders = []

    def with_recorder(cfg: Any, run_dir: Path) -> list[pl.Callback]:
        recorders.append(DrawsRandom())
        return original(cfg, run_dir) + [recorders[-1]]

    original = trainer_module.build_callbacks
    monkeypatch.setattr(trainer_module, "build_callbacks", with_recorder)
    monkeypatch.setitem(DATAMODULES, "ShuffledByDataLoader", ShuffledByDataLoader)
    for name, epochs in (("straight", 2), ("interrupted", 1)):
        cfg = tiny_config(idx_dir, tmp_path / name, max_epochs=epochs)
        cfg["data_loader"]["type"] = "ShuffledByDataLoader"
        (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
        assert train.main(["-c", str(tmp_path / f"{name}.json")]) == 0
    (interrupted,) = run_dirs(tmp_path / "interrupted")
    assert train.main(["-r", str(interrupted / "last.ckpt"), "--set", "trainer.max_epochs=2"]) == 0
    straight, _, resumed = recorders
    assert resumed.seen[1] == straight.seen[1] and straight.seen[1] != straight.seen[0]


def test_float64_run_and_a_refused_resume_that_leaves_the_run_alone(config_file: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    # 64-true: the uint8 MNIST batches become float64 too (they are cast after the device transfer), and
    # the float64 codebooks still export (the file stores float32, as the decoded model is).
    compress = {"IterativePruning": {"keep_ratio": 0.1}, "Quantization": {"bits": 4, "epoch": 1}}
    assert train.main(["-c", str(config_file), "--set", "trainer.precision=64-true", "--set", "trainer.max_epochs=2",
                       "--set", "trainer.limit_train_batches=3",
                       "--set", f"trainer.callbacks={json.dumps(compress)}"]) == 0
    (run,) = run_dirs(config_file.parent / "runs")
    assert final_weights(run / "last.ckpt")["model.fc1.weight"].dtype == torch.float64
    assert (run / "model.dcz").is_file()
    assert test.main(["-r", str(run / "last.ckpt"), "--json"]) == 0
    # A resume the Trainer refuses must not rewrite the run's config.json (test.py reads it).
    before = (run / "config.json").read_bytes()
    capsys.readouterr()
    assert train.main(["-r", str(run / "last.ckpt"), "--set", "trainer.accelerator=mps"]) == 2
    assert "MPSAccelerator" in capsys.readouterr().err and (run / "config.json").read_bytes() == before
    # Nor may a resume add a pruning step for layers the run has quantized (their masks are fixed).
    prune_again = {**compress, "IterativePruning": {"keep_ratio": 0.05, "schedule": "epochs", "epochs": [0, 2]}}
    assert train.main(["-r", str(run / "last.ckpt"), "--set", "trainer.max_epochs=3",
                       "--set", f"trainer.callbacks={json.dumps(prune_again)}"]) == 2
    assert "fc1.weight, fc2.weight, fc3.weight are already quantized" in capsys.readouterr().err
    assert (run / "config.json").read_bytes() == before


def test_weights_start_a_new_run_from_trained_weights(config_file: Path) -> None:
    assert train.main(["-c", str(config_file), "--set", "trainer.max_epochs=1"]) == 0
    (first,) = run_dirs(config_file.parent / "runs")
    source = final_weights(first / "last.ckpt")
    # lr=0: the new run cannot move the weights, so they must equal the source exactly.
    assert train.main(["-c", str(config_file), "--weights", str(first / "last.ckpt"), "--lr", "0",
                       "--set", "trainer.max_epochs=1", "--wd", "0"]) == 0
    second = [d for d in run_dirs(config_file.parent / "runs") if d != first][0]
    started = torch.load(second / "last.ckpt", weights_only=True)
    assert started["epoch"] == 0  # a new run: epochs count from zero
    for key, value in source.items():
        assert torch.equal(started["state_dict"][key], value), key
    assert json.loads((second / "config.json").read_text())["pretrained"] == str(first / "last.ckpt")


def test_test_script_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert test.main(["-r", str(tmp_path / "missing.ckpt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    assert test.main(["-r", str(tmp_path / "junk.ckpt")]) == 2
    assert "not a PyTorch checkpoint" in capsys.readouterr().err


def test_a_diverged_run_stops_with_exit_2_and_writes_no_broken_checkpoint(tmp_path: Path, idx_dir: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config(idx_dir, tmp_path / "runs", max_epochs=3)
    cfg["optimizer"]["args"]["lr"] = 1e30  # the first update makes the weights inf, the next NaN
    path = tmp_path / "diverge.json"
    path.write_text(json.dumps(cfg))
    assert train.main(["-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "training diverged in epoch 0" in err and "gradient_clip_val" in err and "Traceback" not in err
    (run,) = run_dirs(tmp_path / "runs")
    assert not list(run.glob("*.ckpt"))  # nothing written from the broken weights
    cfg["optimizer"]["args"]["lr"] = 0.05  # the same config trains normally: the check does not fire on finite weights
    path.write_text(json.dumps(cfg))
    assert train.main(["-c", str(path)]) == 0
