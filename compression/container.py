"""The ``.dcz`` file: a JSON header plus named binary sections, every part CRC32-checked, no pickle.

Deep Compression (Han et al. 2016, §4 and Table 1) measures a model by the size of what is stored:
per layer a codebook, Huffman-coded weight indices and Huffman-coded relative positions. This module
only frames such byte strings; what goes in them is decided by the caller. Layout, little-endian:

    offset  size  field
    0       8     MAGIC b"\\x89DCZ\\r\\n\\x1a\\n" (high-bit byte, CRLF, ^Z, LF: catches text-mode mangling)
    8       2     format version, u16 (readers refuse newer versions)
    10      4     header length H, u32 (at most MAX_HEADER_BYTES)
    14      4     CRC32 of the header bytes, u32
    18      H     header, raw DEFLATE (RFC 1951) with the preset dictionary HEADER_DICTIONARY, of:
                  the JSON object (UTF-8), a newline, and the section table: a JSON list with one
                  [name, data length, CRC32 of the data] per section, in file order (names unique)
    18+H          the sections' data, back to back; nothing after the last.

Writes are atomic (temp file in the same folder, fsync, ``os.replace``); reads check every length
against the bytes left in the file before reading it: the table's lengths must add up to exactly what
follows the header. Inflating stops at ``HEADER_INFLATE_RATIO`` times the stored header (and
``MAX_HEADER_BYTES``), so a small header cannot expand into a large allocation.

Older formats are still read. Format 1: the JSON header plain, then a u32 section count and per section
a u8 name length, the name, a u64 data length, a CRC32 of name and data, the data. Format 2: the same
with the header raw-DEFLATE compressed. Format 3 moves the section table into the compressed header and
gives DEFLATE a dictionary of the header's usual words: the LeNet-300-100 beyond recipe's table of contents
goes from 890 bytes (format 2: 0.5 KB of header, ~30 bytes of framing per section) to 294, which saves 4.4 %
of its file. A format-3 table lists at most ``MAX_SECTIONS`` sections.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from typing import BinaryIO

from compression.atomic import atomic_open

MAGIC = b"\x89DCZ\r\n\x1a\n"
FORMAT_VERSION = 4  # 1: plain JSON header; 2: the same JSON, raw-DEFLATE compressed; 3: + section table, dictionary;
# 4: format 3's framing, whose tensors may be stored in a smaller shape (model_codec's units section)
FRAMING_VERSION = 3  # what a file gets unless its content needs a newer reader (write_container's version)
MAX_PLAUSIBLE_VERSION = 64  # above this, a version field is corrupt rather than from a future release
MAX_HEADER_BYTES = 16 << 20  # the header is a table of contents, not data
HEADER_INFLATE_RATIO = 32  # a format-2/3 header may inflate to at most this many times its stored size
MAX_NAME_BYTES = 255
MAX_SECTIONS = 1 << 16  # a format-3 table lists at most this many (a VGG-16 file has ~50): no million tiny objects
# Format 3's preset DEFLATE dictionary: words a header usually holds, the likeliest last (DEFLATE codes near
# matches in fewer bits). Part of the format: changing one byte of it needs a new format version.
HEADER_DICTIONARY = (
    b'{"type":"VGG16CIFAR","args":{"num_classes":100}}{"type":"AlexNet","args":{"num_classes":1000}}'
    b'"data_loader":{"type":"Imagenette","args":{"type":"CIFAR100","args":{"type":"MNIST","args":'
    b'"shape":[3,224,224]"shape":[3,32,32]"class_names":["0","1","2","3","4","5","6","7","8","9"],'
    b'"index_bits":,"entries":"clusters":256},"codec":"huffman-v1""encoding":"sparse","stored":"float32"}'
    b'{"name":"fc6.weight","shape":[4096,9216],{"name":"conv2.weight","shape":[50,20,5,5],'
    b'{"format":"deep-compression","arch":{"type":"LeNet5","args":{"num_classes":10}},"tensors":'
    b'[{"name":"fc1.weight","shape":[300,784],"dtype":"float32","encoding":"quantized","codec":"range-v1",'
    b'"kept":,"clusters":16},{"name":"fc1.bias","shape":[300],"dtype":"float32","encoding":"raw",'
    b'"stored":"float16"},"num_classes":10,"class_names":["T-shirt/top","Trouser","Pullover","Dress","Coat",'
    b'"Sandal","Shirt","Sneaker","Bag","Ankle boot"],"eval":{"name":"lenet300_fashionmnist_beyond","loss":'
    b'"cross_entropy","metrics":["top1_err","top5_err"],"data_loader":{"type":"FashionMNIST","args":'
    b'{"batch_size":128,"validation_split":0.1,"num_workers":0}}},"input":{"mean":[0.286],"std":[0.353],'
    b'"shape":[1,28,28]},"sha256":"'
    b'\n[["conv1.weight:codebook",,["conv1.weight:index",,["conv1.weight:position",,["conv1.bias:raw",'
    b',["fc1.weight:codebook",,["fc1.weight:index",,["fc1.weight:position",,["fc1.bias:codebook",'
    b',["fc1.bias:index",,["fc1.bias:position",,["fc1.bias:raw",'
)
_PREFIX = struct.Struct("<8sHII")  # magic, version, header length, header CRC32
_COUNT = struct.Struct("<I")
_SECTION = struct.Struct("<QI")  # data length, CRC32 (after the u8 name length and the name)
_MIN_SECTION = 1 + 1 + _SECTION.size  # a section with a one-byte name and no data


class ContainerError(ValueError):
    """A ``.dcz`` file is missing, damaged, or not a ``.dcz`` file at all."""


def _json(value: object, what: str) -> bytes:
    try:  # compact JSON escapes every newline inside strings: a raw b"\n" can only be the separator
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} is not JSON-serialisable: {err}") from err


def _encode_header(header: dict, names: list[bytes], sections: list[tuple[str, bytes]]) -> bytes:
    """Format 3's stored header: the JSON object and the section table, deflated with the dictionary."""
    if not isinstance(header, dict):
        raise TypeError(f"header must be a dict, got {type(header).__name__}")
    table = [[raw.decode("utf-8"), memoryview(data).nbytes, zlib.crc32(data)]
             for raw, (_, data) in zip(names, sections)]
    data = _json(header, "header") + b"\n" + _json(table, "section table")
    if len(data) > MAX_HEADER_BYTES or len(table) > MAX_SECTIONS:
        raise ValueError(f"header is {len(data)} bytes with {len(table)} sections, at most {MAX_HEADER_BYTES} "
                         f"bytes and {MAX_SECTIONS} sections allowed")
    # raw DEFLATE: no zlib wrapper (the CRC32 covers it), with format 3's preset dictionary
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15, zdict=HEADER_DICTIONARY)
    stored = deflate.compress(data) + deflate.flush()
    if len(data) > _inflate_limit(stored):  # what the reader would refuse is never written
        raise ValueError(f"header is {len(data)} bytes but deflates to {len(stored)}: more than a reader inflates")
    return stored


def _inflate_limit(stored: bytes) -> int:
    return min(MAX_HEADER_BYTES, HEADER_INFLATE_RATIO * len(stored) + (64 << 10))


def _inflate_header(raw: bytes, path: str, version: int) -> bytes:
    """The JSON bytes of a format-2/3 header: at most ``HEADER_INFLATE_RATIO`` times the stored bytes (plus 64
    KiB) and ``MAX_HEADER_BYTES``, so a small file cannot become a large header (a JSON table of contents
    deflates 2-8x; a 16 KB file of repeated ``{},`` would otherwise inflate to 16 MiB of objects)."""
    limit = _inflate_limit(raw)
    inflate = zlib.decompressobj(-15, zdict=HEADER_DICTIONARY) if version >= 3 else zlib.decompressobj(-15)
    try:
        data = inflate.decompress(raw, limit)
    except zlib.error as err:
        raise ContainerError(f"{path}: corrupt header: it does not inflate ({err})") from err
    if inflate.unconsumed_tail:
        raise ContainerError(f"{path}: header inflates beyond the limit of {limit} bytes "
                             f"({len(raw)} stored)")
    if not inflate.eof or inflate.unused_data:
        raise ContainerError(f"{path}: corrupt header: its compressed stream is incomplete or followed by "
                             f"{len(inflate.unused_data)} stray bytes")
    return data


def _encode_names(sections: list[tuple[str, bytes]]) -> list[bytes]:
    names: list[bytes] = []
    seen: set[bytes] = set()  # (a list lookup made a 65,536-section table quadratic: 20 s)
    for item in sections:
        name = item[0] if isinstance(item, (tuple, list)) and len(item) == 2 else None
        if not isinstance(name, str) or not isinstance(item[1], (bytes, bytearray, memoryview)):
            raise TypeError(f"each section must be a (name: str, data: bytes) pair, got {item!r:.80}")
        raw = name.encode("utf-8")
        if not 1 <= len(raw) <= MAX_NAME_BYTES:
            raise ValueError(f"section name {name!r} must be 1..{MAX_NAME_BYTES} UTF-8 bytes, got {len(raw)}")
        if raw in seen:
            raise ValueError(f"duplicate section name {name!r}")
        names.append(raw)
        seen.add(raw)
    return names


def _write_body(f: BinaryIO, header: bytes, sections: list[tuple[str, bytes]], version: int) -> int:
    f.write(_PREFIX.pack(MAGIC, version, len(header), zlib.crc32(header)) + header)
    written = _PREFIX.size + len(header)
    for _, data in sections:
        data = memoryview(data).cast("B")
        f.write(data)
        written += data.nbytes
    return written


def framing_bytes(sections: list[tuple[str, bytes]]) -> int:
    """Bytes of a file with these sections that are neither the header nor section data (the fixed fields;
    names, lengths and CRCs live in the header): ``file size - framing_bytes - data`` is the stored header."""
    return _PREFIX.size


def write_container(path: str | os.PathLike, header: dict, sections: list[tuple[str, bytes]],
                    version: int = FRAMING_VERSION) -> int:
    """Writes a ``.dcz`` file atomically: the file at ``path`` is either complete or untouched.

    Args:
        path: destination; its folder must exist.
        header: JSON-serialisable dict (no NaN/Infinity).
        sections: ``(name, data)`` pairs, names unique and 1..255 UTF-8 bytes, in file order.
        version: The format version recorded: the oldest whose readers understand the content (3 or 4; the
            framing is the same), so a reader too old for it refuses the file instead of misreading it.

    Returns:
        The number of bytes written, equal to the size of the file.

    Raises:
        TypeError: if the header is not a dict or a section not a (str, bytes) pair (nothing is written).
        ValueError: if the header is not JSON-serialisable or a name is empty, too long or repeated.
        OSError: if the folder is not writable; no temp file is left behind.
    """
    if not FRAMING_VERSION <= version <= FORMAT_VERSION:
        raise ValueError(f"version must be {FRAMING_VERSION}..{FORMAT_VERSION}, got {version}")
    names = _encode_names(sections)
    header_bytes = _encode_header(header, names, sections)
    with atomic_open(path) as f:
        written = _write_body(f, header_bytes, sections, version)
    return written


class _Reader:
    """Reads a file piece by piece, refusing any piece longer than what is left."""

    def __init__(self, f: BinaryIO, size: int, path: str) -> None:
        self.f, self.size, self.path, self.offset = f, size, path, 0

    def take(self, n: int, what: str) -> bytes:
        left = self.size - self.offset
        if n > left:
            raise ContainerError(f"{self.path}: truncated file: {what} needs {n} bytes at offset {self.offset}, "
                                 f"only {left} left")
        data = self.f.read(n)
        if len(data) != n:
            raise ContainerError(f"{self.path}: file shrank while reading {what} at offset {self.offset}")
        self.offset += n
        return data


def _read_header(r: _Reader) -> tuple[dict, list | None]:
    """The header object, and (format 3) its section table, unchecked."""
    magic = r.take(len(MAGIC), "magic")
    if magic != MAGIC:
        raise ContainerError(f"{r.path}: not a .dcz file (starts with {magic!r}, expected {MAGIC!r})")
    _, version, length, crc = _PREFIX.unpack(magic + r.take(_PREFIX.size - len(MAGIC), "version and header size"))
    # The version field has no CRC of its own: a value no release could have written is damage, not news.
    if FORMAT_VERSION < version <= MAX_PLAUSIBLE_VERSION:
        raise ContainerError(f"{r.path}: written by a newer version of deep-compression (format {version}, "
                             f"this one reads up to {FORMAT_VERSION}); upgrade deep-compression to read it")
    if not 1 <= version <= FORMAT_VERSION:
        raise ContainerError(f"{r.path}: corrupt file: format version field holds {version}, "
                             f"expected 1..{FORMAT_VERSION}")
    if length > MAX_HEADER_BYTES:
        raise ContainerError(f"{r.path}: header length {length} exceeds the limit of {MAX_HEADER_BYTES} bytes")
    raw = r.take(length, "header")
    if zlib.crc32(raw) != crc:
        raise ContainerError(f"{r.path}: CRC mismatch in the header (stored {crc:#010x}, "
                             f"computed {zlib.crc32(raw):#010x})")
    if version >= 2:
        raw = _inflate_header(raw, r.path, version)
    text, table = raw, None
    if version >= 3:
        text, newline, rest = raw.partition(b"\n")
        if not newline:
            raise ContainerError(f"{r.path}: corrupt header: no section table after the JSON object")
        table = _parse_json(rest, r.path, "section table")
    header = _parse_json(text, r.path, "header JSON")
    if not isinstance(header, dict):
        raise ContainerError(f"{r.path}: header must be a JSON object, got {type(header).__name__}")
    return header, table


def _parse_json(raw: bytes, path: str, what: str) -> object:
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # the last: absurdly deep nesting
        raise ContainerError(f"{path}: invalid {what}: {type(err).__name__}: {err}") from err


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in the header")


def _read_section(r: _Reader, index: int, seen: set[str]) -> tuple[str, bytes]:
    name_len = r.take(1, f"name length of section {index}")[0]
    if name_len == 0:
        raise ContainerError(f"{r.path}: section {index} has an empty name")
    raw = r.take(name_len, f"name of section {index}")
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ContainerError(f"{r.path}: section {index} name is not UTF-8: {raw!r}") from err
    if name in seen:
        raise ContainerError(f"{r.path}: duplicate section name {name!r} (section {index})")
    length, crc = _SECTION.unpack(r.take(_SECTION.size, f"size of section {index} {name!r}"))
    data = r.take(length, f"data of section {index} {name!r}")
    if zlib.crc32(data, zlib.crc32(raw)) != crc:
        raise ContainerError(f"{r.path}: CRC mismatch in section {index} {name!r} ({length} bytes)")
    seen.add(name)
    return name, data


def read_container(path: str | os.PathLike) -> tuple[dict, list[tuple[str, bytes]]]:
    """Reads and validates a ``.dcz`` file completely.

    Args:
        path: the file.

    Returns:
        ``(header, sections)`` as given to ``write_container``.

    Raises:
        ContainerError: if the file is missing or unreadable, not a ``.dcz`` file, from a newer format
            version, truncated, fails a CRC, has an invalid header or absurd counts, or has trailing bytes.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            return _read_file(f, path)
    except FileNotFoundError as err:
        raise ContainerError(f"{path}: not found") from err
    except OSError as err:
        raise ContainerError(f"{path}: cannot read: {err}") from err


def _check_table(table: object, left: int, path: str) -> list[tuple[str, int, int]]:
    """Format 3's section table as (name, length, CRC32) triples, once every length adds up to ``left``."""
    if not isinstance(table, list):
        raise ContainerError(f"{path}: corrupt section table: expected a JSON list, got {type(table).__name__}")
    if len(table) > MAX_SECTIONS:
        raise ContainerError(f"{path}: corrupt section table: {len(table)} sections, at most {MAX_SECTIONS}")
    out, seen = [], set()
    for i, item in enumerate(table):
        ok = (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
              and all(type(v) is int for v in item[1:]) and 0 <= item[1] and 0 <= item[2] < 1 << 32)
        if not ok:
            raise ContainerError(f"{path}: corrupt section table: entry {i} is not [name, length, CRC32]: "
                                 f"{str(item)[:80]}")
        try:
            size = len(item[0].encode("utf-8"))
        except UnicodeEncodeError:  # a lone surrogate escaped in the JSON
            size = 0
        if not 1 <= size <= MAX_NAME_BYTES:
            raise ContainerError(f"{path}: section {i} name must be 1..{MAX_NAME_BYTES} bytes of UTF-8, got "
                                 f"{item[0]!r:.80}")
        if item[0] in seen:
            raise ContainerError(f"{path}: duplicate section name {item[0]!r} (section {i})")
        seen.add(item[0])
        out.append((item[0], item[1], item[2]))
    total = sum(length for _, length, _ in out)
    if total > left:
        raise ContainerError(f"{path}: truncated file: the section table declares {total} bytes of data, only "
                             f"{left} follow the header")
    if total < left:
        raise ContainerError(f"{path}: {left - total} bytes of trailing garbage after the last section")
    return out


def _read_file(f: BinaryIO, path: str) -> tuple[dict, list[tuple[str, bytes]]]:
    r = _Reader(f, os.fstat(f.fileno()).st_size, path)
    header, table = _read_header(r)
    if table is not None:  # format 3: lengths and CRCs from the header
        sections = []
        for i, (name, length, crc) in enumerate(_check_table(table, r.size - r.offset, path)):
            data = r.take(length, f"data of section {i} {name!r}")
            if zlib.crc32(data) != crc:
                raise ContainerError(f"{path}: CRC mismatch in section {i} {name!r} ({length} bytes)")
            sections.append((name, data))
        return header, sections
    (count,) = _COUNT.unpack(r.take(_COUNT.size, "section count"))
    if count * _MIN_SECTION > r.size - r.offset:
        raise ContainerError(f"{path}: truncated file: {count} sections declared, but only "
                             f"{r.size - r.offset} bytes left (each section takes at least {_MIN_SECTION})")
    seen: set[str] = set()
    sections = [_read_section(r, i, seen) for i in range(count)]
    if r.offset != r.size:
        raise ContainerError(f"{path}: {r.size - r.offset} bytes of trailing garbage after the last "
                             f"section (offset {r.offset})")
    return header, sections
