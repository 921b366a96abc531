"""A pruned / quantized tensor as range-v1 sections (beyond the paper, whose §4 Huffman-codes the same streams).

The header entry is ``{"name", "shape", "dtype": "float32", "encoding": "sparse" | "quantized",
"codec": "range-v1", "kept"[, "clusters"]}``; the sections are those of the Huffman layout without fillers:
``position`` (``range_codec.encode_positions`` of the kept positions), then ``values`` (float32 of each
kept weight, row-major) or ``codebook`` (float32, used centroids only) and ``index``
(``range_codec.encode_symbols`` of each kept weight's centroid). The decoder allocates nothing before the
header's ``kept`` and ``clusters`` agree with the shape and the codebook section.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from compression import huffman, range_codec
from compression.tensor_entry import (MAX_CLUSTERS, TensorStats, codebook_of, f32_bytes, fixed_width_layout, int_field,
                                      numel_of, section_of, values_of)


def range_entry(name: str, tensor: torch.Tensor, flat_mask: np.ndarray, codebook: torch.Tensor | None,
                 index: torch.Tensor | None, index_bits: int | str
                 ) -> tuple[dict[str, Any], list[tuple[str, bytes]], TensorStats]:
    """``codec="range"`` (``model_codec.encode_tensor``, which has checked the tensor against its mask and
    codebook): the sections and stats, measured on the section bytes."""
    positions, numel = np.flatnonzero(flat_mask), flat_mask.size
    kept, n = len(positions), max(len(positions), 1)
    shape = list(tensor.shape)
    pos_data, codec = range_codec.encode_positions(positions, numel, range_codec.row_length(shape)), range_codec.CODEC
    entry: dict[str, Any] = {"name": name, "shape": shape, "dtype": "float32", "encoding": "sparse", "codec": codec,
                             "kept": kept}
    stats = TensorStats(name, "sparse", numel, kept, entries=kept, position_bits_huffman=8 * len(pos_data) / n,
                        position_entropy=_mask_entropy(kept, numel) / n, codec=codec)
    if codebook is None:
        values = tensor.flatten().numpy()[flat_mask].astype("<f4")
        sections = [(f"{name}:position", pos_data), (f"{name}:values", values.tobytes())]
    else:
        index_np = index.detach().cpu().numpy().astype(np.int64)
        used = np.unique(index_np)  # drop centroids no weight uses; renumber the rest
        symbols, k = np.searchsorted(used, index_np), len(used)
        idx_data = range_codec.encode_symbols(symbols, k)
        sections = [(f"{name}:codebook", f32_bytes(codebook[torch.from_numpy(used)])), (f"{name}:index", idx_data),
                    (f"{name}:position", pos_data)]
        entry.update(encoding="quantized", clusters=k)
        stats.encoding, stats.clusters, stats.codebook_bits = "quantized", k, 32 * k
        stats.weight_bits = float(max(1, math.ceil(math.log2(k))))
        stats.weight_bits_huffman = 8 * len(idx_data) / n
        stats.weight_entropy = huffman.entropy_bits(np.bincount(symbols, minlength=k)) / n
    stats.pq_entries, stats.index_bits, stats.weight_bits = fixed_width_layout(positions, stats.clusters,
                                                                               codebook is not None, index_bits)
    stats.bytes = sum(len(data) for _, data in sections)
    return entry, sections, stats


def _mask_entropy(kept: int, numel: int) -> float:
    """Bits of the mask as ``numel`` independent coin flips of bias ``kept / numel``: what a coder that models
    no structure cannot beat (the range coder's per-row density context can)."""
    if not 0 < kept < numel:
        return 0.0
    p = kept / numel
    return -numel * (p * math.log2(p) + (1 - p) * math.log2(1 - p))


def range_entries(entry: dict[str, Any], sections: dict[str, bytes], encoding: str) -> tuple[np.ndarray, np.ndarray]:
    """``model_codec.decode_entries`` of a range-v1 tensor: exactly ``kept`` entries, no fillers.

    Raises:
        ValueError: sizes that disagree with the header, or a corrupt stream.
    """
    numel, kept = numel_of(entry), int_field(entry, "kept")
    if kept > numel:
        raise ValueError(f"{kept} kept weights declared for a tensor of {numel}")
    if encoding == "sparse":
        values = values_of(entry, sections, kept)
    else:  # the cheap checks first: nothing is decoded for a header that disagrees with its sections
        book, k = codebook_of(entry, sections)
        if k > min(max(kept, 1), MAX_CLUSTERS):  # every stored centroid is used by some kept weight
            raise ValueError(f"{k} clusters declared for {kept} kept weights (at most {MAX_CLUSTERS})")
        index = section_of(entry, sections, "index")
    positions = range_codec.decode_positions(section_of(entry, sections, "position"), numel,
                                             range_codec.row_length(entry["shape"]), kept)
    return positions, values if encoding == "sparse" else book[range_codec.decode_symbols(index, kept, k)]
