"""``Quantization.bias_bits``: biases share a fine-tuned codebook too, decode bit-exactly, and resume exactly."""

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
             "Quantization": {"bits": 3, "bias_bits": 2, "epoch": 1}}
BIASES = ("fc1.bias", "fc2.bias")  # 300 and 100 entries: more than 4 * 2**2; fc3.bias (10) stays raw


@pytest.mark.parametrize("codec", ["huffman", "range", "context"])
def test_biases_share_a_fine_tuned_codebook_and_decode_bit_exactly(tmp_path: Path, idx_dir: Path, codec: str) -> None:
    path = write_config(tmp_path, idx_dir, codec, CALLBACKS, max_epochs=3)
    cfg = json.loads(path.read_text())
    cfg["export"] = {"codec": codec}
    path.write_text(json.dumps(cfg))
    assert train.main(["-c", str(path)]) == 0
    run = only_run(tmp_path / codec)
    quantized, last = load_ckpt(run / "pruned.ckpt"), load_ckpt(run / "best.ckpt")
    for name in BIASES:
        bias = last["state_dict"][f"model.{name}"]
        assert torch.equal(last["masks"][name], torch.ones_like(bias, dtype=torch.bool)), name  # never pruned
        book = last["state_dict"][codebook_key(name)]
        assert len(book) == 4 and torch.equal(bias, book[last["quant_index"][name]]), name
        # Fine-tuned: the shared values moved after clustering (epoch 1 starts from pruned.ckpt's biases).
        assert not torch.equal(book, quantized["state_dict"][f"model.{name}"].unique()[:4]), name
        assert not torch.isin(book, quantized["state_dict"][f"model.{name}"]).all(), name
    decoded, header = read_compressed(run / "model.dcz")
    entries = {e["name"]: e for e in header["tensors"]}
    for name in BIASES:
        assert entries[name]["encoding"] == "quantized" and entries[name]["clusters"] <= 4, name
    assert entries["fc3.bias"]["encoding"] == "raw" and "fc3.bias" not in last["quant_index"]
    for name, value in decoded.state_dict().items():
        assert torch.equal(value.view(torch.int32), last["state_dict"][f"model.{name}"].view(torch.int32)), name
    report = json.loads((run / "compression_report.json").read_text())
    assert set(BIASES) <= {r["layer"] for r in report["layers"] if r["encoding"] == "quantized"}
    rows = {r["layer"]: r for r in report["layers"]}
    assert rows["fc1.bias"]["encoding"] == "quantized" and rows["fc1.bias"]["kept"] == 300


def test_resume_mid_quantization_with_biases_equals_an_uninterrupted_run(tmp_path: Path, idx_dir: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # killed after epoch 2: biases clustered at 1, fine-tuned one epoch
    whole, cut = whole_and_cut_runs(tmp_path, idx_dir, monkeypatch, CALLBACKS, max_epochs=4, stop_after=2)
    assert set(BIASES) <= set(load_ckpt(cut / "last.ckpt")["quant_index"])
    assert_resume_equals_whole(whole, cut)


def test_bias_bits_is_checked_when_the_config_is_read(tmp_path: Path, idx_dir: Path) -> None:
    path = write_config(tmp_path, idx_dir, "bad", {"Quantization": {"bits": 3, "bias_bits": 0}}, max_epochs=2)
    match = r"trainer\.callbacks\.Quantization\.bias_bits: must be an integer in 1\.\.16 or null, got 0"
    with pytest.raises(ConfigError, match=match):
        parse_config(json.loads(path.read_text()))


def test_a_short_bias_stays_raw(tmp_path: Path, idx_dir: Path) -> None:
    callbacks = {"Quantization": {"bits": 3, "bias_bits": 4, "epoch": 0}}  # > 64 entries: fc3.bias (10) stays raw
    assert train.main(["-c", str(write_config(tmp_path, idx_dir, "raw", callbacks, max_epochs=1))]) == 0
    last = load_ckpt(only_run(tmp_path / "raw") / "last.ckpt")
    assert {"fc1.bias", "fc2.bias"} <= set(last["quant_index"]) and "fc3.bias" not in last["quant_index"]
    _, header = read_compressed(only_run(tmp_path / "raw") / "model.dcz")
    assert next(e for e in header["tensors"] if e["name"] == "fc3.bias")["encoding"] == "raw"
