"""``Distillation``: the teacher is frozen at its epoch, changes the loss, and survives a resume exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import (StopAfter, assert_resume_equals_whole, last_ckpt, load_ckpt, only_run, tiny_config, whole_and_cut_runs,
                     write_config)
from test_callbacks_trainer import fit, tiny_module

import builders
from parse_config import ConfigError, parse_config
from trainer.callbacks import Distillation, IterativePruning
from trainer.callbacks.distillation import TeacherOutputs
from trainer.lit_model import network_state

CALLBACKS = {"IterativePruning": {"keep_ratio": 0.2, "start_epoch": 1},
             "Distillation": {"epoch": 1, "temperature": 3.0, "alpha": 0.7},
             "Quantization": {"bits": 3, "epoch": 2}}


def test_soft_term_is_hintons_formula() -> None:
    torch.manual_seed(0)
    teacher = torch.nn.Linear(4, 3)
    x, student, hard = torch.randn(5, 4), torch.randn(5, 3), torch.tensor(0.8)
    t, alpha = 2.0, 0.25
    p = F.softmax(teacher(x) / t, dim=1)  # KL(p || q) summed over classes, averaged over the batch
    kl = (p * (p.log() - F.log_softmax(student / t, dim=1))).sum(1).mean()
    distillation = Distillation(temperature=t, alpha=alpha)
    distillation.model = teacher
    got = distillation.loss(x, student, hard)
    assert got.item() == pytest.approx((1 - alpha) * 0.8 + alpha * t * t * kl.item(), rel=1e-5)


def test_teacher_is_the_network_at_its_epoch_and_stays_frozen() -> None:
    module = tiny_module()
    seen: dict[str, torch.Tensor] = {}

    class Snapshot(IterativePruning):  # records the weights at the start of epoch 1, before anything else
        def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            if trainer.current_epoch == 1:
                seen.update({k: v.clone() for k, v in pl_module.model.state_dict().items()})
            super().on_train_epoch_start(trainer, pl_module)

    distillation = Distillation(epoch=1)
    fit(module, [Snapshot(keep_ratio=0.5, start_epoch=2), distillation], epochs=3)
    assert module.loss_hook == distillation.loss  # the student's loss gets the teacher's term
    assert distillation.model is not None and not any(p.requires_grad for p in distillation.model.parameters())
    for key, value in distillation.model.state_dict().items():
        assert torch.equal(value, seen[key]), key  # trained two more epochs, the teacher did not move
    assert not torch.equal(module.model.fc1.weight, seen["fc1.weight"])
    assert not any(k.startswith("teacher") for k in module.state_dict())  # never part of the student


def test_distillation_changes_training_and_is_off_before_its_epoch() -> None:
    plain, taught = tiny_module(), tiny_module()
    fit(plain, [], epochs=2)
    fit(taught, [Distillation(epoch=0, alpha=0.9)], epochs=2)
    assert not torch.equal(plain.model.fc1.weight, taught.model.fc1.weight)
    late = tiny_module()  # teacher from epoch 2, stopped after epoch 1: so far, plain training
    fit(late, [Distillation(epoch=2), StopAfter(1)], epochs=3)
    assert late.loss_hook is None and torch.equal(late.model.fc1.weight, plain.model.fc1.weight)


def test_resume_after_the_teacher_was_taken_equals_an_uninterrupted_run(tmp_path: Path, idx_dir: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # killed after epoch 2: the teacher (taken at 1) is in last.ckpt
    whole, run = whole_and_cut_runs(tmp_path, idx_dir, monkeypatch, CALLBACKS, max_epochs=4, stop_after=2)
    stored = next(v for k, v in load_ckpt(run / "last.ckpt")["callbacks"].items() if "Distillation" in k)
    # The teacher is the dense stage's network, taken before the first pruning step of the same epoch.
    dense = network_state(load_ckpt(run / "dense.ckpt"))
    assert set(stored["teacher"]) == set(dense)
    assert all(torch.equal(stored["teacher"][k], v) for k, v in dense.items())
    assert_resume_equals_whole(whole, run)


def test_config_order_puts_the_teacher_before_pruning_whatever_the_json_order(tmp_path: Path, idx_dir: Path) -> None:
    path = write_config(tmp_path, idx_dir, "order", dict(reversed(list(CALLBACKS.items()))), max_epochs=4)
    cfg = parse_config(json.loads(path.read_text()))
    names = [type(c).__name__ for c in builders.build_config_callbacks(cfg, builders.build_model(cfg))]
    assert names == ["Distillation", "IterativePruning", "Quantization"]


def test_config_checks_distillation_early(tmp_path: Path, idx_dir: Path) -> None:
    path = write_config(tmp_path, idx_dir, "bad", {"Distillation": {"epoch": 9}}, max_epochs=3)
    cfg = parse_config(json.loads(path.read_text()))
    with pytest.raises(ConfigError, match=r"trainer\.callbacks\.Distillation: epoch 9 is outside the run's epochs 0\.\.2"):
        builders.build_config_callbacks(cfg, builders.build_model(cfg))
    with pytest.raises(ConfigError, match=r"trainer\.callbacks\.Distillation\.temperature: must be > 0"):
        parse_config({**json.loads(path.read_text()), "trainer": {
            **json.loads(path.read_text())["trainer"], "callbacks": {"Distillation": {"temperature": 0}}}})


def lenet5_teacher(tmp_path: Path, idx_dir: Path) -> tuple[Path, Path]:
    """A tiny LeNet-5 config on the tiny data, and the last.ckpt of one epoch of it (trained by train.py)."""
    import train

    cfg = tiny_config(idx_dir, tmp_path / "teacher_runs", max_epochs=1)
    cfg["arch"] = {"type": "LeNet5", "args": {}}
    path = tmp_path / "teacher.json"
    path.write_text(json.dumps(cfg))
    assert train.main(["-c", str(path)]) == 0
    return path, only_run(tmp_path / "teacher_runs") / "last.ckpt"


def test_another_network_teaches_and_a_resume_keeps_it(tmp_path: Path, idx_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _, ckpt = lenet5_teacher(tmp_path, idx_dir)
    callbacks = {**CALLBACKS, "Distillation": {**CALLBACKS["Distillation"], "teacher": str(ckpt)}}
    whole, run = whole_and_cut_runs(tmp_path, idx_dir, monkeypatch, callbacks, max_epochs=4, stop_after=2)
    stored = next(v for k, v in load_ckpt(run / "last.ckpt")["callbacks"].items() if "Distillation" in k)
    lenet5 = network_state(load_ckpt(ckpt))
    assert "conv1.weight" in stored["teacher"] and set(stored["teacher"]) == set(lenet5)  # the LeNet-5, not itself
    assert all(torch.equal(stored["teacher"][k], v) for k, v in lenet5.items())
    assert_resume_equals_whole(whole, run)
    own = write_config(tmp_path, idx_dir, "own", CALLBACKS, max_epochs=4)  # its own dense model teaching instead
    import train
    assert train.main(["-c", str(own)]) == 0
    assert not torch.equal(last_ckpt(tmp_path / "own")["state_dict"]["model.fc1.weight"],
                           load_ckpt(whole / "last.ckpt")["state_dict"]["model.fc1.weight"])


def test_a_teacher_config_is_trained_first_and_once(tmp_path: Path, idx_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    config, ckpt = lenet5_teacher(tmp_path, idx_dir)  # the config, and the network train.py makes of it
    callbacks = {**CALLBACKS, "Distillation": {**CALLBACKS["Distillation"], "teacher": str(config)}}
    # killed after epoch 0, before the teacher (epoch 1) was taken: the resume must find the trained one. The whole
    # run is taught by the checkpoint: training the config in a process of its own gives that same network.
    whole_callbacks = {**CALLBACKS, "Distillation": {**CALLBACKS["Distillation"], "teacher": str(ckpt)}}
    whole, run = whole_and_cut_runs(tmp_path, idx_dir, monkeypatch, callbacks, max_epochs=3, stop_after=0,
                                    whole_callbacks=whole_callbacks)
    (trained,) = (run / "teacher").glob("*/*/last.ckpt")  # its own folder inside the run
    assert (run / "teacher" / "teacher.ckpt").read_bytes() == trained.read_bytes()
    assert all(torch.equal(v, network_state(load_ckpt(ckpt))[k]) for k, v in network_state(load_ckpt(trained)).items())
    assert not any("Distillation" in k for k in load_ckpt(run / "last.ckpt")["callbacks"])  # not taken yet
    assert_resume_equals_whole(whole, run)
    assert len(list((run / "teacher").glob("*/*"))) == 1  # nothing trained again
    stored = next(v for k, v in load_ckpt(run / "last.ckpt")["callbacks"].items() if "Distillation" in k)
    assert all(torch.equal(stored["teacher"][k], v) for k, v in network_state(load_ckpt(trained)).items())


def test_config_checks_the_teacher_early(tmp_path: Path, idx_dir: Path) -> None:
    def error(teacher: str) -> str:
        path = write_config(tmp_path, idx_dir, "bad", {"Distillation": {"teacher": teacher}}, max_epochs=3)
        cfg = parse_config(json.loads(path.read_text()))
        with pytest.raises(ConfigError) as err:
            builders.build_config_callbacks(cfg, builders.build_model(cfg))
        return str(err.value)

    assert "no such file" in error(str(tmp_path / "missing.ckpt"))
    other = tiny_config(idx_dir, tmp_path / "x")
    other["data_loader"]["type"] = "MNIST"
    (tmp_path / "mnist.json").write_text(json.dumps(other))
    assert "is a teacher for MNIST with 10 classes; this run trains on FashionMNIST" in error(str(tmp_path / "mnist.json"))
    (tmp_path / "broken.json").write_text("{")
    assert "trainer.callbacks.Distillation.teacher" in error(str(tmp_path / "broken.json"))
    with pytest.raises(ConfigError, match=r"Distillation\.teacher: .*expected null .*\.ckpt.*\.json"):
        parse_config({**tiny_config(idx_dir, tmp_path), "trainer": {
            **tiny_config(idx_dir, tmp_path)["trainer"], "callbacks": {"Distillation": {"teacher": "t.dcz"}}}})


def test_removed_options_load_when_off_and_are_refused_when_on(tmp_path: Path, idx_dir: Path) -> None:
    # Resolved config.json files of earlier runs list every argument, the removed ones included, at "off".
    off = {"IterativePruning": {"keep_ratio": 0.2, "splicing": False, "block": 1, "reset_weights": False},
           "Distillation": {"mixup": 0.0, "features": [], "feature_weight": 1.0}}
    cfg = parse_config(json.loads(write_config(tmp_path, idx_dir, "old", off, max_epochs=3).read_text()))
    assert cfg.trainer.callbacks.IterativePruning.keep_ratio == 0.2
    on = {"IterativePruning": {"keep_ratio": 0.2, "splicing": True}}
    with pytest.raises(ConfigError, match=r"IterativePruning\.splicing: this option was removed \(docs/experiments"):
        parse_config(json.loads(write_config(tmp_path, idx_dir, "new", on, max_epochs=3).read_text()))
    with pytest.raises(ConfigError, match=r"Distillation\.teacher: expected a string"):  # an ensemble
        parse_config(json.loads(write_config(tmp_path, idx_dir, "list", {"Distillation": {"teacher": ["self"]}},
                                             max_epochs=3).read_text()))


def test_cached_teacher_outputs_are_the_teachers_found_by_content() -> None:
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5)).eval()
    images = torch.randn(2500, 1, 3, 4)
    images[7] = images[3]  # equal inputs: one key, the same outputs
    cache = TeacherOutputs(teacher, lambda a, b: images[a:b], len(images))
    assert len(cache.keys) == len(images) == len(torch.unique(cache.keys)) + 1
    batch = images[torch.randperm(len(images))[:300]]
    with torch.no_grad():
        assert torch.allclose(cache.lookup(batch), teacher(batch), atol=1e-6)
        fresh = torch.randn(4, 1, 3, 4)  # never seen: run through the teacher
        mixed = torch.cat([batch[:5], fresh])
        assert torch.allclose(cache.lookup(mixed), teacher(mixed), atol=1e-6)


def test_resume_with_cached_teacher_outputs_equals_an_uninterrupted_run(tmp_path: Path, idx_dir: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    callbacks = {**CALLBACKS, "Distillation": {**CALLBACKS["Distillation"], "cache": True}}
    whole, run = whole_and_cut_runs(tmp_path, idx_dir, monkeypatch, callbacks, max_epochs=4, stop_after=2)
    assert_resume_equals_whole(whole, run)
    assert "computed once" in (whole / "info.log").read_text() and "computed once" in (run / "info.log").read_text()
