"""Pure pruning primitives (compression.pruning): exact keep counts, per-layer std, schedules."""

from __future__ import annotations

import math

import pytest
import torch

from compression.pruning import (adjusted_dropout, global_magnitude_masks, keep_ratio_at, magnitude_mask,
                                 schedule_epochs, std_threshold_mask)


def test_magnitude_mask_keeps_exactly_the_largest() -> None:
    torch.manual_seed(0)
    w = torch.randn(30, 40)
    mask = magnitude_mask(w, 0.08)  # round(0.08 * 1200) = 96
    assert int(mask.sum()) == 96
    assert w.abs()[mask].min() > w.abs()[~mask].max()


def test_magnitude_mask_ties_are_broken_by_index() -> None:
    w = torch.ones(10)
    assert magnitude_mask(w, 0.3).tolist() == [True] * 3 + [False] * 7


def test_magnitude_mask_never_revives_pruned_weights() -> None:
    w = torch.tensor([10.0, 9.0, 1.0, 2.0, 3.0, 4.0])
    old = torch.tensor([False, False, True, True, True, True])  # the two largest were pruned before
    new = magnitude_mask(w, 0.5, old)  # keep 3 of 6, among the survivors: 4, 3, 2
    assert new.tolist() == [False, False, False, True, True, True]
    assert magnitude_mask(w, 1.0, old).tolist() == old.tolist()  # a looser target changes nothing


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_magnitude_mask_rejects_bad_keep_ratio(bad: float) -> None:
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]"):
        magnitude_mask(torch.ones(4), bad)


def test_std_threshold_is_per_layer() -> None:
    # Layer a: values ±1 and ±3 (std over [1,-1,3,-3] = sqrt(20/3) = 2.582). s = 1 keeps |w| >= 2.582: the 3s.
    # Layer b: the same shape times 100: its own std is 258.2, so s = 1 again keeps only its 300s.
    a = torch.tensor([1.0, -1.0, 3.0, -3.0])
    assert math.isclose(float(a.std()), math.sqrt(20 / 3), rel_tol=1e-6)
    assert std_threshold_mask(a, 1.0).tolist() == [False, False, True, True]
    assert std_threshold_mask(a * 100, 1.0).tolist() == [False, False, True, True]
    # s = 0.3 -> threshold 0.775: everything survives.
    assert std_threshold_mask(a, 0.3).all()


def test_std_threshold_uses_surviving_weights_only() -> None:
    # Survivors [1, -1, 3, -3] as above; the pruned 100 must not inflate the std.
    w = torch.tensor([1.0, -1.0, 3.0, -3.0, 100.0])
    old = torch.tensor([True, True, True, True, False])
    assert std_threshold_mask(w, 1.0, old).tolist() == [False, False, True, True, False]


def test_std_threshold_errors() -> None:
    with pytest.raises(ValueError, match="sensitivity must be >= 0"):
        std_threshold_mask(torch.ones(3), -1.0)
    with pytest.raises(ValueError, match="at least 2 surviving weights"):
        std_threshold_mask(torch.ones(1), 1.0)


def test_global_magnitude_uses_one_threshold() -> None:
    small, large = torch.full((4,), 0.1), torch.arange(1.0, 5.0)
    masks = global_magnitude_masks({"a": small, "b": large}, 0.5)  # keep 4 of 8: all of b
    assert not masks["a"].any() and masks["b"].all()


def test_schedule_epochs() -> None:
    assert schedule_epochs("one_shot", 10, start_epoch=2) == [2]
    assert schedule_epochs("epochs", 10, epochs=[6, 0, 3]) == [0, 3, 6]
    assert schedule_epochs("every", 10, start_epoch=1, end_epoch=7, every=3) == [1, 4, 7]
    assert schedule_epochs("gradual", 5, start_epoch=0, every=2) == [0, 2, 4]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"kind": "epochs", "epochs": [1, 10]}, r"pruning epochs \[10\] are outside the run's epochs 0\.\.9"),
    ({"kind": "every", "end_epoch": 12}, r"outside the run's epochs"),
    ({"kind": "one_shot", "start_epoch": -1}, r"outside the run's epochs"),
    ({"kind": "weekly"}, r"unknown schedule 'weekly'; valid schedules: one_shot, epochs, every, gradual"),
    ({"kind": "every", "every": 0}, r"prune_every must be >= 1"),
])
def test_schedule_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        schedule_epochs(max_epochs=10, **kwargs)


def test_iterative_keep_ratios_remove_the_same_share_each_step() -> None:
    # target 1 % in 2 steps: keep 10 % then 1 % (each step removes 90 % of what remains).
    assert [round(keep_ratio_at(i, 2, 0.01), 12) for i in range(2)] == [0.1, 0.01]


def test_gradual_cubic_schedule_values() -> None:
    # Zhu & Gupta: sparsity = s_f (1 - (1 - f)^3). Target keep 0.1 (s_f = 0.9), 4 steps:
    # f = 0.25: sparsity = 0.9 * (1 - 0.421875) = 0.5203125 -> keep 0.4796875; f = 1 -> keep 0.1.
    values = [keep_ratio_at(i, 4, 0.1, gradual=True) for i in range(4)]
    assert values[0] == pytest.approx(0.4796875)
    assert values[1] == pytest.approx(1 - 0.9 * (1 - 0.5 ** 3))
    assert values[3] == pytest.approx(0.1)
    assert values == sorted(values, reverse=True)


def test_adjusted_dropout() -> None:
    # Han 2015 §3.5: D_r = D_o sqrt(C_ir / C_io); keeping 9 % of fc6 turns 0.5 into 0.15.
    assert adjusted_dropout(0.5, 0.09) == pytest.approx(0.15)


def test_adjust_dropout_follows_the_papers_rule_without_compounding() -> None:
    from collections import OrderedDict

    from compression.pruning import adjust_dropout_

    model = torch.nn.Sequential(OrderedDict(drop=torch.nn.Dropout(0.5), fc=torch.nn.Linear(10, 10)))
    original: dict[str, float] = {}
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask.view(-1)[:36] = True  # 36 % kept: D_r = 0.5 * sqrt(0.36) = 0.3
    adjust_dropout_(model, {"fc.weight": mask}, original)
    assert model.drop.p == pytest.approx(0.3) and original == {"drop": 0.5}
    mask.view(-1)[9:] = False  # 9 % kept: from the ORIGINAL rate, 0.5 * 0.3 = 0.15
    adjust_dropout_(model, {"fc.weight": mask}, original)
    assert model.drop.p == pytest.approx(0.15)
