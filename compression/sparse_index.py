"""Relative-index coding of the positions of kept weights (Han et al. 2016, Deep Compression §2, Fig. 2).

A pruned layer stores, for each kept weight, the gap to the previous kept weight in ``index_bits`` bits
rather than its absolute position. Entry ``i`` holds ``rel[i]`` meaning "advance ``rel[i] + 1``
positions" (the first entry advances from position -1, so position 0 is reachable). A gap longer than
``2**index_bits`` is bridged by filler entries that each advance the full ``2**index_bits``; the paper
stores them as zero-valued weights, the caller as a reserved symbol of the weight stream.

Example with ``index_bits=3`` (span 8), kept positions ``[1, 4, 15]``: gaps from -1 are 2, 3, 11;
11 > 8, so a filler advances 8 (to 12) and a last entry advances 3: ``rel = [1, 2, 7, 2]``,
``filler = [F, F, T, F]``, as in the paper's figure (filler zero at 12, then 15 three further on).
"""
from __future__ import annotations

from typing import Literal

import numpy as np

MAX_INDEX_BITS = 16  # widest relative index: a gap field of 1..16 bits
IndexBits = int | Literal["auto"]  # a relative-index width, or "auto": the one giving the smallest stream
DEFAULT_INDEX_BITS = 5  # the paper's width for LeNet and VGG fc layers (4 for AlexNet fc, 8 for conv)
AUTO_INDEX_BITS = range(2, 13)  # widths tried by index_bits="auto" (beyond the paper: smallest file)


def check_index_bits(index_bits: int) -> int:
    if isinstance(index_bits, bool) or not isinstance(index_bits, (int, np.integer)) \
            or not 1 <= index_bits <= MAX_INDEX_BITS:
        raise ValueError(f"index_bits must be an int in 1..{MAX_INDEX_BITS}, got {index_bits!r}")
    return int(index_bits)


def _as_int_vector(values: np.ndarray, name: str) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 1 or (values.size and values.dtype.kind not in "iu"):
        raise ValueError(f"{name} must be a 1-D integer array, got shape {values.shape} dtype {values.dtype}")
    return values.astype(np.int64, copy=False)


def encode_positions(positions: np.ndarray, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Relative indices of kept positions, with filler entries for gaps beyond ``2**index_bits``.

    Vectorised: one entry per kept position plus ``(gap - 1) >> index_bits`` fillers before it.

    Args:
        positions: (n,) strictly increasing, non-negative flat indices of the kept weights.
        index_bits: width of a relative index, 1..16.

    Returns:
        ``(rel, filler)``: (m,) int64 values in ``[0, 2**index_bits - 1]`` and (m,) bool, ``m >= n``.

    Raises:
        ValueError: on a bad ``index_bits`` or positions that are negative or not strictly increasing.
    """
    bits = check_index_bits(index_bits)
    positions = _as_int_vector(positions, "positions")
    if not positions.size:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    if positions[0] < 0:
        raise ValueError(f"positions must be non-negative, got {positions[0]} first")
    gaps = np.diff(positions, prepend=-1)  # (n,) >= 1 when strictly increasing
    if (gaps[1:] <= 0).any():
        i = int(np.argmax(gaps[1:] <= 0)) + 1
        raise ValueError(f"positions must be strictly increasing, got {positions[i - 1]} then {positions[i]} "
                         f"at index {i}")
    span = 1 << bits
    entries = ((gaps - 1) >> bits) + 1  # fillers needed before each kept weight, plus the weight itself
    last = np.cumsum(entries) - 1  # (n,) entry index of each kept weight
    rel = np.full(int(last[-1]) + 1, span - 1, np.int64)  # fillers advance the full span
    filler = np.ones(rel.size, bool)
    rel[last] = (gaps - 1) & (span - 1)
    filler[last] = False
    return rel, filler


def decode_positions(rel: np.ndarray, filler: np.ndarray, index_bits: int) -> np.ndarray:
    """Inverse of ``encode_positions``: the kept positions, filler entries dropped.

    Args:
        rel: (m,) integers in ``[0, 2**index_bits - 1]``.
        filler: (m,) bool, True for filler entries.
        index_bits: width of a relative index, 1..16.

    Returns:
        (n,) int64 strictly increasing positions.

    Raises:
        ValueError: on a bad ``index_bits``, mismatched lengths, a non-bool ``filler`` or ``rel``
            values outside ``[0, 2**index_bits - 1]``.
    """
    bits = check_index_bits(index_bits)
    rel = _as_int_vector(rel, "rel")
    filler = np.asarray(filler)
    if filler.shape != rel.shape or (filler.size and filler.dtype != bool):
        raise ValueError(f"filler must be a bool array shaped like rel {rel.shape}, "
                         f"got shape {filler.shape} dtype {filler.dtype}")
    if rel.size and (rel.min() < 0 or rel.max() >= 1 << bits):
        bad = rel.min() if rel.min() < 0 else rel.max()
        raise ValueError(f"relative index {bad} is outside [0, {(1 << bits) - 1}] for index_bits={bits}")
    positions = np.cumsum(rel + 1) - 1  # (m,) position of every entry, fillers included
    return positions[~filler.astype(bool)]
