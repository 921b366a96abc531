"""The range-v1 codec (``compression.range_codec``, beyond the paper): exact round trips of the coder and of
whole models, the header's codec names, the report, the sparse decode path, the CLI and config switches,
and corrupt streams rejected with our own message."""

from __future__ import annotations

import hashlib
from importlib.metadata import version
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import dcz
from compression import range_codec
from compression.model_codec import decode_tensor, encode_tensor
from compression.model_file import CompressedFileError, file_table
from compression.quantization import MAX_BITS
from compression.sparse import SparseLinear
from helpers import compress_like_the_paper, tiny_config
from models import LeNet5, LeNet300
from parse_config import ConfigError, parse_config
from trainer.compression_state import INDEX_KEY, MASKS_KEY, codebook_key
from builders import encode_run_checkpoint
from trainer.export import read_compressed, save_compressed

LENET300 = {"type": "LeNet300", "args": {"num_classes": 10}}
LENET5 = {"type": "LeNet5", "args": {"num_classes": 10}}


def round_trip(mask: np.ndarray) -> bytes:
    """Codes the kept positions of ``mask`` (viewed as ``(shape[0], rest)``) and checks they decode exactly."""
    positions, row = np.flatnonzero(mask), range_codec.row_length(mask.shape)
    data = range_codec.encode_positions(positions, mask.size, row)
    assert np.array_equal(range_codec.decode_positions(data, mask.size, row, len(positions)), positions)
    return data


def clustered(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Kept weights in runs along the rows, with rows of very different densities (what pruning leaves)."""
    rng = np.random.default_rng(seed)
    rows = shape[0]
    density = rng.uniform(0.0, 0.3, rows)[:, None]
    start = rng.random((rows, int(np.prod(shape[1:])))) < density / 4
    return (start | np.roll(start, 1, axis=1) | np.roll(start, 2, axis=1)).reshape(shape)


@pytest.mark.parametrize(("shape", "density"), [
    ((300, 784), 0.06), ((10, 100), 0.26), ((50, 20, 5, 5), 0.12), ((20, 1, 5, 5), 0.66),  # LeNets' layers
    ((3, 10_000), 0.3),  # rows longer than a lane: cut into lanes of LANE columns
    ((1, 9000), 0.01), ((9000, 1), 0.5), ((7,), 0.5), ((), 1.0),  # one row, one column, 1-D, 0-D
    ((0, 5), 0.5), ((5, 0), 0.5),  # empty tensors
])
def test_random_masks_round_trip(shape: tuple[int, ...], density: float) -> None:
    round_trip(np.random.default_rng(0).random(shape) < density)


@pytest.mark.parametrize("fill", [False, True])
@pytest.mark.parametrize("shape", [(40, 50), (2, range_codec.LANE), (3, 2 * range_codec.LANE + 1)])
def test_nothing_or_everything_kept(shape: tuple[int, int], fill: bool) -> None:
    # A lane of exactly LANE kept columns takes LANE + 1 steps: the longest the decoder allows.
    data = round_trip(np.full(shape, fill))
    assert len(data) <= 64  # nothing to say beyond "all" or "none": a few words


def test_structured_masks_cost_less_than_their_coin_flip_bound() -> None:
    # The per-lane density context is what lets range-v1 beat an iid model on real (uneven) masks.
    mask = clustered((300, 784), seed=1)
    p = mask.mean()
    iid_bits = -mask.size * (p * np.log2(p) + (1 - p) * np.log2(1 - p))
    assert 8 * len(round_trip(mask)) < 0.9 * iid_bits


@pytest.mark.parametrize(("alphabet", "symbols"), [
    (1, np.zeros(50, np.int64)),  # one cluster: nothing is coded but the check
    (32, np.zeros(5000, np.int64)),  # all one symbol of many
    (32, np.zeros(0, np.int64)),
    (1 << MAX_BITS, np.random.default_rng(2).permutation(np.arange(70_000) % (1 << MAX_BITS))),  # 2**16 clusters
    (256, np.random.default_rng(3).integers(0, 256, 330)),  # LeNet-5 conv1: fewer weights than 2x the clusters
])
def test_symbol_streams_round_trip(alphabet: int, symbols: np.ndarray) -> None:
    data = range_codec.encode_symbols(symbols, alphabet)
    assert np.array_equal(range_codec.decode_symbols(data, len(symbols), alphabet), symbols)
    if alphabet == 32 and len(symbols):
        assert len(data) < 64  # 5000 zeros: bits only while the counts learn it (fixed width: 3,125 bytes)


def test_streams_are_stable_across_versions() -> None:
    # range-v1 is a file format: the same input must give these bytes. requirements.txt pins the constriction
    # release they were made with; before allowing another, run this test with it: if it fails, the coder changed,
    # and that needs a new codec tag, not a new digest.
    assert version("constriction") == "0.5.0", "GOLDEN was made with constriction 0.5.0 (requirements.txt)"
    rng = np.random.default_rng(7)
    mask = clustered((30, 200), seed=7)
    symbols = rng.integers(0, 16, int(mask.sum()))
    data = range_codec.encode_positions(np.flatnonzero(mask), mask.size, 200) + range_codec.encode_symbols(symbols, 16)
    assert hashlib.sha256(data).hexdigest()[:16] == GOLDEN


GOLDEN = "27683a5796b1b812"  # constriction 0.5.0; 596 bytes for 627 kept weights


@pytest.mark.parametrize(("model", "arch", "keep", "bits"), [(LeNet300(), LENET300, 0.08, 6),
                                                           (LeNet5(), LENET5, 0.1, 8)])
def test_whole_models_decode_bit_exactly_with_both_codecs(tmp_path: Path, model: torch.nn.Module, arch: dict,
                                                          keep: float, bits: int) -> None:
    torch.manual_seed(0)
    state = compress_like_the_paper(model, keep, bits)
    sizes = {}
    for codec in ("huffman", "range"):
        path = tmp_path / f"{codec}.dcz"
        report = save_compressed(model, path, arch=arch, index_bits="auto", codec=codec, **state)
        decoded, header = read_compressed(path)
        for name, value in model.state_dict().items():  # the bits, so that -0.0 != +0.0
            assert torch.equal(decoded.state_dict()[name].view(torch.int32), value.view(torch.int32)), name
        coded = [t for t in header["tensors"] if t["encoding"] != "raw"]
        assert {t.get("codec") for t in coded} == ({"range-v1"} if codec == "range" else {None})
        assert report["file"]["bytes"] == path.stat().st_size
        sizes[codec] = path.stat().st_size
    assert sizes["range"] < sizes["huffman"]


def test_the_default_is_huffman_and_writes_the_same_bytes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LeNet300()
    state = compress_like_the_paper(model, 0.08, 5)
    save_compressed(model, tmp_path / "default.dcz", arch=LENET300, **state)
    save_compressed(model, tmp_path / "huffman.dcz", arch=LENET300, codec="huffman", **state)
    assert (tmp_path / "default.dcz").read_bytes() == (tmp_path / "huffman.dcz").read_bytes()
    _, header = read_compressed(tmp_path / "default.dcz")
    assert all("codec" not in t for t in header["tensors"])  # files as they were before the option existed
    with pytest.raises(ValueError, match="unknown codec 'zip'; choose one of 'huffman', 'range'"):
        save_compressed(model, tmp_path / "x.dcz", arch=LENET300, codec="zip", **state)


def test_huffman_tensors_are_coded_as_before_the_codec_option() -> None:
    # Digest of the entry and sections as the code before `codec` existed wrote them (same seed, same call).
    torch.manual_seed(5)
    mask, codebook = torch.rand(60, 70) < 0.1, torch.linspace(-1, 1, 9)
    index = torch.randint(0, 9, (int(mask.sum()),))
    w = torch.zeros(60, 70).masked_scatter(mask, codebook[index])
    entry, sections, _ = encode_tensor("w", w, mask, codebook, index, index_bits=4)
    digest = hashlib.sha256(json.dumps(entry, sort_keys=True).encode() + b"".join(n.encode() + d for n, d in sections))
    assert digest.hexdigest()[:16] == "b8078adc611092a1"


def test_short_rows_make_one_long_row() -> None:
    # A (N, 1) weight must not cost N lanes of decoder state: rows under MIN_ROW columns are one long row.
    assert range_codec.row_length((100_000, 1)) == 100_000 and range_codec.row_length((20, 1, 5, 5)) == 500
    assert range_codec.row_length((300, 784)) == 784 and range_codec.row_length((7,)) == 7
    round_trip(np.random.default_rng(4).random((100_000, 1)) < 0.01)


def test_the_report_counts_the_real_section_bytes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LeNet300()
    state = compress_like_the_paper(model, 0.08, 5)
    report = save_compressed(model, tmp_path / "m.dcz", arch=LENET300, codec="range", index_bits=5, **state)
    _, rows = file_table(tmp_path / "m.dcz")
    for layer, row in zip(report["layers"], rows, strict=True):
        assert layer["bytes"] == row["bytes"]
        if layer["encoding"] == "quantized":  # P+Q+H: every bit of index, position and codebook sections
            assert layer["bits_pqh"] == pytest.approx(8 * row["bytes"])
            assert (layer["codec"], row["codec"], row["fillers"], layer["fillers"]) == ("range-v1",) * 2 + (0, 0)
            assert layer["index_bits_pq"] == 5 and layer["bits_pq"] > layer["kept"] * (layer["weight_bits_pq"] + 5)
            assert row["weight_bits_pqh"] == pytest.approx(layer["weight_bits_pqh"])  # dcz.py info agrees
    assert report["paper_total"]["bits_pqh"] < 8 * report["file"]["bytes"]  # biases, header and framing on top


@pytest.mark.parametrize("codebook", [False, True])
def test_sparse_decode_builds_csr_from_range_positions(tmp_path: Path, codebook: bool) -> None:
    torch.manual_seed(0)
    model = LeNet300()
    state = compress_like_the_paper(model, 0.08, 5)
    if not codebook:  # pruned only: float32 values beside the positions
        state = {"masks": state["masks"]}
    save_compressed(model, tmp_path / "m.dcz", arch=LENET300, codec="range", **state)
    sparse, _ = read_compressed(tmp_path / "m.dcz", sparse=True)
    assert isinstance(sparse.fc1, SparseLinear)
    assert torch.equal(sparse.fc1.weight.to_dense(), model.fc1.weight.detach())
    x = torch.randn(3, 784)
    with torch.no_grad():
        assert torch.allclose(sparse(x), model.eval()(x), atol=1e-5)


@pytest.fixture()
def range_tensor() -> tuple[dict[str, Any], dict[str, bytes]]:
    """A quantized 40x80 tensor, 10 % kept over 7 clusters, as range-v1 entry and sections."""
    torch.manual_seed(3)
    mask, codebook = torch.rand(40, 80) < 0.1, torch.linspace(-1, 1, 7)
    index = torch.randint(0, 7, (int(mask.sum()),))
    w = torch.zeros(40, 80).masked_scatter(mask, codebook[index])
    entry, sections, _ = encode_tensor("w", w, mask, codebook, index, codec="range")
    assert entry["codec"] == "range-v1" and "index_bits" not in entry and "entries" not in entry
    assert torch.equal(decode_tensor(entry, dict(sections)), w)
    return entry, dict(sections)


@pytest.mark.parametrize("kept", [0, 1, 3200])
def test_edge_masks_round_trip(kept: int) -> None:
    mask = torch.zeros(40, 80, dtype=torch.bool)
    mask.view(-1)[:kept] = True
    w = torch.randn(40, 80).masked_fill(~mask, 0.0)
    entry, sections, _ = encode_tensor("w", w, mask, codec="range")
    assert torch.equal(decode_tensor(entry, dict(sections)), w)
    assert entry["codec"] == "range-v1"


@pytest.mark.parametrize(("kind", "edit", "match"), [
    ("position", lambda d: d[:-4], "w: position stream is corrupt"),  # truncated by one word
    ("position", lambda d: d[:-1], "w: position stream has \\d+ bytes, not a whole number of 32-bit words"),
    # Two stray words (the decoder reads one word ahead, so a single one passes unseen, and harmless: the CRC
    # has already vouched for every decoded symbol).
    ("position", lambda d: d + b"\x01\x00\x00\x00" * 2, "w: position stream is corrupt: data left"),
    ("position", lambda d: d[:8] + bytes([d[8] ^ 0x10]) + d[9:], "w: position stream"),  # a bit flipped
    ("index", lambda d: d[:-4], "w: index stream is corrupt"),
    ("index", lambda d: bytes([d[0] ^ 0x01]) + d[1:], "w: index stream is corrupt"),
    ("index", lambda d: b"", "w: index stream is corrupt"),
])
def test_corrupt_streams_are_rejected(range_tensor: tuple[dict, dict], kind: str, edit: Any, match: str) -> None:
    entry, sections = range_tensor
    with pytest.raises(ValueError, match=f"^{match}"):
        decode_tensor(entry, {**sections, f"w:{kind}": edit(sections[f"w:{kind}"])})


def test_mutated_streams_fail_with_our_message_or_decode_identically(range_tensor: tuple[dict, dict]) -> None:
    """Seeded damage inside the streams themselves (below the file's CRCs): truncations, bit flips, stray and
    missing words. Anything but a clean ValueError (a crash, another exception, a hang) fails the test."""
    entry, sections = range_tensor
    expected, rng = decode_tensor(entry, sections), np.random.default_rng(0)
    refused = 0
    for case in range(300):
        kind = ("position", "index")[case % 2]
        data = bytearray(sections[f"w:{kind}"])
        if case % 3 == 0:
            data = data[:rng.integers(0, len(data) + 1)]
        elif case % 3 == 1:
            for _ in range(rng.integers(1, 4)):
                data[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
        else:
            at = 4 * int(rng.integers(len(data) // 4))
            data[at:at + 4] = rng.bytes(4)
        try:
            decoded = decode_tensor(entry, {**sections, f"w:{kind}": bytes(data)})
        except ValueError as err:
            assert str(err).startswith(f"w: {kind} stream"), err
            refused += 1
            continue
        assert torch.equal(decoded, expected), case
    assert refused > 280


@pytest.mark.parametrize(("field", "value", "match"), [
    ("kept", 10, "w: position stream holds more than the 10 kept weights the header declares"),
    ("kept", 1, "w: 7 clusters declared for 1 kept weights"),  # refused before anything is decoded
    ("kept", 500, "w: position stream holds \\d+ kept weights, the header says 500"),
    ("kept", 3201, "w: 3201 kept weights declared for a tensor of 3200"),
    ("clusters", 8, "w: codebook has 28 bytes for 8 clusters"),
    ("clusters", 0, "w: codebook has 28 bytes for 0 clusters"),
    ("codec", "range-v9", "w: unknown codec 'range-v9'; this reader knows huffman-v1, range-v1, ctx-v1"),
    ("codec", "range-v2", "w: codec 'range-v2' \\(range coding of runs of weights, for IterativePruning.block\\) was "
                          "removed \\(docs/experiments.md\\); encode the run's checkpoint again"),
    ("shape", [20, 160], "w: position stream"),  # another row length: other lanes, other contexts
])
def test_header_fields_are_checked(range_tensor: tuple[dict, dict], field: str, value: Any, match: str) -> None:
    entry, sections = range_tensor
    with pytest.raises(ValueError, match=f"^{match}"):
        decode_tensor({**entry, field: value}, sections)


def test_a_file_with_an_unknown_codec_names_the_tensor(tmp_path: Path) -> None:
    from helpers import rewrite_header

    torch.manual_seed(0)
    model = LeNet300()
    path = tmp_path / "m.dcz"
    save_compressed(model, path, arch=LENET300, codec="range", **compress_like_the_paper(model, 0.1, 4))
    rewrite_header(path, lambda h: h["tensors"][0].update(codec="range-v3"))
    with pytest.raises(CompressedFileError, match=r"fc1.weight: unknown codec 'range-v3'; this reader knows "
                                                  r"huffman-v1, range-v1, ctx-v1 \(a file from a newer version\?\)"):
        read_compressed(path)


def fake_checkpoint(path: Path, export: dict[str, Any]) -> LeNet300:
    """What train.py writes after a pruned + quantized fit, without the fit: config, weights and state."""
    torch.manual_seed(0)
    model = LeNet300()
    state = compress_like_the_paper(model, 0.1, 4)
    cfg = tiny_config(path.parent, path.parent / "runs")
    cfg["export"] = export
    torch.save({"config": parse_config(cfg).model_dump(), "epoch": 1,
                "state_dict": {**{f"model.{k}": v for k, v in model.state_dict().items()},
                               **{codebook_key(k): v for k, v in state["codebooks"].items()}},
                MASKS_KEY: state["masks"], INDEX_KEY: state["indices"]}, path)
    return model


@pytest.mark.parametrize(("stored", "flag", "expected"), [
    ({}, [], None), ({"codec": "range"}, [], "range-v1"), ({}, ["--codec", "range"], "range-v1"),
    ({"codec": "range"}, ["--codec", "huffman"], None),
])
def test_dcz_encode_takes_the_codec_from_the_flag_or_the_config(tmp_path: Path, stored: dict, flag: list[str],
                                                                expected: str | None) -> None:
    model = fake_checkpoint(tmp_path / "last.ckpt", stored)
    assert dcz.main(["encode", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "m.dcz"), *flag]) == 0
    decoded, header = read_compressed(tmp_path / "m.dcz")
    assert {t.get("codec") for t in header["tensors"] if t["encoding"] != "raw"} == {expected}
    assert all(torch.equal(decoded.state_dict()[k], v) for k, v in model.state_dict().items())
    report = json.loads((tmp_path / "compression_report.json").read_text())
    assert report["file"]["bytes"] == (tmp_path / "m.dcz").stat().st_size
    if expected:
        assert "H = range coding (range-v1" in (tmp_path / "compression_report.md").read_text()
        stored_cfg = parse_config(torch.load(tmp_path / "last.ckpt", weights_only=True)["config"])
        out, _ = encode_run_checkpoint(tmp_path / "last.ckpt", tmp_path / "again.dcz", stored_cfg)  # its export
        assert read_compressed(out)[1]["tensors"][0].get("codec") == ("range-v1" if stored else None)


def test_config_names_the_allowed_codecs(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, tmp_path / "runs")
    assert parse_config(cfg).export.codec == "huffman"
    cfg["export"] = {"codec": "arithmetic"}
    with pytest.raises(ConfigError, match="export.codec: must be one of 'huffman', 'range' or 'context'"):
        parse_config(cfg)


def test_raw_float16_halves_the_unpruned_tensors_and_decodes_to_their_rounding(tmp_path: Path) -> None:
    from compression.model_codec import decode_tensor, encode_tensor

    bias = torch.tensor([0.1, -2.5, 3.0e-5, 1234.567])
    entry, sections, stats = encode_tensor("fc1.bias", bias, raw_dtype="float16")
    assert entry["stored"] == "float16" and len(sections[0][1]) == 2 * 4 and stats.weight_bits == 16
    assert torch.equal(decode_tensor(entry, dict(sections)), bias.half().float())
    big = torch.tensor([1.0, 70000.0])  # beyond float16's range: stays float32, exact
    entry, sections, _ = encode_tensor("b", big, raw_dtype="float16")
    assert "stored" not in entry and torch.equal(decode_tensor(entry, dict(sections)), big)
    entry, sections, _ = encode_tensor("fc1.bias", bias, raw_dtype="float16")
    with pytest.raises(ValueError, match=r"raw section has 8 bytes, header says 4 x float32"):
        decode_tensor({**entry, "stored": "float32"}, dict(sections))
    with pytest.raises(ValueError, match=r"a 'float32' tensor cannot be stored as 'int8'"):
        decode_tensor({**entry, "stored": "int8"}, dict(sections))
    with pytest.raises(ValueError, match="raw_dtype must be one of float32, float16, got 'bfloat16'"):
        encode_tensor("b", bias, raw_dtype="bfloat16")


def test_a_whole_model_with_float16_biases(tmp_path: Path) -> None:
    from compression.model_file import read_compressed, save_compressed
    from helpers import compress_like_the_paper
    from models import MODELS

    torch.manual_seed(0)
    model = MODELS["LeNet300"](num_classes=10)
    state = compress_like_the_paper(model, keep=0.1, bits=4)
    sizes = {}
    for raw in ("float32", "float16"):
        save_compressed(model, tmp_path / f"{raw}.dcz", arch={"type": "LeNet300", "args": {"num_classes": 10}},
                        raw_dtype=raw, codec="range", **state)
        sizes[raw] = (tmp_path / f"{raw}.dcz").stat().st_size
        decoded, _ = read_compressed(tmp_path / f"{raw}.dcz", MODELS)
        for name, value in model.state_dict().items():
            expected = value.half().float() if raw == "float16" and name.endswith("bias") else value
            assert torch.equal(decoded.state_dict()[name], expected), (raw, name)
    assert sizes["float32"] - sizes["float16"] >= 2 * 410 - 16  # 410 biases, 2 bytes each saved
