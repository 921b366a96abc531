"""``StructuredPruning``: whole units and input features removed in training, and stored in a smaller shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_resume_equals_whole, load_ckpt, only_run, whole_and_cut_runs, write_config

import train
from compression.container import FRAMING_VERSION
from compression.model_codec import decode_tensor, encode_tensor
from compression.quantization import dequantize
from compression.structured import input_mask, unit_chain, unit_masks, unit_norms
from dcz import read_compressed
from models import LeNet5, LeNet300
from models.vgg import VGG16CIFAR
from parse_config import ConfigError, parse_config

CALLBACKS = {"StructuredPruning": {"units": {"fc1": 0.5, "fc2": 0.6}, "inputs": 0.7,
                                   "start_epoch": 0, "end_epoch": 1},
             "IterativePruning": {"keep_ratio": 0.3, "start_epoch": 1},
             "Quantization": {"bits": 4, "epoch": 2}}


@pytest.mark.parametrize("arch", [LeNet300, LeNet5])
def test_removing_units_whose_groups_are_zero_leaves_the_outputs_unchanged(arch: type) -> None:
    """A unit's group holds everything that reads or writes it: zero it and the network computes the same
    function with the unit's row, bias and the successor's inputs masked (LeNet-5: a conv channel feeding the
    next conv, and conv2's channels feeding fc1 through the flatten)."""
    torch.manual_seed(0)
    model = arch().eval()
    layers = [n for n in ("conv1", "conv2", "fc1", "fc2") if hasattr(model, n)][:-1] if arch is LeNet5 else ["fc1",
                                                                                                              "fc2"]
    chain = unit_chain(model, layers)
    params = dict(model.named_parameters())
    x = torch.randn(4, 1, 28, 28)
    for name, units in chain.items():
        gone = torch.zeros(units.count, dtype=torch.bool)
        gone[::3] = True
        # The unit's own row and bias zero: what it feeds is the only trace, and the mask removes exactly that.
        with torch.no_grad():
            params[f"{name}.weight"][gone] = 0.0
            params[f"{name}.bias"][gone] = 0.0
        before = model(x)
        masks = unit_masks(params, units, ~gone)
        with torch.no_grad():
            for pname, mask in masks.items():
                params[pname].masked_fill_(~mask, 0.0)
        assert torch.equal(model(x), before), name
        assert not params[units.successor + ".weight"][~masks[units.successor + ".weight"]].any()
        assert int(masks[f"{name}.bias"].sum()) == units.count - int(gone.sum())
        assert unit_norms(params, units)[gone].eq(0).all() and unit_norms(params, units)[~gone].gt(0).all()


def test_input_mask_removes_whole_columns() -> None:
    weight = LeNet300().fc1.weight
    mask = input_mask(weight, torch.arange(784) < 10)
    assert mask.sum() == 10 * 300 and mask[:, :10].all()


def test_networks_whose_units_cannot_be_removed_are_refused() -> None:
    with pytest.raises(ValueError, match="last layer"):
        unit_chain(LeNet300(), ["fc3"])
    with pytest.raises(ValueError, match="normalisation layers"):
        unit_chain(VGG16CIFAR(batch_norm=True), ["features.conv1_1"])


@pytest.mark.parametrize("codec", ["huffman", "range", "context"])
def test_removed_rows_and_inputs_are_stored_in_the_smaller_shape_and_decode_bit_exactly(codec: str) -> None:
    torch.manual_seed(1)
    for shape in [(60, 80), (12, 8, 3, 3)]:
        mask = torch.rand(shape) < 0.4
        mask[::2] = False  # half the units removed
        mask[:, 1::3] = False  # a third of the inputs (a conv: input channels)
        book = torch.tensor([-0.5, -0.25, 0.25, 0.5])
        index = torch.randint(0, 4, (int(mask.sum()),))
        tensor = dequantize(book, index, mask)
        entry, sections, stats = encode_tensor("w", tensor, mask, book, index, index_bits=4, codec=codec)
        rows, inputs = shape[0] // 2, shape[1] - len(range(1, shape[1], 3))
        assert entry["stored_shape"] == [rows, inputs, *shape[2:]] and entry["shape"] == list(shape)
        assert stats.numel == tensor.numel() and stats.bytes == sum(len(d) for _, d in sections)
        assert torch.equal(decode_tensor(entry, dict(sections)).view(torch.int32), tensor.view(torch.int32))
        full = mask.clone()
        full[0], full.view(shape[0], -1)[:, 0] = True, True  # every unit and every input keeps a weight
        index = torch.randint(0, 4, (int(full.sum()),))
        assert "stored_shape" not in encode_tensor("w", dequantize(book, index, full), full, book, index,
                                                   index_bits=4, codec=codec)[0]
        bad = dict(sections)
        bad["w:units"] = bytes(len(bad["w:units"]))  # every unit gone: disagrees with the stored shape
        with pytest.raises(ValueError, match="units section keeps 0 rows"):
            decode_tensor(entry, bad)


def test_structured_pruning_trains_exports_and_decodes_bit_exactly(tmp_path: Path, idx_dir: Path) -> None:
    path = write_config(tmp_path, idx_dir, "units", CALLBACKS, max_epochs=3)
    assert train.main(["-c", str(path)]) == 0
    run = only_run(tmp_path / "units")
    ckpt = load_ckpt(run / "best.ckpt")
    masks = ckpt["masks"]
    assert int(masks["fc1.bias"].sum()) == 150 and int(masks["fc2.bias"].sum()) == 60
    assert int(masks["fc1.weight"].any(0).sum()) <= round(0.7 * 784)
    assert not masks["fc1.weight"][~masks["fc1.bias"]].any()  # removed units: their rows ...
    assert not masks["fc2.weight"][:, ~masks["fc1.bias"]].any()  # ... and the inputs reading them
    assert not masks["fc3.weight"][:, ~masks["fc2.bias"]].any()
    model, header = read_compressed(run / "model.dcz")
    shapes = {e["name"]: e.get("stored_shape") for e in header["tensors"]}
    assert shapes["fc1.weight"][0] == 150 and shapes["fc2.weight"][:2] == [60, 150]  # both sides of fc1's units
    with open(run / "model.dcz", "rb") as f:
        assert int.from_bytes(f.read(10)[8:10], "little") == FRAMING_VERSION + 1  # older readers refuse it
    for name, value in model.state_dict().items():
        assert torch.equal(value.view(torch.int32), ckpt["state_dict"][f"model.{name}"].view(torch.int32)), name


def test_resume_mid_removal_equals_an_uninterrupted_run(tmp_path: Path, idx_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    callbacks = {"StructuredPruning": {**CALLBACKS["StructuredPruning"], "end_epoch": 2},
                 "Quantization": {"bits": 4, "epoch": 3}}
    whole, cut = whole_and_cut_runs(tmp_path, idx_dir, monkeypatch, callbacks, max_epochs=4, stop_after=1)
    assert_resume_equals_whole(whole, cut)


@pytest.mark.parametrize(("args", "match"), [
    ({}, "name what to remove"),
    ({"units": {"fc1": 0.0}}, r"fc1: the fraction kept must be in \(0, 1\]"),
    ({"inputs": 1.5}, r"inputs: the fraction kept must be in \(0, 1\]"),
    ({"units": {"fc1": 0.5}, "group_lasso": 0.01}, "group_lasso: this option was removed"),
    ({"units": {"fc3": 0.5}}, "last layer"),
    ({"units": {"conv9": 0.5}}, "not a prunable layer"),
    ({"units": {"fc1": 0.5}, "end_epoch": 5}, "outside the run's epochs"),
])
def test_impossible_settings_fail_before_training(tmp_path: Path, idx_dir: Path, args: dict, match: str) -> None:
    path = write_config(tmp_path, idx_dir, "bad", {"StructuredPruning": args}, max_epochs=2)
    with pytest.raises(ConfigError, match=match):
        cfg = parse_config(json.loads(path.read_text()))
        import builders
        builders.build_config_callbacks(cfg, builders.build_model(cfg))


def test_a_config_with_group_lasso_off_still_loads(tmp_path: Path, idx_dir: Path) -> None:
    path = write_config(tmp_path, idx_dir, "old", {"StructuredPruning": {"units": {"fc1": 0.5}, "group_lasso": 0.0}},
                        max_epochs=2)
    assert parse_config(json.loads(path.read_text())).trainer.callbacks.StructuredPruning.units == {"fc1": 0.5}


def test_quantization_must_follow_the_last_removal(tmp_path: Path, idx_dir: Path) -> None:
    callbacks = {"StructuredPruning": {"units": {"fc1": 0.5}, "start_epoch": 0, "end_epoch": 2},
                 "Quantization": {"bits": 4, "epoch": 1}}
    path = write_config(tmp_path, idx_dir, "order", callbacks, max_epochs=3)
    assert train.main(["-c", str(path)]) == 2
    assert not (tmp_path / "order").exists()
