"""The .dcz file: bit-identical round trips, test.py on the file, the report, and every corruption."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from compression.model_codec import decode_tensor, encode_tensor
from helpers import compress_like_the_paper, load_script, sections_of, tiny_config
import dcz
from dcz import CompressedFileError, read_compressed, save_compressed
from builders import encode_run_checkpoint
from parse_config import parse_config
from models import LeNet5, LeNet300

train = load_script("train")
test = load_script("test")


@pytest.mark.parametrize(("model", "arch", "keep", "bits"), [
    (LeNet300(), {"type": "LeNet300", "args": {"num_classes": 10}}, 0.08, 6),
    (LeNet5(), {"type": "LeNet5", "args": {"num_classes": 10}}, 0.1, 5),
])
def test_decode_encode_is_bit_identical(tmp_path: Path, model: torch.nn.Module, arch: dict, keep: float,
                                        bits: int) -> None:
    torch.manual_seed(0)
    state = compress_like_the_paper(model, keep, bits)
    report = save_compressed(model, tmp_path / "m.dcz", arch=arch, **state)
    decoded, header = read_compressed(tmp_path / "m.dcz")
    for name, value in model.state_dict().items():
        assert torch.equal(decoded.state_dict()[name], value), name
    assert report["file"]["bytes"] == os.path.getsize(tmp_path / "m.dcz")
    assert report["file"]["rate"] > 10  # ~10 % kept at <= 6 bits: far smaller than float32
    assert header["arch"] == arch


def test_model_without_compressed_layers_round_trips(tmp_path: Path) -> None:
    model = LeNet300()
    report = save_compressed(model, tmp_path / "dense.dcz", arch={"type": "LeNet300", "args": {}})
    decoded = read_compressed(tmp_path / "dense.dcz")[0]
    assert all(torch.equal(decoded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert report["file"]["rate"] == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("case", ["sparse", "quantized_dense", "edges", "empty", "empty_quantized"])
def test_tensor_codec_cases(case: str) -> None:
    torch.manual_seed(1)
    w = torch.randn(40, 50)
    mask, codebook, index = torch.rand(40, 50) < 0.05, None, None
    if case == "quantized_dense":  # quantized without pruning: every weight kept
        mask, codebook = torch.ones(40, 50, dtype=torch.bool), torch.tensor([-1.0, 0.5, 2.0])
        index = torch.randint(0, 3, (2000,))
    if case == "edges":  # first and last element kept, a gap of ~2000 with 3-bit indices
        mask = torch.zeros(40, 50, dtype=torch.bool)
        mask.view(-1)[[0, 1999]] = True
    if case.startswith("empty"):
        mask = torch.zeros(40, 50, dtype=torch.bool)
    if case == "empty_quantized":  # a quantized layer pruned away entirely: no index to store
        codebook, index = torch.tensor([0.5, 1.0]), torch.zeros(0, dtype=torch.int64)
    w = w.masked_fill(~mask, 0.0) if codebook is None else torch.zeros(40, 50).masked_scatter(mask, codebook[index])
    entry, sections, stats = encode_tensor("w", w, mask, codebook, index, index_bits=3)
    decoded = decode_tensor(entry, dict(sections))
    assert torch.equal(decoded.view(torch.int32), w.view(torch.int32))  # the bits, so that -0.0 != +0.0
    assert stats.kept == int(mask.sum())


def test_weight_bits_pq_count_the_filler_symbol() -> None:
    # 4 used centroids take 2 bits; with fillers (gaps > 2**2 - 1 at 2-bit positions) the fixed-width
    # code needs a 5th symbol, so 3 bits: the P+Q column must describe a decodable encoding.
    codebook, mask = torch.tensor([-1.0, -0.5, 0.5, 1.0]), torch.zeros(100, dtype=torch.bool)
    for positions, bits in (([0, 1, 2, 3], 2.0), ([0, 1, 2, 90], 3.0)):
        mask[:] = False
        mask[positions] = True
        index = torch.arange(4)
        w = torch.zeros(100).masked_scatter(mask, codebook[index])
        stats = encode_tensor("w", w, mask, codebook, index, index_bits=2)[2]
        assert (stats.fillers > 0, stats.weight_bits) == (bits == 3.0, bits)


def test_encoder_refuses_weights_that_disagree_with_mask_or_codebook() -> None:
    mask, codebook, index = torch.tensor([True, False, True]), torch.tensor([0.25, 0.5]), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="w: the tensor has non-zero pruned weights"):
        encode_tensor("w", torch.tensor([0.25, 1.0, 0.5]), mask)
    with pytest.raises(ValueError, match="w: the tensor has weights that are not codebook\\[index\\] on the mask"):
        encode_tensor("w", torch.tensor([0.25, 0.0, 0.75]), mask, codebook, index)


@pytest.mark.parametrize(("field", "value", "match"), [
    ("clusters", None, "header field 'clusters' must be a non-negative integer, got None"),
    ("clusters", [3], "header field 'clusters' must be a non-negative integer, got \\[3\\]"),
    ("kept", "7", "header field 'kept' must be a non-negative integer, got '7'"),
])
def test_decoder_checks_header_fields_before_use(field: str, value: Any, match: str) -> None:
    mask, codebook = torch.tensor([True, True, False, True, True]), torch.tensor([-1.0, 0.5, 2.0])
    index = torch.tensor([0, 1, 2, 1])
    w = torch.zeros(5).masked_scatter(mask, codebook[index])
    entry, sections, _ = encode_tensor("w", w, mask, codebook, index, index_bits=3)
    with pytest.raises(ValueError, match=match):
        decode_tensor({**entry, field: value}, dict(sections))


def test_index_stream_is_checked_before_it_is_decoded() -> None:
    from compression import huffman

    mask, codebook = torch.tensor([True, True, False, True]), torch.tensor([-1.0, 0.5, 2.0])
    index = torch.tensor([0, 1, 2])
    entry, sections, _ = encode_tensor("w", torch.tensor([-1.0, 0.5, 0.0, 2.0]), mask, codebook, index, index_bits=3)
    for symbols, alphabet in (([0, 1, 2, 1, 0], 4), ([0, 1, 2], 9)):  # too many symbols; an alphabet beyond k + 1
        bad = {**dict(sections), "w:index": huffman.encode(np.array(symbols), alphabet).to_bytes()}
        with pytest.raises(ValueError, match=f"w: index stream has {len(symbols)} symbols over {alphabet} values "
                                             "for 3 entries and 3 clusters"):
            decode_tensor(entry, bad)


def run_pipeline(tmp_path: Path, idx_dir: Path) -> Path:
    cfg = tiny_config(idx_dir, tmp_path / "runs", max_epochs=2)
    cfg["trainer"]["callbacks"] = {"IterativePruning": {"keep_ratio": {"fc1": 0.08, "fc2": 0.09, "fc3": 0.26}},
                                   "Quantization": {"bits": 6, "epoch": 1, "lr": 1e-4}}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert train.main(["-c", str(tmp_path / "c.json")]) == 0
    (run,) = sorted((tmp_path / "runs" / "tiny").iterdir())
    return run


def test_train_writes_dcz_and_test_py_gives_identical_results(tmp_path: Path, idx_dir: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    run = run_pipeline(tmp_path, idx_dir)
    assert {"model.dcz", "compression_report.md", "compression_report.json"} <= {p.name for p in run.iterdir()}
    report = json.loads((run / "compression_report.json").read_text())
    assert report["file"]["bytes"] == os.path.getsize(run / "model.dcz")
    capsys.readouterr()
    results = []
    for path in (run / "best.ckpt", run / "model.dcz"):  # a .dcz names no data folder: the user does
        assert test.main(["-r", str(path), "--json", "--set", f"data_loader.args.data_dir={idx_dir}"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    for key in ("loss", "top1_err", "top5_err", "nonzero", "params", "layers"):
        assert results[0][key] == results[1][key], key
    # The decoded weights equal the quantized weights of the checkpoint, bit for bit (-0.0 is not +0.0).
    ckpt = torch.load(run / "best.ckpt", weights_only=True)
    decoded, header = read_compressed(run / "model.dcz")
    for name, value in decoded.state_dict().items():
        assert torch.equal(value.view(torch.int32), ckpt["state_dict"][f"model.{name}"].view(torch.int32)), name
    assert header["class_names"][:2] == ["T-shirt/top", "Trouser"] and len(header["class_names"]) == 10
    # dcz.py encode does the same for any checkpoint, with the index width of the checkpoint's config.
    assert dcz.main(["encode", str(run / "best.ckpt"), "--out", str(tmp_path / "again.dcz")]) == 0
    assert (tmp_path / "again.dcz").read_bytes() == (run / "model.dcz").read_bytes()
    cfg = parse_config(json.loads((run / "config.json").read_text()))
    out, again = encode_run_checkpoint(run / "best.ckpt", tmp_path / "auto.dcz", cfg,
                                       cfg.export.model_copy(update={"index_bits": "auto"}))
    assert again["file"]["bytes"] == os.path.getsize(out) and (tmp_path / "compression_report.md").is_file()


@pytest.fixture(scope="module")
def dcz_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dcz") / "m.dcz"
    torch.manual_seed(0)
    model = LeNet300()
    save_compressed(model, path, arch={"type": "LeNet300", "args": {}}, **compress_like_the_paper(model, 0.1, 4))
    return path


def section_offsets(path: Path) -> list[tuple[str, int, int]]:
    """(name, data offset, data length) of every section, parsed independently of the reader."""
    return [(name, start, length) for name, (start, length) in sections_of(path).items()]


def test_every_corrupted_section_is_named(dcz_file: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    sections = section_offsets(dcz_file)
    assert len(sections) == 12  # weight: codebook, index, position; bias: raw; for 3 layers
    for name, start, length in sections:
        data = bytearray(dcz_file.read_bytes())
        data[start + length // 2] ^= 0xFF
        bad = tmp_path / "bad.dcz"
        bad.write_bytes(bytes(data))
        with pytest.raises(CompressedFileError, match=re_escape(name)):
            read_compressed(bad)
        assert test.main(["-r", str(bad)]) == 2
        err = capsys.readouterr().err
        assert name in err and "Traceback" not in err


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda d: d[: len(d) // 2], "truncated"),
    (lambda d: b"PK\x03\x04" + d[4:], "not a .dcz file"),
    (lambda d: d[:8] + (5).to_bytes(2, "little") + d[10:], "newer version"),
    (lambda d: d[:8] + (999).to_bytes(2, "little") + d[10:], "corrupt file: format version field holds 999"),
    (lambda d: d[:20] + bytes([d[20] ^ 0xFF]) + d[21:], "header"),
])
def test_damaged_files_give_one_clear_error(dcz_file: Path, tmp_path: Path, mutate: Any, match: str) -> None:
    bad = tmp_path / "bad.dcz"
    bad.write_bytes(mutate(dcz_file.read_bytes()))
    with pytest.raises(CompressedFileError, match=match):
        read_compressed(bad)


def test_hostile_header_cannot_make_us_allocate(tmp_path: Path) -> None:
    from compression.container import write_container

    write_container(tmp_path / "huge.dcz", {"arch": {"type": "VGG16", "args": {"num_classes": 10 ** 9}},
                                             "tensors": []}, [])
    with pytest.raises(CompressedFileError, match="more than the"):
        read_compressed(tmp_path / "huge.dcz")
    write_container(tmp_path / "alien.dcz", {"arch": {"type": "ResNet50"}, "tensors": []}, [])
    with pytest.raises(CompressedFileError, match="names no known architecture"):
        read_compressed(tmp_path / "alien.dcz")


def test_auto_index_bits_never_loses_to_a_fixed_width(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LeNet300()
    state = compress_like_the_paper(model, 0.05, 5)
    arch = {"type": "LeNet300", "args": {}}
    sizes = {bits: save_compressed(model, tmp_path / f"{bits}.dcz", arch=arch, index_bits=bits,
                                   **state)["file"]["bytes"] for bits in (3, 5, 8, "auto")}
    assert sizes["auto"] <= min(sizes[3], sizes[5], sizes[8])
    decoded = read_compressed(tmp_path / "auto.dcz")[0]
    assert all(torch.equal(decoded.state_dict()[k], v) for k, v in model.state_dict().items())
