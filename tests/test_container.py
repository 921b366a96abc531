"""The .dcz container (compression/container.py): round trip, atomic writes, every kind of damage."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import pytest

from compression import container
from compression.container import FORMAT_VERSION, MAGIC, ContainerError, read_container, write_container

HEADER = {"model": "LeNet300", "args": {"num_classes": 10}, "classes": ["T-shirt", "Ünïcode"], "mean": 0.286}
SECTIONS = [("fc1.codebook", bytes(range(256)) * 3), ("fc1.index", b""), ("fc2/weights", b"\x00\xff" * 50)]


def written(tmp_path: Path, header: dict = HEADER, sections: list = SECTIONS) -> tuple[Path, bytes]:
    path = tmp_path / "model.dcz"
    write_container(path, header, sections)
    return path, path.read_bytes()


def deflate(data: bytes) -> bytes:
    """Raw DEFLATE, as format 2 stores its header."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def raw_file(tmp_path: Path, version: int = FORMAT_VERSION, header: bytes = b"{}", count: int = 0,
             tail: bytes = b"", magic: bytes = MAGIC, packed: bytes | None = None) -> Path:
    """A file laid out by hand, with a correct header CRC unless the test damages it afterwards; the JSON
    ``header`` is deflated for format 2 (``packed``: the header field's bytes exactly as given)."""
    path = tmp_path / "raw.dcz"
    if packed is not None:
        header = packed
    elif version >= 2:
        header = deflate(header)
    path.write_bytes(struct.pack("<8sHII", magic, version, len(header), zlib.crc32(header)) + header
                     + struct.pack("<I", count) + tail)
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
    with pytest.raises(ContainerError, match="newer version.*format 3, this one reads up to 2.*upgrade"):
        read_container(raw_file(tmp_path, version=FORMAT_VERSION + 1))
    with pytest.raises(ContainerError, match="corrupt file: format version field holds 0, expected 1..2"):
        read_container(raw_file(tmp_path, version=0))


def test_format_1_files_with_a_plain_header_are_still_read(tmp_path: Path) -> None:
    text = json.dumps(HEADER).encode()
    assert read_container(raw_file(tmp_path, version=1, header=text)) == (HEADER, [])


def test_the_header_is_stored_deflated_and_smaller(tmp_path: Path) -> None:
    header = {"tensors": [{"name": f"fc{i}.weight", "encoding": "quantized", "dtype": "float32"} for i in range(9)]}
    _, data = written(tmp_path, header, [])
    (length,) = struct.unpack("<I", data[10:14])
    assert length < len(json.dumps(header, separators=(",", ":"))) / 2


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
    # format 1 (plain): the nesting bomb deflates 1000x, which format 2 refuses before parsing (tested below)
    with pytest.raises(ContainerError, match=match):
        read_container(raw_file(tmp_path, version=1, header=header))
    if len(header) < 1000:
        with pytest.raises(ContainerError, match=match):
            read_container(raw_file(tmp_path, header=header))


def test_huge_declared_lengths_are_rejected_before_reading(tmp_path: Path) -> None:
    path = raw_file(tmp_path)
    data = bytearray(path.read_bytes())
    data[10:14] = struct.pack("<I", 0xFFFF_FFFF)  # header length 4 GiB in a 26-byte file
    path.write_bytes(bytes(data))
    with pytest.raises(ContainerError, match="header length 4294967295 exceeds the limit"):
        read_container(path)
    with pytest.raises(ContainerError, match="truncated.*4294967295 sections declared"):
        read_container(raw_file(tmp_path, count=0xFFFF_FFFF))
    section = b"\x01a" + struct.pack("<QI", 1 << 62, 0)  # one section claiming 4 EiB of data
    with pytest.raises(ContainerError, match="truncated file: data of section 0 'a' needs 4611686018427387904"):
        read_container(raw_file(tmp_path, count=1, tail=section))


@pytest.mark.parametrize(("tail", "match"), [
    (b"\x00" + struct.pack("<QI", 0, 0) + b"\x00", "section 0 has an empty name"),
    (b"\x01\xff" + struct.pack("<QI", 0, 0), "section 0 name is not UTF-8"),
])
def test_bad_section_names(tmp_path: Path, tail: bytes, match: str) -> None:
    with pytest.raises(ContainerError, match=match):
        read_container(raw_file(tmp_path, count=1, tail=tail))


def test_duplicate_section_in_file(tmp_path: Path) -> None:
    section = b"\x01a" + struct.pack("<QI", 0, zlib.crc32(b"a"))
    with pytest.raises(ContainerError, match="duplicate section name 'a' \\(section 1\\)"):
        read_container(raw_file(tmp_path, count=2, tail=section * 2))


def test_crash_while_writing_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def crc_then_crash(data: bytes, start: int = 0) -> int:
        calls.append(len(data))
        if len(calls) > 3:  # header and first section done, second section half-way
            raise OSError("disk full")
        return zlib.crc32(data, start)

    monkeypatch.setattr(container.zlib, "crc32", crc_then_crash)
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
    _, data = written(tmp_path, {"a": 1}, [("w", b"xyz")])
    header = deflate(json.dumps({"a": 1}, separators=(",", ":")).encode())
    expected = (MAGIC + struct.pack("<HII", FORMAT_VERSION, len(header), zlib.crc32(header)) + header
                + struct.pack("<I", 1) + b"\x01w" + struct.pack("<QI", 3, zlib.crc32(b"xyz", zlib.crc32(b"w")))
                + b"xyz")
    assert data == expected


def test_framing_bytes_and_the_stored_header_add_up_to_the_file(tmp_path: Path) -> None:
    path, data = written(tmp_path)
    (length,) = struct.unpack("<I", data[10:14])
    assert len(data) == container.framing_bytes(SECTIONS) + length + sum(len(d) for _, d in SECTIONS)
