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
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from compression import huffman
from compression.quantization import dequantize
from compression.sparse_index import DEFAULT_INDEX_BITS, MAX_INDEX_BITS, encode_positions

RAW_DTYPES = {"float32": np.dtype("<f4"), "float64": np.dtype("<f8"), "float16": np.dtype("<f2"),
              "int64": np.dtype("<i8"), "int32": np.dtype("<i4")}


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


def _f32(values: torch.Tensor) -> bytes:
    return values.detach().cpu().contiguous().to(torch.float32).numpy().astype("<f4").tobytes()


def _raw_entry(name: str, tensor: torch.Tensor) -> tuple[dict[str, Any], list[tuple[str, bytes]], TensorStats]:
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in RAW_DTYPES:
        raise ValueError(f"{name}: dtype {dtype} cannot be stored; supported: {', '.join(RAW_DTYPES)}")
    data = tensor.detach().cpu().contiguous().numpy().astype(RAW_DTYPES[dtype]).tobytes()
    entry = {"name": name, "shape": list(tensor.shape), "dtype": dtype, "encoding": "raw"}
    bits = 8 * RAW_DTYPES[dtype].itemsize
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
                  index_bits: int = DEFAULT_INDEX_BITS) -> tuple[dict[str, Any], list[tuple[str, bytes]], TensorStats]:
    """Encodes one tensor: ``raw`` without a mask, ``sparse`` with a mask, ``quantized`` with a codebook too.

    Args:
        name: Parameter name (``fc1.weight``).
        tensor: The float32 values; for a quantized tensor, exactly ``codebook[index]`` on ``mask``.
        mask: Bool mask of kept weights.
        codebook: (k,) shared values; ``index``: (n_kept,) centroid of each kept weight (row-major order).
        index_bits: Width of a relative position before Huffman coding (paper: 4-5 for fc, 8 for conv).

    Returns:
        (header entry, sections, stats).
    """
    if mask is None:
        return _raw_entry(name, tensor)
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
    flat_mask = mask.flatten().numpy()
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


def _numel(entry: dict[str, Any]) -> int:
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"{entry.get('name')}: bad shape {shape!r}")
    return math.prod(shape)


def _section(entry: dict[str, Any], sections: dict[str, bytes], kind: str) -> bytes:
    name = entry.get("name")
    if f"{name}:{kind}" not in sections:
        raise ValueError(f"{name}: section '{name}:{kind}' is missing")
    return sections[f"{name}:{kind}"]


def decode_tensor(entry: dict[str, Any], sections: dict[str, bytes]) -> torch.Tensor:
    """Rebuilds one tensor from its header entry and sections.

    Raises:
        ValueError: missing sections, sizes that disagree with the header, or corrupt streams.
    """
    name, encoding = entry.get("name"), entry.get("encoding")
    numel = _numel(entry)
    if encoding == "raw":
        dtype = RAW_DTYPES.get(entry.get("dtype", ""))
        data = _section(entry, sections, "raw")
        if dtype is None or len(data) != numel * dtype.itemsize:
            raise ValueError(f"{name}: raw section has {len(data)} bytes, header says {numel} x {entry.get('dtype')}")
        return torch.from_numpy(np.frombuffer(data, dtype).astype(dtype.newbyteorder("="))).reshape(entry["shape"])
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
    positions = _positions(entry, _section(entry, sections, "position"), _numel(entry))
    if encoding == "sparse":
        values = _section(entry, sections, "values")
        if len(values) != 4 * len(positions):
            raise ValueError(f"{name}: {len(values)} value bytes for {len(positions)} entries")
        entry_values = np.frombuffer(values, "<f4").astype(np.float32)
    else:
        book = _section(entry, sections, "codebook")
        k = _int_field(entry, "clusters")
        if len(book) != 4 * k or k < 1:
            raise ValueError(f"{name}: codebook has {len(book)} bytes for {k} clusters")
        stream = huffman.HuffmanStream.from_bytes(_section(entry, sections, "index"))
        if stream.n_symbols != len(positions) or len(stream.lengths) != k + 1:  # before decoding allocates
            raise ValueError(f"{name}: index stream has {stream.n_symbols} symbols over {len(stream.lengths)} "
                             f"values for {len(positions)} entries and {k} clusters (+ filler)")
        symbols = huffman.decode(stream)
        if len(symbols) and symbols.max() > k:
            raise ValueError(f"{name}: index stream holds symbol {symbols.max()} beyond {k} clusters (+ filler)")
        entry_values = np.append(np.frombuffer(book, "<f4"), np.float32(0.0))[symbols]  # symbol k: filler 0
    if int(np.count_nonzero(entry_values)) > _int_field(entry, "kept"):
        raise ValueError(f"{name}: more non-zero entries than the {entry.get('kept')} kept weights declared")
    return positions, entry_values


def _int_field(entry: dict[str, Any], key: str) -> int:
    value = entry.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{entry.get('name')}: header field {key!r} must be a non-negative integer, got {value!r}")
    return value


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
