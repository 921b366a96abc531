"""Trained quantization: eq. 3 gradients, at most 2**bits values, zeros kept, codebooks trained, resume."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import builders as trainer_module
from compression.quantization import centroid_grad, dequantize
from helpers import StopAfter, last_ckpt, load_script, tiny_config, write_config
from models import LeNet300
from builders import training_parts
from trainer.lit_model import LitClassifier

train = load_script("train")
test = load_script("test")
KEEP = {"fc1": 0.08, "fc2": 0.09, "fc3": 0.26}
LAYERS = ("fc1", "fc2", "fc3")


def codebook(ckpt: dict[str, Any], layer: str) -> torch.Tensor:
    return ckpt["state_dict"][f"compression.codebooks.{layer}__weight"]


def test_dequantize_and_centroid_grad_by_hand() -> None:
    mask = torch.tensor([[True, False], [True, True]])
    index = torch.tensor([1, 0, 1])  # row-major kept entries: (0,0) -> c1, (1,0) -> c0, (1,1) -> c1
    cb = torch.tensor([-0.5, 2.0])
    assert torch.equal(dequantize(cb, index, mask), torch.tensor([[2.0, 0.0], [-0.5, 2.0]]))
    grad = torch.tensor([[1.0, 100.0], [3.0, 5.0]])  # the pruned entry's 100 must not count
    assert torch.equal(centroid_grad(grad, index, mask, 2), torch.tensor([3.0, 6.0]))


def test_codebook_gradient_is_the_grouped_sum_of_weight_gradients(idx_dir: Path, tmp_path: Path) -> None:
    from parse_config import parse_config

    torch.manual_seed(0)
    cfg = parse_config(tiny_config(idx_dir, tmp_path))
    lit = LitClassifier(LeNet300(), training_parts(cfg))
    w = lit.model.fc2.weight
    mask = torch.rand_like(w) < 0.3
    index = torch.randint(0, 8, (int(mask.sum()),))
    lit.compression.set_masks(lit.model, {"fc2.weight": mask})
    lit.compression.set_quantization(lit.model, "fc2.weight", torch.linspace(-0.2, 0.2, 8), index)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    lit.loss_fn(lit(x), y).backward()
    weight_grad = w.grad.clone()
    lit.on_after_backward()
    expected = torch.zeros(8)
    kept_grads = weight_grad[mask]
    for i in range(len(index)):  # explicit eq. 3, one weight at a time
        expected[index[i]] += kept_grads[i]
    assert torch.allclose(lit.compression.codebooks["fc2__weight"].grad, expected, atol=1e-6)
    assert w.grad is None  # the weight itself is not updated by the optimizer


def test_prune_quantize_finetune(tmp_path: Path, idx_dir: Path) -> None:
    callbacks = {"IterativePruning": {"keep_ratio": KEEP},
                 "Quantization": {"bits": {"Linear": 5, "fc3": 3}, "epoch": 1, "lr": 1e-4}}
    frozen = {**callbacks, "Quantization": {**callbacks["Quantization"], "lr": 0.0}}
    assert train.main(["-c", str(write_config(tmp_path, idx_dir, "q", callbacks, max_epochs=3))]) == 0
    assert train.main(["-c", str(write_config(tmp_path, idx_dir, "frozen", frozen, max_epochs=3))]) == 0
    ckpt, ref = last_ckpt(tmp_path / "q"), last_ckpt(tmp_path / "frozen")
    for layer, bits in (("fc1", 5), ("fc2", 5), ("fc3", 3)):
        w, mask = ckpt["state_dict"][f"model.{layer}.weight"], ckpt["masks"][f"{layer}.weight"]
        assert int(mask.sum()) == round(KEEP[layer] * w.numel())
        assert torch.count_nonzero(w[~mask]) == 0  # zeros stayed zero through ~16 fine-tuning steps
        assert len(torch.unique(w[mask])) <= 2 ** bits
        cb, index = codebook(ckpt, layer), ckpt["quant_index"][f"{layer}.weight"]
        assert torch.equal(w[mask], cb[index])  # the weight is exactly codebook[index]
        # With lr 0 the codebook stays the k-means result (ascending); with lr > 0 it was fine-tuned.
        frozen_cb = codebook(ref, layer)
        assert torch.equal(frozen_cb, torch.sort(frozen_cb).values)
        assert not torch.equal(cb, frozen_cb)
        assert torch.equal(index, ref["quant_index"][f"{layer}.weight"])  # assignments stay fixed



def test_resume_mid_finetuning_reproduces_the_codebook(tmp_path: Path, idx_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    callbacks = {"IterativePruning": {"keep_ratio": KEEP}, "Quantization": {"bits": 4, "epoch": 1, "lr": 1e-4}}
    assert train.main(["-c", str(write_config(tmp_path, idx_dir, "straight", callbacks, max_epochs=4))]) == 0
    path = write_config(tmp_path, idx_dir, "cut", callbacks, max_epochs=4)
    original = trainer_module.build_callbacks
    monkeypatch.setattr(trainer_module, "build_callbacks", lambda cfg, run_dir: original(cfg, run_dir) + [StopAfter(2)])
    assert train.main(["-c", str(path)]) == 0
    monkeypatch.undo()
    (run,) = sorted((tmp_path / "cut" / "tiny").iterdir())
    assert last_ckpt(tmp_path / "cut")["epoch"] == 2  # stopped mid fine-tuning (quantized at epoch 1)
    assert train.main(["-r", str(run / "last.ckpt")]) == 0
    resumed, straight = last_ckpt(tmp_path / "cut"), last_ckpt(tmp_path / "straight")
    assert resumed["epoch"] == 3
    for layer in LAYERS:
        assert torch.equal(codebook(resumed, layer), codebook(straight, layer))
    for key, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key


def test_quantized_checkpoint_in_test_py_and_as_new_run(tmp_path: Path, idx_dir: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    callbacks = {"IterativePruning": {"keep_ratio": KEEP}, "Quantization": {"bits": 3, "epoch": 1}}
    assert train.main(["-c", str(write_config(tmp_path, idx_dir, "q", callbacks, max_epochs=2))]) == 0
    (run,) = sorted((tmp_path / "q" / "tiny").iterdir())
    capsys.readouterr()
    assert test.main(["-r", str(run / "last.ckpt"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {r["name"]: r["nonzero"] for r in out["layers"]} == {"fc1": 18_816, "fc2": 2_700, "fc3": 260}

    # A new run from the quantized weights, with no callbacks: masks and codebooks come along and are trained.
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(tiny_config(idx_dir, tmp_path / "again", max_epochs=1)))
    assert train.main(["-c", str(plain), "--weights", str(run / "last.ckpt")]) == 0
    again, source = last_ckpt(tmp_path / "again"), last_ckpt(tmp_path / "q")
    for layer in LAYERS:
        w = again["state_dict"][f"model.{layer}.weight"]
        kept = int(source["masks"][f"{layer}.weight"].sum())
        assert len(torch.unique(w[w != 0])) <= 8 and int((w != 0).sum()) == kept
        assert not torch.equal(codebook(again, layer), codebook(source, layer))

    # Pruning them again is refused before anything runs: a quantized layer's mask is fixed.
    prune = write_config(tmp_path, idx_dir, "prune", {"IterativePruning": {"keep_ratio": 0.5}}, max_epochs=1)
    capsys.readouterr()
    assert train.main(["-c", str(prune), "--weights", str(run / "last.ckpt")]) == 2
    assert re.search(r"IterativePruning: fc1\.weight, fc2\.weight, fc3\.weight are already quantized, so their masks "
                     r"are fixed", capsys.readouterr().err)
    assert not (tmp_path / "prune").exists()


@pytest.mark.parametrize(("callbacks", "match"), [
    ({"Quantization": {"bits": 0}}, r"Quantization\.bits: must be an integer in 1\.\.16, got 0"),
    ({"Quantization": {"bits": {"fc1": 17}}}, r"Quantization\.bits: fc1: must be an integer in 1\.\.16, got 17"),
    ({"Quantization": {"init": "random"}}, r"unknown init 'random'; valid inits: linear, density, forgy"),
    ({"Quantization": {"epoch": 2}}, r"Quantization: epoch 2 is outside the run's epochs 0\.\.1"),
    ({"Quantization": {"bits": {"conv9": 4}}}, r"'conv9' is not a prunable layer of LeNet300; prunable layers: fc1"),
    ({"IterativePruning": {"keep_ratio": 0.5, "start_epoch": 1}, "Quantization": {"epoch": 1}},
     r"Quantization\.epoch: quantization at epoch 1 must come after the last IterativePruning step \(epoch 1\)"),
])
def test_quantization_config_errors(tmp_path: Path, idx_dir: Path, callbacks: dict[str, Any], match: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert train.main(["-c", str(write_config(tmp_path, idx_dir, "bad", callbacks, max_epochs=2))]) == 2
    assert re.search(match, capsys.readouterr().err)


def test_quantization_reports_to_tensorboard(tmp_path: Path, idx_dir: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callbacks = {"IterativePruning": {"keep_ratio": KEEP}, "Quantization": {"bits": 4, "epoch": 1}}
    assert train.main(["-c", str(write_config(tmp_path, idx_dir, "tb", callbacks, max_epochs=2))]) == 0
    (run,) = sorted((tmp_path / "tb" / "tiny").iterdir())
    events = EventAccumulator(str(run), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    histograms, scalars = set(events.Tags()["histograms"]), set(events.Tags()["scalars"])
    for layer in LAYERS:  # the paper's Fig. 4 views: dense, pruned (before k-means), quantized
        assert {f"weights/{layer}/at_start", f"weights/{layer}/before_quantization",
                f"weights/{layer}/quantized"} <= histograms
        assert events.Scalars(f"quant/{layer}/bits")[-1].value == 4
        assert 1 <= events.Scalars(f"quant/{layer}/clusters")[-1].value <= 16
        assert events.Scalars(f"quant/{layer}/iterations")[-1].value >= 0
    assert {"compression/file_rate", "compression/rate_pqh"} <= scalars  # the .dcz figures of the run
