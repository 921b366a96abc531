"""benchmarks/ablation.py: each row is the beyond recipe's compression cycle, shifted to start from a dense model."""

from __future__ import annotations

import json
from pathlib import Path

import builders
from helpers import load_script
from parse_config import parse_config
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
    # bias_bits and the recipe's raw_dtype only in the last row (the recipe as shipped)
    assert "bias_bits" not in taught["trainer"]["callbacks"]["Quantization"] and taught["export"]["raw_dtype"] == "float32"
    # the recipe's own teacher (a config every row would train again) never; a checkpoint when given
    assert beyond["trainer"]["callbacks"]["Distillation"]["teacher"].endswith(".json")
    assert "teacher" not in taught["trainer"]["callbacks"]["Distillation"]
    other = ablation.compression_cycle(beyond, Path("d.ckpt"), "row", {"fc1": 0.1}, {"fc1": 6}, True, "range",
                                       teacher=["/t/last.ckpt"])
    assert other["trainer"]["callbacks"]["Distillation"]["teacher"] == "/t/last.ckpt"
    shipped = ablation.compression_cycle(beyond, Path("d.ckpt"), "row", {"fc1": 0.1}, {"fc1": 6}, True, "range", True)
    assert shipped["trainer"]["callbacks"]["Quantization"]["bias_bits"] == \
        beyond["trainer"]["callbacks"]["Quantization"]["bias_bits"]
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
        "lenet300_ablation_1", "lenet300_ablation_2", "lenet300_ablation_3", "lenet300_ablation_3_biases",
        "lenet300_ablation_1_x1.4", "lenet300_ablation_3_x1.4", "lenet300_ablation_3_x1.4_biases"]
    assert [f["recipe"] for _, _, f in fits[:4]] == ["paper", "+ sparser, fewer bits", "+ distillation",
                                                     "+ shared biases"]
    assert all(cfg["name"] == tag for tag, cfg, _ in fits)
    ours = beyond["trainer"]["callbacks"]["IterativePruning"]["keep_ratio"]
    assert fits[5][2]["keep"] == ablation.scaled(ours, 1.4) and fits[5][2]["distill"]
    assert [f["teacher"] for _, _, f in fits[:4]] == ["no", "no", "itself", "itself"]


def test_feature_hints_get_a_row_of_their_own_after_the_taught_rows() -> None:
    beyond, paper = ablation.read_recipe("lenet5", "beyond"), ablation.read_recipe("lenet5", "pipeline")
    distill = beyond["trainer"]["callbacks"]["Distillation"]
    distill.update(features=["conv2", "fc1"], feature_weight=0.5)
    args = ablation.get_args_parser().parse_args(["--scales", "1.0"])
    fits = ablation.plan_rows(args, beyond, paper, Path("/d/dense.ckpt"))
    assert [f["recipe"] for _, _, f in fits] == ["paper", "+ sparser, fewer bits", "+ distillation",
                                                 "+ feature hints", "+ shared biases"]
    hints = [cfg["trainer"]["callbacks"].get("Distillation", {}).get("features") for _, cfg, _ in fits]
    assert hints == [None, None, None, ["conv2", "fc1"], ["conv2", "fc1"]]  # only the hinted row and the shipped one
    assert [f["last_taught"] for _, _, f in fits] == [False, False, False, True, False]
    assert fits[3][1]["trainer"]["callbacks"]["Distillation"]["feature_weight"] == 0.5


def test_block_pruning_gets_the_last_row_and_the_curve_point() -> None:
    beyond, paper = ablation.read_recipe("lenet5", "beyond"), ablation.read_recipe("lenet5", "pipeline")
    beyond["trainer"]["callbacks"]["IterativePruning"]["block"] = {"fc1": 4}
    args = ablation.get_args_parser().parse_args(["--model", "lenet5", "--scales", "1.0,1.4"])
    fits = ablation.plan_rows(args, beyond, paper, Path("/d/dense.ckpt"))
    assert [tag for tag, _, _ in fits] == [
        "lenet5_ablation_1", "lenet5_ablation_2", "lenet5_ablation_3", "lenet5_ablation_3_biases",
        "lenet5_ablation_3_blocks", "lenet5_ablation_1_x1.4", "lenet5_ablation_3_x1.4", "lenet5_ablation_3_x1.4_blocks"]
    blocks = [cfg["trainer"]["callbacks"]["IterativePruning"].get("block") for _, cfg, _ in fits]
    assert blocks == [None] * 4 + [{"fc1": 4}] + [None] * 2 + [{"fc1": 4}]  # the rows before it prune weight by weight
    assert [f.get("shipped", False) for _, _, f in fits] == [False] * 4 + [True] + [False] * 2 + [True]
    row = {"recipe": "+ block pruning", "keep": {"conv2": 0.08, "fc1": 0.025}, "bits": {"fc1": 3}, "codec": "range",
           "distill": True, "dcz_bytes": 15000, "rate": 115.0, "top1_err": 8.6, "block": {"fc1": 4}}
    text = ablation.table("lenet5", 8.32, [row], "abc1234", "python benchmarks/ablation.py")
    assert "| + block pruning | conv2 8% / fc1 2.5% in runs of 4 | fc1 3 | range |" in text


def test_another_teacher_adds_its_row_and_teaches_the_shipped_rows(tmp_path: Path) -> None:
    beyond, paper = ablation.read_recipe("lenet300", "beyond"), ablation.read_recipe("lenet300", "pipeline")
    (tmp_path / "config.json").write_text('{"arch": {"type": "LeNet5"}}')  # the teacher's run folder
    teacher = str(tmp_path / "last.ckpt")
    fits = ablation.plan_rows(ablation.get_args_parser().parse_args([]), beyond, paper, Path("d.ckpt"), [teacher])
    assert [f["recipe"] for _, _, f in fits] == ["paper", "+ sparser, fewer bits", "+ distillation",
                                                 "+ LeNet5 teacher", "+ shared biases"]
    assert [f["teacher"] for _, _, f in fits] == ["no", "no", "itself", "LeNet5", "LeNet5"]
    assert [cfg["trainer"]["callbacks"].get("Distillation", {}).get("teacher") for _, cfg, _ in fits] == [
        None, None, None, teacher, teacher]
    assert [f["last_taught"] for _, _, f in fits] == [False, False, False, True, False]  # recoded once, not twice
    assert ablation.teacher_arch(tmp_path / "elsewhere" / "x.ckpt") == "another network"
    fits = ablation.plan_rows(ablation.get_args_parser().parse_args([]), beyond, paper, Path("d.ckpt"),
                              ["self", teacher, teacher])  # an ensemble: the dense model and two LeNet-5s
    assert fits[3][2]["recipe"] == "+ ensemble teacher (itself + LeNet5 + LeNet5)"
    assert fits[4][2]["teacher"] == "itself + LeNet5 + LeNet5"
    assert fits[4][1]["trainer"]["callbacks"]["Distillation"]["teacher"] == ["self", teacher, teacher]


def test_parallel_fits_each_train_in_a_folder_of_their_own(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    seen = []

    def fake_row(cfg, folder):  # noqa: ANN001, ANN202
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


def test_reuse_takes_a_finished_fit_with_the_same_config_only(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
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


def test_teacher_checkpoints_given_must_match_the_recipes_members(tmp_path: Path) -> None:
    import pytest

    beyond = ablation.read_recipe("lenet300", "beyond")
    beyond["trainer"]["callbacks"]["Distillation"]["teacher"] = ["self", "configs/lenet5_fashionmnist.json"]
    ckpt = tmp_path / "t.ckpt"
    ckpt.write_bytes(b"")

    def find(*given: str) -> list[str] | None:
        return ablation.find_teacher(ablation.get_args_parser().parse_args(["--teacher", *given]), beyond, tmp_path)

    assert find("self", str(ckpt)) == ["self", str(ckpt)]
    with pytest.raises(ablation.ReproduceError, match="1 checkpoints for the recipe's 2 teachers"):
        find(str(ckpt))
    with pytest.raises(ablation.ReproduceError, match="no such checkpoint"):
        find("self", str(tmp_path / "missing.ckpt"))
