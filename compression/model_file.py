"""A model <-> ``.dcz`` file: write it, read it back (Deep Compression §2-§4, Table 1's "file on disk").

    report = save_compressed(model, "model.dcz", arch={"type": "LeNet300", "args": {"num_classes": 10}},
                             masks=masks, codebooks=codebooks, indices=indices, index_bits=5)
    model, header = read_compressed("model.dcz", MODELS)   # MODELS: {arch type name: constructor}

The file (``compression.container``): magic + version, a JSON header (architecture and its arguments,
input normalisation, class count and names, one entry per tensor) and CRC32-checked sections
(``compression.model_codec``). No pickle anywhere. The architecture constructors are passed in by the
caller (``models.MODELS``), so this module knows no model; reading validates every size before allocating
and builds the declared architecture on the meta device first to bound its size.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compression.context_codec import CODEC as CONTEXT_CODEC
from compression.range_codec import CODEC as RANGE_CODEC
from compression.container import (FORMAT_VERSION, FRAMING_VERSION, MAGIC, ContainerError, framing_bytes,
                                   read_container, write_container)
from compression.layers import layer_type
from compression.model_codec import (CODECS, DEFAULT_CODEC, DEFAULT_RAW_DTYPE, HUFFMAN, _int_field, decode_entries,
                                     decode_tensor, encode_tensor)
from compression.report import build_report
from compression.sparse import SparseLinear, csr_from_positions
from compression.sparse_index import AUTO_INDEX_BITS, DEFAULT_INDEX_BITS, IndexBits

MAX_PARAMETERS = 1 << 31  # a header declaring more than 2G weights (8 GiB) is not one of ours
# A file may decode to at most this many times its own size (plus a floor for small files): Deep Compression
# reaches 35-49x (AlexNet, VGG-16) and beyond-the-paper LeNets 100-200x; a 31 KB file claiming a 2 GB model
# is refused before anything is allocated. read_compressed(max_decoded_bytes=...) raises it for one call.
MAX_DECODE_RATIO = 1000
MIN_DECODE_CAP = 256 << 20
RANGE_DECODE_BYTES = 24  # working memory of the range decoder per kept weight (positions, symbols, counts)
CONTEXT_DECODE_BYTES = 12  # working memory of the ctx-v1 decoder per weight (its int32 rank table, two copies)
SPARSE_MAX_DENSITY = 0.5  # sparse=True: a Linear keeping more than this fraction stays dense (CSR would lose)
Architectures = Mapping[str, Callable[..., nn.Module]]  # arch type name -> constructor (models.MODELS)
IndexBitsSpec = IndexBits | Mapping[str, IndexBits]  # one width or "auto", or {layer type: width or "auto"}


class CompressedFileError(ValueError):
    """A ``.dcz`` file that cannot be read: the message names the file, the part and what was expected."""


def index_bits_for(index_bits: IndexBitsSpec, kind: str | None) -> int | str:
    """The relative-index width of a tensor owned by a layer of type ``kind`` (``Linear``, ``Conv2d``).

    A mapping that does not name ``kind`` (or a tensor of no prunable layer) gets ``DEFAULT_INDEX_BITS``.
    """
    if not isinstance(index_bits, Mapping):
        return index_bits
    return index_bits.get(kind or "", DEFAULT_INDEX_BITS)


def save_compressed(model: nn.Module, path: str | Path, *, arch: dict[str, Any],
                    masks: Mapping[str, torch.Tensor] | None = None,
                    codebooks: Mapping[str, torch.Tensor] | None = None,
                    indices: Mapping[str, torch.Tensor] | None = None, index_bits: IndexBitsSpec = DEFAULT_INDEX_BITS,
                    metadata: dict[str, Any] | None = None, codec: str = DEFAULT_CODEC,
                    raw_dtype: str = DEFAULT_RAW_DTYPE) -> dict[str, Any]:
    """Writes ``model`` as a ``.dcz`` file (atomically) and returns the compression report.

    Args:
        model: The network whose ``state_dict`` is stored (weights already pruned / quantized).
        path: Output file.
        arch: ``{"type": architecture name, "args": {...}}``: how the decoder rebuilds the model.
        masks: Pruning masks by parameter name; those tensors are stored sparse.
        codebooks, indices: Shared values and centroid indices by parameter name (quantized tensors).
        index_bits: Bits of a relative position before Huffman coding: one number, ``"auto"`` (per tensor,
            the width in 2..12 with the smallest coded size), or ``{"Conv2d": 8, "Linear": "auto"}`` by type.
        metadata: Extra header fields (``input`` normalisation, ``class_names``, ``eval``...).
        codec: Entropy coder of the pruned / quantized tensors: ``"huffman"`` (the paper's; files as before
            this option existed) or ``"range"`` (``compression.range_codec``: smaller, ``index_bits`` then only
            sets the report's P / P+Q accounting). Recorded per tensor in the header.
        raw_dtype: ``"float16"`` stores the float32 tensors without a mask (biases, BatchNorm statistics,
            layers left dense) rounded to float16, half the bytes (lossy for those tensors only; recorded as
            ``"stored": "float16"``, widened back to float32 by the reader).

    Returns:
        The report (``compression.report.build_report``) measured on the written file.

    Raises:
        ValueError: weights that disagree with their mask / codebook, an ``arch`` without a type name, or an
            unknown codec.
    """
    masks, codebooks, indices = masks or {}, codebooks or {}, indices or {}
    if not isinstance(arch.get("type"), str):
        raise ValueError(f"arch must name its type, got {arch!r}")
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(map(repr, CODECS))}")
    entries, sections, stats = [], [], []
    for name, tensor in model.state_dict().items():
        bits = index_bits_for(index_bits, layer_type(model, name))
        args = (name, tensor, masks.get(name), codebooks.get(name), indices.get(name))
        if bits == "auto" and codec == "huffman":  # beyond the paper: the width of the smallest coded size
            entry, parts, stat = min((encode_tensor(*args, b, raw_dtype=raw_dtype) for b in AUTO_INDEX_BITS),
                                     key=lambda e: e[2].bytes)
        else:
            entry, parts, stat = encode_tensor(*args, bits, codec=codec, raw_dtype=raw_dtype)
        entries.append(entry)
        sections += parts
        stats.append(stat)
    header = {"format": "deep-compression", "arch": arch, "tensors": entries, **(metadata or {}),
              "sha256": payload_digest(sections)}
    shrunk = any("stored_shape" in entry for entry in entries)  # readers before format 4 would misplace them
    size = write_container(path, header, sections, FORMAT_VERSION if shrunk else FRAMING_VERSION)
    dense = sum(p.numel() for p in model.parameters())
    header_bytes = size - framing_bytes(sections) - sum(len(data) for _, data in sections)  # as stored: deflated
    return build_report(stats, size, dense, header_bytes)


def payload_digest(sections: list[tuple[str, bytes]]) -> str:
    """SHA-256 over every section's name and data, in file order (stored in the header).

    The per-section CRCs catch damage; this catches a file edited and re-CRC'd section by section, or
    sections swapped between files. Integrity, not authenticity: whoever can edit the file can recompute it.
    """
    digest = hashlib.sha256()
    for name, data in sections:
        raw = name.encode("utf-8")
        digest.update(len(raw).to_bytes(1, "little") + raw + len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def read_compressed(path: str | Path, architectures: Architectures, max_decoded_bytes: int | None = None,
                    sparse: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuilds the model stored in a ``.dcz`` file from the file alone.

    Nothing real is allocated before the header's architecture, built on the meta device, agrees with the
    tensor table (names, shapes, dtypes) and its size with ``max_decoded_bytes``; decoded values must be
    finite.

    Args:
        path: The file.
        architectures: ``{arch type name: constructor}`` the header may name (``models.MODELS``).
        max_decoded_bytes: Largest model (bytes of its tensors) to rebuild; default ``MAX_DECODE_RATIO`` times
            the file's size, at least ``MIN_DECODE_CAP``.
        sparse: Rebuild every pruned ``Linear`` as a ``SparseLinear`` (CSR, inference only) straight from the
            file's positions, without a dense copy of its weight; other layers as usual.

    Returns:
        (model in eval mode, header).

    Raises:
        CompressedFileError: missing, truncated, corrupt or foreign file, a header that does not describe one
            of ``architectures``, a model larger than allowed, or non-finite values.
    """
    try:
        header, sections = read_container(path)
    except ContainerError as err:
        raise CompressedFileError(str(err)) from None
    meta = _meta_model(path, header, architectures)
    cap = max_decoded_bytes or max(MAX_DECODE_RATIO * Path(path).stat().st_size, MIN_DECODE_CAP)
    _check_table(path, header, meta, cap)
    # Files written before the digest existed have none: they are read with their CRCs alone (the digest
    # guards integrity, not authenticity, so its absence lets nothing in that a recomputed one would not).
    if "sha256" in header and header.get("sha256") != payload_digest(sections):
        raise CompressedFileError(f"{path}: corrupt file: the sections do not match the header's SHA-256 "
                                  f"(edited, or sections from another file)")
    by_name = dict(sections)
    linears = {f"{n}.weight" for n, m in meta.named_modules() if isinstance(m, nn.Linear)} if sparse else set()
    state: dict[str, torch.Tensor] = {}
    for entry in header["tensors"]:
        name = entry["name"]
        try:
            if name in linears and entry.get("encoding") in ("sparse", "quantized") and \
                    _int_field(entry, "kept") <= SPARSE_MAX_DENSITY * math.prod(entry["shape"]):
                positions, values = decode_entries(entry, by_name)
                state[name] = tensor = csr_from_positions(positions, values, tuple(entry["shape"]))
            else:
                state[name] = tensor = decode_tensor(entry, by_name)
        except ValueError as err:
            raise CompressedFileError(f"{path}: {err}") from None
        finite = tensor.values() if tensor.layout == torch.sparse_csr else tensor
        if finite.is_floating_point() and not _all_finite(finite):
            raise CompressedFileError(f"{path}: tensor {name!r} holds NaN or infinite values")
    return _materialize(meta, state).eval(), header


def _all_finite(tensor: torch.Tensor, chunk: int = 1 << 20) -> bool:
    """``torch.isfinite(tensor).all()`` a million values at a time: no temporary the size of a VGG fc6."""
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def _materialize(meta: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """``meta`` with every tensor taken from ``state`` as it is (no random init of weights about to be
    overwritten, no second copy) and each Linear whose weight is CSR swapped for a ``SparseLinear``."""
    for name, module in list(meta.named_modules()):
        weight = state.get(f"{name}.weight")
        if isinstance(module, nn.Linear) and weight is not None and weight.layout == torch.sparse_csr:
            parent, _, child = name.rpartition(".")
            bias = state.pop(f"{name}.bias", None)
            setattr(meta.get_submodule(parent) if parent else meta, child, SparseLinear(state.pop(f"{name}.weight"),
                                                                                      bias))
    meta.load_state_dict(state, strict=False, assign=True)  # the rest replaces the meta tensors
    left = [n for n, t in [*meta.named_parameters(), *meta.named_buffers()] if t.is_meta]
    if left:
        raise CompressedFileError(f"tensors {', '.join(left[:5])} are not in the file")
    return meta


def is_compressed_file(path: str | Path) -> bool:
    """True for a ``.dcz`` path or a file starting with the container's magic bytes."""
    path = Path(path)
    if path.suffix == ".dcz":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _meta_model(path: str | Path, header: dict[str, Any], architectures: Architectures) -> nn.Module:
    """The declared architecture on the meta device (no memory), after checking its size is sane."""
    arch = header.get("arch")
    if not isinstance(arch, dict) or not isinstance(arch.get("type"), str) or arch["type"] not in architectures \
            or not isinstance(arch.get("args", {}), dict):
        raise CompressedFileError(f"{path}: header names no known architecture (got {str(arch)[:100]}); "
                                  f"known: {', '.join(architectures)}")
    if not isinstance(header.get("tensors"), list):
        raise CompressedFileError(f"{path}: header has no tensor table")
    build = architectures[arch["type"]]
    try:
        with torch.device("meta"):  # no memory: a hostile num_classes cannot make us allocate
            meta = build(**arch.get("args", {}))
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:  # the last two: absurd sizes on meta
        raise CompressedFileError(f"{path}: cannot build {arch['type']} with {str(arch.get('args'))[:100]}: "
                                  f"{str(err)[:200]}") from None
    count = sum(math.prod(t.shape) for t in meta.state_dict().values())
    if count > MAX_PARAMETERS:
        raise CompressedFileError(f"{path}: header declares {count:,} weights, "
                                  f"more than the {MAX_PARAMETERS:,} allowed")
    return meta


def _check_table(path: str | Path, header: dict[str, Any], meta: nn.Module, cap: int) -> None:
    """The tensor table names every tensor of ``meta`` once, with its shape and dtype, within ``cap`` bytes."""
    expected = meta.state_dict()
    seen = set()
    for entry in header["tensors"]:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or name not in expected or name in seen or list(expected[name].shape) != entry.get("shape"):
            raise CompressedFileError(f"{path}: tensor {name!r} does not belong to {header['arch']['type']} "
                                      f"(or appears twice, or has another shape)")
        if entry.get("dtype") != str(expected[name].dtype).removeprefix("torch."):
            raise CompressedFileError(f"{path}: tensor {name!r} is declared {entry.get('dtype')!r}, but "
                                      f"{header['arch']['type']} holds it as {expected[name].dtype}")
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise CompressedFileError(f"{path}: tensors missing from the file: {', '.join(missing[:5])}")
    size = sum(t.numel() * t.element_size() for t in expected.values())
    # A range-coded stream is decoded to its declared length before its CRC can refuse it: count the
    # decoder's working arrays (~24 bytes per declared kept weight) against the cap too.
    size += sum(RANGE_DECODE_BYTES * min(entry["kept"], math.prod(entry["shape"])) for entry in header["tensors"]
                if entry.get("codec", HUFFMAN) == RANGE_CODEC and isinstance(entry.get("kept"), int) and entry["kept"] > 0)
    size += sum(CONTEXT_DECODE_BYTES * math.prod(entry["shape"]) for entry in header["tensors"]
                if entry.get("codec") == CONTEXT_CODEC)
    if size > cap:
        raise CompressedFileError(f"{path}: the model it declares takes {size:,} bytes, more than the {cap:,} "
                                  f"allowed for a file of this size (read_compressed(max_decoded_bytes=...) "
                                  f"raises the limit)")


def file_table(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The per-tensor table of a ``.dcz`` file from the file alone (the report's columns, as stored).

    Bits are measured on the sections: a coded stream's bytes (its code-length table included) per entry.

    Returns:
        (header, rows): each row ``layer, encoding, codec, weights, kept, kept_pct, clusters, fillers, index_bits,
        weight_bits_pqh, index_bits_pqh, bytes, rate``.

    Raises:
        CompressedFileError: the file cannot be read (see ``read_compressed``).
    """
    try:
        header, sections = read_container(path)
    except ContainerError as err:
        raise CompressedFileError(str(err)) from None
    if not isinstance(header.get("tensors"), list):
        raise CompressedFileError(f"{path}: header has no tensor table")
    size = {name: len(data) for name, data in sections}
    per_tensor: dict[str, int] = {}  # once, not a scan of every section per tensor
    for key, n in size.items():
        per_tensor[key.rpartition(":")[0]] = per_tensor.get(key.rpartition(":")[0], 0) + n
    rows = []
    for entry in header["tensors"]:
        if not isinstance(entry, dict):
            raise CompressedFileError(f"{path}: malformed tensor entry in the header: {str(entry)[:100]}")
        shape = entry.get("shape")
        # Counts as a file of ours can hold them: a count past MAX_PARAMETERS (or one no float can hold) is corrupt.
        counts = [*(shape if isinstance(shape, list) else [None]), entry.get("kept", 0), entry.get("entries", 0)]
        if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_PARAMETERS for d in counts) \
                or math.prod(shape) > MAX_PARAMETERS:
            raise CompressedFileError(f"{path}: malformed tensor entry in the header: {str(entry)[:100]}")
        name, encoding = str(entry.get("name")), entry.get("encoding")
        numel = math.prod(entry.get("shape") or [0])
        stored = per_tensor.get(name, 0)
        kept = int(entry.get("kept", numel)) if encoding != "raw" else numel
        codec = str(entry.get("codec", HUFFMAN))[:40] if encoding != "raw" else None
        entries = int(entry.get("entries", kept if codec not in (None, HUFFMAN) else 0) or 0)  # range: no fillers
        weight_bytes = size.get(f"{name}:index", size.get(f"{name}:values", 0))
        rows.append({"layer": name, "encoding": encoding, "codec": codec, "weights": numel, "kept": kept,
                     "kept_pct": 100.0 * kept / max(numel, 1), "clusters": entry.get("clusters"),
                     "fillers": entries - kept if encoding != "raw" else 0, "index_bits": entry.get("index_bits"),
                     "weight_bits_pqh": 8 * weight_bytes / entries if entries else None,
                     "index_bits_pqh": 8 * size.get(f"{name}:position", 0) / entries if entries else None,
                     "bytes": stored, "rate": 4 * numel / max(stored, 1)})
    return header, rows
