"""Untrusted files (issue: nothing trusted): crafted and mutated .dcz files, malicious checkpoints, and
headers that try to choose where we read or write. Every case ends in one clear error, never a traceback,
an allocation out of proportion to the file, or a decode that differs from what was encoded."""

from __future__ import annotations

import json
import random
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from compression.container import FORMAT_VERSION, write_container
from compression.model_file import CompressedFileError, file_table, payload_digest
from compression.model_file import read_compressed as read_with
from models import MODELS, LeNet300
from trainer.export import read_compressed, save_compressed
from utils import CheckpointError, load_checkpoint

from helpers import compress_like_the_paper, fix_crcs, load_script, only_run, rewrite_header, sections_of, tiny_config

ARCH = {"type": "LeNet300", "args": {"num_classes": 10}}


def small_file(tmp_path: Path, codec: str = "huffman", **edit: Any) -> tuple[Path, LeNet300]:
    """A pruned (5 %) and quantized (3 bits) LeNet-300-100 file; ``edit`` replaces tensors before encoding."""
    torch.manual_seed(0)
    model = LeNet300()
    state = compress_like_the_paper(model, 0.05, 3)
    with torch.no_grad():
        for name, value in edit.items():
            dict(model.named_parameters())[name].copy_(value)
    path = tmp_path / "m.dcz"
    save_compressed(model, path, arch=ARCH, codec=codec, **state)
    return path, model


class Recorder(dict):
    """An architecture table that counts real (non-meta) constructions."""

    def __init__(self) -> None:
        super().__init__(MODELS)
        self.real = 0
        for name, build in MODELS.items():
            self[name] = self._wrap(build)

    def _wrap(self, build: Any) -> Any:
        def construct(**kwargs: Any) -> Any:
            model = build(**kwargs)
            self.real += next(model.parameters()).device.type != "meta"
            return model
        return construct


def test_hostile_class_count_is_refused_before_anything_real_is_built(tmp_path: Path) -> None:
    path, _ = small_file(tmp_path)
    rewrite_header(path, lambda h: h["arch"]["args"].update(num_classes=5_000_000))
    architectures = Recorder()
    with pytest.raises(CompressedFileError, match=r"tensor 'fc3.weight' does not belong to LeNet300"):
        read_with(path, architectures)
    assert architectures.real == 0  # only the meta-device model was built


def test_a_tiny_file_cannot_declare_a_huge_model(tmp_path: Path) -> None:
    # 600M weights (2.4 GB) declared by a file of a few hundred bytes, every tensor sparse and empty.
    with torch.device("meta"):
        meta = LeNet300(in_features=2_000_000)
    tensors = [{"name": n, "shape": list(t.shape), "dtype": "float32", "encoding": "sparse", "index_bits": 5,
                "kept": 0, "entries": 0} for n, t in meta.state_dict().items()]
    write_container(tmp_path / "huge.dcz", {"arch": {"type": "LeNet300", "args": {"in_features": 2_000_000}},
                                             "tensors": tensors, "sha256": payload_digest([])}, [])
    architectures = Recorder()
    with pytest.raises(CompressedFileError, match=r"takes 2,\d{3},\d{3},\d{3} bytes, more than the"):
        read_with(tmp_path / "huge.dcz", architectures)
    assert architectures.real == 0


@pytest.mark.parametrize("name", ["fc1.bias", "fc3.weight"])
def test_non_finite_values_are_refused(tmp_path: Path, name: str) -> None:
    path, _ = small_file(tmp_path)  # fc1.bias is stored raw, fc3.weight quantized
    if name == "fc1.bias":
        path, _ = small_file(tmp_path, **{"fc1.bias": torch.full((300,), float("nan"))})
    else:  # a NaN centroid: edit the codebook section and its CRC, then the header's digest
        data = bytearray(path.read_bytes())
        offsets = sections_of(path)
        start, _ = offsets[f"{name}:codebook"]
        data[start:start + 4] = struct.pack("<f", float("inf"))
        path.write_bytes(bytes(data))
        fix_crcs(path)
    with pytest.raises(CompressedFileError, match=f"{name}' holds NaN or infinite values"):
        read_compressed(path)


def test_section_edited_and_re_crcd_is_caught_by_the_digest(tmp_path: Path) -> None:
    path, _ = small_file(tmp_path)
    data = bytearray(path.read_bytes())
    start, length = sections_of(path)["fc1.weight:index"]
    data[start + length // 2] ^= 0x01
    path.write_bytes(bytes(data))
    fix_crcs(path, digest=False)  # the section's CRC matches its new bytes; the SHA-256 does not
    with pytest.raises(CompressedFileError, match="do not match the header's SHA-256"):
        read_compressed(path)


def test_declared_dtype_must_be_the_architectures(tmp_path: Path) -> None:
    path, _ = small_file(tmp_path)
    rewrite_header(path, lambda h: next(t for t in h["tensors"] if t["name"] == "fc1.bias").update(dtype="int32"))
    with pytest.raises(CompressedFileError, match=r"'fc1.bias' is declared 'int32', but LeNet300 holds it as "
                                                  r"torch.float32"):
        read_compressed(path)


@pytest.mark.parametrize(("version", "match"), [(FORMAT_VERSION + 1, "written by a newer version"),
                                                (51966, "corrupt file")])
def test_version_field(tmp_path: Path, version: int, match: str) -> None:
    path, _ = small_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:8] + struct.pack("<H", version) + data[10:])
    with pytest.raises(CompressedFileError, match=match):
        read_compressed(path)


@pytest.mark.parametrize("codec", ["huffman", "range", "context"])
def test_fuzzed_files_decode_identically_or_fail_cleanly(tmp_path: Path, codec: str) -> None:
    """Seeded mutations of a real file: truncations, bit flips, header edits with recomputed CRCs."""
    path, model = small_file(tmp_path, codec)
    original, expected = path.read_bytes(), model.state_dict()
    rng = random.Random(0)
    header_edits = [
        lambda h, t: t.update(shape=[t["shape"][0] + 1, *t["shape"][1:]]), lambda h, t: t.update(kept=0),
        lambda h, t: t.update(entries=t.get("entries", 0) + 7), lambda h, t: t.update(index_bits=17),
        lambda h, t: t.update(encoding="quantized"), lambda h, t: t.update(clusters=1 << 40),
        lambda h, t: t.pop("name"), lambda h, t: h["arch"]["args"].update(in_features=-3),
        lambda h, t: h["tensors"].append(dict(t)), lambda h, t: h.update(class_names=["x"] * 3),
        lambda h, t: h["arch"].update(type=["x"]), lambda h, t: t.update(name=["fc1.weight"]),
        lambda h, t: h["arch"]["args"].update(in_features=2 ** 62), lambda h, t: t.update(kept=None),
        lambda h, t: h.update(class_names=5), lambda h, t: t.update(codec="range-v2"),
        lambda h, t: t.update(codec="range-v1"), lambda h, t: t.update(clusters=t.get("clusters", 0) + 1),
        lambda h, t: t.update(codec="ctx-v1"), lambda h, t: t.update(nb=2), lambda h, t: t.update(up=1),
        lambda h, t: t.update(up=t.get("up", 0) + 3), lambda h, t: t.update(negatives=t.get("negatives", 0) + 1),
    ]
    outcomes = {"refused": 0, "identical": 0}
    for case in range(300):
        bad = tmp_path / "fuzz.dcz"
        kind = case % 3
        if kind == 0:
            bad.write_bytes(original[: rng.randrange(len(original))])
        elif kind == 1:
            data = bytearray(original)
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            bad.write_bytes(bytes(data))
        else:
            bad.write_bytes(original)
            edit = header_edits[case // 3 % len(header_edits)]
            rewrite_header(bad, lambda h: edit(h, rng.choice(h["tensors"])))
        try:
            file_table(bad)  # dcz.py info reads the same untrusted header
        except CompressedFileError:
            pass
        try:
            decoded, _ = read_compressed(bad)
        except CompressedFileError:
            outcomes["refused"] += 1
            continue
        assert all(torch.equal(decoded.state_dict()[k], v) for k, v in expected.items()), case
        outcomes["identical"] += 1
    # Edits of class_names (and, in range-v1 entries, of the index_bits and entries they do not have) decode
    # as before; every other case is refused.
    assert outcomes["refused"] > 240 and outcomes["identical"] >= 10
    for sparse in (True,):  # the sparse decode reads the same fields
        bad.write_bytes(original)
        rewrite_header(bad, lambda h: h["tensors"][0].update(kept=None))
        with pytest.raises(CompressedFileError):
            read_compressed(bad, sparse=sparse)


def test_files_from_before_the_digest_still_read(tmp_path: Path) -> None:
    path, model = small_file(tmp_path)
    rewrite_header(path, lambda h: h.pop("sha256"))
    decoded, _ = read_compressed(path)
    assert all(torch.equal(decoded.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("edit", "match"), [
    (lambda c: c.update(state_dict=[1]), "'state_dict' must map names to tensors"),
    (lambda c: c.update(masks={"fc1.weight": 5}), "'masks' must map names to tensors"),
    (lambda c: c.update(epoch="abc"), "'epoch' must be a count"),
    (lambda c: c.update(config=[1]), "'config' must be an object"),
])
def test_checkpoint_entries_of_the_wrong_type_are_refused(tmp_path: Path, edit: Any, match: str) -> None:
    ckpt = {"state_dict": {"model.w": torch.zeros(1)}, "masks": {}, "epoch": 0}
    edit(ckpt)
    torch.save(ckpt, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(tmp_path / "bad.ckpt")


def test_checkpoint_zip_bomb_is_refused_before_loading(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.ckpt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data/0", bytes(96 << 20))  # 96 MiB of zeros in ~100 KB
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(CheckpointError, match=r"would unpack to 100,663,296 bytes from [\d,]+ on disk"):
        load_checkpoint(bomb)


def test_a_refused_pickle_names_the_blocked_object(tmp_path: Path) -> None:
    import argparse

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": argparse.Namespace(x=1)}, path)
    with pytest.raises(CheckpointError, match=r"asks to load the Python object argparse.Namespace"):
        load_checkpoint(path)


def test_a_file_never_chooses_where_we_read_or_write(tmp_path: Path, idx_dir: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    test = load_script("test")
    path, _ = small_file(tmp_path)
    evil = tmp_path / "evil"
    rewrite_header(path, lambda h: h.update(eval={"name": "x", "data_loader": {"type": "FashionMNIST", "args": {
        "data_dir": str(evil), "download": True, "batch_size": 64}}}))
    assert test.main(["-r", str(path), "--json", "--set", f"data_loader.args.data_dir={idx_dir}"]) == 0
    assert not evil.exists() and json.loads(capsys.readouterr().out)["top1_err"] >= 0


def test_exported_header_holds_no_machine_paths(tmp_path: Path, idx_dir: Path) -> None:
    train = load_script("train")
    cfg = tiny_config(idx_dir, tmp_path / "runs", max_epochs=1)
    cfg["trainer"]["callbacks"] = {"IterativePruning": {"keep_ratio": 0.5}}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert train.main(["-c", str(tmp_path / "c.json")]) == 0
    _, header = read_compressed(only_run(tmp_path / "runs") / "model.dcz")
    assert str(idx_dir) not in json.dumps(header) and str(tmp_path) not in json.dumps(header)
    assert header["eval"]["data_loader"] == {"type": "FashionMNIST", "args": {"batch_size": 32,
                                                                             "validation_split": 0.2}}
