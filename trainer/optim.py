"""Optimizer, learning-rate scheduler and loss registries (explicit: a config can only name these)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


class CosineCycles(torch.optim.lr_scheduler.LambdaLR):
    """Cosine cycles of given lengths, each starting from its own fraction of the base rate.

    ``cycles=[30, 30], peaks=[1.0, 0.4]``: epochs 0-29 anneal from ``lr`` to 0 (the dense stage), epochs
    30-59 from ``0.4 * lr`` to 0 (pruning and quantization, which start from a trained network and need
    less). Epoch ``t`` of a cycle of length ``T`` with peak ``p`` runs at ``p * lr * (1 + cos(pi * t / T)) / 2``;
    after the last cycle the rate stays 0. Every parameter group (the codebooks' included) is scaled alike.

    Raises:
        ValueError: no cycles, a length below 1, peaks of another count or negative.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cycles: list[int], peaks: list[float] | None = None,
                 last_epoch: int = -1) -> None:
        peaks = [1.0] * len(cycles) if peaks is None else list(peaks)
        if not cycles or any(not isinstance(n, int) or n < 1 for n in cycles):
            raise ValueError(f"cycles must be a non-empty list of epoch counts >= 1, got {cycles!r}")
        if len(peaks) != len(cycles) or not all(0 <= p < math.inf for p in peaks):
            raise ValueError(f"peaks must be {len(cycles)} numbers >= 0 (one per cycle), got {peaks!r}")
        self.cycles, self.peaks = list(cycles), peaks
        super().__init__(optimizer, self.factor, last_epoch)

    def state_dict(self) -> dict:
        # The cycles come from the config (a resume under an edited config follows the config, as it says).
        return {k: v for k, v in super().state_dict().items() if k not in ("cycles", "peaks")}

    def factor(self, epoch: int) -> float:
        """The multiplier of the base rate at ``epoch``."""
        for length, peak in zip(self.cycles, self.peaks):
            if epoch < length:
                return peak * (1.0 + math.cos(math.pi * epoch / length)) / 2.0
            epoch -= length
        return 0.0

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "SGD": torch.optim.SGD,
    "Adam": torch.optim.Adam,
    "AdamW": torch.optim.AdamW,
    "RMSprop": torch.optim.RMSprop,
}

SCHEDULERS: dict[str, type] = {
    "StepLR": torch.optim.lr_scheduler.StepLR,
    "MultiStepLR": torch.optim.lr_scheduler.MultiStepLR,
    "ExponentialLR": torch.optim.lr_scheduler.ExponentialLR,
    "CosineAnnealingLR": torch.optim.lr_scheduler.CosineAnnealingLR,
    "CosineAnnealingWarmRestarts": torch.optim.lr_scheduler.CosineAnnealingWarmRestarts,
    # One cosine cycle per pipeline stage, each with its own peak (the beyond-the-paper recipes).
    "CosineCycles": CosineCycles,
    "ReduceLROnPlateau": torch.optim.lr_scheduler.ReduceLROnPlateau,
}

LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "cross_entropy": nn.functional.cross_entropy,
}
