"""Nothing lost: every file we write is complete or untouched, failures are one message and exit code 2."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

import builders
from compression import atomic
from compression.atomic import atomic_write_text
from helpers import load_ckpt, load_script, only_run, tiny_config
from parse_config import parse_config
from trainer.checkpoint_io import AtomicCheckpointIO

train = load_script("train")


def full_disk(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "config.json"
    atomic_write_text(target, "old")
    monkeypatch.setattr(atomic.os, "fsync", full_disk)  # the data did not reach the disk
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_checkpoints_go_through_the_atomic_writer(tmp_path: Path, idx_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = builders.build_trainer(parse_config(tiny_config(idx_dir, tmp_path)), tmp_path)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    # A save interrupted after some bytes (a kill, a full disk) keeps the previous checkpoint whole.
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, tmp_path / "last.ckpt")

    def torch_save_then_fail(obj: object, f: object) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")  # type: ignore[attr-defined]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("trainer.checkpoint_io.torch.save", torch_save_then_fail)
    with pytest.raises(OSError):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, tmp_path / "last.ckpt")
    assert torch.equal(load_ckpt(tmp_path / "last.ckpt")["state_dict"]["w"], torch.ones(3))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_disk_full_during_the_fit_is_one_message_and_the_last_checkpoint_survives(
        tmp_path: Path, idx_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(tiny_config(idx_dir, tmp_path / "runs", max_epochs=3)))
    saves = {"n": 0}
    original = AtomicCheckpointIO.save_checkpoint

    def fail_after_two(self: AtomicCheckpointIO, checkpoint: dict, target: object, storage_options: object = None):
        saves["n"] += 1
        if saves["n"] > 2:  # epoch 0's best + last are written; the disk fills during epoch 1
            full_disk()
        return original(self, checkpoint, target, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", fail_after_two)
    assert train.main(["-c", str(path)]) == 2
    err = capsys.readouterr().err
    run = only_run(tmp_path / "runs")
    assert "No space left on device" in err and f"resume with -r {run / 'last.ckpt'}" in err and "Traceback" not in err
    assert load_ckpt(run / "last.ckpt")["epoch"] == 0  # intact: the run can resume
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_save_dir_that_is_a_file_is_a_clear_error(tmp_path: Path, idx_dir: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "runs"
    blocker.write_text("not a folder")
    path = tmp_path / "c.json"
    path.write_text(json.dumps(tiny_config(idx_dir, blocker)))
    assert train.main(["-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "trainer.save_dir: cannot create a run folder under" in err and "Traceback" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders anyway")
def test_read_only_save_dir_is_a_clear_error(tmp_path: Path, idx_dir: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(tiny_config(idx_dir, folder)))
    assert train.main(["-c", str(path)]) == 2
    assert "trainer.save_dir: cannot create a run folder" in capsys.readouterr().err


def test_resume_from_a_file_that_is_no_checkpoint_fails_before_anything_else(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# not a checkpoint\n")
    (tmp_path / "config.json").write_text(json.dumps({"name": "x", "data_loader": {"type": "MNIST", "args": {
        "download": True, "data_dir": str(tmp_path / "data")}}}))  # would download if it were read
    assert train.main(["-r", str(readme)]) == 2
    assert "is not a PyTorch checkpoint" in capsys.readouterr().err and not (tmp_path / "data").exists()
