"""Tests for compression/kmeans.py: 1-D k-means for trained quantization (Han et al. 2016, §3)."""

from __future__ import annotations

import numpy as np
import pytest

from compression.kmeans import INITS, KMeansResult, _finish, _nearest, _reseed_empty, init_centroids, kmeans_1d


def mixture(n: int, seed: int) -> np.ndarray:
    """Pruned-layer-like float32 weights: two bumps of either sign, no zeros, shuffled."""
    rng = np.random.default_rng(seed)
    magnitude = np.abs(rng.normal(0.05, 0.02, n)) + 0.01
    return (magnitude * rng.choice([-1.0, 1.0], n)).astype(np.float32)


def check_consistent(values: np.ndarray, result: KMeansResult) -> None:
    """Properties every result must have, whatever the data: codebook, labels and inertia agree."""
    c = result.centroids
    assert c.dtype == np.float32 and c.ndim == 1 and np.all(np.diff(c) > 0)  # sorted, no two equal
    assert result.labels.dtype == np.int64 and result.labels.shape == values.shape
    assert np.all(np.bincount(result.labels, minlength=c.size) > 0)  # no empty cluster
    x, wide = values.astype(np.float64), c.astype(np.float64)
    distance = np.abs(x[:, None] - wide[None, :])  # (n, k')
    assert np.array_equal(distance[np.arange(x.size), result.labels], distance.min(axis=1))  # nearest centroid
    assert result.inertia == pytest.approx(float(np.sum((x - wide[result.labels]) ** 2)), rel=1e-12, abs=1e-300)


def test_three_tight_groups_give_the_group_means() -> None:
    # Groups {-1.1, -1.0, -0.9}, {4.8, 5.0, 5.2}, {9.9, 10.0, 10.1}, interleaved. Linear init puts centroids at
    # -1.1, 4.5, 10.1 (midpoints 1.7 and 7.3 already separate the groups), density at min, median, max;
    # one update moves them to the group means -1, 5, 10. Inertia: 2 * 0.1**2 + 2 * 0.2**2 + 2 * 0.1**2 = 0.12.
    values = np.array([5.0, -1.0, 10.1, -1.1, 4.8, 9.9, -0.9, 5.2, 10.0])
    groups = np.array([1, 0, 2, 0, 1, 2, 0, 1, 2])
    for init in ("linear", "density"):
        result = kmeans_1d(values, 3, init=init)
        np.testing.assert_allclose(result.centroids, [-1.0, 5.0, 10.0], rtol=1e-6)
        np.testing.assert_array_equal(result.labels, groups)
        assert result.inertia == pytest.approx(0.12, rel=1e-5)  # float32 centroids: -1, 5, 10 are exact
        check_consistent(values, result)


def test_value_on_a_midpoint_joins_the_lower_cluster() -> None:
    # Linear init [-1, 1] has its midpoint at 0, so 0 joins -1: means -0.5 and 1 (midpoint 0.25, stable).
    result = kmeans_1d(np.array([1.0, 0.0, -1.0]), 2)
    np.testing.assert_array_equal(result.centroids, [-0.5, 1.0])
    np.testing.assert_array_equal(result.labels, [1, 0, 0])
    assert result.inertia == 0.5 and result.n_iter == 1  # 0.5**2 + 0.5**2; the first update is the fixed point


VECTOR = np.array([3.0, 10.0, 0.0, 2.0, 1.0])  # sorted: 0, 1, 2, 3, 10


def test_linear_init_spaces_the_range_evenly() -> None:
    np.testing.assert_array_equal(init_centroids(VECTOR, 3, "linear"), [0.0, 5.0, 10.0])
    np.testing.assert_array_equal(init_centroids(VECTOR, 1, "linear"), [0.0])  # linspace(min, max, 1)


def test_density_init_takes_evenly_spaced_quantiles() -> None:
    # Order-statistic positions linspace(0, 4, 4) = 0, 4/3, 8/3, 4 in the sorted values 0, 1, 2, 3, 10, i.e.
    # 0, 1 + 1/3 * (2 - 1), 2 + 2/3 * (3 - 2), 10.
    got = init_centroids(VECTOR, 4, "density")
    np.testing.assert_allclose(got, [0.0, 4 / 3, 8 / 3, 10.0], rtol=1e-15)
    np.testing.assert_array_equal(got, np.quantile(VECTOR, np.linspace(0, 1, 4)))  # the documented definition
    np.testing.assert_array_equal(init_centroids(VECTOR, 3, "density"), [0.0, 2.0, 10.0])  # min, median, max
    # A vector where a naive a + (b - a) * t differs from numpy's lerp in the last bit: still bit-identical.
    awkward = np.array([0.126, -0.132, 0.64, 0.105, -0.536, 0.362, 1.304])
    np.testing.assert_array_equal(init_centroids(awkward, 5, "density"), np.quantile(awkward, np.linspace(0, 1, 5)))


def test_forgy_init_draws_distinct_values_by_the_documented_keys() -> None:
    # All distinct values (k >= 5) come back whatever the seed.
    np.testing.assert_array_equal(init_centroids(VECTOR, 5, "forgy", seed=7), [0.0, 1.0, 2.0, 3.0, 10.0])
    # k = 2: the two largest keys log(u) / count, with one u per distinct value in ascending order. With seed 0
    # the weighting matters: it picks [1, 4], unweighted keys log(u) would pick [1, 2].
    values = np.array([4.0, 4.0, 4.0, 1.0, 2.0, 8.0])  # distinct 1, 2, 4, 8 with counts 1, 1, 3, 1
    keys = np.log(np.random.default_rng(0).random(4)) / np.array([1, 1, 3, 1])
    expected = np.sort(np.array([1.0, 2.0, 4.0, 8.0])[np.argsort(-keys)[:2]])
    np.testing.assert_array_equal(init_centroids(values, 2, "forgy", seed=0), expected)


@pytest.mark.parametrize("init", INITS)
def test_init_returns_sorted_distinct_float64_values(init: str) -> None:
    values = mixture(500, seed=1)
    got = init_centroids(values, 16, init, seed=2)
    assert got.dtype == np.float64 and got.size == 16 and np.all(np.diff(got) > 0)
    assert values.min() <= got[0] and got[-1] <= values.max()
    if init == "forgy":
        assert np.all(np.isin(got, values.astype(np.float64)))  # chosen among the values


@pytest.mark.parametrize("init", INITS)
def test_labels_are_in_original_order_and_nearest(init: str) -> None:
    values = mixture(2000, seed=4)
    result = kmeans_1d(values, 16, init=init, seed=5)
    assert result.centroids.size == 16
    check_consistent(values, result)
    # Shuffling the input permutes the labels and changes nothing else (the work happens on sorted values).
    order = np.random.default_rng(6).permutation(values.size)
    shuffled = kmeans_1d(values[order], 16, init=init, seed=5)
    np.testing.assert_array_equal(shuffled.centroids, result.centroids)
    np.testing.assert_array_equal(shuffled.labels, result.labels[order])
    assert shuffled.inertia == result.inertia


@pytest.mark.parametrize("init", INITS)
def test_converged_result_is_a_lloyd_fixed_point(init: str) -> None:
    for seed in range(3):
        values = mixture(3000, seed=seed)
        result = kmeans_1d(values, 8, init=init, seed=seed, max_iter=100_000)
        assert result.n_iter < 100_000  # stopped because the assignment no longer changed
        x = values.astype(np.float64)
        means = np.bincount(result.labels, weights=x) / np.bincount(result.labels)
        # Each centroid is its members' mean, up to the float32 rounding of the codebook.
        np.testing.assert_allclose(result.centroids, means, rtol=1e-6, atol=0)
        check_consistent(values, result)


def test_fewer_distinct_values_than_k_gives_one_cluster_each() -> None:
    result = kmeans_1d(np.array([3.0, 1.0, 3.0, 2.0, 1.0], dtype=np.float32), 8)
    np.testing.assert_array_equal(result.centroids, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(result.labels, [2, 0, 2, 1, 0])
    assert result.inertia == 0.0 and result.n_iter == 0
    exactly_k = kmeans_1d(np.array([5.0, -2.0, 7.0, 5.0]), 3)  # k distinct values: also exact
    np.testing.assert_array_equal(exactly_k.centroids, [-2.0, 5.0, 7.0])
    assert exactly_k.inertia == 0.0


def test_single_value() -> None:
    for values in (np.array([0.5]), np.full(100, -0.25, dtype=np.float32)):
        result = kmeans_1d(values, 4)
        np.testing.assert_array_equal(result.centroids, [values[0]])
        np.testing.assert_array_equal(result.labels, np.zeros(values.size, dtype=np.int64))
        assert result.inertia == 0.0


def test_centroids_equal_after_float32_rounding_are_merged() -> None:
    # Two float64 values closer than a float32 ulp would give two equal float32 centroids: one is kept.
    result = kmeans_1d(np.array([1.0, 1.0 + 1e-12, 1.0]), 2)
    np.testing.assert_array_equal(result.centroids, [1.0])
    np.testing.assert_array_equal(result.labels, [0, 0, 0])
    assert result.inertia == pytest.approx(1e-24)


def test_empty_cluster_is_reseeded_at_the_farthest_value() -> None:
    # Linear init [0, 50, 100]: nobody is near 50. The others' means are 1 ({0, 1, 2}) and 100; the distinct
    # values farthest from their new mean are 0 and 2 (distance 1), the tie goes to the lower, 0. From
    # [0, 1, 100]: {0}, {1, 2}, {100} -> [0, 1.5, 100], stable. Inertia 2 * 0.5**2 = 0.5.
    result = kmeans_1d(np.array([100.0, 2.0, 0.0, 1.0]), 3)
    np.testing.assert_array_equal(result.centroids, [0.0, 1.5, 100.0])
    np.testing.assert_array_equal(result.labels, [2, 1, 0, 1])
    assert result.inertia == 0.5
    # A heavy-tailed layer with gaps: every one of the k codebook entries is still used.
    rng = np.random.default_rng(0)
    values = np.concatenate((rng.normal(0, 0.01, 5000), [-1.0, 0.9, 1.0])).astype(np.float32)
    wide = kmeans_1d(values, 64)
    assert wide.centroids.size == 64
    check_consistent(values, wide)


def test_reseeding_never_picks_a_repeated_value_twice() -> None:
    # Clusters of [0, 0, 3, 3.5, 4, 100] around [0, 100/3, 200/3, 100]: {0, 0, 3, 3.5, 4}, {}, {}, {100}.
    # Means 2.1 and 100; distances to 2.1: 0 -> 2.1 (twice), 4 -> 1.9, 3.5 -> 1.4, 3 -> 0.9. The two empty
    # clusters take 0 (once) and 4, not 0 twice.
    x = np.array([0.0, 0.0, 3.0, 3.5, 4.0, 100.0])
    prefix = np.concatenate(([0.0], np.cumsum(x)))
    np.testing.assert_allclose(_reseed_empty(x, prefix, np.array([0, 5, 5, 5, 6])), [0.0, 2.1, 4.0, 100.0])
    # Through kmeans_1d: from there {0, 0}, {3}, {3.5, 4}, {100} is stable. Inertia 2 * 0.25**2 = 0.125.
    result = kmeans_1d(x[::-1].copy(), 4)
    np.testing.assert_array_equal(result.centroids, [0.0, 3.0, 3.75, 100.0])
    assert result.inertia == 0.125


def test_finish_drops_a_centroid_without_values() -> None:
    # The last safety net: a codebook entry nobody is nearest to (50 here) is removed, labels follow.
    values = np.array([100.0, 0.0, 1.0])
    result = _finish(values, np.sort(values), np.array([0.0, 50.0, 100.0]), n_iter=0)
    np.testing.assert_array_equal(result.centroids, [0.0, 100.0])
    np.testing.assert_array_equal(result.labels, [1, 0, 0])
    assert result.inertia == 1.0


@pytest.mark.parametrize("init", INITS)
def test_deterministic_across_calls(init: str) -> None:
    values = mixture(5000, seed=8)
    first, second = kmeans_1d(values, 32, init=init, seed=9), kmeans_1d(values.copy(), 32, init=init, seed=9)
    assert first.centroids.tobytes() == second.centroids.tobytes()  # bit-identical
    assert first.labels.tobytes() == second.labels.tobytes()
    assert (first.inertia, first.n_iter) == (second.inertia, second.n_iter)


@pytest.mark.parametrize("init", ["forgy"])
def test_random_inits_follow_the_seed(init: str) -> None:
    values = mixture(1000, seed=10)
    seed0, again, seed1 = (init_centroids(values, 8, init, seed=s) for s in (0, 0, 1))
    np.testing.assert_array_equal(seed0, again)
    assert not np.array_equal(seed0, seed1)
    assert not np.array_equal(kmeans_1d(values, 8, init, seed=0, max_iter=1).centroids,
                              kmeans_1d(values, 8, init, seed=1, max_iter=1).centroids)


def test_tol_and_max_iter_stop_early() -> None:
    values = mixture(2000, seed=11)
    full = kmeans_1d(values, 16, max_iter=100_000)
    one = kmeans_1d(values, 16, max_iter=1)
    loose = kmeans_1d(values, 16, tol=1.0)  # every centroid moves less than 1 on the first update
    assert one.n_iter == 1 and loose.n_iter == 1 and full.n_iter > 1
    assert full.inertia <= one.inertia  # Lloyd never increases the inertia
    check_consistent(values, one)


def test_nearest_matches_searchsorted() -> None:
    # The grid shortcut must give np.searchsorted's answer exactly, including values on a midpoint, values
    # outside the midpoints' range, bunched midpoints (several passes) and the plain-search fallbacks.
    rng = np.random.default_rng(12)
    spread = np.sort(rng.normal(0, 1, 63))
    bunched = np.sort(np.concatenate((rng.normal(0, 1, 20), 0.5 + np.arange(40) * 1e-9)))
    for midpoints in (spread, bunched, np.array([0.25]), np.array([])):
        values = np.concatenate((rng.normal(0, 2, 5000), midpoints, [-1e30, 1e30])).astype(np.float64)
        expected = np.searchsorted(midpoints, values, side="left")
        np.testing.assert_array_equal(_nearest(values, midpoints), expected)
        np.testing.assert_array_equal(_nearest(values.astype(np.float32), midpoints),
                                      np.searchsorted(midpoints, values.astype(np.float32), side="left"))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"values": np.array([])}, "values is empty"),
    ({"values": np.ones((2, 2))}, r"1-D array, got shape \(2, 2\)"),
    ({"values": np.array([1 + 2j])}, "real numbers .* complex128"),
    ({"values": np.array([1.0, np.nan, 2.0])}, r"finite, got 1 NaN/inf among 3 \(min=1.0, max=nan\)"),
    ({"values": np.array([-np.inf, 1.0])}, r"finite, got 1 NaN/inf among 2 \(min=-inf, max=1.0\)"),
    ({"k": 0}, "k must be an integer >= 1, got 0"),
    ({"k": 2.5}, "k must be an integer >= 1, got 2.5"),
    ({"k": True}, "k must be an integer >= 1, got True"),
    ({"init": "random"}, r"unknown init 'random'; valid: linear, density, forgy"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"max_iter": 0}, "max_iter must be an integer >= 1, got 0"),
    ({"tol": -0.1}, r"tol must be a finite number >= 0, got -0.1"),
    ({"tol": float("nan")}, "tol must be a finite number >= 0, got nan"),
])
def test_kmeans_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    arguments = {"values": np.array([0.5, -0.5, 1.0]), "k": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        kmeans_1d(**arguments)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"values": np.array([], dtype=np.float32)}, "values is empty"),
    ({"values": np.array([np.inf])}, "finite"),
    ({"k": -3}, "k must be an integer >= 1, got -3"),
    ({"method": "Linear"}, r"unknown init 'Linear'; valid: linear, density, forgy"),
    ({"seed": 1.5}, "seed must be an integer >= 0, got 1.5"),
])
def test_init_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    arguments = {"values": np.array([0.5, -0.5, 1.0]), "k": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        init_centroids(**arguments)
