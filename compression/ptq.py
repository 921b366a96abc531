"""Precision chosen by rate: uniform quantization of a pruned model after training, under an error budget.

Beyond Deep Compression §3 (k-means with a fixed number of bits per layer, then fine-tuning): here each tensor gets
a uniform grid ``step * level`` whose step is *searched* for the smallest coded file whose validation error stays
within a budget, as MPEG's NNR chooses its quantization parameter, and each weight's level is chosen by
entropy-constrained scalar quantization (Chou, Lookabaugh & Gray 1989): the level minimising
``(w - step * level)**2 + lam * step**2 * bits(level)``, ``bits`` the code length of the level under the
tensor's current level histogram, iterated a few times. ``lam = 0`` is plain rounding; a larger ``lam`` moves
weights to likelier levels (level 0 prunes them), trading a little distortion for fewer bits.

The error a budget bounds is the *expected* top-1 error on the validation split (``errors``: the mean probability
the model puts off the true class, in %), not the count of wrong answers: a paired difference between two close
models is far less noisy for it. On LeNet-300-100 / Fashion-MNIST (6,000 validation images) a search bounded by
the counted error chose grids whose validation error did not move while the test error rose by 0.7-1 point; the
expected error rose with the test error in every setting tried (docs/experiments.md).

Everything here is a pure function of tensors and of the callables the caller passes (``measure``: the
validation error and the real file size of a setting), so the same search serves any model and any codec.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch

STEP_RATIO = 2 ** 0.25  # neighbouring steps of the search (NNR's qp: four per octave)
BIAS_STEP_DIVISOR = 16  # a bias starts at the weights' step / 16: it is added to every output, once
LAMBDAS = (0.0, 0.1, 0.2, 0.4)  # entropy-constrained assignment strengths tried at the end
ECSQ_ITERATIONS = 4

Setting = dict[str, float]  # tensor name -> step ("lam" -> the assignment strength)
Measure = Callable[[Setting], tuple[float, int]]  # setting -> (validation error in %, file bytes)
State = dict[str, dict[str, torch.Tensor]]  # {"masks" | "codebooks" | "indices": {tensor name: tensor}}


def levels_of(values: torch.Tensor, step: float, lam: float = 0.0, iterations: int = ECSQ_ITERATIONS) -> torch.Tensor:
    """The integer level of each value on the grid ``step * level`` (0: the weight is pruned).

    Args:
        values: (n,) float weights (the kept ones).
        step: The grid's step (> 0).
        lam: Rate weight of the entropy-constrained assignment (0: nearest level).

    Returns:
        (n,) int64 levels.
    """
    if not step > 0 or not math.isfinite(step):
        raise ValueError(f"step must be a positive number, got {step!r}")
    scaled = values.detach().double().cpu() / step
    levels = torch.round(scaled).long()
    if lam <= 0 or not len(levels):
        return levels
    for _ in range(iterations):  # assignments and code lengths, alternately (Chou et al.'s ECVQ, on a grid)
        low = int(levels.min())
        counts = torch.bincount(levels - low).double()
        bits = -torch.log2((counts + 0.5) / (counts.sum() + 0.5 * len(counts)))  # never infinite

        def cost(candidate: torch.Tensor) -> torch.Tensor:
            index = (candidate - low).clamp(0, len(bits) - 1)
            rate = torch.where((candidate >= low) & (candidate < low + len(bits)), bits[index], bits.max() + 1)
            return (scaled - candidate) ** 2 + lam * rate

        options = torch.stack([torch.floor(scaled).long(), torch.ceil(scaled).long(), torch.zeros_like(levels)])
        levels = options.gather(0, torch.stack([cost(o) for o in options]).argmin(0, keepdim=True))[0]
    return levels


def search(names: list[str], sizes: Mapping[str, int], start: Setting, measure: Measure, limit: float,
           log: Callable[[str], None] = lambda _: None) -> tuple[Setting, float, int]:
    """The setting of smallest file whose validation error is at most ``limit``.

    1. One step for every weight (biases at ``step / BIAS_STEP_DIVISOR``), from ``start`` coarser by
       ``STEP_RATIO`` while the error stays within ``limit`` (finer first if ``start`` breaks it).
    2. Each tensor in turn, largest first: coarser while the file shrinks and the error stays within ``limit``.
    3. The assignment strength ``lam`` of ``LAMBDAS`` that gives the smallest file within ``limit``.

    Args:
        names: The tensors quantized (keys of a setting besides ``"lam"``).
        sizes: Their number of elements (the order of step 2).
        start: The first setting tried.
        measure: ``setting -> (error %, bytes)``.
        limit: The largest acceptable validation error, in %.

    Returns:
        (setting, its error, its bytes).

    Raises:
        ValueError: no setting within the limit, even the finest tried.
    """
    cache: dict[tuple, tuple[float, int]] = {}

    def trial(setting: Setting) -> tuple[float, int]:
        key = tuple(sorted(setting.items()))
        if key not in cache:
            cache[key] = measure(setting)
            log(f"  {describe(setting)}: {cache[key][0]:.2f} % error, {cache[key][1]:,} bytes")
        return cache[key]

    def scaled(setting: Setting, factor: float, only: list[str]) -> Setting:
        return {k: (v * factor if k in only else v) for k, v in setting.items()}

    best = dict(start)
    for _ in range(24):  # finer until within the limit
        if trial(best)[0] <= limit:
            break
        best = scaled(best, 1 / STEP_RATIO, names)
    else:
        raise ValueError(f"no step keeps the validation error within {limit:.2f} %")
    best = _coarser(best, names, trial, scaled, limit)
    for name in sorted(names, key=lambda n: -sizes[n]):
        best = _coarser(best, [name], trial, scaled, limit)
    candidates = [dict(best, lam=lam) for lam in LAMBDAS]
    best = min((c for c in candidates if trial(c)[0] <= limit), key=lambda c: trial(c)[1])
    return best, *trial(best)


def _coarser(setting: Setting, which: list[str], trial: Callable, scaled: Callable, limit: float) -> Setting:
    """``setting`` with the steps of ``which`` coarser by ``STEP_RATIO`` while the file shrinks within limit."""
    for _ in range(24):
        candidate = scaled(setting, STEP_RATIO, which)
        error, size = trial(candidate)
        if error > limit or size >= trial(setting)[1]:
            return setting
        setting = candidate
    return setting


def describe(setting: Setting) -> str:
    return ", ".join(f"{k} {v:.3g}" if k == "lam" else f"{k} 2^{math.log2(v):.2f}" for k, v in setting.items())


def start_setting(weights: Mapping[str, torch.Tensor], biases: list[str], relative: float = 1 / 16) -> Setting:
    """A first setting: each weight's step ``relative`` x its kept weights' standard deviation, rounded to a
    power of ``STEP_RATIO``, shared by all (the largest tensor's); biases at that step / ``BIAS_STEP_DIVISOR``."""
    largest = max(weights, key=lambda n: weights[n].numel())
    kept = weights[largest][weights[largest] != 0]
    std = float(kept.std()) if kept.numel() > 1 else 1.0
    step = STEP_RATIO ** round(math.log(max(std * relative, 1e-12), STEP_RATIO))
    return {**{n: step for n in weights}, **{n: step / BIAS_STEP_DIVISOR for n in biases}}


def on_device(loader: Iterable, device: torch.device, transfer: Callable | None = None, limit: int | None = None):
    """The first ``limit`` (all: None) batches of ``loader`` moved to ``device``, each through ``transfer`` (e.g. a
    data module's ``on_after_batch_transfer``: uint8 images normalised there) when given: what ``errors`` reads."""
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            return
        batch = [part.to(device) for part in batch]
        yield transfer(batch) if transfer is not None else batch


@torch.no_grad()
def errors(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """(top-1 error, expected top-1 error) of ``model`` over ``batches`` of (inputs, labels), in %: the share of
    wrong argmaxes, and the mean softmax probability off the true class (what a budget bounds)."""
    wrong, off, total = 0, 0.0, 0
    for x, y in batches:
        probs = model(x).float().softmax(1)
        wrong += int((probs.argmax(1) != y).sum())
        off += float((1 - probs.gather(1, y[:, None])).sum())
        total += len(y)
    return 100.0 * wrong / max(total, 1), 100.0 * off / max(total, 1)


def search_grids(params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], weights: list[str],
                 evaluate: Callable[[], float], size_of: Callable[[State], int], limit: float,
                 log: Callable[[str], None] = lambda _: None) -> tuple[Setting, float, int, State]:
    """The grids of smallest file within ``limit``: ``search`` over live parameters (what both the post-training
    path and ``Quantization(bits="auto")`` run).

    Each trial puts every tensor of ``params`` on its grid in place, then calls ``evaluate`` (the model's
    expected validation error, in %: ``errors``) and ``size_of`` (the real bytes of the file holding that state).
    On return the parameters hold the chosen grids' values.

    Args:
        params: The tensors to quantize (weights and biases), by name; changed in place.
        masks: Pruning masks by name (a tensor without one is quantized whole; its zero levels join a new mask).
        weights: The names in ``params`` that are weights (the others, biases, start at a finer step).

    Returns:
        (setting, its error, its bytes, its masks / codebooks / indices).
    """
    original = {name: value.detach().cpu().clone() for name, value in params.items()}
    masks = {name: mask.detach().cpu() for name, mask in masks.items() if name in original}

    def apply(setting: Setting) -> State:
        state: State = {"masks": {}, "codebooks": {}, "indices": {}}
        with torch.no_grad():
            for name, value in original.items():
                quantized, mask, book, index = quantize_tensor(value, masks.get(name), setting[name],
                                                               setting.get("lam", 0.0))
                params[name].copy_(quantized)
                state["masks"][name], state["codebooks"][name], state["indices"][name] = mask, book, index
        return state

    def measure(setting: Setting) -> tuple[float, int]:
        size = size_of(apply(setting))
        return evaluate(), size

    start = start_setting({n: original[n] for n in weights}, [n for n in original if n not in weights])
    setting, error, size = search(list(original), {n: v.numel() for n, v in original.items()}, start, measure,
                                  limit, log)
    return setting, error, size, apply(setting)


def quantize_tensor(weight: torch.Tensor, mask: torch.Tensor | None, step: float, lam: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight`` on the grid: (quantized weight, its mask, codebook ``step * levels``, index per kept weight).

    A weight whose level is 0 joins the pruned ones; the codebook holds the float32 values
    ``float32(step) * level`` exactly, as the ``ctx-v1`` codec stores a grid.
    """
    mask = torch.ones_like(weight, dtype=torch.bool) if mask is None else mask.bool()
    levels = levels_of(weight[mask], step, lam)
    keep = levels != 0
    new_mask = torch.zeros_like(mask)
    new_mask[mask] = keep
    used, index = torch.unique(levels[keep], return_inverse=True)
    step32 = np.float32(step)
    codebook = torch.from_numpy(step32 * used.numpy().astype(np.float32))
    quantized = torch.zeros_like(weight)
    quantized[new_mask] = codebook[index].to(weight.dtype)
    return quantized, new_mask, codebook, index
