"""benchmarks/ablation.py: each row is the beyond recipe's compression cycle, shifted to start from a dense model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import ROOT, load_script

import builders
from parse_config import parse_config
from teacher import teacher_command
from trainer.callbacks.stages import plan_stages

ablation = load_script("benchmarks/ablation")


def test_a_row_is_the_compression_cycle_of_the_recipe_from_the_dense_checkpoint() -> None:
    beyond = ablation.read_recipe("lenet300", "beyond")
    assert ablation.first_compression_epoch(beyond) == 30
    cfg = ablation.compression_cycle(beyond, Path("/d/dense.ckpt"), "row", {"fc1": 0.1}, {"fc1": 6}, False, "huffman")
    cbs = cfg["trainer"]["callbacks"]
    assert cfg["pretrained"] == "/d/dense.ckpt" and cfg["trainer"]["max_epochs"] == 30 and "Distillation" not in cbs
    assert (cbs["IterativePruning"]["start_epoch"], cbs["IterativePruning"]["end_epoch"], cbs["Quantization"]["epoch"]) \
        == (0, 16, 20)
    assert cbs["IterativePruning"]["keep_ratio"] == {"fc1": 0.1} and cfg["export"]["codec"] == "huffman"
    # the recipe's second cycle is the row's schedule: 0.4 x lr at the row's epoch 0
    assert cfg["lr_scheduler"]["args"] == {"cycles": [30], "peaks": [0.4]}
    assert beyond["lr_scheduler"]["args"]["cycles"] == [30, 30]  # the recipe itself is untouched
    assert beyond["trainer"]["callbacks"]["IterativePruning"]["start_epoch"] == 30
    taught = ablation.compression_cycle(beyond, Path("d.ckpt"), "row", {"fc1": 0.1}, {"fc1": 6}, True, "range")
    assert taught["trainer"]["callbacks"]["Distillation"]["epoch"] == 0
    parsed = parse_config({**taught, "pretrained": None})  # a valid config: stages dense-free, prune then quantize
    callbacks = builders.build_config_callbacks(parsed, builders.build_model(parsed))
    assert [s.name for s in builders.pipeline_stages(parsed, callbacks, Path(".")).stages] == ["prune", "quantize"]
    assert plan_stages(30, [0, 16], 20)[0].name == "prune"
    # k-means bits and raw float32 biases before the last row (the recipe as shipped)
    assert "bias_bits" not in taught["trainer"]["callbacks"]["Quantization"] and taught["export"]["raw_dtype"] == "float32"
    # the recipe's own teacher (a config every row would train again) never; a checkpoint when given
    assert beyond["trainer"]["callbacks"]["Distillation"]["teacher"].endswith(".json")
    assert "teacher" not in taught["trainer"]["callbacks"]["Distillation"]
    other = ablation.compression_cycle(beyond, Path("d.ckpt"), "row", {"fc1": 0.1}, {"fc1": 6}, True, "range",
                                       teacher="/t/last.ckpt")
    assert other["trainer"]["callbacks"]["Distillation"]["teacher"] == "/t/last.ckpt"
    shipped = ablation.compression_cycle(beyond, Path("d.ckpt"), "row", {"fc1": 0.1}, None, True, "context")
    quantization = beyond["trainer"]["callbacks"]["Quantization"]
    assert shipped["trainer"]["callbacks"]["Quantization"] == {**quantization, "epoch": quantization["epoch"] - 30}
    assert shipped["export"]["raw_dtype"] == beyond["export"]["raw_dtype"]


def test_table_and_scaled_ratios() -> None:
    assert ablation.scaled({"fc1": 0.03, "fc3": 0.8}, 1.5) == {"fc1": 0.045, "fc3": 1.0}
    row = {"recipe": "paper", "keep": {"fc1": 0.06}, "bits": {"Linear": 6}, "codec": "huffman", "distill": False,
           "dcz_bytes": 25000, "rate": 42.66, "top1_err": 10.5}
    text = ablation.table("lenet300", 10.18, [row], "abc1234", "python benchmarks/ablation.py")
    assert "| paper | fc1 6% | Linear 6 | huffman | no | float32 | 25,000 | **42.7×** | 10.50 % | +0.32 pt |" in text
    shared = {**row, "recipe": "+ shared biases", "raw_dtype": "float16", "bias_bits": 4}
    text = ablation.table("lenet300", 10.18, [shared], "abc1234", "python benchmarks/ablation.py")
    assert "| + shared biases | fc1 6% | Linear 6 | huffman | no | float16, long ones 4-bit | 25,000 |" in text


def test_plan_lists_every_fit_once_in_table_order() -> None:
    beyond, paper = ablation.read_recipe("lenet300", "beyond"), ablation.read_recipe("lenet300", "pipeline")
    args = ablation.get_args_parser().parse_args(["--scales", "1.0,1.4"])
    fits = ablation.plan_rows(args, beyond, paper, Path("/d/dense.ckpt"))
    assert [tag for tag, _, _ in fits] == [
        "lenet300_ablation_1", "lenet300_ablation_2", "lenet300_ablation_3", "lenet300_ablation_3_grids",
        "lenet300_ablation_1_x1.4", "lenet300_ablation_3_x1.4", "lenet300_ablation_3_x1.4_grids"]
    assert [f["recipe"] for _, _, f in fits[:4]] == ["paper", "+ sparser, fewer bits", "+ distillation",
                                                     "+ the recipe's quantization and codec"]
    assert all(cfg["name"] == tag for tag, cfg, _ in fits)
    ours = beyond["trainer"]["callbacks"]["IterativePruning"]["keep_ratio"]
    assert fits[5][2]["keep"] == ablation.scaled(ours, 1.4) and fits[5][2]["distill"]
    assert [f["teacher"] for _, _, f in fits[:4]] == ["no", "no", "itself", "itself"]


def test_another_teacher_adds_its_row_and_teaches_the_shipped_rows(tmp_path: Path) -> None:
    beyond, paper = ablation.read_recipe("lenet300", "beyond"), ablation.read_recipe("lenet300", "pipeline")
    (tmp_path / "config.json").write_text((ROOT / "configs" / "lenet5_fashionmnist.json").read_text())  # its run
    teacher = tmp_path / "last.ckpt"
    teacher.write_bytes(b"")  # its config is read from the run folder: the weights are never loaded here
    fits = ablation.plan_rows(ablation.get_args_parser().parse_args([]), beyond, paper, Path("d.ckpt"), str(teacher))
    assert [f["recipe"] for _, _, f in fits] == ["paper", "+ sparser, fewer bits", "+ distillation",
                                                 "+ LeNet5 teacher", "+ the recipe's quantization and codec"]
    assert [f["teacher"] for _, _, f in fits] == ["no", "no", "itself", "LeNet5", "LeNet5"]
    assert [cfg["trainer"]["callbacks"].get("Distillation", {}).get("teacher") for _, cfg, _ in fits] == [
        None, None, None, str(teacher), str(teacher)]
    assert [f["last_taught"] for _, _, f in fits] == [False, False, False, True, False]  # recoded once, not twice
    assert ablation.teacher_arch(beyond, tmp_path / "elsewhere" / "x.ckpt") == "another network"


def test_parallel_fits_each_train_in_a_folder_of_their_own(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def fake_row(cfg: dict, folder: Path) -> dict:
        seen.append((cfg["name"], folder))
        return {"rate": 2.0, "top1_err": 1.0, "name": cfg["name"]}

    monkeypatch.setattr(ablation, "run_row", fake_row)
    fits = [(f"t{i}", {"name": f"t{i}"}, {"scale": 1.0, "index": i}) for i in range(3)]
    done = ablation.run_fits(fits, tmp_path, jobs=2)
    assert {t: r["name"] for t, r in done.items()} == {"t0": "t0", "t1": "t1", "t2": "t2"}
    assert sorted(seen) == [(f"t{i}", tmp_path / f"t{i}") for i in range(3)]  # never two runs in one folder
    seen.clear()
    ablation.run_fits(fits[:1], tmp_path, jobs=1)
    assert seen == [("t0", tmp_path)]
    assert ablation.main(["--jobs", "0"]) == 2


def test_reuse_takes_a_finished_fit_with_the_same_config_only(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    beyond = ablation.read_recipe("lenet300", "beyond")
    cfg = ablation.compression_cycle(beyond, Path("/d/dense.ckpt"), "row", {"fc1": 0.1}, {"fc1": 6}, True, "range")
    run = tmp_path / "row" / "20261202-000000"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({**cfg, "trainer": {**cfg["trainer"], "save_dir": "/x",
                                                                     "progress_bar": "none"}}))
    (run / "summary.json").write_text(json.dumps({"top1_err": 1.5}))
    assert ablation.finished_run(cfg, tmp_path) == {"top1_err": 1.5, "run_dir": str(run)}
    other = {**cfg, "seed": 1}
    assert ablation.finished_run(other, tmp_path) is None  # another config: trained, not taken
    monkeypatch.setattr(ablation, "run_row", lambda c, folder: {"top1_err": 9.0})
    done = ablation.run_fits([("a", cfg, {}), ("b", other, {})], tmp_path, jobs=1, reuse=True)
    assert done["a"]["top1_err"] == 1.5 and done["b"]["top1_err"] == 9.0


def test_the_teacher_is_one_checkpoint_of_the_same_data_or_the_recipes_config_trained_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    beyond = ablation.read_recipe("lenet300", "beyond")

    def find(*argv: str) -> str | None:
        return ablation.find_teacher(ablation.get_args_parser().parse_args(list(argv)), beyond, tmp_path)

    with pytest.raises(SystemExit):  # one teacher: ensembles were removed
        ablation.get_args_parser().parse_args(["--teacher", "a.ckpt", "b.ckpt"])
    with pytest.raises(ablation.ReproduceError, match="no such checkpoint"):
        find("--teacher", str(tmp_path / "missing.ckpt"))
    run = tmp_path / "cifar" / "run"  # a checkpoint of a network trained on other data
    run.mkdir(parents=True)
    (run / "config.json").write_text((ROOT / "configs" / "vgg16_cifar100.json").read_text())
    (run / "last.ckpt").write_bytes(b"")
    with pytest.raises(ablation.ReproduceError, match="this run trains on FashionMNIST with 10 classes"):
        find("--teacher", str(run / "last.ckpt"))
    # the recipe's config, trained as train.py trains a teacher (teacher.teacher_command), into <save-dir>/teacher
    calls = []

    def fake_train(cmd: list[str], runs: Path, pattern: str, what: str) -> Path:
        calls.append((cmd, pattern))
        ckpt = runs / ablation.FOLDER / "lenet5" / "0" / "last.ckpt"
        ckpt.parent.mkdir(parents=True)
        ckpt.parent.joinpath("config.json").write_text((ROOT / "configs" / "lenet5_fashionmnist.json").read_text())
        ckpt.write_bytes(b"")
        return ckpt

    monkeypatch.setattr(ablation, "trained_checkpoint", fake_train)
    assert find() == str(tmp_path / "teacher" / "lenet5" / "0" / "last.ckpt")
    named = beyond["trainer"]["callbacks"]["Distillation"]["teacher"]
    assert calls == [(teacher_command(ROOT / named, tmp_path / "teacher"), "teacher/*/*/last.ckpt")]
    del beyond["trainer"]["callbacks"]["Distillation"]["teacher"]
    assert find() is None  # the dense model itself teaches: no other row
