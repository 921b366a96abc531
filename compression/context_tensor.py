"""A pruned / quantized tensor as ctx-v1 sections (beyond Deep Compression §4: ``compression.context_codec``).

The header entry is ``{"name", "shape", "dtype": "float32", "encoding": "sparse" | "quantized", "codec": "ctx-v1",
"kept", "nb", "up"[, "clusters", "negatives"]}``. Sections: ``data`` (the context-coded significance and signed
ranks of the kept weights) and, for ``sparse``, ``values`` (float32 of each kept weight, row-major). A
``quantized`` tensor's ``data`` starts with its codebook (the used centroids, ascending) in the fewest bytes that
give it back bit for bit (one section, not two: each costs a row of the file's table):

    byte 0  kind
    0       float32 values, k x 4 bytes
    1       float16 values, k x 2 bytes (every centroid exactly a float16)
    2       a uniform grid: float32 step s, int32 lo, int32 hi; centroid = float32(s) * float32(level), as a
            uniform quantizer writes them, and the coded rank of a weight *is* its level (no level is 0)

A uniform quantizer's codebook costs 13 bytes, whatever its levels (a float32 one of 20 levels: 81).
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import torch

from compression import context_codec, huffman
from compression.tensor_entry import (MAX_CLUSTERS, TensorStats, fixed_width_layout, int_field, numel_of, section_of,
                                      values_of)

_F32, _F16, _GRID = 0, 1, 2
_GRID_HEAD = struct.Struct("<fii")
_DIVISORS = 64  # a grid step is looked for among the smallest value and the smallest gap divided by 1 .. 64
MAX_LEVEL = 1 << 24  # a grid's levels, |lo| and |hi| at most this: every one exact in float32


def grid_of(values: np.ndarray) -> tuple[np.float32, np.ndarray] | None:
    """``(s, levels)`` with ``values == float32(s) * float32(levels)`` bit for bit, or None: a uniform grid,
    as a uniform quantizer writes its centroids (or any finite float32 values that happen to be one)."""
    values = np.ascontiguousarray(values, np.float32)
    nonzero = np.abs(values[values != 0])
    if not len(nonzero) or not np.all(np.isfinite(values)):
        return None
    ordered = np.unique(values)
    bases = [nonzero.min()] + ([np.diff(ordered).min()] if len(ordered) > 1 else [])
    # The grid's step divides both; the largest step that reproduces every value wins (its levels are smallest).
    candidates = [base / n for n in range(1, _DIVISORS + 1) for base in bases]
    for step in map(np.float32, candidates):
        if not np.isfinite(step) or step <= 0:
            continue
        levels = np.rint(values.astype(np.float64) / float(step))
        if np.abs(levels).max() > MAX_LEVEL:
            continue
        if np.array_equal((step * levels.astype(np.float32)).view(np.int32), values.view(np.int32)):
            return step, levels.astype(np.int64)
    return None


def _pack_book(book: np.ndarray) -> bytes:
    """The fewest bytes that give ``book`` (ascending float32 centroids, not a grid) back bit for bit."""
    half = book.astype("<f2")
    if np.array_equal(half.astype(np.float32).view(np.int32), book.view(np.int32)):
        return bytes([_F16]) + half.tobytes()
    return bytes([_F32]) + book.astype("<f4").tobytes()


def _book_bytes(data: bytes, k: int) -> int:
    """Bytes of the codebook at the start of a quantized tensor's ``data`` section (kind byte included)."""
    return 1 + {_F32: 4 * k, _F16: 2 * k, _GRID: _GRID_HEAD.size}[data[0]]


def _unpack_book(data: bytes, k: int) -> tuple[np.ndarray | None, float, int, int]:
    """(centroids, or None for a grid; the grid's step, lo, hi) from the start of ``data``.

    Raises:
        ValueError: a section whose size or content disagrees with ``k``.
    """
    kind = data[0] if data else None
    if kind in (_F32, _F16, _GRID) and len(data) < _book_bytes(data, k):
        kind = None
    elif kind == _F32:
        return np.frombuffer(data, "<f4", k, 1).astype(np.float32), 0.0, 0, 0
    elif kind == _F16:
        return np.frombuffer(data, "<f2", k, 1).astype(np.float32), 0.0, 0, 0
    if kind == _GRID:
        step, lo, hi = _GRID_HEAD.unpack_from(data, 1)
        if math.isfinite(step) and step > 0 and -MAX_LEVEL <= lo <= hi <= MAX_LEVEL:
            return None, step, lo, hi
    raise ValueError(f"data section ({len(data)} bytes, codebook kind {data[:1]!r}) does not hold {k} centroids")


def context_entry(name: str, tensor: torch.Tensor, flat_mask: np.ndarray, codebook: torch.Tensor | None,
                  index: torch.Tensor | None, index_bits: int | str
                  ) -> tuple[dict[str, Any], list[tuple[str, bytes]], TensorStats]:
    """``codec="context"`` (``model_codec.encode_tensor`` has checked the tensor against its mask and codebook)."""
    positions, numel, shape = np.flatnonzero(flat_mask), flat_mask.size, list(tensor.shape)
    kept, n = len(positions), max(len(positions), 1)
    entry: dict[str, Any] = {"name": name, "shape": shape, "dtype": "float32", "encoding": "sparse",
                             "codec": context_codec.CODEC, "kept": kept}
    stats = TensorStats(name, "sparse", numel, kept, entries=kept, codec=context_codec.CODEC)
    if codebook is None:
        data, nb, up = context_codec.encode(positions, None, shape)
        values = tensor.flatten().numpy()[flat_mask].astype("<f4")
        sections = [(f"{name}:data", data), (f"{name}:values", values.tobytes())]
        stats.position_bits_huffman = 8 * len(data) / n
    else:
        index_np = index.detach().cpu().numpy().astype(np.int64)
        used = np.unique(index_np)
        book = codebook.detach().cpu().to(torch.float32).numpy()[used]
        order = np.argsort(book, kind="stable")  # ascending: a symbol's signed rank is its place from zero
        book, symbols = book[order], np.argsort(order)[np.searchsorted(used, index_np)]
        k, grid = len(book), grid_of(book)
        if grid is not None and not np.any(grid[1] == 0):  # a uniform quantizer's: the rank is the level
            step, levels = grid
            ranks, lo, hi = levels[symbols], int(levels[0]), int(levels[-1])
            negatives, positives = max(-lo, 0), max(hi, 0)
            packed = bytes([_GRID]) + _GRID_HEAD.pack(float(step), lo, hi)
        else:
            negatives = int(np.sum(book < 0))
            ranks, positives = np.where(symbols >= negatives, symbols - negatives + 1, symbols - negatives), k - negatives
            packed = _pack_book(book)
        data, nb, up = context_codec.encode(positions, ranks, shape, negatives, positives)
        sections = [(f"{name}:data", packed + data)]  # one section: each costs a row of the file's table
        entry.update(encoding="quantized", clusters=k, **({"negatives": negatives} if grid is None else {}))
        stats.encoding, stats.clusters, stats.codebook_bits = "quantized", k, 8 * len(packed)
        stats.weight_bits_huffman = 8 * len(data) / n  # positions and values share one stream: all here
        stats.weight_entropy = huffman.entropy_bits(np.bincount(symbols, minlength=k)) / n
    entry.update(nb=nb, up=up)
    stats.pq_entries, stats.index_bits, stats.weight_bits = fixed_width_layout(positions, stats.clusters,
                                                                               codebook is not None, index_bits)
    stats.bytes = sum(len(data) for _, data in sections)
    return entry, sections, stats


def context_entries(entry: dict[str, Any], sections: dict[str, bytes], encoding: str
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``model_codec.decode_entries`` of a ctx-v1 tensor: exactly ``kept`` entries.

    Raises:
        ValueError: sizes that disagree with the header, or a corrupt stream.
    """
    numel, kept = numel_of(entry), int_field(entry, "kept")
    nb, up = int_field(entry, "nb"), int_field(entry, "up")
    if kept > numel:
        raise ValueError(f"{kept} kept weights declared for a tensor of {numel}")
    if encoding != "sparse":  # the cheap checks first: nothing is decoded for a header that disagrees with its sections
        k = int_field(entry, "clusters")
        data = section_of(entry, sections, "data")
        book, step, lo, hi = _unpack_book(data, k)
        data = data[_book_bytes(data, k):]
        if not 1 <= k <= min(max(kept, 1), MAX_CLUSTERS if book is not None else kept):  # a grid's k: levels in use
            raise ValueError(f"{k} clusters declared for {kept} kept weights (at most {MAX_CLUSTERS})")
        if book is None:
            negatives, positives = max(-lo, 0), max(hi, 0)
        else:
            negatives = int_field(entry, "negatives")
            if negatives > k:
                raise ValueError(f"{negatives} negative centroids declared of {k}")
            positives = k - negatives
    else:
        values, data, negatives, positives = values_of(entry, sections, kept), section_of(entry, sections, "data"), 0, 0
    positions, ranks = context_codec.decode(data, entry["shape"], kept, negatives, positives, nb, up)
    if encoding == "sparse":
        return positions, values
    if book is None:  # a grid: the rank is the level
        return positions, np.float32(step) * ranks.astype(np.float32)
    return positions, book[np.where(ranks > 0, ranks - 1 + negatives, ranks + negatives)]
