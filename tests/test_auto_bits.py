"""``Quantization.bits: "auto"``: grids searched under a validation budget inside training, then fine-tuned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_resume_equals_whole, load_ckpt, only_run, whole_and_cut_runs, write_config

import train
from dcz import read_compressed
from parse_config import ConfigError, parse_config
from trainer.compression_state import codebook_key

CALLBACKS = {"IterativePruning": {"keep_ratio": 0.2, "start_epoch": 0},
             "Quantization": {"bits": "auto", "budget": 1.0, "epoch": 1, "val_batches": 1}}
RESUMED = {**CALLBACKS, "Quantization": {**CALLBACKS["Quantization"], "layers": ["fc3"]}}  # fewer trials
TENSORS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias")


def test_auto_bits_searches_grids_fine_tunes_them_and_decodes_bit_exactly(tmp_path: Path, idx_dir: Path) -> None:
    path = write_config(tmp_path, idx_dir, "auto", CALLBACKS, max_epochs=3)
    cfg = json.loads(path.read_text())
    cfg["export"] = {"codec": "range"}  # every trial writes the file: range-v1 is the fastest to write
    path.write_text(json.dumps(cfg))
    assert train.main(["-c", str(path)]) == 0
    run = only_run(tmp_path / "auto")
    pruned, last = load_ckpt(run / "pruned.ckpt"), load_ckpt(run / "best.ckpt")  # what model.dcz holds
    assert set(TENSORS) <= set(last["quant_index"])  # every weight and bias of every layer
    for name in TENSORS:
        value, index = last["state_dict"][f"model.{name}"], last["quant_index"][name]
        book = last["state_dict"][codebook_key(name)]
        mask = last["masks"][name]
        assert torch.equal(value[mask], book[index]) and not value[~mask].any(), name
        # Grid levels at most those of a searched step, and fewer than the registered 2**12 entries.
        assert 1 <= int(index.max()) + 1 < 200, name
        if name.endswith(".weight"):  # a weight rounded to 0 joins the pruned ones: the mask never grows
            assert not (mask & ~pruned["masks"][name]).any(), name
    decoded, header = read_compressed(run / "model.dcz")
    assert {e["name"]: e["codec"] for e in header["tensors"]}["fc1.weight"] == "range-v1"
    for name, value in decoded.state_dict().items():
        assert torch.equal(value.view(torch.int32), last["state_dict"][f"model.{name}"].view(torch.int32)), name


def test_resume_after_the_search_equals_an_uninterrupted_run(tmp_path: Path, idx_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    whole, cut = whole_and_cut_runs(tmp_path, idx_dir, monkeypatch, RESUMED, max_epochs=4, stop_after=2)
    assert set(load_ckpt(cut / "last.ckpt")["quant_index"]) == {"fc3.weight", "fc3.bias"}
    assert_resume_equals_whole(whole, cut)


@pytest.mark.parametrize(("args", "match"), [
    ({"bits": "auto"}, r'bits "auto" needs budget'),
    ({"bits": "auto", "budget": -1}, r'bits "auto" needs budget.*got -1'),
    ({"bits": 4, "budget": 0.1}, r'budget and val_batches apply only with bits "auto"'),
    ({"bits": "auto", "budget": 0.1, "bias_bits": 4}, r'bias_bits does not apply with bits "auto"'),
    ({"bits": "auto", "budget": 0.1, "val_batches": 0}, r"val_batches must be >= 1"),
    ({"bits": "most"}, r"Quantization\.bits"),
])
def test_auto_bits_settings_are_checked_when_the_config_is_read(tmp_path: Path, idx_dir: Path, args: dict,
                                                                 match: str) -> None:
    path = write_config(tmp_path, idx_dir, "bad", {"Quantization": args}, max_epochs=2)
    with pytest.raises(ConfigError, match=match):
        parse_config(json.loads(path.read_text()))
