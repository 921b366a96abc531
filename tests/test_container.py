"""The .dcz container (compression/container.py): round trip, atomic writes, every kind of damage."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import pytest

from compression import container
from compression.container import (FORMAT_VERSION, FRAMING_VERSION, MAGIC, ContainerError, read_container,
                                   write_container)

HEADER = {"model": "LeNet300", "args": {"num_classes": 10}, "classes": ["T-shirt", "Ünïcode"], "mean": 0.286}
SECTIONS = [("fc1.codebook", bytes(range(256)) * 3), ("fc1.index", b""), ("fc2/weights", b"\x00\xff" * 50)]


def written(tmp_path: Path, header: dict = HEADER, sections: list = SECTIONS) -> tuple[Path, bytes]:
    path = tmp_path / "model.dcz"
    write_container(path, header, sections)
    return path, path.read_bytes()


def deflate(data: bytes, version: int = FORMAT_VERSION) -> bytes:
    """Raw DEFLATE, as formats 2 and 3 store their header (3: with the format's preset dictionary)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15, **({"zdict": container.HEADER_DICTIONARY} if version >= 3 else {}))
    return c.compress(data) + c.flush()


def raw_file(tmp_path: Path, version: int = FORMAT_VERSION, header: bytes = b"{}", count: int = 0,
             tail: bytes = b"", magic: bytes = MAGIC, packed: bytes | None = None, table: bytes = b"[]") -> Path:
    """A file laid out by hand, with a correct header CRC unless the test damages it afterwards.

    Format 3: the JSON ``header``, a newline and ``table`` deflated, then ``tail`` (the sections' data).
    Formats 1 and 2: ``header`` (deflated for 2), the section ``count``, then ``tail`` (framed sections).
    ``packed``: the header field's bytes exactly as given."""
    path = tmp_path / "raw.dcz"
    if packed is not None:
        header = packed
    elif version >= 3:
        header = deflate(header + b"\n" + table)
    elif version == 2:
        header = deflate(header, 2)
    body = tail if version >= 3 else struct.pack("<I", count) + tail
    path.write_bytes(struct.pack("<8sHII", magic, version, len(header), zlib.crc32(header)) + header + body)
    return path


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "model.dcz"
    size = write_container(path, HEADER, SECTIONS + [("raw", bytearray(b"abc")), ("view", memoryview(b"xyz"))])
    assert size == os.path.getsize(path)
    header, sections = read_container(path)
    assert header == HEADER
    assert sections == SECTIONS + [("raw", b"abc"), ("view", b"xyz")]
    assert sorted(os.listdir(tmp_path)) == ["model.dcz"]  # no temp file left behind


def test_overwrite_and_empty_container(tmp_path: Path) -> None:
    path, _ = written(tmp_path)
    assert write_container(path, {}, []) == os.path.getsize(path)
    assert read_container(str(path)) == ({}, [])


def test_corrupted_header_byte_names_the_header(tmp_path: Path) -> None:
    path, data = written(tmp_path)
    damaged = bytearray(data)
    damaged[30] ^= 0x01  # inside the (compressed) header, which starts at byte 18
    path.write_bytes(bytes(damaged))
    with pytest.raises(ContainerError, match="CRC mismatch in the header"):
        read_container(path)


@pytest.mark.parametrize("index", [0, 2])
def test_corrupted_section_byte_names_the_section(tmp_path: Path, index: int) -> None:
    path, data = written(tmp_path)
    name, payload = SECTIONS[index]
    damaged = bytearray(data)
    damaged[data.index(payload) + len(payload) // 2] ^= 0x80
    path.write_bytes(bytes(damaged))
    with pytest.raises(ContainerError, match=f"CRC mismatch in section {index} '{name}'"):
        read_container(path)


def test_every_truncation_is_a_container_error(tmp_path: Path) -> None:
    path, data = written(tmp_path)
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        with pytest.raises(ContainerError, match="truncated"):
            read_container(path)


def test_trailing_garbage(tmp_path: Path) -> None:
    path, data = written(tmp_path)
    path.write_bytes(data + b"\0")
    with pytest.raises(ContainerError, match="1 bytes of trailing garbage"):
        read_container(path)


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n" + bytes(30), b'{"model": "LeNet300"}' * 3],
                         ids=["png", "json"])
def test_wrong_magic(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "other.dcz"
    path.write_bytes(content)
    with pytest.raises(ContainerError, match="not a .dcz file"):
        read_container(path)


def test_text_mode_mangling_is_caught_by_the_magic(tmp_path: Path) -> None:
    path, data = written(tmp_path)
    path.write_bytes(data.replace(b"\r\n", b"\n"))  # what a text-mode transfer does
    with pytest.raises(ContainerError, match="not a .dcz file"):
        read_container(path)


def test_future_version_asks_for_an_upgrade(tmp_path: Path) -> None:
    with pytest.raises(ContainerError, match="newer version.*format 5, this one reads up to 4.*upgrade"):
        read_container(raw_file(tmp_path, version=FORMAT_VERSION + 1))
    with pytest.raises(ContainerError, match="corrupt file: format version field holds 0, expected 1..4"):
        read_container(raw_file(tmp_path, version=0))


@pytest.mark.parametrize("version", [1, 2])
def test_format_1_and_2_files_are_still_read(tmp_path: Path, version: int) -> None:
    text = json.dumps(HEADER).encode()
    tail = b"".join(bytes([len(n)]) + n.encode() + struct.pack("<QI", len(d), zlib.crc32(d, zlib.crc32(n.encode())))
                    + d for n, d in SECTIONS)
    path = raw_file(tmp_path, version=version, header=text, count=len(SECTIONS), tail=tail)
    assert read_container(path) == (HEADER, SECTIONS)


def test_the_header_is_stored_deflated_and_smaller(tmp_path: Path) -> None:
    header = {"tensors": [{"name": f"fc{i}.weight", "encoding": "quantized", "dtype": "float32"} for i in range(9)]}
    _, data = written(tmp_path, header, [])
    (length,) = struct.unpack("<I", data[10:14])
    assert length < len(json.dumps(header, separators=(",", ":"))) / 2
    # The preset dictionary is what makes a LeNet's table of contents small; without it, 2-3x larger.
    text = json.dumps(header, separators=(",", ":")).encode() + b"\n[]"
    assert length == len(deflate(text)) and 2 * length < len(deflate(text, 2))


@pytest.mark.parametrize(("packed", "match"), [
    (b"\xff\x00garbage", "corrupt header: it does not inflate"),
    (deflate(b"{}")[:-1], "corrupt header: its compressed stream is incomplete"),
    (deflate(b"{}") + b"xx", "followed by 2 stray bytes"),
    (deflate(b" " * (container.MAX_HEADER_BYTES + 1) + b"{}"), "header inflates beyond the limit"),  # 16 KB file
    (deflate(b'{"t":[' + b"{}," * 200_000 + b"{}]}"), r"beyond the limit of \d+ bytes \(\d+ stored\)"),  # 1 KB
])
def test_a_damaged_or_exploding_compressed_header_is_refused(tmp_path: Path, packed: bytes, match: str) -> None:
    with pytest.raises(ContainerError, match=match):
        read_container(raw_file(tmp_path, packed=packed))


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ContainerError, match="not found"):
        read_container(tmp_path / "absent.dcz")
    with pytest.raises(ContainerError, match="cannot read"):
        read_container(tmp_path)


@pytest.mark.parametrize(("header", "match"), [
    (b"{not json", "invalid header JSON"),
    (b"\xff\xfe", "invalid header JSON"),
    (b'{"x": NaN}', "invalid header JSON.*NaN"),
    (b"[1, 2]", "must be a JSON object, got list"),
    (b"[" * 100_000 + b"]" * 100_000, "invalid header JSON: RecursionError"),  # nesting deeper than Python's stack
])
def test_invalid_header_json(tmp_path: Path, header: bytes, match: str) -> None:
    # format 1 (plain): the nesting bomb deflates 1000x, which formats 2/3 refuse before parsing (tested below)
    with pytest.raises(ContainerError, match=match):
        read_container(raw_file(tmp_path, version=1, header=header))
    if len(header) < 1000:
        for version in (2, 3):
            with pytest.raises(ContainerError, match=match):
                read_container(raw_file(tmp_path, version=version, header=header))


@pytest.mark.parametrize(("table", "tail", "match"), [
    (None, b"", "corrupt header: no section table after the JSON object"),
    (b"[1,", b"", "invalid section table: JSONDecodeError"),
    (b'{"a":1}', b"", "corrupt section table: expected a JSON list, got dict"),
    (b'[["a",1]]', b"x", r"entry 0 is not \[name, length, CRC32\]"),
    (b'[["a",-1,0]]', b"", r"entry 0 is not \[name, length, CRC32\]"),
    (b'[["a",1.0,0]]', b"x", r"entry 0 is not \[name, length, CRC32\]"),
    (b'[["a",true,0]]', b"x", r"entry 0 is not \[name, length, CRC32\]"),
    (b'[["a",1,4294967296]]', b"x", r"entry 0 is not \[name, length, CRC32\]"),
    (b'[["",0,0]]', b"", "section 0 name must be 1..255 bytes of UTF-8"),
    (b'[["\\ud800",0,0]]', b"", "section 0 name must be 1..255 bytes of UTF-8"),
    (b'[["a",0,0],["a",0,0]]', b"", r"duplicate section name 'a' \(section 1\)"),
    (b'[["a",4611686018427387904,0]]', b"x", "truncated file: the section table declares 4611686018427387904 bytes"),
    (b'[["a",1,0]]', b"xy", "1 bytes of trailing garbage"),
    (b'[["a",2,0]]', b"xy", "CRC mismatch in section 0 'a' \\(2 bytes\\)"),
])
def test_a_bad_section_table_is_refused_before_any_data_is_read(tmp_path: Path, table: bytes | None, tail: bytes,
                                                                 match: str) -> None:
    path = raw_file(tmp_path, table=table or b"", tail=tail)
    if table is None:
        path = raw_file(tmp_path, packed=deflate(b"{}"))
    with pytest.raises(ContainerError, match=match):
        read_container(path)


def test_huge_declared_lengths_are_rejected_before_reading(tmp_path: Path) -> None:
    path = raw_file(tmp_path, version=2)
    data = bytearray(path.read_bytes())
    data[10:14] = struct.pack("<I", 0xFFFF_FFFF)  # header length 4 GiB in a 26-byte file
    path.write_bytes(bytes(data))
    with pytest.raises(ContainerError, match="header length 4294967295 exceeds the limit"):
        read_container(path)
    with pytest.raises(ContainerError, match="truncated.*4294967295 sections declared"):
        read_container(raw_file(tmp_path, version=2, count=0xFFFF_FFFF))
    section = b"\x01a" + struct.pack("<QI", 1 << 62, 0)  # one section claiming 4 EiB of data
    with pytest.raises(ContainerError, match="truncated file: data of section 0 'a' needs 4611686018427387904"):
        read_container(raw_file(tmp_path, version=2, count=1, tail=section))


@pytest.mark.parametrize(("tail", "match"), [
    (b"\x00" + struct.pack("<QI", 0, 0) + b"\x00", "section 0 has an empty name"),
    (b"\x01\xff" + struct.pack("<QI", 0, 0), "section 0 name is not UTF-8"),
])
def test_bad_section_names_in_format_2(tmp_path: Path, tail: bytes, match: str) -> None:
    with pytest.raises(ContainerError, match=match):
        read_container(raw_file(tmp_path, version=2, count=1, tail=tail))


def test_duplicate_section_in_a_format_2_file(tmp_path: Path) -> None:
    section = b"\x01a" + struct.pack("<QI", 0, zlib.crc32(b"a"))
    with pytest.raises(ContainerError, match="duplicate section name 'a' \\(section 1\\)"):
        read_container(raw_file(tmp_path, version=2, count=2, tail=section * 2))


def test_crash_while_writing_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_body = container._write_body

    def write_then_crash(f: object, header: bytes, sections: list, version: int) -> int:
        write_body(f, header, sections[:1], version)  # header and first section on disk, then the disk is full
        raise OSError("disk full")

    monkeypatch.setattr(container, "_write_body", write_then_crash)
    with pytest.raises(OSError, match="disk full"):
        write_container(tmp_path / "model.dcz", HEADER, SECTIONS)
    assert os.listdir(tmp_path) == []


def test_crash_before_rename_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, old = written(tmp_path)

    def fail(fd: int) -> None:
        raise OSError("fsync failed")

    monkeypatch.setattr(container.os, "fsync", fail)
    with pytest.raises(OSError, match="fsync failed"):
        write_container(path, {"new": True}, [])
    assert os.listdir(tmp_path) == ["model.dcz"] and path.read_bytes() == old


@pytest.mark.parametrize(("header", "sections", "error", "match"), [
    ([1, 2], [], TypeError, "header must be a dict, got list"),
    ({"x": object()}, [], ValueError, "not JSON-serialisable"),
    ({"x": float("nan")}, [], ValueError, "not JSON-serialisable"),
    ({}, [("a", b""), ("a", b"")], ValueError, "duplicate section name 'a'"),
    ({}, [("", b"")], ValueError, "must be 1..255 UTF-8 bytes, got 0"),
    ({}, [("x" * 256, b"")], ValueError, "must be 1..255 UTF-8 bytes, got 256"),
    ({}, [("a", "text")], TypeError, "\\(name: str, data: bytes\\) pair"),
    ({}, [(1, b"")], TypeError, "\\(name: str, data: bytes\\) pair"),
])
def test_write_rejects_bad_arguments(tmp_path: Path, header: object, sections: list, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        write_container(tmp_path / "model.dcz", header, sections)
    assert os.listdir(tmp_path) == []


def test_layout_is_as_documented(tmp_path: Path) -> None:
    _, data = written(tmp_path, {"a": 1}, [("w", b"xyz"), ("e", b"")])
    header = deflate(b'{"a":1}\n[["w",3,%d],["e",0,0]]' % zlib.crc32(b"xyz"))
    expected = MAGIC + struct.pack("<HII", FRAMING_VERSION, len(header), zlib.crc32(header)) + header + b"xyz"
    assert data == expected  # format 3 unless the content needs 4 (a tensor in a smaller shape: test_structured)
    write_container(tmp_path / "v4.dcz", {"a": 1}, [("w", b"xyz"), ("e", b"")], version=4)
    assert (tmp_path / "v4.dcz").read_bytes() == expected[:8] + b"\x04\x00" + expected[10:]
    assert read_container(tmp_path / "v4.dcz")[0] == {"a": 1}
    with pytest.raises(ValueError, match="version must be 3..4"):
        write_container(tmp_path / "v5.dcz", {"a": 1}, [], version=5)


def test_the_preset_dictionary_is_pinned() -> None:
    # Part of format 3: a changed byte would make every format-3 file written so far unreadable.
    import hashlib

    assert len(container.HEADER_DICTIONARY) == 1408
    assert hashlib.sha256(container.HEADER_DICTIONARY).hexdigest() == \
        "53f897548a976cb133f4028307a18a6a2692f44517fd91cdde7b307002440ce6"


def test_a_table_of_too_many_sections_is_refused_and_never_written(tmp_path: Path) -> None:
    many = b"[" + b",".join(b'["s%d",0,0]' % i for i in range(container.MAX_SECTIONS + 1)) + b"]"
    with pytest.raises(ContainerError, match="65537 sections, at most 65536"):
        read_container(raw_file(tmp_path, table=many))
    with pytest.raises(ValueError, match="at most 16777216 bytes and 65536 sections"):
        write_container(tmp_path / "m.dcz", {}, [(f"s{i}", b"") for i in range(container.MAX_SECTIONS + 1)])


def test_the_writer_refuses_a_header_its_reader_would_not_inflate(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="more than a reader inflates"):
        write_container(tmp_path / "m.dcz", {"pad": " " * (1 << 20)}, [])
    assert os.listdir(tmp_path) == []


def test_framing_bytes_and_the_stored_header_add_up_to_the_file(tmp_path: Path) -> None:
    path, data = written(tmp_path)
    (length,) = struct.unpack("<I", data[10:14])
    assert len(data) == container.framing_bytes(SECTIONS) + length + sum(len(d) for _, d in SECTIONS)
