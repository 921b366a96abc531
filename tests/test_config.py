"""Every documented configuration mistake ends in one ConfigError naming the JSON path (exit code 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import ROOT, load_script, tiny_config
from parse_config import (ConfigError, apply_overrides, instantiate, load_config, make_run_dir, parse_config,
                          read_json)


@pytest.fixture()
def raw(tmp_path: Path) -> dict[str, Any]:
    return tiny_config(tmp_path / "data", tmp_path / "runs")


def set_key(raw: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    return apply_overrides(raw, [(key, value)])


def test_valid_config_resolves_num_classes_from_data(raw: dict[str, Any]) -> None:
    cfg = parse_config(raw)
    assert cfg.arch.args["num_classes"] == 10 and cfg.trainer.monitor_metric == "val/top1_err"


@pytest.mark.parametrize(("key", "value", "match"), [
    ("colour", 1, r"^colour: unknown key; valid keys here: name, seed"),
    ("trainer.epochs", 3, r"trainer\.epochs: unknown key; valid keys here: max_epochs"),
    ("arch.type", "LeNet", r"arch\.type: unknown type; valid types: LeNet300, LeNet5, AlexNet, VGG16"),
    ("data_loader.type", "SVHN", r"data_loader\.type: unknown type; valid types: MNIST, FashionMNIST"),
    ("optimizer.type", "Adagrad", r"optimizer\.type: unknown type; valid types: SGD, Adam"),
    ("lr_scheduler.type", "OneCycleLR", r"lr_scheduler\.type: unknown type"),
    ("trainer.callbacks", {"Pruning": {}}, r"trainer\.callbacks\.Pruning: unknown key; valid keys here: Distillation, StructuredPruning, IterativePruning, Quantization"),
    ("trainer.max_epochs", "3", r"trainer\.max_epochs: expected an integer \(got \"3\"\)"),
    ("trainer.max_epochs", 0, r"trainer\.max_epochs: must be >= 1 \(got 0\)"),
    ("trainer.deterministic", 1, r"trainer\.deterministic: expected true or false \(got 1\)"),
    ("trainer.precision", "16", r"trainer\.precision: must be one of '32-true', '16-mixed'"),
    ("trainer.accelerator", "npu", r"trainer\.accelerator: must be one of 'auto', 'cpu'"),
    ("trainer.min_epochs", 3, r"trainer: min_epochs \(3\) must not exceed max_epochs \(2\)"),
    ("export.index_bits", {"Linear": 17}, r"export\.index_bits: index bits must be in 1\.\.16 or 'auto', got 17"),
    ("trainer.monitor", "val/loss", r"trainer\.monitor: must be '<min\|max> <metric>'"),
    ("trainer.monitor", "min val/acc", r"trainer\.monitor: metric 'val/acc' is not logged; choose one of"),
    ("loss", "mse", r"loss: must be one of 'cross_entropy'"),
    ("metrics", ["accuracy"], r"metrics\[0\]: must be one of 'top1_err' or 'top5_err'"),
    ("name", "my run/1", r"name: must match the pattern"),
    ("optimizer.args.lrr", 0.1, r"optimizer\.args\.lrr: unknown argument for SGD; valid arguments: lr, momentum"),
    ("optimizer.args.lr", -1, r"optimizer\.args: SGD rejected .*Invalid learning rate: -1"),
    ("optimizer.args.lr", "fast", r"optimizer\.args\.lr: expected"),
    ("data_loader.args.batch_size", "64", r"data_loader\.args\.batch_size: expected int, got '64'"),
    ("data_loader.args.batch_size", 0, r"data_loader\.args: FashionMNIST rejected .*batch_size must be >= 1"),
    ("data_loader.args.validation_split", 1.5, r"validation_split must be in \(0, 1\)"),
    ("data_loader.args.shuffle", True, r"data_loader\.args\.shuffle: unknown argument for FashionMNIST"),
    ("arch.args.num_classes", 100, r"arch\.args\.num_classes: FashionMNIST has 10 classes, got 100"),
    ("arch.args.depth", 3, r"arch\.args\.depth: unknown argument for LeNet300; valid arguments: num_classes"),
    ("lr_scheduler.args", {}, r"lr_scheduler\.args\.step_size: missing required argument for StepLR"),
    ("trainer.callbacks", {"EarlyStopping": {"patience": 2}},
     r"trainer\.callbacks\.EarlyStopping\.monitor: missing required argument"),
])
def test_config_errors_name_the_path(raw: dict[str, Any], key: str, value: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(set_key(raw, key, value))


def test_missing_required_key(raw: dict[str, Any]) -> None:
    del raw["optimizer"]
    with pytest.raises(ConfigError, match=r"^optimizer: missing required key$"):
        parse_config(raw)


def test_several_errors_are_reported_together(raw: dict[str, Any]) -> None:
    raw = apply_overrides(raw, [("trainer.max_epochs", -1), ("seed", "x")])
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert "trainer.max_epochs" in str(info.value) and "seed" in str(info.value)


def test_invalid_json_gives_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{\n  "name": "x",\n  "arch": {"type": "LeNet300",}\n}\n')
    with pytest.raises(ConfigError, match=r"bad\.json: invalid JSON at line 3, column 31"):
        read_json(path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file .*nope.json"):
        read_json(tmp_path / "nope.json")


def test_overrides_apply_and_are_validated(tmp_path: Path, raw: dict[str, Any]) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(raw))
    cfg = load_config(path, None, [("optimizer.args.lr", 0.2), ("trainer.max_epochs", 5),
                                   ("data_loader.args.batch_size", 8)])
    assert cfg.optimizer.args["lr"] == 0.2 and cfg.trainer.max_epochs == 5 and cfg.data_loader.args["batch_size"] == 8
    with pytest.raises(ConfigError, match=r"trainer\.max_epoch: unknown key"):
        load_config(path, None, [("trainer.max_epoch", 5)])
    with pytest.raises(ConfigError, match=r"--set name\.x: name is not an object"):
        load_config(path, None, [("name.x", 5)])


def test_run_dirs_never_collide(raw: dict[str, Any]) -> None:
    cfg = parse_config(raw)
    dirs = {make_run_dir(cfg) for _ in range(5)}  # same second, same name
    assert len(dirs) == 5
    for d in dirs:
        assert json.loads((d / "config.json").read_text())["name"] == "tiny"


@pytest.mark.parametrize(("args", "match"), [
    (["--set", "trainer.max_epochs=0"], "trainer.max_epochs: must be >= 1 (got 0)"),
    (["--set", "trainer.max_epochs"], "expected KEY=VALUE"),
    (["--lr", "-1"], "Invalid learning rate"),
    (["--bs", "0"], "batch_size must be >= 1"),
    (["--set", "data_loader.args.data_dir=/nonexistent/x"], "FashionMNIST not found: looked for its idx files"),
    # Refused by Lightning itself (after the run folder is made: it is removed again).
    (["--set", "trainer.accelerator=mps"], "trainer: `MPSAccelerator` can not run on your system"),
    (["--set", "trainer.accelerator=tpu"], "trainer: Requirement 'torch_xla"),
    (["--set", 'trainer.callbacks={"EarlyStopping": {"monitor": "val/loss", "mode": "avg"}}'],
     "trainer.callbacks.EarlyStopping: `mode` can be min, max, got avg"),
    (["--set", 'trainer.callbacks={"ModelCheckpoint": {"save_top_k": -2}}'],
     "trainer.callbacks.ModelCheckpoint: Invalid value for save_top_k=-2"),
])
def test_train_cli_errors_exit_2(config_file: Path, args: list[str], match: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    train = load_script("train")
    assert train.main(["-c", str(config_file), *args]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert not list((config_file.parent / "runs").glob("tiny/*"))  # no run folder left behind


@pytest.mark.parametrize(("devices", "expected"), [(2, 1), ("auto", 1), ([3, 1], [3]), ("1,2", [1])])
def test_evaluation_uses_one_device_of_the_configured_ones(raw: dict[str, Any], devices: Any, expected: Any) -> None:
    from builders import one_device

    assert one_device(parse_config(set_key(raw, "trainer.devices", devices))) == {"devices": expected,
                                                                                 "strategy": "auto"}


def test_tuple_arguments_are_json_lists(raw: dict[str, Any]) -> None:
    raw["optimizer"] = {"type": "Adam", "args": {"lr": 1e-3, "betas": [0.8, 0.99]}}
    cfg = parse_config(raw)
    optimizer = instantiate(cfg.optimizer, "optimizer", params=[torch.nn.Parameter(torch.zeros(1))])
    assert optimizer.defaults["betas"][1] == 0.99
    raw["optimizer"]["args"]["betas"] = "fast"
    with pytest.raises(ConfigError, match=r"optimizer\.args\.betas: expected tuple, got 'fast'"):
        parse_config(raw)


def test_cli_error_in_a_real_process_has_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x",')
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "-c", str(bad)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "invalid JSON at line 1" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.json")) + [ROOT / "config.json"],
                         ids=lambda p: p.name)
def test_shipped_configs_are_valid(path: Path) -> None:
    from builders import build_config_callbacks, build_model

    cfg = parse_config(read_json(path))
    assert cfg.trainer.accelerator == "auto"  # shipped configs must run on CPU and GPU alike
    with torch.device("meta"):  # shapes without weights: VGG-16's 138M parameters cost nothing
        model = build_model(cfg)
    callbacks = build_config_callbacks(cfg, model)  # layer names and epochs fit the model
    assert len(callbacks) == len(cfg.trainer.callbacks.items())


@pytest.mark.skipif(not torch.__version__.startswith("2.14.1"),
                    reason="the reference lists torch's optimizer and scheduler signatures: generated with torch 2.14.1")
def test_the_configuration_reference_is_generated_from_the_models_and_up_to_date() -> None:
    import config_reference

    text = config_reference.reference()
    assert (ROOT / "docs" / "configuration.md").read_text() == text, "stale: run python config_reference.py --write"
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) > 60 and all(line.split("|")[4].strip() for line in rows)  # every key says what it means
    for key in ("trainer.callbacks.IterativePruning.keep_ratio", "trainer.callbacks.Quantization.bias_bits",
                "export.codec", "trainer.gradient_clip_val"):
        assert f"| `{key}` |" in text, key


def test_a_model_checkpoint_beside_ours_is_refused_when_it_would_clash_and_works_otherwise(tmp_path: Path,
                                                                                          idx_dir: Path) -> None:
    train = load_script("train")
    for name, args, code in (("same", {}, 2), ("other", {"monitor": "val/loss", "filename": "by_loss"}, 0)):
        cfg = tiny_config(idx_dir, tmp_path / name, max_epochs=1)
        cfg["trainer"]["callbacks"] = {"ModelCheckpoint": args}
        (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
        assert train.main(["-c", str(tmp_path / f"{name}.json")]) == code
    assert not list((tmp_path / "same").rglob("config.json"))  # refused before anything ran: no run folder left
    assert list((tmp_path / "other").rglob("by_loss.ckpt"))
