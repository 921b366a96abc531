"""benchmarks/reproduce.py: the results tables from run folders, the model.dcz check, bad input.

The fake runs are finished pipeline runs minus the training: a real ``model.dcz`` of an untrained LeNet
(every weight tensor pruned to 10 % by magnitude and k-means quantized to 16 clusters) written by the real
exporter, its real ``compression_report.json``, and a hand-written ``summary.json`` whose compressed top-1
error is what ``test.py`` measures on the file (plus an offset, to provoke the mismatch flag).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import ROOT, compress_like_the_paper, load_script, tiny_config

import utils
from builders import file_metadata
from models import MODELS
from parse_config import parse_config
from trainer.export import save_compressed

test_script = load_script("test")
REQUIRED = {"model", "dataset", "recipe", "dense_top1_err", "top1_err", "dcz_bytes", "dense_bytes", "rate",
            "wall_s", "commit"}
reproduce = load_script("benchmarks/reproduce")


def dcz_top1_err(dcz: Path, idx_dir: Path, capsys: pytest.CaptureFixture[str]) -> float:
    capsys.readouterr()
    assert test_script.main(["-r", str(dcz), "--json", "--set", f"data_loader.args.data_dir={idx_dir}"]) == 0
    return json.loads(capsys.readouterr().out)["top1_err"]


def fake_run(folder: Path, idx_dir: Path, arch: str, recipe: str, capsys: pytest.CaptureFixture[str],
             offset: float = 0.0) -> Path:
    """A finished run folder of ``arch`` (see the module docstring); summary's top1_err = measured + offset."""
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    model = MODELS[arch]()
    cfg = tiny_config(idx_dir, folder.parent)
    (folder / "config.json").write_text(json.dumps(cfg))  # where the run's data is (the .dcz never says)
    with torch.no_grad():
        report = save_compressed(model, folder / "model.dcz", arch={"type": arch, "args": {}}, index_bits="auto",
                                 metadata=file_metadata(parse_config(cfg)), **compress_like_the_paper(model, 0.1, 4))
    (folder / "compression_report.json").write_text(json.dumps(report))
    f, t = report["file"], report["paper_total"]
    summary = {"model": arch, "dataset": "FashionMNIST", "recipe": recipe, "dense_top1_err": 12.5,
               "pruned_top1_err": 13.0, "top1_err": dcz_top1_err(folder / "model.dcz", idx_dir, capsys) + offset,
               "dcz_bytes": f["bytes"], "dense_bytes": f["dense_float32_bytes"], "rate": f["rate"],
               "rate_p": t.get("rate_p", 9.0), "rate_pq": t["rate_pq"], "rate_pqh": t["rate_pqh"], "wall_s": 95.0,
               "stages": [{"name": "dense", "first_epoch": 0, "last_epoch": 0, "wall_s": 30.0},
                          {"name": "prune", "first_epoch": 1, "last_epoch": 1, "wall_s": 32.0},
                          {"name": "quantize", "first_epoch": 2, "last_epoch": 2, "wall_s": 33.0}],
               "run_dir": str(folder)}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_tables_from_runs_and_the_dcz_check(tmp_path: Path, idx_dir: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    lenet300 = fake_run(tmp_path / "runs" / "a", idx_dir, "LeNet300", "tiny300", capsys)
    lenet5 = fake_run(tmp_path / "runs" / "b", idx_dir, "LeNet5", "Tiny5", capsys, offset=5.0)
    # LeNet-300's file goes through a real test.py process; LeNet-5's error is the one measured in
    # fake_run (one more subprocess would cost ~8 s of torch imports on 2 CPUs and test nothing new).
    measured5 = json.loads((lenet5 / "summary.json").read_text())["top1_err"] - 5.0
    real_check = reproduce.evaluate_dcz
    monkeypatch.setattr(reproduce, "evaluate_dcz",
                        lambda dcz, data_dir: measured5 if dcz.parent == lenet5 else real_check(dcz, data_dir))
    out = tmp_path / "results"
    assert reproduce.main(["--from-runs", str(lenet300), str(lenet5), "--out", str(out)]) == 0
    std = capsys.readouterr()
    # The LeNet-5 summary claims 5 points more than its file gives: flagged on stderr and in the table.
    assert std.err.count("warning:") == 1 and "b/model.dcz" in std.err
    summary = json.loads((lenet300 / "summary.json").read_text())
    row = json.loads((out / "lenet300_fashionmnist_tiny300.json").read_text())
    assert REQUIRED <= set(row) and row["commit"] == utils.commit_id()  # no commit in the summary: the tables'
    assert all(row[k] == summary[k] for k in REQUIRED - {"commit"})
    assert row["dcz_top1_err"] == pytest.approx(summary["top1_err"], abs=0.01)  # the file alone, same error
    assert row["stages"] == summary["stages"] and row["rate_pqh"] == summary["rate_pqh"]
    row5 = json.loads((out / "lenet5_fashionmnist_tiny5.json").read_text())  # lowercased
    assert row5["top1_err"] - row5["dcz_top1_err"] == pytest.approx(5.0, abs=1e-6)

    ours, paper = (out / "table1.md").read_text().split(f"## {reproduce.PAPER_LABEL}")
    assert f"**{row['rate']:.1f}×**" in ours and "| LeNet-300-100 | FashionMNIST | tiny300 |" in ours
    assert "| LeNet-5 | FashionMNIST | Tiny5 |" in ours and ours.count("**mismatch**") == 2  # the row + the note
    assert "1.64 % → 1.58 %" in paper and "1720 KB → 44 KB | 39×" in paper
    assert "tiny" not in paper.lower() and "1.64" not in ours  # never one table for both
    assert ours.split("\n")[0] in std.out and "table1.md" in std.out  # printed, with where it went
    per_layer = (out / "table23.md").read_text()
    assert "## LeNet-300-100 on FashionMNIST (tiny300)" in per_layer and "## LeNet-5 on FashionMNIST" in per_layer
    assert "| fc1.weight | 235,200 | 10.0% |" in per_layer and "| conv1.weight | 500 |" in per_layer
    assert per_layer.count("**Paper's accounting**") == 2 and f"**{row['rate']:.1f}× smaller**" in per_layer
    assert (out / "rate_vs_error.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary file behind


def bad_input_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    (tmp_path / "no_summary").mkdir()
    (tmp_path / "broken.json").write_text("{ not json")
    return [(["--recipe", str(tmp_path / "missing.json")], "recipe not found"),
            (["--from-runs", str(tmp_path / "no_summary")], "it has no summary.json"),
            (["--from-runs", str(tmp_path / "nowhere")], "run folder not found"),
            (["--models", "lenet300,alexnet"], "expected a comma-separated list of lenet300, lenet5"),
            (["--kinds", "pipeline,best"], "expected a comma-separated list of pipeline, beyond"),
            (["--kinds", "structured", "--models", "lenet300"], "lenet300_fashionmnist_structured.json"),
            (["--recipe", str(tmp_path / "broken.json"), "--from-runs", str(tmp_path)], "pick one"),
            (["--recipe", str(tmp_path / "broken.json"), "--set", "novalue"], "expected KEY=VALUE"),
            # train.py itself fails (its own message is quoted): a real subprocess
            (["--recipe", str(tmp_path / "broken.json")], "train.py failed (exit 2)")]


def test_bad_input_is_one_error_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in bad_input_cases(tmp_path):
        code = reproduce.main([*argv, "--out", str(tmp_path / "out"), "--save-dir", str(tmp_path / "runs")])
        err = capsys.readouterr().err
        assert code == 2, argv
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (argv, err)
        assert not (tmp_path / "out").exists()  # nothing written
    assert "invalid JSON" in err  # train.py's own reason, in our one line


def test_no_check_and_runs_that_would_share_a_file(tmp_path: Path, idx_dir: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run = fake_run(tmp_path / "runs" / "a", idx_dir, "LeNet300", "tiny300", capsys)
    (run / "model.dcz").unlink()
    out = ["--out", str(tmp_path / "out")]
    assert reproduce.main(["--from-runs", str(run), *out]) == 2
    assert "has no model.dcz to check (pass --no-check" in capsys.readouterr().err
    assert reproduce.main(["--from-runs", str(run), str(run), "--no-check", *out]) == 2
    assert "several runs of tiny300 with the same or an unknown seed" in capsys.readouterr().err
    assert reproduce.main(["--from-runs", str(run), "--no-check", *out]) == 0
    row = json.loads((tmp_path / "out" / "lenet300_fashionmnist_tiny300.json").read_text())
    assert row["dcz_top1_err"] is None and "mismatch" not in (tmp_path / "out" / "table1.md").read_text()


def test_runs_of_one_recipe_with_different_seeds_make_one_row_of_means(tmp_path: Path, idx_dir: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    runs = [fake_run(tmp_path / "runs" / name, idx_dir, "LeNet300", "tiny300", capsys, offset=off)
            for name, off in (("a", 0.0), ("b", 0.02))]
    for seed, run in zip((7, 8), runs):
        cfg = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**cfg, "seed": seed}))
    summary = json.loads((runs[1] / "summary.json").read_text())
    (runs[1] / "summary.json").write_text(json.dumps({**summary, "dcz_bytes": summary["dcz_bytes"] + 100}))
    assert reproduce.main(["--from-runs", *map(str, runs), "--no-check", "--out", str(tmp_path / "out")]) == 0
    row = json.loads((tmp_path / "out" / "lenet300_fashionmnist_tiny300.json").read_text())
    assert [s["seed"] for s in row["seeds"]] == [7, 8] and row["dcz_bytes"] == summary["dcz_bytes"] + 50
    assert row["top1_err"] == pytest.approx((row["seeds"][0]["top1_err"] + row["seeds"][1]["top1_err"]) / 2)
    table = (tmp_path / "out" / "table1.md").read_text()
    assert "tiny300: the mean of 2 runs (file error, file bytes): seed 7: " in table
    assert reproduce.main(["--seeds", "1,1", "--out", str(tmp_path / "o2")]) == 2
    assert "--seeds '1,1': expected distinct integers" in capsys.readouterr().err


PIPELINE = "summary.json" in (ROOT / "train.py").read_text()


@pytest.mark.slow
@pytest.mark.skipif(not PIPELINE, reason="train.py does not write summary.json yet (one-fit pipeline pending)")
def test_end_to_end_tiny_recipe(tmp_path: Path, idx_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # dense epoch 0, pruning at epoch 1, quantization from epoch 2: the three stages in 3 short epochs
    cfg = tiny_config(idx_dir, tmp_path / "ignored", max_epochs=3, limit_train_batches=3)
    cfg["trainer"]["callbacks"] = {"IterativePruning": {"keep_ratio": 0.3, "schedule": "epochs", "epochs": [1]},
                                   "Quantization": {"bits": 4, "epoch": 2}}
    recipe = tmp_path / "tiny.json"
    recipe.write_text(json.dumps(cfg))
    out = tmp_path / "results"
    assert reproduce.main(["--recipe", str(recipe), "--save-dir", str(tmp_path / "runs"), "--out", str(out),
                           "--data-dir", str(idx_dir)]) == 0
    assert "warning:" not in capsys.readouterr().err
    (path,) = out.glob("lenet300_fashionmnist_*.json")
    row = json.loads(path.read_text())
    assert REQUIRED <= set(row) and row["dcz_top1_err"] == pytest.approx(row["top1_err"], abs=0.01)
    (run,) = (tmp_path / "runs" / "tiny").iterdir()
    assert row["dcz_bytes"] == (run / "model.dcz").stat().st_size


@pytest.mark.parametrize(("kinds", "stems"), [("pipeline", ["lenet300_fashionmnist_pipeline"]),
                                              ("pipeline,beyond", ["lenet300_fashionmnist_pipeline",
                                                                   "lenet300_fashionmnist_beyond"])])
def test_kinds_pick_the_shipped_recipes(kinds: str, stems: list[str]) -> None:
    args = reproduce.get_args_parser().parse_args(["--models", "lenet300", "--kinds", kinds])
    assert [p.stem for p in reproduce.recipes_to_run(args)] == stems
    assert all(p.is_file() for p in reproduce.recipes_to_run(args))


def test_a_row_names_the_code_its_run_trained_with() -> None:
    summary = {**{k: 1.0 for k in REQUIRED - {"commit"}}, "commit": "abc1234"}
    assert reproduce.result_row(summary, None, "def5678")["commit"] == "abc1234"
    del summary["commit"]  # a run from before summaries named their commit: the tables' code
    assert reproduce.result_row(summary, None, "def5678")["commit"] == "def5678"


def test_rows_of_earlier_runs_join_the_tables(tmp_path: Path, idx_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lenet300 = fake_run(tmp_path / "runs" / "a", idx_dir, "LeNet300", "tiny300", capsys)
    lenet5 = fake_run(tmp_path / "runs" / "b", idx_dir, "LeNet5", "Tiny5", capsys)
    first, out = tmp_path / "first", tmp_path / "out"
    assert reproduce.main(["--from-runs", str(lenet5), "--out", str(first), "--no-check"]) == 0
    row5 = first / "lenet5_fashionmnist_tiny5.json"
    assert reproduce.main(["--from-runs", str(lenet300), "--with-rows", str(row5), "--out", str(out), "--no-check"]) == 0
    table = (out / "table1.md").read_text().split(f"## {reproduce.PAPER_LABEL}")[0]
    assert "| LeNet-300-100 | FashionMNIST | tiny300 |" in table and "| LeNet-5 | FashionMNIST | Tiny5 |" in table
    assert "Tiny5): a row from an earlier run" in (out / "table23.md").read_text()
    assert not (out / "lenet5_fashionmnist_tiny5.json").exists()  # an input, not rewritten
    capsys.readouterr()
    assert reproduce.main(["--from-runs", str(lenet5), "--with-rows", str(row5), "--out", str(out), "--no-check"]) == 2
    assert "the runs given make this row again" in capsys.readouterr().err
    (tmp_path / "partial.json").write_text('{"model": "LeNet5"}')
    assert reproduce.main(["--from-runs", str(lenet300), "--with-rows", str(tmp_path / "partial.json"), "--out",
                           str(out), "--no-check"]) == 2
    assert "not a result row (missing dataset" in capsys.readouterr().err
