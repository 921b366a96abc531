"""Each compression callback on its own, in a bare Lightning ``Trainer`` over a tiny module and random tensors
(Lightning's habit: no config, no run folder, no logger), beside the end-to-end CLI tests."""

from __future__ import annotations

import functools
from collections import OrderedDict

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainer.callbacks import IterativePruning, Quantization
from trainer.lit_model import LitClassifier, TrainingParts

PARTS = TrainingParts(num_classes=3, metrics=("top1_err",),  # SGD as the configs use it
                      optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3))


def tiny_module() -> LitClassifier:
    torch.manual_seed(0)
    net = nn.Sequential(OrderedDict(fc1=nn.Linear(6, 20), relu=nn.ReLU(), fc2=nn.Linear(20, 3)))
    return LitClassifier(net, PARTS)


def fit(module: LitClassifier, callbacks: list[pl.Callback], epochs: int) -> pl.Trainer:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 6, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                         limit_train_batches=4, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    return trainer


def test_iterative_pruning_reaches_each_target_exactly_and_zeros_stay_zero() -> None:
    module = tiny_module()
    fit(module, [IterativePruning(keep_ratio={"fc1": 0.25, "fc2": 0.5}, schedule="every", prune_every=1,
                                  start_epoch=0, end_epoch=2)], epochs=4)
    w1, w2 = module.model.fc1.weight, module.model.fc2.weight
    assert int(torch.count_nonzero(w1)) == round(0.25 * 120) and int(torch.count_nonzero(w2)) == round(0.5 * 60)
    assert torch.equal(module.masks["fc1.weight"], w1 != 0)  # trained one more epoch: still exactly the mask


def test_quantization_keeps_at_most_2_bits_values_on_the_mask_and_trains_the_codebook() -> None:
    module = tiny_module()
    fit(module, [IterativePruning(keep_ratio=0.5), Quantization(bits={"Linear": 2}, epoch=1)], epochs=3)
    for name in ("fc1", "fc2"):
        weight = getattr(module.model, name).weight
        values = torch.unique(weight[weight != 0])
        assert len(values) <= 4 and torch.equal(weight != 0, module.masks[f"{name}.weight"])
    # Every kept weight is one of its codebook's entries (the codebook is what the optimizer trains).
    codebook = module.compression.codebooks["fc1__weight"].detach()
    assert set(torch.unique(module.model.fc1.weight[module.model.fc1.weight != 0]).tolist()) <= set(codebook.tolist())


def test_callbacks_validate_their_arguments_with_our_messages() -> None:
    with pytest.raises(ValueError, match=r"Quantization\.bits: must be an integer in 1\.\.16, got 17"):
        Quantization(bits=17)
    with pytest.raises(ValueError, match=r"IterativePruning: keep_ratio fc1: must be in \(0, 1\], got 2"):
        IterativePruning(keep_ratio={"fc1": 2})
    with pytest.raises(ValueError, match=r"IterativePruning\.amount: unknown key; valid keys here: criterion"):
        IterativePruning(keep_ratio=0.5, amount=0.1)
