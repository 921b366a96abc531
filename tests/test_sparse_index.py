"""Relative-index coding of kept positions (compression/sparse_index.py), paper Fig. 2."""

from __future__ import annotations

import numpy as np
import pytest

from compression.sparse_index import decode_positions, encode_positions


def test_paper_figure_2_example() -> None:
    # 3-bit indices span 8. Kept positions 1, 4, 15: from -1, position 1 is 2 ahead (rel 1), 4 is 3 ahead
    # (rel 2); 15 is 11 ahead, more than 8, so a filler advances 8 (rel 7, lands on 12), then 3 (rel 2).
    rel, filler = encode_positions(np.array([1, 4, 15]), 3)
    assert rel.tolist() == [1, 2, 7, 2]
    assert filler.tolist() == [False, False, True, False]
    assert decode_positions(rel, filler, 3).tolist() == [1, 4, 15]


def test_gaps_at_the_bound() -> None:
    # With 3 bits a gap of 8 still fits (rel 7); 9 needs one filler (8) and rel 0; 16 needs one filler
    # and rel 7; 17 needs two fillers and rel 0. Positions 7, 15, 24, 40, 57 have gaps 8, 8, 9, 16, 17.
    rel, filler = encode_positions(np.array([7, 15, 24, 40, 57]), 3)
    assert rel.tolist() == [7, 7, 7, 0, 7, 7, 7, 7, 0]
    assert filler.tolist() == [False, False, True, False, True, False, True, True, False]


def test_gap_far_beyond_the_bound() -> None:
    # 0 is reached from -1 by rel 0; 1000 is 1000 ahead: 124 fillers of 8 (992), then 8 more (rel 7).
    rel, filler = encode_positions(np.array([0, 1000]), 3)
    assert rel.size == 1 + 124 + 1
    assert filler.sum() == 124 and not filler[0] and not filler[-1]
    assert rel[0] == 0 and rel[-1] == 7 and (rel[filler] == 7).all()
    np.testing.assert_array_equal(decode_positions(rel, filler, 3), [0, 1000])


def test_first_and_last_position_of_a_tensor() -> None:
    # A flattened (10, 10) weight keeping its first and last entries; 5 bits span 32. 0 is rel 0; 57 is
    # 57 ahead: filler 32 (rel 31), then 25 (rel 24); 99 is 42 ahead: filler 32, then 10 (rel 9).
    size = 100
    positions = np.array([0, 57, size - 1])
    rel, filler = encode_positions(positions, 5)
    assert rel.tolist() == [0, 31, 24, 31, 9]
    assert filler.tolist() == [False, True, False, True, False]
    np.testing.assert_array_equal(decode_positions(rel, filler, 5), positions)


def test_empty_input() -> None:
    rel, filler = encode_positions(np.array([], dtype=np.int64), 4)
    assert rel.shape == filler.shape == (0,) and filler.dtype == bool
    assert decode_positions(rel, filler, 4).shape == (0,)


@pytest.mark.parametrize("index_bits", [1, 2, 5, 8, 16])
def test_random_masks_round_trip(index_bits: int) -> None:
    rng = np.random.default_rng(index_bits)
    mask = rng.random(200_000) < rng.choice([0.002, 0.1, 0.9])
    positions = np.flatnonzero(mask)
    rel, filler = encode_positions(positions, index_bits)
    assert rel.min() >= 0 and rel.max() <= 2 ** index_bits - 1
    assert (rel[filler] == 2 ** index_bits - 1).all()  # fillers always advance the full span
    assert (~filler).sum() == positions.size
    out = decode_positions(rel, filler, index_bits)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, positions)


@pytest.mark.parametrize(("positions", "index_bits", "match"), [
    (np.array([1, 2]), 0, "index_bits must be an int in 1..16"),
    (np.array([1, 2]), 17, "index_bits must be an int in 1..16"),
    (np.array([1, 2]), True, "index_bits must be an int in 1..16"),
    (np.array([1, 2]), 3.0, "index_bits must be an int in 1..16"),
    (np.array([-1, 2]), 3, "non-negative"),
    (np.array([3, 3]), 3, "strictly increasing, got 3 then 3 at index 1"),
    (np.array([0, 5, 2]), 3, "strictly increasing, got 5 then 2"),
    (np.array([[0, 1]]), 3, "1-D integer array"),
    (np.array([0.0, 1.0]), 3, "1-D integer array"),
])
def test_encode_rejects_bad_input(positions: np.ndarray, index_bits: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode_positions(positions, index_bits)


@pytest.mark.parametrize(("rel", "filler", "match"), [
    (np.array([0, 8]), np.array([False, False]), "relative index 8 is outside \\[0, 7\\]"),
    (np.array([0, -1]), np.array([False, False]), "relative index -1 is outside"),
    (np.array([0, 1]), np.array([False]), "shaped like rel"),
    (np.array([0, 1]), np.array([0, 1]), "bool array"),
])
def test_decode_rejects_bad_input(rel: np.ndarray, filler: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        decode_positions(rel, filler, 3)
