"""benchmarks/ablation.py: each row is the beyond recipe's compression cycle, shifted to start from a dense model."""

from __future__ import annotations

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
