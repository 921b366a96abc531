"""Tensor <-> bytes coding of a compressed model (Deep Compression §2 and §4, Fig. 2).

Each tensor becomes one entry of the ``.dcz`` header plus named sections:

- ``raw``: the tensor's bytes, little-endian (biases, BatchNorm statistics, layers left dense).
- ``sparse``: a pruned, not quantized tensor: the Huffman-coded relative positions of the kept weights
  (``index_bits`` wide before coding, a filler entry when a gap exceeds ``2**index_bits``) and their
  float32 values, fillers holding 0.0 (the paper's "filler zero").
- ``quantized``: the codebook (float32, used entries only), the Huffman-coded cluster index of every
  entry (symbol ``k`` for fillers) and the Huffman-coded relative positions.

Decoding puts every entry's value at its position; a filler's value is 0 at a position that is zero
anyway, so the result is bit-identical to the encoded tensor. Every count in the header is checked
against the sections before anything is allocated.

The entropy coder is chosen per file and recorded per tensor, through ``CODECS``, the one registry that ties a
codec's config name to its encoder, decoder and file tag: ``"huffman"`` (the paper's, the default; its entries
carry no ``codec`` field, so such files are byte-identical to those written before the choice existed) and
``"range"`` (entries ``"codec": "range-v1"``, ``compression.range_tensor``: the same sections, range-coded with
adaptive models, positions coded from the mask itself, so no fillers and no ``index_bits``) and ``"context"``
(``"codec": "ctx-v1"``, ``compression.context_tensor``: significance and values in one stream, each bit coded
with probabilities chosen by its neighbours, the codebook in its fewest exact bytes). A reader meeting a tag it
does not know says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from compression import context_codec, huffman, range_codec
from compression.context_tensor import context_entries, context_entry
from compression.quantization import dequantize
from compression.range_tensor import range_entries, range_entry
from compression.sparse_index import DEFAULT_INDEX_BITS, MAX_INDEX_BITS, encode_positions
from compression.tensor_entry import (HUFFMAN, MAX_CLUSTERS, TensorStats, codebook_of, int_field, numel_of, section_of,
                                      values_of)
from compression.tensor_entry import f32_bytes as _f32

__all__ = ["CODECS", "DEFAULT_CODEC", "DEFAULT_RAW_DTYPE", "HUFFMAN", "MAX_CLUSTERS", "RAW_DTYPES", "RAW_STORAGE",
           "Codec", "TensorStats", "decode_entries", "decode_tensor", "encode_tensor", "stats_dict"]
_int_field = int_field  # model_file's name for it

Entry = tuple[dict[str, Any], list[tuple[str, bytes]], TensorStats]  # (header entry, sections, stats)


@dataclass(frozen=True)
class Codec:
    """An entropy coder of pruned / quantized tensors: its file tag, encoder and decoder.

    Attributes:
        tag: What each header entry records (``"codec"``); a change to the coder's arithmetic needs a new tag.
        encode: ``(name, tensor, flat_mask, codebook, index, index_bits) -> (entry, sections, stats)``, on a
            tensor ``encode_tensor`` has checked against its mask and codebook.
        decode: ``(entry, sections, encoding) -> (positions, values)``, as ``decode_entries`` returns them.
    """

    tag: str
    encode: Callable[..., Entry]
    decode: Callable[[dict[str, Any], dict[str, bytes], str], tuple[np.ndarray, np.ndarray]]


RAW_DTYPES = {"float32": np.dtype("<f4"), "float64": np.dtype("<f8"), "float16": np.dtype("<f2"),
              "int64": np.dtype("<i8"), "int32": np.dtype("<i4")}


RAW_STORAGE = ("float32", "float16")  # export.raw_dtype: how float32 raw tensors are stored
DEFAULT_RAW_DTYPE = "float32"  # the paper's: biases and dense layers stored as they are
DEFAULT_CODEC = "huffman"  # the paper's coder: the default of export.codec (a key of CODECS, below)
F16_MAX = 65504.0  # the largest finite float16: a tensor beyond it stays float32


def _raw_entry(name: str, tensor: torch.Tensor, raw_dtype: str = DEFAULT_RAW_DTYPE) -> Entry:
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in RAW_DTYPES:
        raise ValueError(f"{name}: dtype {dtype} cannot be stored; supported: {', '.join(RAW_DTYPES)}")
    if raw_dtype not in RAW_STORAGE:
        raise ValueError(f"{name}: raw_dtype must be one of {', '.join(RAW_STORAGE)}, got {raw_dtype!r}")
    values = tensor.detach().cpu().contiguous().numpy()
    entry = {"name": name, "shape": list(tensor.shape), "dtype": dtype, "encoding": "raw"}
    stored = dtype
    # Beyond the paper, lossy for these tensors only: float32 biases (and BatchNorm statistics, layers left
    # dense) in half the bytes. The decoder widens them back to float32; the error measured on the file is
    # the rounded model's. A tensor with values float16 cannot hold keeps its float32 bytes.
    if raw_dtype == "float16" and dtype == "float32" and (not values.size or abs(values).max() <= F16_MAX):
        stored = entry["stored"] = "float16"
    data = values.astype(RAW_DTYPES[stored]).tobytes()
    bits = 8 * RAW_DTYPES[stored].itemsize
    stats = TensorStats(name, "raw", tensor.numel(), int(torch.count_nonzero(tensor)),
                        weight_bits=bits, weight_bits_huffman=bits, bytes=len(data))
    return entry, [(f"{name}:raw", data)], stats


def _stream(symbols: np.ndarray, alphabet: int) -> tuple[bytes, float, float, int]:
    """Huffman-codes ``symbols``: (bytes, coded bits per symbol, entropy bits per symbol, overhead bytes)."""
    stream = huffman.encode(symbols, alphabet)
    data = stream.to_bytes()
    n = max(len(symbols), 1)
    entropy = huffman.entropy_bits(np.bincount(symbols, minlength=alphabet)) if len(symbols) else 0.0
    return data, stream.n_bits / n, entropy / n, len(data) - (stream.n_bits + 7) // 8


def encode_tensor(name: str, tensor: torch.Tensor, mask: torch.Tensor | None = None,
                  codebook: torch.Tensor | None = None, index: torch.Tensor | None = None,
                  index_bits: int | str = DEFAULT_INDEX_BITS, codec: str = DEFAULT_CODEC,
                  raw_dtype: str = DEFAULT_RAW_DTYPE) -> Entry:
    """Encodes one tensor: ``raw`` without a mask, ``sparse`` with a mask, ``quantized`` with a codebook too.

    Args:
        name: Parameter name (``fc1.weight``).
        tensor: The float32 values; for a quantized tensor, exactly ``codebook[index]`` on ``mask``.
        mask: Bool mask of kept weights.
        codebook: (k,) shared values; ``index``: (n_kept,) centroid of each kept weight (row-major order).
        index_bits: Width of a relative position before Huffman coding (paper: 4-5 for fc, 8 for conv).
            ``codec="range"`` codes positions without relative indices: there the width (or ``"auto"``: the
            one with the smallest fixed-width size) only sets the report's P and P+Q accounting.
        codec: Entropy coder of the streams, one of ``CODECS`` (``"huffman"``: the paper's).
        raw_dtype: ``"float16"``: a float32 tensor without a mask is stored rounded to float16 (lossy).

    Returns:
        (header entry, sections, stats).

    Raises:
        ValueError: an unknown codec, or weights that disagree with their mask / codebook.
    """
    if codec not in CODECS:
        raise ValueError(f"{name}: unknown codec {codec!r}; choose one of {', '.join(map(repr, CODECS))}")
    if mask is None:
        return _raw_entry(name, tensor, raw_dtype)
    if tensor.dtype != torch.float32:
        raise ValueError(f"{name}: only float32 tensors can be stored sparse, got {tensor.dtype}")
    mask = mask.detach().cpu().to(torch.bool)
    tensor = tensor.detach().cpu()
    if codebook is not None and index is not None and len(index) == 0:
        codebook = None  # every weight pruned: nothing to look up, the sparse form is exact (and decodable)
    if codebook is None:
        expected = tensor.masked_fill(~mask, 0.0)
    else:
        codebook = codebook.detach().cpu().to(tensor.dtype)  # e.g. float64 after a 64-true run; stored as float32
        expected = dequantize(codebook, index.cpu(), mask)
    if not torch.equal(tensor, expected):
        what = "non-zero pruned weights" if codebook is None else "weights that are not codebook[index] on the mask"
        raise ValueError(f"{name}: the tensor has {what}; re-apply the compression state before encoding")
    plain = CODECS[codec].encode(name, tensor, mask.flatten().numpy(), codebook, index, index_bits)
    units = _live_units(mask)
    if units is None:
        return plain
    shrunk = _shrunk_entry(name, tensor, mask, *units, CODECS[codec], codebook, index, index_bits)
    return min((plain, shrunk), key=lambda e: e[2].bytes)  # the bitmaps cost R + G bits: kept when they pay


def _live_units(mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
    """(rows, input groups) holding a kept weight, of a mask of 2 or more dimensions with a dead one; else None.

    A row is an output unit (``shape[0]``), an input group one index of ``shape[1]`` (a Linear's input feature,
    a conv's input channel: its ``kh x kw`` kernel positions together)."""
    if mask.dim() < 2 or not mask.numel():
        return None
    alive = mask.reshape(mask.shape[0], mask.shape[1], -1).any(2)
    rows, groups = alive.any(1).numpy(), alive.any(0).numpy()
    return None if (rows.all() and groups.all()) or not rows.any() else (rows, groups)  # (all pruned: plain)


def _shrunk_entry(name: str, tensor: torch.Tensor, mask: torch.Tensor, rows: np.ndarray, groups: np.ndarray,
                  codec: Codec, codebook: torch.Tensor | None, index: torch.Tensor | None,
                  index_bits: int | str) -> Entry:
    """The tensor without its dead rows and input groups, coded by ``codec`` in that smaller shape (beyond the
    paper: structured pruning's removed units cost their bit in the ``units`` section, nothing more). The kept
    weights keep their row-major order, so a quantized tensor's ``index`` is the same."""
    r, g = torch.from_numpy(rows), torch.from_numpy(groups)
    sub_tensor, sub_mask = tensor[r][:, g].contiguous(), mask[r][:, g].contiguous()
    entry, sections, stats = codec.encode(name, sub_tensor, sub_mask.flatten().numpy(), codebook, index, index_bits)
    entry["stored_shape"], entry["shape"] = entry["shape"], list(tensor.shape)
    bitmap = np.packbits(np.concatenate([rows, groups])).tobytes()
    stats.numel, stats.bytes = tensor.numel(), stats.bytes + len(bitmap)
    if stats.entries:  # the bitmap says where the kept weights are: the report counts it as position bits
        stats.position_bits_huffman += 8 * len(bitmap) / stats.entries
    return entry, sections + [(f"{name}:units", bitmap)], stats


def _unshrink(entry: dict[str, Any], sections: dict[str, bytes]) -> tuple[dict[str, Any], np.ndarray | None]:
    """(the entry as its codec coded it, each of its flat positions' place in the full tensor), or (entry, None)
    for an entry stored in its own shape.

    Raises:
        ValueError: a stored shape or ``units`` section that disagrees with the shape.
    """
    if "stored_shape" not in entry:
        return entry, None
    name, shape, stored = entry.get("name"), entry.get("shape"), entry.get("stored_shape")
    numel_of(entry)
    numel_of({"name": name, "shape": stored})
    if len(shape) < 2 or len(stored) != len(shape) or stored[2:] != shape[2:]:
        raise ValueError(f"{name}: stored shape {str(stored)[:60]} does not fit the shape {shape}")
    data = section_of(entry, sections, "units")
    if len(data) != (shape[0] + shape[1] + 7) // 8:
        raise ValueError(f"{name}: units section has {len(data)} bytes for {shape[0]} rows and {shape[1]} inputs")
    bits = np.unpackbits(np.frombuffer(data, np.uint8))[: shape[0] + shape[1]].astype(bool)
    rows, groups = np.flatnonzero(bits[: shape[0]]), np.flatnonzero(bits[shape[0]:])
    if [len(rows), len(groups)] != stored[:2]:
        raise ValueError(f"{name}: units section keeps {len(rows)} rows and {len(groups)} inputs, stored shape "
                         f"{stored}")
    inner = math.prod(shape[2:])
    # place[p]: the full tensor's flat position of the stored tensor's flat position p (row-major, increasing)
    place = ((rows[:, None, None] * shape[1] + groups[None, :, None]) * inner
             + np.arange(inner)[None, None, :]).reshape(-1)
    return {**entry, "shape": list(stored)}, place


def _huffman_entry(name: str, tensor: torch.Tensor, flat_mask: np.ndarray, codebook: torch.Tensor | None,
                   index: torch.Tensor | None, index_bits: int) -> Entry:
    """The paper's layout (§4, Fig. 2): Huffman-coded relative positions with fillers, and cluster indices."""
    rel, filler = encode_positions(np.flatnonzero(flat_mask), index_bits)
    pos_data, pos_bits, pos_entropy, pos_over = _stream(rel, 1 << index_bits)
    entry: dict[str, Any] = {"name": name, "shape": list(tensor.shape), "dtype": "float32", "index_bits": index_bits,
                             "kept": int(flat_mask.sum()), "entries": int(len(rel))}
    stats = TensorStats(name, "sparse", tensor.numel(), entry["kept"], entries=len(rel), fillers=int(filler.sum()),
                        index_bits=index_bits, position_bits_huffman=pos_bits, position_entropy=pos_entropy,
                        stream_overhead_bytes=pos_over)
    if codebook is None:
        values = np.zeros(len(rel), "<f4")
        values[~filler] = tensor.detach().cpu().flatten().numpy()[flat_mask]
        sections = [(f"{name}:position", pos_data), (f"{name}:values", values.tobytes())]
        entry["encoding"] = "sparse"
    else:
        index_np = index.detach().cpu().numpy().astype(np.int64)
        used = np.unique(index_np)  # drop centroids no weight uses; renumber the rest
        k = len(used)
        symbols = np.full(len(rel), k, np.int64)  # symbol k = filler
        symbols[~filler] = np.searchsorted(used, index_np)
        idx_data, idx_bits, idx_entropy, idx_over = _stream(symbols, k + 1)
        book = _f32(codebook.detach().cpu()[torch.from_numpy(used)])
        sections = [(f"{name}:codebook", book), (f"{name}:index", idx_data), (f"{name}:position", pos_data)]
        entry.update(encoding="quantized", clusters=k)
        stats.encoding, stats.clusters, stats.codebook_bits = "quantized", k, 32 * k
        # Fixed-width bits per entry (P+Q): the k centroids, plus the filler symbol when there are fillers.
        stats.weight_bits = float(max(1, math.ceil(math.log2(k + (stats.fillers > 0)))))
        stats.weight_bits_huffman, stats.weight_entropy = idx_bits, idx_entropy
        stats.stream_overhead_bytes += idx_over
    stats.bytes = sum(len(data) for _, data in sections)
    return entry, sections, stats


def decode_tensor(entry: dict[str, Any], sections: dict[str, bytes]) -> torch.Tensor:
    """Rebuilds one tensor from its header entry and sections.

    Raises:
        ValueError: missing sections, sizes that disagree with the header, or corrupt streams.
    """
    name, encoding = entry.get("name"), entry.get("encoding")
    numel = numel_of(entry)
    if encoding == "raw":
        dtype = RAW_DTYPES.get(entry.get("dtype", ""))
        stored = entry.get("stored", entry.get("dtype"))
        if stored != entry.get("dtype") and (stored, entry.get("dtype")) != ("float16", "float32"):
            raise ValueError(f"{name}: a {entry.get('dtype')!r} tensor cannot be stored as {str(stored)[:20]!r}")
        data = section_of(entry, sections, "raw")
        disk = RAW_DTYPES.get(stored) if isinstance(stored, str) else None
        if dtype is None or disk is None or len(data) != numel * disk.itemsize:
            raise ValueError(f"{name}: raw section has {len(data)} bytes, header says {numel} x {stored}")
        return torch.from_numpy(np.frombuffer(data, disk).astype(dtype.newbyteorder("="))).reshape(entry["shape"])
    positions, entry_values = decode_entries(entry, sections)
    out = np.zeros(numel, np.float32)
    out[positions] = entry_values
    return torch.from_numpy(out).reshape(entry["shape"])


def decode_entries(entry: dict[str, Any], sections: dict[str, bytes]) -> tuple[np.ndarray, np.ndarray]:
    """The entries of a ``sparse`` or ``quantized`` tensor, without building the dense tensor.

    Returns:
        (flat row-major positions, ascending; float32 values), fillers included (value 0).

    Raises:
        ValueError: as ``decode_tensor``.
    """
    name, encoding = entry.get("name"), entry.get("encoding")
    if encoding not in ("sparse", "quantized"):
        raise ValueError(f"{name}: unknown encoding {encoding!r}")
    codec = BY_TAG.get(entry.get("codec", HUFFMAN))  # type: ignore[arg-type]
    if codec is None and entry.get("codec") in RETIRED_TAGS:
        raise ValueError(f"{name}: codec {entry['codec']!r} ({RETIRED_TAGS[entry['codec']]}) was removed "
                         f"(docs/experiments.md); encode the run's checkpoint again with dcz.py encode")
    if codec is None:
        raise ValueError(f"{name}: unknown codec {str(entry.get('codec'))[:40]!r}; this reader knows "
                         f"{', '.join(BY_TAG)} (a file from a newer version?)")
    try:
        entry, place = _unshrink(entry, sections)
        positions, entry_values = codec.decode(entry, sections, encoding)
        return (positions, entry_values) if place is None else (place[positions], entry_values)
    except ValueError as err:  # the coders' messages do not always know the tensor; the entry's own checks do
        raise ValueError(str(err) if str(err).startswith(f"{name}: ") else f"{name}: {err}") from None


def _huffman_entries(entry: dict[str, Any], sections: dict[str, bytes], encoding: str
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``decode_entries`` of the paper's layout: fillers included (value 0)."""
    name = entry.get("name")
    positions = _positions(entry, section_of(entry, sections, "position"), numel_of(entry))
    if encoding == "sparse":
        entry_values = values_of(entry, sections, len(positions))
    else:
        book, k = codebook_of(entry, sections)
        stream = huffman.HuffmanStream.from_bytes(section_of(entry, sections, "index"))
        if stream.n_symbols != len(positions) or len(stream.lengths) != k + 1:  # before decoding allocates
            raise ValueError(f"{name}: index stream has {stream.n_symbols} symbols over {len(stream.lengths)} "
                             f"values for {len(positions)} entries and {k} clusters (+ filler)")
        symbols = huffman.decode(stream)
        if len(symbols) and symbols.max() > k:
            raise ValueError(f"{name}: index stream holds symbol {symbols.max()} beyond {k} clusters (+ filler)")
        entry_values = np.append(book, np.float32(0.0))[symbols]  # symbol k: filler 0
    if int(np.count_nonzero(entry_values)) > int_field(entry, "kept"):
        raise ValueError(f"{name}: more non-zero entries than the {entry.get('kept')} kept weights declared")
    return positions, entry_values


def _positions(entry: dict[str, Any], data: bytes, numel: int) -> np.ndarray:
    """Absolute position of every entry (fillers included), validated against the tensor size."""
    bits = entry.get("index_bits")
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= MAX_INDEX_BITS:
        raise ValueError(f"{entry.get('name')}: bad index_bits {bits!r}")
    stream = huffman.HuffmanStream.from_bytes(data)
    if stream.n_symbols != entry.get("entries") or stream.n_symbols > max(numel, 0):
        raise ValueError(f"{entry.get('name')}: position stream has {stream.n_symbols} entries, header says "
                         f"{entry.get('entries')} for a tensor of {numel}")
    rel = huffman.decode(stream)
    positions = np.cumsum(rel.astype(np.int64) + 1) - 1
    if len(positions) and (rel.max() >= 1 << bits or positions[-1] >= numel):
        raise ValueError(f"{entry.get('name')}: positions run past the tensor's {numel} elements")
    return positions


def stats_dict(stats: TensorStats) -> dict[str, Any]:
    return asdict(stats)


# The codec registry: export.codec (the config's and dcz.py's name) -> file tag, encoder, decoder.
CODECS: dict[str, Codec] = {
    "huffman": Codec(HUFFMAN, _huffman_entry, _huffman_entries),  # the paper's (§4)
    "range": Codec(range_codec.CODEC, range_entry, range_entries),  # beyond the paper: adaptive range coding
    "context": Codec(context_codec.CODEC, context_entry, context_entries),  # beyond: neighbour contexts (DeepCABAC's idea)
}
BY_TAG = {codec.tag: codec for codec in CODECS.values()}  # what a header entry may record
RETIRED_TAGS = {"range-v2": "range coding of runs of weights, for IterativePruning.block"}  # written by older code
