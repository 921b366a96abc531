"""``IterativePruning.block``: magnitude pruning by runs of consecutive weights (vector-level granularity)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import assert_resume_equals_whole, load_ckpt, whole_and_cut_runs, write_config

import builders
from compression import range_codec
from compression.range_tensor import range_entry
from dcz import read_compressed
from parse_config import ConfigError, parse_config
from trainer.export import encode_checkpoint

BLOCKS = {"fc1": 4, "fc2": 4}
PRUNING = {"keep_ratio": 0.1, "schedule": "gradual", "start_epoch": 0, "end_epoch": 3, "prune_every": 1,
           "block": BLOCKS}


@pytest.mark.parametrize("splicing", [False, True])
def test_resume_between_block_pruning_steps_equals_an_uninterrupted_run(tmp_path: Path, idx_dir: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        splicing: bool) -> None:
    callbacks = {"IterativePruning": {**PRUNING, "splicing": splicing}, "Quantization": {"bits": 3, "epoch": 4}}
    whole, run = whole_and_cut_runs(tmp_path, idx_dir, monkeypatch, callbacks, max_epochs=6, stop_after=1)
    cut = load_ckpt(run / "last.ckpt")["masks"]
    assert_resume_equals_whole(whole, run)
    best = load_ckpt(run / "best.ckpt")
    for name, mask in best["masks"].items():
        block = BLOCKS.get(name.split(".")[0], 1)
        runs = mask.reshape(-1, block)
        assert torch.equal(runs.any(1), runs.all(1)), name  # whole blocks only
        assert int(mask.sum()) == block * round(0.1 * mask.numel() / block), name
        if not splicing:
            assert not (mask & ~cut[name]).any()  # nothing grew back across the resume
    for codec in ("huffman", "range"):  # the file is the model it was written from, bit for bit
        path, _ = encode_checkpoint(run / "best.ckpt", tmp_path / f"{codec}.dcz", "auto", codec=codec)
        decoded, header = read_compressed(path)
        for name, value in decoded.state_dict().items():
            assert torch.equal(value.view(torch.int32), best["state_dict"][f"model.{name}"].view(torch.int32)), name
        if codec == "range":  # the runs' positions are what is coded
            assert {t["name"]: t.get("block") for t in header["tensors"] if t.get("codec") == "range-v2"} == {
                "fc1.weight": 4, "fc2.weight": 4}
            report = (tmp_path / "compression_report.md").read_text()
            assert "positions of runs of weights (range-v2) for fc1.weight, fc2.weight" in report
            sparse, x = read_compressed(path, sparse=True)[0].eval(), torch.randn(5, 1, 28, 28)
            with torch.no_grad():  # the CSR layers built from the runs' positions compute what the dense ones do
                assert torch.allclose(sparse(x), decoded.eval()(x), atol=1e-5)


def test_a_blocky_mask_costs_fewer_position_bytes_in_the_range_codec() -> None:
    rng = np.random.default_rng(0)
    rows, cols, block, kept_blocks = 300, 784, 4, 6_000  # 10 % kept
    starts = np.sort(rng.choice(rows * cols // block, kept_blocks, replace=False)) * block
    blocky = (starts[:, None] + np.arange(block)).ravel()
    scattered = np.sort(rng.choice(rows * cols, len(blocky), replace=False))
    sizes = [len(range_codec.encode_positions(p, rows * cols, cols)) for p in (blocky, scattered)]
    assert sizes[0] < 0.6 * sizes[1], sizes  # range-v1's per-row context already sees the runs (2.42 vs 4.75 bits)
    data = range_codec.encode_positions(blocky, rows * cols, cols)
    assert np.array_equal(range_codec.decode_positions(data, rows * cols, cols, len(blocky)), blocky)
    mask = np.zeros(rows * cols, bool)
    mask[blocky] = True
    entry, sections, _ = range_entry("w", torch.ones(rows, cols), mask, None, None, "auto")
    assert entry["codec"] == "range-v2" and entry["block"] == block  # the runs' positions: 1.24 bits per weight
    assert len(dict(sections)["w:position"]) < 0.6 * sizes[0], (len(dict(sections)["w:position"]), sizes)


@pytest.mark.parametrize(("pruning", "match"), [
    ({"keep_ratio": 0.1, "block": {"fc1": 5}}, "fc1: block 5 does not split rows of 784 weights; blocks that do: 2, 4"),
    ({"keep_ratio": 0.1, "block": 0}, r"block must be >= 1 \(1: weight by weight\), got 0"),
    ({"keep_ratio": {"fc1": 0.1}, "block": {"fc2": 4}}, r"block: fc2 is not pruned \(pruned layers: fc1\)"),
    ({"criterion": "std", "sensitivity": 1.0, "block": 4}, r"block applies to criterion 'magnitude'"),
    ({"criterion": "global", "keep_ratio": 0.1, "block": {"fc1": 4}}, r"block applies to criterion 'magnitude'"),
    ({"keep_ratio": 0.1, "block": {"fc7": 4}}, r"'fc7' is not a prunable layer of LeNet300"),
])
def test_block_is_checked_when_the_config_is_read(tmp_path: Path, idx_dir: Path, pruning: dict[str, Any],
                                                  match: str) -> None:
    path = write_config(tmp_path, idx_dir, "bad", {"IterativePruning": pruning}, max_epochs=2)
    with pytest.raises(ConfigError, match=match):
        cfg = parse_config(json.loads(path.read_text()))
        builders.build_config_callbacks(cfg, builders.build_model(cfg))
