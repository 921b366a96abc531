"""Per-layer sensitivity to pruning and quantization (Han et al. 2015, arXiv 1506.02626, §4 and Fig. 6).

Han et al. prune each layer *alone*, the rest untouched, at a range of thresholds, plot the accuracy of
each layer against the fraction pruned away (Fig. 6), and read every layer's threshold off its curve;
Distiller's ``compress_classifier.py --sense`` does the same with an evaluation function passed in. Here the
sweep covers magnitude pruning (keep ratios) and weight sharing by 1-D k-means over the non-zero weights
(bits and initialisation, Han et al. 2016 §3.2). Evaluation is the caller's function; after every point
the layer's weight is restored from a copy of *that layer only*. Torch/numpy only: no Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compression.kmeans import MAX_ITER, kmeans_1d
from compression.pruning import magnitude_mask

KINDS = ("prune", "quantize")
BUDGET_TOL = 1e-6  # errors are float32 percentages: "within budget" forgives rounding at the boundary

Metrics = dict[str, float]  # {"top1_err": %, "top5_err": %, "loss": ...}


@dataclass(frozen=True)
class Point:
    """One sweep point: a layer, pruned to ``value`` (keep ratio) or quantized to ``value`` bits with ``init``."""

    layer: str
    kind: str  # "prune" or "quantize"
    value: float | int  # keep ratio in (0, 1] or bits in 1..16
    init: str = ""  # k-means initialisation ("quantize" only)


def sweep_points(layers: Iterable[str], kinds: Iterable[str], keep_ratios: list[float], bits: list[int],
                 inits: list[str]) -> list[Point]:
    """Every point of the sweep, grouped by layer (one layer's copy is kept at a time)."""
    points = []
    for layer in layers:
        if "prune" in kinds:
            points += [Point(layer, "prune", r) for r in keep_ratios]
        if "quantize" in kinds:
            points += [Point(layer, "quantize", b, init) for init in inits for b in bits]
    return points


# -------------------------------------------------------------------------------------- weight changes
def prune_(weight: torch.Tensor, keep_ratio: float) -> None:
    """Zeroes all but the ``round(keep_ratio × numel)`` largest-magnitude entries of ``weight``, in place."""
    weight.masked_fill_(~magnitude_mask(weight, keep_ratio), 0.0)


def quantize_(weight: torch.Tensor, bits: int, init: str = "linear", seed: int = 0, max_iter: int = MAX_ITER) -> None:
    """Replaces the non-zero entries of ``weight`` by their k-means centroid (at most ``2**bits`` values), in place.

    Zeros stay zero (they are the pruned weights and are not clustered); an all-zero weight is left alone.
    """
    kept = weight != 0
    if not bool(kept.any()):
        return
    result = kmeans_1d(weight[kept].double().cpu().numpy(), 2 ** bits, init=init, seed=seed, max_iter=max_iter)
    shared = torch.from_numpy(result.centroids)[torch.from_numpy(result.labels)]  # (n_kept,)
    weight[kept] = shared.to(weight.device, weight.dtype)


def apply_(weight: torch.Tensor, point: Point, seed: int = 0) -> None:
    """Prunes or quantizes ``weight`` in place as ``point`` says."""
    if point.kind == "prune":
        prune_(weight, float(point.value))
    else:
        quantize_(weight, int(point.value), point.init, seed)


def _restore_(layers: Mapping[str, nn.Module], saved: Mapping[str, torch.Tensor]) -> None:
    # .weight is looked up again: Lightning may have moved the module to another device meanwhile.
    with torch.no_grad():
        for name, weight in saved.items():
            layers[name].weight.copy_(weight)


def run_sweeps(layers: Mapping[str, nn.Module], points: Iterable[Point], evaluate: Callable[[], Metrics],
               baseline: Metrics | None = None, seed: int = 0) -> Iterator[tuple[Point, Metrics]]:
    """Applies each point to its layer alone, evaluates, and restores that layer's weight.

    A point that leaves the weight unchanged (keep ratio 1.0, or no more distinct values than clusters)
    reuses ``baseline`` when given: same weights, same figures, without GPU run-to-run noise.

    Args:
        layers: ``{full layer name: module with a .weight}``, e.g. ``prunable_layers(model)``.
        points: Sweep points, grouped by layer (``sweep_points``).
        evaluate: Evaluates the whole network as it is now; returns ``Metrics``.
        baseline: ``evaluate()`` of the untouched network.
        seed: Seed of the ``forgy`` initialisation.

    Yields:
        ``(point, metrics)`` in the order of ``points``; the weights are restored before each yield and
        also when the caller stops early.
    """
    saved: dict[str, torch.Tensor] = {}
    try:
        for point in points:
            if point.layer not in saved:  # a new layer: forget the previous one's copy
                saved = {point.layer: layers[point.layer].weight.detach().clone()}
            weight = layers[point.layer].weight
            with torch.no_grad():
                apply_(weight, point, seed)
            unchanged = baseline is not None and torch.equal(weight, saved[point.layer].to(weight.device))
            metrics = dict(baseline) if unchanged else evaluate()
            _restore_(layers, saved)
            yield point, metrics
    finally:
        _restore_(layers, saved)


def check_jointly(layers: Mapping[str, nn.Module], keep_ratio: Mapping[str, float], bits: Mapping[str, int],
                  init: str, evaluate: Callable[[], Metrics], seed: int = 0) -> dict[str, Metrics]:
    """Prunes all layers of ``keep_ratio`` together, evaluates, then quantizes those of ``bits``, evaluates
    again, and restores every touched weight.

    Returns:
        ``{"prune": metrics}`` and/or ``{"prune+quantize" or "quantize": metrics}``.
    """
    saved = {n: layers[n].weight.detach().clone() for n in {*keep_ratio, *bits}}
    out: dict[str, Metrics] = {}
    try:
        with torch.no_grad():
            for name, ratio in keep_ratio.items():
                prune_(layers[name].weight, ratio)
        if keep_ratio:
            out["prune"] = evaluate()
        with torch.no_grad():
            for name, b in bits.items():
                quantize_(layers[name].weight, b, init, seed)
        if bits:
            out["prune+quantize" if keep_ratio else "quantize"] = evaluate()
    finally:
        _restore_(layers, saved)
    return out


# ------------------------------------------------------------------------------------------ budget proposal
def _mildest_run(curve: Mapping[float, float], limit: float, values: Iterable[float]) -> float | None:
    """Walks ``values`` from the mildest (densest / most bits) to the harshest and returns the last one
    reached before the first point whose error exceeds ``limit`` (None: already the mildest does)."""
    chosen = None
    for value in values:
        if curve[value] > limit + BUDGET_TOL:
            break
        chosen = value
    return chosen


def propose(results: Iterable[tuple[Point, Metrics]], baseline_top1: float, budget: float,
            sizes: Mapping[str, int]) -> dict:
    """Per-layer targets whose top-1 error, each layer alone, stays within ``baseline_top1 + budget``.

    For each layer: the smallest keep ratio, and (per init) the fewest bits, such that it and every milder
    swept point is within the budget (a lucky point below an over-budget one is not taken). The best init is
    the one whose bits store the kept weights in the fewest bits (a layer it cannot quantize counts 32 bits
    per weight); ties go to the lower summed error, then to the order of the sweep.

    Args:
        results: The sweep's ``(point, metrics)`` pairs.
        baseline_top1: Top-1 error (%) of the untouched network.
        budget: Error points the proposal may add, each layer alone.
        sizes: ``{layer: number of weights}``.

    Returns:
        ``{"limit", "keep_ratio": {layer: r}, "init", "bits": {layer: b}, "bits_by_init", "layers"}``; a layer
        that cannot be pruned (quantized) within the budget is left out of ``keep_ratio`` (``bits``).
    """
    limit = baseline_top1 + budget
    curves: dict[tuple[str, str, str], dict[float, float]] = {}
    for point, metrics in results:
        curves.setdefault((point.kind, point.init, point.layer), {})[point.value] = metrics["top1_err"]
    keep_ratio: dict[str, float] = {}
    by_init: dict[str, dict[str, int]] = {}
    for (kind, init, layer), curve in curves.items():
        choice = _mildest_run(curve, limit, sorted(curve, reverse=True))
        if choice is not None and kind == "prune":
            keep_ratio[layer] = float(choice)
        elif kind == "quantize":
            by_init.setdefault(init, {})
            if choice is not None:
                by_init[init][layer] = int(choice)
    quantized = sorted({layer for kind, _, layer in curves if kind == "quantize"})

    def rank(item: tuple[int, str]) -> tuple[float, float, int]:
        order, init = item
        bits = by_init[init]
        storage = sum(sizes[n] * keep_ratio.get(n, 1.0) * bits.get(n, 32) for n in quantized)
        return storage, sum(curves["quantize", init, n][b] for n, b in bits.items()), order

    init = min(enumerate(by_init), key=rank)[1] if by_init else None
    bits = by_init.get(init, {}) if init else {}
    layers = {n: {"keep_ratio": keep_ratio.get(n), "bits": bits.get(n)} for n in sizes}
    for n, row in layers.items():
        row["prune_top1_err"] = curves["prune", "", n][row["keep_ratio"]] if row["keep_ratio"] else None
        row["quantize_top1_err"] = curves["quantize", init, n][row["bits"]] if row["bits"] else None
    return {"limit": limit, "keep_ratio": keep_ratio, "init": init, "bits": bits, "bits_by_init": by_init,
            "layers": layers}


PRUNE_EPOCH = 0  # a sensitivity proposal prunes one-shot at the start of the first epoch...
QUANTIZE_EPOCH = 1  # ...and clusters one epoch later, so pruning gets one epoch of retraining first


def proposal_callbacks(keep_ratio: Mapping[str, float], bits: Mapping[str, int], init: str | None,
                       seed: int = 0) -> dict[str, dict[str, Any]]:
    """The ``trainer.callbacks`` entries that apply per-layer targets (a sensitivity proposal): one-shot
    magnitude pruning at epoch ``PRUNE_EPOCH``, then k-means at epoch ``QUANTIZE_EPOCH`` (epoch 0 when
    nothing is pruned). The run needs ``trainer.max_epochs`` of at least 2 with both (1 with one of them).
    """
    out: dict[str, dict[str, Any]] = {}
    if keep_ratio:
        out["IterativePruning"] = {"criterion": "magnitude", "keep_ratio": dict(keep_ratio),
                                   "schedule": "one_shot", "start_epoch": PRUNE_EPOCH}
    if bits:
        out["Quantization"] = {"bits": dict(bits), "init": init, "epoch": QUANTIZE_EPOCH if keep_ratio else 0}
        if seed:
            out["Quantization"]["seed"] = seed
    return out
