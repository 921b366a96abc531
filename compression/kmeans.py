"""1-D k-means for trained quantization / weight sharing (Han et al. 2016, "Deep Compression", §3).

The non-zero weights of a layer are clustered into ``k = 2**bits`` groups and each is replaced by its group's
centroid (the layer's codebook). §3.2 compares Forgy, density-based and linear initialisation and finds
linear best, as it keeps centroids near the few large weights; k-means++ is offered as a common baseline.

Weights are scalars, so this exploits one dimension: the values are sorted once (``O(n log n)``) and summed
into float64 prefix sums; a Lloyd iteration then assigns by the midpoints between the sorted centroids
(``np.searchsorted`` on the sorted values gives the cluster boundaries) and takes every mean from the prefix
sums, ``O(k log n)`` independent of ``n``. Labels are computed once at the end, in the caller's order.

Empty clusters are **re-seeded** (as scikit-learn does, so all ``k`` codebook entries get used): each takes
one of the distinct values farthest from its cluster's new mean (ties: lowest value first). Only when every
value already sits on a centroid is an empty cluster dropped instead. Everything is deterministic: the same
inputs and seed give bit-identical results, so every DDP rank builds the same codebook.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np

INITS: tuple[str, ...] = ("linear", "density", "forgy")  # the paper's three (§3.2)
MAX_ITER = 1000  # Lloyd updates at most (the 1-D exact Lloyd converges in far fewer on trained weights)


@dataclass(frozen=True)
class KMeansResult:
    """Outcome of :func:`kmeans_1d`.

    Attributes:
        centroids: ``(k',)`` float32, strictly increasing, ``k' <= k`` (the codebook).
        labels: ``(n,)`` int64, index into ``centroids`` of each value, in the caller's original order.
        inertia: sum over values of ``(value - centroids[label])**2``, computed in float64.
        n_iter: number of Lloyd updates run (0 when every distinct value got its own centroid).
    """

    centroids: np.ndarray
    labels: np.ndarray
    inertia: float
    n_iter: int


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _sorted_values(values: np.ndarray) -> np.ndarray:
    """Validates ``values`` and returns them sorted ascending as float64 (a new array)."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"values must be a 1-D array, got shape {array.shape}")
    if array.dtype.kind not in "fiu":
        raise ValueError(f"values must be real numbers (float or int), got dtype {array.dtype}")
    if array.size == 0:
        raise ValueError("values is empty: k-means needs at least one value (pass the layer's non-zero weights)")
    # Sort in the input dtype (float32 sorts twice as fast as float64); the cast is monotone.
    x = np.sort(array).astype(np.float64, copy=False)
    if not (np.isfinite(x[0]) and np.isfinite(x[-1])):  # NaN sorts last, -inf first, +inf before NaN
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise ValueError(f"values must be finite, got {bad} NaN/inf among {x.size} (min={x[0]}, max={x[-1]})")
    return x


def _distinct(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of sorted ``x`` and how often each occurs."""
    starts = np.flatnonzero(np.concatenate(([True], x[1:] != x[:-1])))
    return x[starts], np.diff(np.append(starts, x.size))


def _init_linear(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """``np.linspace(min, max, k)``: evenly spaced over the range (paper's best; keeps large weights)."""
    return np.linspace(x[0], x[-1], k)


def _init_density(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """``np.quantile(x, np.linspace(0, 1, k))`` (default "linear" method), bit for bit, in O(k) on sorted x."""
    position = np.linspace(0.0, x.size - 1, k)
    below = np.floor(position).astype(np.int64)
    above = np.minimum(below + 1, x.size - 1)
    t = position - below
    a, b = x[below], x[above]
    # numpy's lerp: from the nearer end, so that t = 0 and t = 1 return the order statistics exactly.
    return np.where(t >= 0.5, b - (b - a) * (1.0 - t), a + (b - a) * t)


def _init_forgy(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Forgy's "k random observations", repeated values skipped: see :func:`init_centroids`."""
    distinct, counts = _distinct(x)
    if distinct.size <= k:
        return distinct
    with np.errstate(divide="ignore"):
        keys = np.log(np.random.default_rng(seed).random(distinct.size)) / counts
    return distinct[_top(keys, k)]


def _top(scores: np.ndarray, m: int) -> np.ndarray:
    """Indices of the ``m`` largest scores, ties broken by lowest index: deterministic on every machine."""
    threshold = np.partition(scores, scores.size - m)[scores.size - m]  # the m-th largest value
    candidates = np.flatnonzero(scores >= threshold)
    return candidates[np.argsort(-scores[candidates], kind="stable")[:m]]


_INIT_FUNCTIONS = {"linear": _init_linear, "density": _init_density, "forgy": _init_forgy}


def _check_k_init_seed(k: object, init: object, seed: object) -> tuple[int, int]:
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
    return _check_int("k", k, 1), _check_int("seed", seed, 0)


def init_centroids(values: np.ndarray, k: int, method: str = "linear", seed: int = 0) -> np.ndarray:
    """Initial centroids for 1-D k-means (Han et al. 2016, §3.2).

    Methods (``x`` = the values):
        - ``"linear"``: ``np.linspace(x.min(), x.max(), k)``.
        - ``"density"``: ``np.quantile(x, np.linspace(0, 1, k))``, evenly spaced on the CDF.
        - ``"forgy"``: ``k`` distinct values of ``x`` drawn at random without replacement, each with probability
          proportional to its number of occurrences (Forgy's "k random observations" with repeated values
          skipped): the ``k`` largest Efraimidis-Spirakis keys ``log(u) / count``, ``u`` drawn from
          ``np.random.default_rng(seed).random`` for the distinct values in ascending order.

    Args:
        values: 1-D real array, finite, non-empty (the layer's non-zero weights).
        k: Number of centroids wanted, ``>= 1``.
        method: One of :data:`INITS`.
        seed: Seed for ``"forgy"`` (unused by the deterministic ones).

    Returns:
        float64 array, strictly increasing, length ``<= k`` (duplicates removed).

    Raises:
        ValueError: If ``values`` is empty, not 1-D, not real, or not finite; if ``k < 1``; if ``method`` is
            not one of :data:`INITS`.
    """
    k, seed = _check_k_init_seed(k, method, seed)
    return np.unique(_INIT_FUNCTIONS[method](_sorted_values(values), k, seed))  # sorted, deduplicated


def _boundaries(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """``(k'+1,)`` cut points: cluster j is ``x[b[j]:b[j+1]]``. A value on a midpoint joins the lower cluster."""
    cuts = np.searchsorted(x, (centroids[:-1] + centroids[1:]) / 2.0, side="right")
    return np.concatenate(([0], cuts, [x.size]))


def _means(x: np.ndarray, prefix: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Mean of each non-empty cluster from the prefix sums, clamped to its own range against rounding (so the
    means stay strictly increasing: clusters never share a value)."""
    start, stop = bounds[:-1], bounds[1:]
    keep = stop > start
    start, stop = start[keep], stop[keep]
    means = (prefix[stop] - prefix[start]) / (stop - start)
    return np.clip(means, x[start], x[stop - 1])


def _reseed_empty(x: np.ndarray, prefix: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Update step when some clusters are empty: the means of the others, plus one new centroid per empty
    cluster at the distinct values farthest from their cluster's new mean (only positive distances count, so
    a new centroid never equals a mean nor another new one; if too few qualify, the rest are dropped)."""
    counts = np.diff(bounds)
    means = _means(x, prefix, bounds)
    distance = np.abs(x - np.repeat(means, counts[counts > 0]))  # (n,) to the mean of the value's cluster
    distance[1:][x[1:] == x[:-1]] = 0.0  # a repeated value may be picked once only
    n_new = min(int(np.count_nonzero(counts == 0)), int(np.count_nonzero(distance)))
    if n_new == 0:
        return means
    return np.sort(np.concatenate((means, x[_top(distance, n_new)])))


def _lloyd(x: np.ndarray, centroids: np.ndarray, max_iter: int, tol: float) -> tuple[np.ndarray, int]:
    """Lloyd iterations on sorted ``x``; returns the centroids (float64) and the number of updates run."""
    prefix = np.empty(x.size + 1)  # prefix[i] = x[:i].sum(), float64
    prefix[0] = 0.0
    np.cumsum(x, out=prefix[1:])
    bounds = _boundaries(x, centroids)
    for n_iter in range(1, max_iter + 1):
        if np.any(bounds[1:] == bounds[:-1]):  # an empty cluster
            new, shift = _reseed_empty(x, prefix, bounds), np.inf
        else:
            new = _means(x, prefix, bounds)
            shift = float(np.max(np.abs(new - centroids)))
        centroids = new
        new_bounds = _boundaries(x, centroids)
        if shift <= tol or np.array_equal(new_bounds, bounds):  # same assignment: a fixed point
            return centroids, n_iter
        bounds = new_bounds
    return centroids, max_iter


def _nearest(values: np.ndarray, midpoints: np.ndarray) -> np.ndarray:
    """``np.searchsorted(midpoints, values, side="left")`` (the index of each value's nearest centroid, a tie
    going to the lower one), 4-8x faster: a uniform grid of ``16 * len(midpoints)`` bins maps each value to
    a lower bound on its index, then a few vectorised passes step it up to the exact one."""
    values = np.asarray(values)
    lo, hi = (midpoints[0], midpoints[-1]) if midpoints.size else (0.0, 0.0)
    bins = 16 * midpoints.size
    # The grid is exact only while a bin is much wider than the rounding of its edges; else search directly.
    if midpoints.size < 2 or hi - lo <= 64 * np.finfo(np.float64).eps * bins * max(abs(lo), abs(hi)):
        return np.searchsorted(midpoints, values, side="left").astype(np.int64, copy=False)
    scale = bins / (hi - lo)
    # below[b] = number of midpoints left of grid edge b - 1: a value in bin b (up to rounding) has at least
    # below[b] midpoints under it and at most below[b + 3], hence the number of passes.
    below = np.searchsorted(midpoints, lo + np.arange(-1, bins + 2) / scale, side="left").astype(np.int64)
    passes = int(np.max(below[3:] - below[:bins]))
    if passes > 8:  # midpoints bunched far tighter than the grid
        return np.searchsorted(midpoints, values, side="left").astype(np.int64, copy=False)
    position = np.clip((values - lo) * scale, 0, bins - 1)  # float64; the clip keeps out-of-range values
    labels = below[position.astype(np.intp)]
    ceiling = np.append(midpoints, np.inf)
    for _ in range(passes):
        labels += values > ceiling[labels]  # float64 comparison: exact for float32 values
    return labels


def _finish(values: np.ndarray, x: np.ndarray, centroids: np.ndarray, n_iter: int) -> KMeansResult:
    """Rounds the codebook to float32, assigns every value to its nearest float32 centroid (dropping a
    centroid that is left with no value) and measures the inertia in float64."""
    codebook = np.unique(centroids.astype(np.float32))
    counts = np.diff(_boundaries(x, codebook.astype(np.float64)))
    if np.any(counts == 0):
        codebook = codebook[counts > 0]  # removing a memberless centroid moves no value
        counts = counts[counts > 0]
    wide = codebook.astype(np.float64)
    # A value v is in cluster j when midpoints[j-1] < v <= midpoints[j]: the same rule as _boundaries.
    labels = _nearest(values, (wide[:-1] + wide[1:]) / 2.0)  # midpoints exact: float32 values in float64
    residual = x - np.repeat(wide, counts)
    return KMeansResult(codebook, labels, float(residual @ residual), n_iter)


def kmeans_1d(values: np.ndarray, k: int, init: str = "linear", seed: int = 0, max_iter: int = MAX_ITER,
              tol: float = 0.0) -> KMeansResult:
    """Clusters 1-D ``values`` into at most ``k`` groups with Lloyd's algorithm (Han et al. 2016, §3).

    With ``k`` or fewer distinct values, each distinct value is its own centroid (inertia 0, ``n_iter`` 0).
    Otherwise Lloyd runs from :func:`init_centroids` until the assignment no longer changes, the largest
    centroid move is ``<= tol``, or ``max_iter`` updates. Empty clusters are re-seeded at the farthest values
    (see the module docstring), so ``k' == k`` unless the values run out; a cluster is never empty and no two
    centroids are equal.

    Args:
        values: 1-D real array, finite, non-empty (the non-zero weights of one layer; the caller drops zeros).
        k: Maximum number of clusters, ``>= 1`` (``2**bits``).
        init: Initialisation, one of :data:`INITS`; ``"linear"`` is the paper's best.
        seed: Seed for the random initialisations; same inputs and seed give bit-identical results.
        max_iter: Maximum number of Lloyd updates, ``>= 1``.
        tol: Stop once no centroid moved more than this (absolute, ``>= 0``); 0 runs to convergence.

    Returns:
        :class:`KMeansResult` with float32 centroids, labels in the original order, float64 inertia.

    Raises:
        ValueError: If ``values`` is empty, not 1-D, not real, or not finite; if ``k < 1``,
            ``max_iter < 1``, ``tol < 0`` or ``init`` is not one of :data:`INITS`.
    """
    k, seed = _check_k_init_seed(k, init, seed)
    max_iter = _check_int("max_iter", max_iter, 1)
    if isinstance(tol, bool) or not isinstance(tol, Real) or not 0.0 <= tol < np.inf:
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    x = _sorted_values(values)
    if np.count_nonzero(x[1:] != x[:-1]) < k:  # at most k distinct values: each is its own centroid
        return _finish(values, x, _distinct(x)[0], 0)
    centroids, n_iter = _lloyd(x, np.unique(_INIT_FUNCTIONS[init](x, k, seed)), max_iter, tol)
    return _finish(values, x, centroids, n_iter)
