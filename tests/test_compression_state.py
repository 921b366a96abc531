"""CompressionState on its own: exact zeros, devices after a checkpoint load, checks on loaded entries."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from helpers import tiny_config
from parse_config import parse_config
from trainer import compression_state
from trainer.compression_state import CompressionState
from trainer.lit_model import LitClassifier
from builders import build_model, training_parts


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 3))


def quantized_entries(model: torch.nn.Module) -> dict[str, Any]:
    """Checkpoint entries for ``0.weight`` pruned to 8 of 24 and quantized to 2 centroids."""
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask.view(-1)[::3] = True
    return {"masks": {"0.weight": mask}, "quant_index": {"0.weight": torch.tensor([0, 1] * 4)},
            "state_dict": {"compression.codebooks.0__weight": torch.tensor([-0.5, 0.25])}}


def test_pruned_weights_are_positive_zeros() -> None:
    # mul_ by a mask leaves -0.0 where a weight was negative; the decoded file holds +0.0, so the bits
    # of the model and of its decoded copy would differ.
    model, state = small_model(), CompressionState()
    weight = model[0].weight
    mask = weight.detach() > 0  # prunes every negative weight
    state.set_masks(model, {"0.weight": mask})
    assert (weight[~mask] == 0).all() and not torch.signbit(weight[~mask]).any()


def test_loaded_masks_follow_the_weights_to_their_device(monkeypatch: pytest.MonkeyPatch) -> None:
    # A checkpoint puts masks and indices on the CPU; the first step on the GPU calls route_gradients_
    # before apply_. The meta device stands in for CUDA here (no GPU on CI): same device mismatch. Meta
    # tensors cannot do the boolean indexing of centroid_grad, so a stand-in checks what it is given.
    def centroid_grad(grad: torch.Tensor, index: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
        assert index.device == mask.device == grad.device
        return torch.zeros(k, device=grad.device)

    monkeypatch.setattr(compression_state, "centroid_grad", centroid_grad)
    model, state = small_model(), CompressionState()
    entries = quantized_entries(model)
    entries["masks"]["1.weight"] = torch.ones(3, 4, dtype=torch.bool)  # pruned only: its gradient is masked
    state.load_entries(model, entries)
    model.to("meta")
    state.to("meta")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    state.route_gradients_(model)  # raised "expected ... same device" before the masks moved themselves
    assert {m.device.type for m in state.masks.values()} == {"meta"} and state.index["0.weight"].device.type == "meta"
    assert state.codebooks["0__weight"].grad.shape == (2,) and model[0].weight.grad is None
    state.apply_(model)


@pytest.mark.parametrize(("change", "match"), [
    (lambda e: e["masks"].update({"0.weight": torch.ones(6, 4, dtype=torch.bool)}),
     r"mask for 0\.weight has shape \(6, 4\), the model's: \(4, 6\)"),
    (lambda e: e["masks"].update({"9.weight": torch.ones(2, dtype=torch.bool)}),
     r"mask for 9\.weight has shape \(2,\), the model's: no such parameter"),
    (lambda e: e["quant_index"].update({"0.weight": torch.tensor([0, 1, 0])}),
     r"quantization index of 0\.weight does not fit: \(3,\) entries for 8 kept weights and a codebook of 2"),
    (lambda e: e["quant_index"].update({"0.weight": torch.tensor([0, 1, 2, 0, 0, 0, 0, 0])}),
     r"quantization index of 0\.weight does not fit"),
    (lambda e: e["state_dict"].clear(), r"quantization indices for 0\.weight but no codebook"),
])
def test_loaded_entries_that_do_not_fit_are_refused(change: Any, match: str) -> None:
    model = small_model()
    entries = quantized_entries(model)
    change(entries)
    with pytest.raises(ValueError, match=match):
        CompressionState().load_entries(model, entries)


def test_codebooks_come_back_in_the_saved_order() -> None:
    # "1.weight" was pruned away entirely: it has a codebook (registered by Quantization.setup) but no
    # index. The optimizer restores its state by position, so the saved order must come back.
    model = small_model()
    entries = quantized_entries(model)
    entries["state_dict"] = {"compression.codebooks.1__weight": torch.zeros(4), **entries["state_dict"]}
    state = CompressionState()
    state.load_entries(model, entries)
    assert list(state.codebooks) == ["1__weight", "0__weight"] and state.codebooks["1__weight"].shape == (4,)


def test_ddp_is_told_to_leave_the_codebooks_alone(tmp_path: Any) -> None:
    # Codebook gradients are summed from DDP-averaged weight gradients after backward: DDP must not wait
    # for autograd gradients of its own for them, whatever the strategy's name ("auto", "ddp_spawn", ...).
    cfg = parse_config(tiny_config(tmp_path, tmp_path / "runs"))
    lit = LitClassifier(build_model(cfg), training_parts(cfg))
    assert lit._ddp_params_and_buffers_to_ignore == []
    lit.compression.add_codebook("fc1.weight", 4)
    names = lit._ddp_params_and_buffers_to_ignore
    assert names == ["compression.codebooks.fc1__weight"] and set(names) <= dict(lit.named_parameters()).keys()
