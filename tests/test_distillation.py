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
from trainer.callbacks.distillation import Teacher
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
    got = Teacher([teacher], t, alpha).loss(x, student, hard)
    assert got.item() == pytest.approx((1 - alpha) * 0.8 + alpha * t * t * kl.item(), rel=1e-5)


def test_teacher_is_the_network_at_its_epoch_and_stays_frozen() -> None:
    module = tiny_module()
    seen: dict[str, torch.Tensor] = {}

    class Snapshot(IterativePruning):  # records the weights at the start of epoch 1, before anything else
        def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            if trainer.current_epoch == 1:
                seen.update({k: v.clone() for k, v in pl_module.model.state_dict().items()})
            super().on_train_epoch_start(trainer, pl_module)

    fit(module, [Snapshot(keep_ratio=0.5, start_epoch=2), Distillation(epoch=1)], epochs=3)
    assert module.teacher is not None and not any(p.requires_grad for p in module.teacher.models[0].parameters())
    for key, value in module.teacher.models[0].state_dict().items():
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
    assert late.teacher is None and torch.equal(late.model.fc1.weight, plain.model.fc1.weight)


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


def test_mixup_mixes_inputs_and_labels_with_one_beta_weight_per_batch() -> None:
    x, y = torch.arange(12.0).reshape(6, 2), torch.arange(6)
    torch.manual_seed(3)
    mixed, y_mixed, lam = Teacher([torch.nn.Identity()], 2.0, 0.5, mixup=0.4).mix(x, y)
    torch.manual_seed(3)  # the same draws, made by hand
    lam_ref = float(torch.distributions.Beta(0.4, 0.4).sample())
    perm = torch.randperm(6)
    assert lam == lam_ref and 0.0 < lam < 1.0
    assert torch.equal(y_mixed, y[perm]) and not torch.equal(perm, torch.arange(6))
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[perm])
    state = torch.get_rng_state()  # without mixup: the batch itself, and nothing drawn
    same, y_same, one = Teacher([torch.nn.Identity()], 2.0, 0.5).mix(x, y)
    assert same is x and y_same is y and one == 1.0 and torch.equal(torch.get_rng_state(), state)


def test_mixup_changes_training_only_when_on() -> None:
    runs = {}
    for name, mixup in (("plain", 0.0), ("mixed", 0.5)):
        module = tiny_module()
        torch.manual_seed(0)
        fit(module, [Distillation(epoch=0, alpha=0.7, mixup=mixup)], epochs=2)
        runs[name] = module.model.fc1.weight.detach().clone()
    again = tiny_module()
    torch.manual_seed(0)
    fit(again, [Distillation(epoch=0, alpha=0.7)], epochs=2)
    assert torch.equal(again.model.fc1.weight, runs["plain"])  # mixup 0: the loss as before, deterministic
    assert not torch.equal(runs["mixed"], runs["plain"])


def test_resume_with_mixup_equals_an_uninterrupted_run(tmp_path: Path, idx_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # lambda and the permutation come from torch's generator: its state is in last.ckpt
    callbacks = {**CALLBACKS, "Distillation": {**CALLBACKS["Distillation"], "mixup": 0.4}}
    whole, run = whole_and_cut_runs(tmp_path, idx_dir, monkeypatch, callbacks, max_epochs=4, stop_after=2)
    assert_resume_equals_whole(whole, run)


def test_config_refuses_a_negative_mixup(tmp_path: Path, idx_dir: Path) -> None:
    path = write_config(tmp_path, idx_dir, "bad", {"Distillation": {"mixup": -1}}, max_epochs=3)
    with pytest.raises(ConfigError, match=r"trainer\.callbacks\.Distillation\.mixup: must be >= 0"):
        parse_config(json.loads(path.read_text()))


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
    config, _ = lenet5_teacher(tmp_path, idx_dir)
    callbacks = {**CALLBACKS, "Distillation": {**CALLBACKS["Distillation"], "teacher": str(config)}}
    # killed after epoch 0, before the teacher (epoch 1) was taken: the resume must find the trained one
    whole, run = whole_and_cut_runs(tmp_path, idx_dir, monkeypatch, callbacks, max_epochs=3, stop_after=0)
    (trained,) = (run / "teacher").glob("*/*/last.ckpt")  # its own folder inside the run
    assert (run / "teacher" / "teacher.ckpt").read_bytes() == trained.read_bytes()
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


def test_an_ensembles_soft_target_is_the_mean_of_its_members_distributions() -> None:
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    x, student, hard, t, alpha = torch.randn(5, 4), torch.randn(5, 3), torch.tensor(0.8), 2.0, 0.25
    p = (F.softmax(a(x) / t, dim=1) + F.softmax(b(x) / t, dim=1)) / 2  # Hinton 2015 §2: the arithmetic mean
    kl = (p * (p.log() - F.log_softmax(student / t, dim=1))).sum(1).mean()
    got = Teacher([a, b], t, alpha).loss(x, student, hard)
    assert got.item() == pytest.approx((1 - alpha) * 0.8 + alpha * t * t * kl.item(), rel=1e-5)
    assert Teacher([a, a], t, alpha).loss(x, student, hard).item() == pytest.approx(
        Teacher([a], t, alpha).loss(x, student, hard).item(), rel=1e-6)  # two equal members: one teacher


def test_an_ensemble_of_itself_and_another_network_teaches_and_a_resume_keeps_both(
        tmp_path: Path, idx_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, ckpt = lenet5_teacher(tmp_path, idx_dir)
    callbacks = {**CALLBACKS, "Distillation": {**CALLBACKS["Distillation"], "teacher": ["self", str(ckpt)]}}
    whole, run = whole_and_cut_runs(tmp_path, idx_dir, monkeypatch, callbacks, max_epochs=4, stop_after=2)
    stored = next(v for k, v in load_ckpt(run / "last.ckpt")["callbacks"].items() if "Distillation" in k)
    own, lenet5 = stored["teachers"]
    assert "fc3.weight" in own and "conv1.weight" not in own  # the LeNet-300-100 itself, at epoch 1 ...
    assert all(torch.equal(lenet5[k], v) for k, v in network_state(load_ckpt(ckpt)).items())  # ... and the LeNet-5
    assert_resume_equals_whole(whole, run)
    alone = write_config(tmp_path, idx_dir, "alone", {**CALLBACKS, "Distillation": {  # the LeNet-5 alone differs
        **CALLBACKS["Distillation"], "teacher": str(ckpt)}}, max_epochs=4)
    import train
    assert train.main(["-c", str(alone)]) == 0
    assert not torch.equal(last_ckpt(tmp_path / "alone")["state_dict"]["model.fc1.weight"],
                           load_ckpt(whole / "last.ckpt")["state_dict"]["model.fc1.weight"])


def test_a_config_named_twice_trains_two_teachers_with_their_own_seeds(tmp_path: Path, idx_dir: Path) -> None:
    import train

    config, _ = lenet5_teacher(tmp_path, idx_dir)
    path = write_config(tmp_path, idx_dir, "run", {"Distillation": {"epoch": 1, "teacher": [str(config)] * 2}},
                        max_epochs=2)
    assert train.main(["-c", str(path)]) == 0
    run = only_run(tmp_path / "run")
    (first,), (second,) = (run / "teacher").glob("*/*/config.json"), (run / "teacher_1").glob("*/*/config.json")
    assert (json.loads(first.read_text())["seed"], json.loads(second.read_text())["seed"]) == (7, 8)
    weights = [network_state(load_ckpt(run / folder / "teacher.ckpt"))["conv1.weight"]
               for folder in ("teacher", "teacher_1")]
    assert not torch.equal(*weights)  # two networks, not one twice
    stored = next(v for k, v in load_ckpt(run / "last.ckpt")["callbacks"].items() if "Distillation" in k)
    assert [torch.equal(s["conv1.weight"], w) for s, w in zip(stored["teachers"], weights)] == [True, True]


def test_teacher_command_gives_member_i_the_seed_plus_i() -> None:
    import train

    def seed(cmd: list[str]) -> str | None:
        return next((a.split("=")[1] for a in cmd if a.startswith("seed=")), None)

    assert seed(train.teacher_command("t.json", 42, 0, Path("x"))) is None  # the config as it is
    assert seed(train.teacher_command("t.json", 42, 2, Path("x"))) == "44"
    assert seed(train.teacher_command("t.json", None, 2, Path("x"))) is None  # unseeded stays unseeded
    assert train.teacher_folder(0) == "teacher" and train.teacher_folder(3) == "teacher_3"


def test_config_checks_an_ensemble_early_and_a_resume_with_other_teachers_fails_cleanly(tmp_path: Path,
                                                                                          idx_dir: Path) -> None:
    def refused(teacher: object) -> str:
        cfg = tiny_config(idx_dir, tmp_path)
        cfg["trainer"]["callbacks"] = {"Distillation": {"teacher": teacher}}
        with pytest.raises(ConfigError) as err:
            parse_config(cfg)
        return str(err.value)

    assert "a list of 1 to 8 teachers, got 0" in refused([])
    assert "a list of 1 to 8 teachers, got 9" in refused(["self"] * 9)
    assert "'t.dcz': expected null" in refused(["self", "t.dcz"])
    path = write_config(tmp_path, idx_dir, "bad", {"Distillation": {"teacher": ["self", str(tmp_path / "no.ckpt")]}},
                        max_epochs=3)
    with pytest.raises(ConfigError, match=r"Distillation\.teacher: .*no\.ckpt: no such file"):
        builders.build_config_callbacks(parse_config(json.loads(path.read_text())), builders.build_model(
            parse_config(json.loads(path.read_text()))))
    from utils import CheckpointError
    callback = Distillation(teacher=["self", "self"])
    with pytest.raises(CheckpointError, match="holds 1 teachers, the config names 2"):
        callback.load_state_dict({"teacher": {}})
    callback.load_state_dict({"teachers": [{}, {}]})  # the same number: taken
    assert callback._saved == [{}, {}]


def test_feature_term_is_the_mean_normalised_squared_error_of_the_named_outputs() -> None:
    teacher = Teacher([torch.nn.Identity()], 2.0, 0.0, feature_weight=0.5)
    # two layers: (s - t)² / t² averaged per layer: fc1 ((1-2)² + (2-2)²)/2 / ((4+4)/2) = 0.125; conv 1² / 1² = 1
    teacher.student_out.update(fc1=torch.tensor([[1.0, 2.0]]), conv=torch.tensor([[0.0]]))
    teacher.teacher_out.update(fc1=torch.tensor([[2.0, 2.0]]), conv=torch.tensor([[1.0]]))
    assert teacher.hint().item() == pytest.approx((0.125 + 1.0) / 2)
    x = torch.zeros(1, 3)  # alpha 0: the soft term is off, the loss is the hard loss plus beta times the hint
    assert teacher.loss(x, torch.zeros(1, 3), torch.tensor(0.8)).item() == pytest.approx(0.8 + 0.5 * 0.5625)
    teacher.student_out["fc1"] = torch.zeros(1, 3)
    with pytest.raises(ValueError, match=r"fc1 outputs \(1, 3\) in the student but \(1, 2\) in the teacher"):
        teacher.hint()


def test_features_change_training_and_their_hooks_go_at_fit_end() -> None:
    plain, hinted = tiny_module(), tiny_module()
    fit(plain, [Distillation(epoch=0, alpha=0.7)], epochs=2)
    fit(hinted, [Distillation(epoch=0, alpha=0.7, features=["fc1"], feature_weight=1.0)], epochs=2)
    assert not torch.equal(plain.model.fc1.weight, hinted.model.fc1.weight)
    assert not hinted.model.fc1._forward_hooks and not hinted.teacher.models[0].fc1._forward_hooks
    assert not hinted.teacher.student_out and not hinted.teacher.teacher_out  # no activations kept after the fit
    zero = tiny_module()  # beta 0: the features are recorded, the loss is the plain distillation loss
    fit(zero, [Distillation(epoch=0, alpha=0.7, features=["Linear"], feature_weight=0.0)], epochs=2)
    assert torch.equal(zero.model.fc1.weight, plain.model.fc1.weight)


def test_resume_with_features_equals_an_uninterrupted_run(tmp_path: Path, idx_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # the hooks are registered again when the resumed run takes its teacher back; the file decodes the same bytes
    callbacks = {**CALLBACKS, "Distillation": {**CALLBACKS["Distillation"], "features": ["fc2"],
                                               "feature_weight": 0.1}}
    whole, run = whole_and_cut_runs(tmp_path, idx_dir, monkeypatch, callbacks, max_epochs=4, stop_after=2)
    assert_resume_equals_whole(whole, run)


def test_config_checks_features_early(tmp_path: Path, idx_dir: Path) -> None:
    path = write_config(tmp_path, idx_dir, "bad", {"Distillation": {"features": ["conv9"]}}, max_epochs=3)
    cfg = parse_config(json.loads(path.read_text()))
    with pytest.raises(ConfigError, match=r"Distillation\.features: 'conv9' is not a prunable layer of LeNet300"):
        builders.build_config_callbacks(cfg, builders.build_model(cfg))
    raw = json.loads(path.read_text())
    raw["trainer"]["callbacks"] = {"Distillation": {"features": ["fc1"], "teacher": ["self", "a.ckpt"]}}
    with pytest.raises(ConfigError, match=r"features \['fc1'\] need one teacher of the student's architecture, got 2"):
        parse_config(raw)
    other = tiny_config(idx_dir, tmp_path / "x")
    other["arch"] = {"type": "LeNet5", "args": {}}
    (tmp_path / "lenet5.json").write_text(json.dumps(other))
    raw["trainer"]["callbacks"] = {"Distillation": {"features": ["fc1"], "teacher": str(tmp_path / "lenet5.json")}}
    with pytest.raises(ConfigError, match=r"Distillation\.features: the teacher .*lenet5\.json is a LeNet5 \{\}, this "
                                          r"run trains a LeNet300 \{\}; features need a teacher of the student's"):
        builders.build_config_callbacks(parse_config(raw), builders.build_model(parse_config(raw)))
    other["arch"] = {"type": "LeNet300", "args": {"in_features": 392}}  # the same type, other layer shapes
    (tmp_path / "lenet5.json").write_text(json.dumps(other))
    with pytest.raises(ConfigError, match=r"is a LeNet300 \{'in_features': 392\}, this run trains a LeNet300 \{\}"):
        builders.build_config_callbacks(parse_config(raw), builders.build_model(parse_config(raw)))
    raw["trainer"]["callbacks"] = {"Distillation": {"feature_weight": -1}}
    with pytest.raises(ConfigError, match=r"Distillation\.feature_weight: must be >= 0"):
        parse_config(raw)
