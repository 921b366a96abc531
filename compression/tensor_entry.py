"""What every compressed tensor's header entry and sections share, whatever its entropy coder (Deep
Compression §2-§4): the per-tensor cost record behind the paper's Table 2/3 columns, the file tag of the paper's
layout, and the validated readers of an entry's fields and sections (``compression.model_codec`` for the paper's
Huffman layout and the codec registry, ``compression.range_tensor`` for range-v1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from compression.sparse_index import AUTO_INDEX_BITS, check_index_bits

HUFFMAN = "huffman-v1"  # the file tag of an entry without a "codec" field: the paper's layout
MAX_CLUSTERS = 1 << 16  # 2**compression.quantization.MAX_BITS: a range-coded header declaring more is corrupt


@dataclass
class TensorStats:
    """What one tensor costs, for the paper's Table 2/3 columns (all sizes in bits unless named bytes)."""

    name: str
    encoding: str
    numel: int
    kept: int
    entries: int = 0  # kept weights + fillers
    fillers: int = 0
    clusters: int = 0
    index_bits: int = 0
    weight_bits: float = 32.0  # bits per entry before Huffman (P+Q): ceil(log2 clusters), 32 if not quantized
    weight_bits_huffman: float = 32.0  # coded bits per entry (P+Q+H)
    weight_entropy: float = 0.0  # Shannon bound of the weight stream, bits per entry
    position_bits_huffman: float = 0.0  # coded bits per entry of the position stream
    position_entropy: float = 0.0
    codebook_bits: int = 0
    stream_overhead_bytes: int = 0  # stream headers, code lengths, decode-block tables
    bytes: int = 0  # all of this tensor's section bytes
    codec: str = HUFFMAN  # the entropy coder of its streams (range-v1: the *_huffman fields hold its coded bits)
    pq_entries: int = 0  # entries of the fixed-width P / P+Q layout when they differ from ``entries`` (range-v1)


def f32_bytes(values: torch.Tensor) -> bytes:
    return values.detach().cpu().contiguous().to(torch.float32).numpy().astype("<f4").tobytes()


def numel_of(entry: dict[str, Any]) -> int:
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"{entry.get('name')}: bad shape {shape!r}")
    return math.prod(shape)


def section_of(entry: dict[str, Any], sections: dict[str, bytes], kind: str) -> bytes:
    name = entry.get("name")
    if f"{name}:{kind}" not in sections:
        raise ValueError(f"{name}: section '{name}:{kind}' is missing")
    return sections[f"{name}:{kind}"]


def int_field(entry: dict[str, Any], key: str) -> int:
    value = entry.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{entry.get('name')}: header field {key!r} must be a non-negative integer, got {value!r}")
    return value


def values_of(entry: dict[str, Any], sections: dict[str, bytes], n: int) -> np.ndarray:
    values = section_of(entry, sections, "values")
    if len(values) != 4 * n:
        raise ValueError(f"{entry.get('name')}: {len(values)} value bytes for {n} entries")
    return np.frombuffer(values, "<f4").astype(np.float32)


def codebook_of(entry: dict[str, Any], sections: dict[str, bytes]) -> tuple[np.ndarray, int]:
    book, k = section_of(entry, sections, "codebook"), int_field(entry, "clusters")
    if len(book) != 4 * k or k < 1:
        raise ValueError(f"{entry.get('name')}: codebook has {len(book)} bytes for {k} clusters")
    return np.frombuffer(book, "<f4").astype(np.float32), k


def fixed_width_layout(positions: np.ndarray, clusters: int, quantized: bool, index_bits: int | str
                       ) -> tuple[int, int, float]:
    """The paper's P / P+Q accounting whatever the entropy coder: ``(entries, index bits, weight bits)`` of the
    cheapest fixed-width layout at ``index_bits`` (``"auto"``: each of ``AUTO_INDEX_BITS``), relative indices with
    their fillers as the Huffman path stores them before coding (a filler takes a symbol of its own); an
    unquantized tensor's weights are 32 bits."""
    widths = AUTO_INDEX_BITS if index_bits == "auto" else [check_index_bits(index_bits)]
    skipped = np.diff(positions, prepend=-1) - 1  # zeros before each kept weight: (skipped >> b) fillers at b bits

    def layout(b: int) -> tuple[int, int, float]:
        fill = int((skipped >> b).sum())
        bits = float(max(1, math.ceil(math.log2(clusters + (fill > 0))))) if quantized else 32.0
        return len(positions) + fill, b, bits

    return min(map(layout, widths), key=lambda e: e[0] * (e[1] + e[2]))
