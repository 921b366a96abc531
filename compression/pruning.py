"""Pruning primitives of Han et al., *Learning both Weights and Connections* (arXiv 1506.02626, §3).

Pure tensor functions: masks by magnitude (per layer or global), by Han's per-layer threshold
``s × std(w)``, the keep-ratio of each step of a pruning schedule, and the dropout adjustment of §3.5.
A mask is a bool tensor shaped like the weight, True where the weight is kept. Every function takes the
current mask and returns a subset of it, so pruned weights never come back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

CRITERIA = ("magnitude", "std", "global")
SCHEDULES = ("one_shot", "epochs", "every", "gradual")


def _alive(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(weight, dtype=torch.bool) if mask is None else mask.to(weight.device, torch.bool)


def _keep_top(scores: torch.Tensor, alive: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` largest scores among ``alive`` entries; ties broken by lower flat index.

    Deterministic for identical inputs (what keeps DDP ranks in agreement), O(n) memory plus O(k).
    """
    flat_scores, flat_alive = scores.flatten(), alive.flatten()
    n_alive = int(flat_alive.sum())
    if k >= n_alive:
        return alive.clone()
    if k <= 0:
        return torch.zeros_like(alive)
    masked = torch.where(flat_alive, flat_scores, torch.full_like(flat_scores, -1.0))  # scores are >= 0
    kth = torch.topk(masked, k, sorted=False).values.min()
    keep = masked > kth
    ties = torch.nonzero(masked == kth).flatten()[: k - int(keep.sum())]  # lowest indices first
    keep[ties] = True
    return keep.view_as(alive)


def magnitude_mask(weight: torch.Tensor, keep_ratio: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Keeps the ``round(keep_ratio × numel)`` largest-magnitude weights (of those still alive).

    Args:
        weight: Any-shape weight tensor.
        keep_ratio: Fraction of *all* entries to keep, in (0, 1].
        mask: Current mask (None: nothing pruned yet).

    Returns:
        A bool mask, a subset of ``mask``, with exactly ``min(round(keep_ratio × numel), alive)`` True.

    Raises:
        ValueError: keep_ratio outside (0, 1].
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    return _keep_top(weight.detach().abs(), _alive(weight, mask), round(keep_ratio * weight.numel()))


def std_threshold_mask(weight: torch.Tensor, sensitivity: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Han's criterion: prunes ``|w| < sensitivity × std(w)``, std over this layer's surviving weights.

    Raises:
        ValueError: negative sensitivity, or fewer than two surviving weights (std undefined).
    """
    if sensitivity < 0:
        raise ValueError(f"sensitivity must be >= 0, got {sensitivity}")
    alive = _alive(weight, mask)
    survivors = weight.detach()[alive]
    if survivors.numel() < 2:
        raise ValueError(f"std threshold needs at least 2 surviving weights, got {survivors.numel()}")
    threshold = sensitivity * survivors.float().std()
    return alive & (weight.detach().abs() >= threshold)


def global_magnitude_masks(weights: Mapping[str, torch.Tensor], keep_ratio: float,
                           masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """One magnitude threshold over all ``weights`` together, keeping ``keep_ratio`` of their entries.

    Raises:
        ValueError: keep_ratio outside (0, 1] or no tensors given.
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if not weights:
        raise ValueError("global pruning needs at least one tensor")
    masks = masks or {}
    names = list(weights)
    scores = torch.cat([weights[n].detach().abs().flatten().float().cpu() for n in names])
    alive = torch.cat([_alive(weights[n], masks.get(n)).flatten().cpu() for n in names])
    keep = _keep_top(scores, alive, int(round(keep_ratio * scores.numel())))
    out, start = {}, 0
    for n in names:
        size = weights[n].numel()
        out[n] = keep[start:start + size].view_as(weights[n]).to(weights[n].device)
        start += size
    return out


def schedule_epochs(kind: str, max_epochs: int, epochs: list[int] | None = None, start_epoch: int = 0,
                    end_epoch: int | None = None, every: int = 1) -> list[int]:
    """The (0-based) epochs at whose start a pruning step happens.

    - ``one_shot``: ``[start_epoch]``.
    - ``epochs``: the given list, sorted.
    - ``every`` / ``gradual``: ``start_epoch, start_epoch + every, ...`` up to ``end_epoch`` (inclusive;
      default the last epoch).

    Raises:
        ValueError: an epoch outside [0, max_epochs), an empty schedule, or an unknown kind.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; valid schedules: {', '.join(SCHEDULES)}")
    if every < 1:
        raise ValueError(f"prune_every must be >= 1, got {every}")
    if kind == "one_shot":
        steps = [start_epoch]
    elif kind == "epochs":
        steps = sorted(set(epochs or []))
    else:
        last = max_epochs - 1 if end_epoch is None else end_epoch
        steps = list(range(start_epoch, last + 1, every))
    if not steps:
        raise ValueError(f"schedule {kind!r} has no pruning epoch (epochs={epochs}, start_epoch={start_epoch}, "
                         f"end_epoch={end_epoch})")
    bad = [e for e in steps if not 0 <= e < max_epochs]
    if bad or (end_epoch is not None and not 0 <= end_epoch < max_epochs):
        raise ValueError(f"pruning epochs {bad or [end_epoch]} are outside the run's epochs 0..{max_epochs - 1} "
                         f"(trainer.max_epochs={max_epochs})")
    return steps


def progress(step: int, n_steps: int) -> float:
    """Fraction of the schedule completed after step ``step`` (0-based) of ``n_steps``: 1/n, 2/n, ..., 1."""
    return (step + 1) / n_steps


def keep_ratio_at(step: int, n_steps: int, target: float, gradual: bool = False) -> float:
    """Keep-ratio to reach at ``step``; the last step reaches ``target`` exactly.

    Iterative schedules remove the same share of what remains at every step (geometric:
    ``target ** progress``). The gradual schedule follows Zhu & Gupta (2017):
    sparsity = s_f · (1 − (1 − progress)³), which prunes fast early and slowly near the end.
    """
    f = progress(step, n_steps)
    if gradual:
        return 1.0 - (1.0 - target) * (1.0 - (1.0 - f) ** 3)
    return target ** f


def adjusted_dropout(p_original: float, keep_ratio: float) -> float:
    """Han 2015 §3.5: ``D_r = D_o · sqrt(C_ir / C_io)``, the connection ratio being the layer's keep-ratio."""
    return p_original * math.sqrt(keep_ratio)


def step_masks(criterion: str, weights: Mapping[str, torch.Tensor], targets: Mapping[str, float], step: int,
               n_steps: int, gradual: bool, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The masks of pruning step ``step`` (0-based) of ``n_steps``, each a subset of the current one.

    Args:
        criterion: ``magnitude`` (each tensor to ``keep_ratio_at`` its target), ``std`` (Han's threshold,
            the quality parameter growing to its target with ``progress``) or ``global`` (one threshold over
            all tensors; every target is the same keep ratio).
        weights: The tensors to prune, by parameter name.
        targets: Final keep ratio (``magnitude``, ``global``) or sensitivity (``std``) per tensor.
        gradual: Zhu & Gupta's cubic schedule instead of the geometric one (``keep_ratio_at``).
        masks: The current masks (a tensor without one is unpruned).
    """
    if criterion == "global":
        keep = keep_ratio_at(step, n_steps, float(next(iter(targets.values()))), gradual)
        return global_magnitude_masks(weights, keep, masks)
    out = {}
    for name, weight in weights.items():
        if criterion == "std":
            out[name] = std_threshold_mask(weight, targets[name] * progress(step, n_steps), masks.get(name))
        else:
            out[name] = magnitude_mask(weight, keep_ratio_at(step, n_steps, targets[name], gradual), masks.get(name))
    return out


def adjust_dropout_(model: nn.Module, masks: Mapping[str, torch.Tensor], original_p: dict[str, float]) -> None:
    """Sets each ``nn.Dropout`` that directly precedes a pruned layer in a ``Sequential`` (AlexNet's and
    VGG's classifiers) to ``adjusted_dropout`` of its original rate and that layer's keep ratio (§3.5).

    Args:
        model: The network (changed in place).
        masks: Pruning masks by parameter name.
        original_p: ``{dropout module name: original rate}``, filled on first sight and reused afterwards,
            so repeated steps (and a resume) scale the original rate, never an already scaled one.
    """
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        for (drop_name, drop), (layer_name, _) in zip(children, children[1:]):
            weight = f"{parent_name}.{layer_name}.weight".lstrip(".")
            if isinstance(drop, nn.Dropout) and weight in masks:
                key = f"{parent_name}.{drop_name}".lstrip(".")
                original_p.setdefault(key, drop.p)
                drop.p = adjusted_dropout(original_p[key], float(masks[weight].float().mean()))
