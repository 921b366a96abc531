"""The one-file pipeline: dense -> pruning -> quantization -> .dcz in one fit, its stages, its Table 1 row,
stage checkpoints, and resume in every stage equal to an uninterrupted run."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import ROOT, StopAfter, assert_resume_equals_whole, load_ckpt, load_script, only_run, tiny_config

import builders
import utils
from trainer.callbacks.stages import plan_stages

train = load_script("train")
test = load_script("test")


def pipeline_config(idx_dir: Path, save_dir: Path) -> dict[str, Any]:
    """The shipped default recipe's shape, shrunk: dense 0-1, pruning 2-3, quantization 4-5."""
    cfg = tiny_config(idx_dir, save_dir, max_epochs=6)
    cfg["trainer"]["callbacks"] = {
        "IterativePruning": {"keep_ratio": {"fc1": 0.1, "fc2": 0.2, "fc3": 0.5}, "schedule": "gradual",
                             "start_epoch": 2, "end_epoch": 3},
        "Quantization": {"bits": {"Linear": 4}, "epoch": 4, "lr": 1e-3}}
    cfg["export"] = {"index_bits": "auto"}
    return cfg


def test_plan_stages_from_the_schedule() -> None:
    names = [(s.name, s.first_epoch, s.last_epoch) for s in plan_stages(10, [3, 5], 7)]
    assert names == [("dense", 0, 2), ("prune", 3, 6), ("quantize", 7, 9)]
    assert [s.name for s in plan_stages(4, [0], None)] == ["prune"]  # from a dense checkpoint: no dense stage
    assert [(s.name, s.first_epoch) for s in plan_stages(4, [], 0)] == [("quantize", 0)]


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory: pytest.TempPathFactory, idx_dir: Path) -> tuple[Path, str]:
    """One uninterrupted pipeline run (shared by the tests below) and what train.py printed."""
    import contextlib
    import io

    tmp_path = tmp_path_factory.mktemp("pipeline")
    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps(pipeline_config(idx_dir, tmp_path / "runs")))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert train.main(["-c", str(path)]) == 0
    return only_run(tmp_path / "runs"), printed.getvalue()


def test_one_command_from_random_weights_to_a_decoded_dcz(whole_run: tuple[Path, str], idx_dir: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    run, out = whole_run
    summary = json.loads((run / "summary.json").read_text())
    # Every stage's model stays available, and the final file decodes into the best checkpoint's weights.
    assert {"dense.ckpt", "pruned.ckpt", "best.ckpt", "last.ckpt", "model.dcz", "compression_report.md"} <= {
        p.name for p in run.iterdir()}
    assert not load_ckpt(run / "dense.ckpt")["masks"] and load_ckpt(run / "dense.ckpt")["epoch"] == 1
    pruned = load_ckpt(run / "pruned.ckpt")
    assert not pruned["quant_index"] and int(pruned["masks"]["fc1.weight"].sum()) == round(0.1 * 784 * 300)
    assert [s["name"] for s in summary["stages"]] == ["dense", "prune", "quantize"]
    assert summary["commit"] == utils.commit_id()  # the code the run trained with
    report = json.loads((run / "compression_report.json").read_text())
    assert summary["dcz_bytes"] == (run / "model.dcz").stat().st_size == report["file"]["bytes"]
    assert summary["rate"] == pytest.approx(summary["dense_bytes"] / summary["dcz_bytes"])
    assert 1 < summary["rate_p"] < summary["rate_pq"] and summary["rate_pqh"] > 1
    # The Table 1 row printed at the end, with the errors test.py measures on the same files.
    assert re.search(r"top-1 error +dense [\d.]+ % -> pruned [\d.]+ % -> compressed file [\d.]+ %", out)
    assert f"{summary['dcz_bytes']:,} bytes model.dcz: {summary['rate']:.1f}x smaller on disk" in out
    assert test.main(["-r", str(run / "model.dcz"), "--json", "--set", f"data_loader.args.data_dir={idx_dir}"]) == 0
    assert json.loads(capsys.readouterr().out)["top1_err"] == pytest.approx(summary["top1_err"], abs=1e-4)
    assert test.main(["-r", str(run / "dense.ckpt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1_err"] == pytest.approx(summary["dense_top1_err"], abs=1e-4)


@pytest.mark.parametrize("stop_after", [0, 2, 4])  # interrupted in the dense, prune and quantize stage
def test_resume_in_every_stage_equals_an_uninterrupted_run(tmp_path: Path, idx_dir: Path, stop_after: int,
                                                          whole_run: tuple[Path, str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cut = tmp_path / "cut.json"
    cut.write_text(json.dumps(pipeline_config(idx_dir, tmp_path / "cut")))
    original = builders.build_callbacks
    with monkeypatch.context() as patch:
        patch.setattr(builders, "build_callbacks", lambda cfg, run_dir: original(cfg, run_dir) + [StopAfter(stop_after)])
        assert train.main(["-c", str(cut)]) == 0
    run = only_run(tmp_path / "cut")
    assert load_ckpt(run / "last.ckpt")["epoch"] == stop_after
    assert train.main(["-r", str(run / "last.ckpt")]) == 0
    a, b = load_ckpt(whole_run[0] / "last.ckpt"), load_ckpt(run / "last.ckpt")
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for name in a["masks"]:
        assert torch.equal(a["masks"][name], b["masks"][name]) and torch.equal(a["quant_index"][name],
                                                                                b["quant_index"][name])
    assert (whole_run[0] / "model.dcz").read_bytes() == (run / "model.dcz").read_bytes()


@pytest.mark.parametrize("stage", ["dense.ckpt", "pruned.ckpt"])
def test_resume_from_a_stage_checkpoint_equals_an_uninterrupted_run(tmp_path: Path, stage: str,
                                                                    whole_run: tuple[Path, str]) -> None:
    # A stage checkpoint is written where last.ckpt is (after validation and the scheduler's step), so -r from
    # it continues exactly as the run did; the copy keeps the whole run's files out of reach.
    run = tmp_path / "run"
    shutil.copytree(whole_run[0], run, ignore=shutil.ignore_patterns("last.ckpt", "best.ckpt", "model.dcz"))
    a, b = assert_resume_equals_whole(whole_run[0], run, stage)
    assert a["lr_schedulers"] == b["lr_schedulers"]


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs").glob("*_pipeline.json")))
def test_shipped_pipelines_have_all_three_stages(name: str) -> None:
    from parse_config import parse_config, read_json

    cfg = parse_config(read_json(ROOT / "configs" / f"{name}.json"))
    with torch.device("meta"):  # shapes without weights
        model = builders.build_model(cfg)
    callbacks = builders.build_config_callbacks(cfg, model)
    stages = builders.pipeline_stages(cfg, callbacks, Path("unused"))
    assert [s.name for s in stages.stages] == ["dense", "prune", "quantize"]


def test_default_job_is_the_fashion_mnist_pipeline() -> None:
    assert json.loads((ROOT / "config.json").read_text()) == {
        **json.loads((ROOT / "configs" / "lenet300_fashionmnist_pipeline.json").read_text()),
        "name": "lenet300_fashionmnist_pipeline"}


def test_a_new_recipe_from_a_stage_checkpoint_uses_its_own_bits(whole_run: tuple[Path, str], tmp_path: Path,
                                                                idx_dir: Path) -> None:
    # dense.ckpt holds the first recipe's 16-slot codebooks, not yet in use; a 6-bit recipe from it gets 64 slots.
    cfg = tiny_config(idx_dir, tmp_path / "runs", max_epochs=2)
    cfg["trainer"]["callbacks"] = {"IterativePruning": {"keep_ratio": 0.2}, "Quantization": {"bits": 6, "epoch": 1}}
    path = tmp_path / "from_dense.json"
    path.write_text(json.dumps(cfg))
    assert train.main(["-c", str(path), "--weights", str(whole_run[0] / "dense.ckpt")]) == 0
    ckpt = load_ckpt(only_run(tmp_path / "runs") / "last.ckpt")
    assert ckpt["state_dict"]["compression.codebooks.fc1__weight"].numel() == 64
    # No dense stage in this run: the dense error is the (unpruned) pretrained checkpoint's, as in the first run.
    first = json.loads((whole_run[0] / "summary.json").read_text())["dense_top1_err"]
    assert json.loads((only_run(tmp_path / "runs") / "summary.json").read_text())["dense_top1_err"] == first


def test_a_fit_stopped_before_any_compression_writes_no_file(tmp_path: Path, idx_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(idx_dir, tmp_path / "runs", max_epochs=3)
    cfg["trainer"]["callbacks"] = {"Quantization": {"bits": 4, "epoch": 2}}
    path = tmp_path / "q.json"
    path.write_text(json.dumps(cfg))
    original = builders.build_callbacks
    monkeypatch.setattr(builders, "build_callbacks", lambda cfg, run_dir: original(cfg, run_dir) + [StopAfter(0)])
    assert train.main(["-c", str(path)]) == 0
    assert not (only_run(tmp_path / "runs") / "model.dcz").exists()  # codebooks set up, nothing quantized yet
