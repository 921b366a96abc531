"""ctx-v1 (compression/context_codec.py, context_tensor.py) and the post-training path (compression/ptq.py,
post_training.py, dcz.py encode --budget): bit-exact round trips, the neighbour contexts, grids, hostile streams."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import dcz
from compression import context_codec, ptq
from compression.context_tensor import grid_of
from compression.model_codec import decode_tensor, encode_tensor
from helpers import load_script, tiny_config

train = load_script("train")
test = load_script("test")


def grid_tensor(shape: tuple[int, ...], keep: float, step: float = 2 ** -5, seed: int = 0):
    """A pruned tensor on a uniform grid: (weights, mask, codebook, index), as the post-training path makes them."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen) * 0.1
    mask = torch.rand(shape, generator=gen) < keep
    return ptq.quantize_tensor(weight, mask, step, 0.0)


@pytest.mark.parametrize("shape", [(30, 784), (20, 6, 5, 5), (300,), (1, 1), (7, 0), (3, 5000)])
@pytest.mark.parametrize("book", ["grid", "float16", "float32", "sparse"])
def test_every_kind_of_tensor_decodes_bit_exactly(shape: tuple[int, ...], book: str) -> None:
    weight, mask, codebook, index = grid_tensor(shape, 0.1)
    if book == "float16":  # not a grid, but every centroid a float16
        codebook = torch.tensor(np.arange(1, len(codebook) + 1, dtype=np.float16) ** 1.5, dtype=torch.float32)
    elif book == "float32":  # k-means-like centroids, one of them -0.0 (its bits must survive)
        codebook = torch.linspace(-0.3, 0.31, len(codebook)) + 1e-7 if len(codebook) else codebook
        if len(codebook) > 1:
            codebook[0] = -0.0
    weight = torch.zeros(shape)
    if book != "sparse" and len(index):
        weight[mask] = codebook[index]
    else:
        weight = torch.where(mask, torch.randn(shape), torch.zeros(shape))  # pruned: +0.0
    args = (codebook, index) if book != "sparse" else (None, None)
    entry, sections, stats = encode_tensor("w", weight, mask, *args, codec="context")
    decoded = decode_tensor(entry, dict(sections))
    assert torch.equal(decoded.view(torch.int32), weight.view(torch.int32))
    assert entry["codec"] == "ctx-v1" and stats.bytes == sum(len(data) for _, data in sections)


def test_a_uniform_grid_costs_13_bytes_and_is_found_exactly() -> None:
    values = np.float32(0.03125) * np.array([-3, -1, 2, 7], np.float32)
    step, levels = grid_of(values)
    assert step == np.float32(0.03125) and levels.tolist() == [-3, -1, 2, 7]
    assert grid_of(np.array([0.1, 0.2, 0.3141593], np.float32)) is None  # no step of the 128 tried fits: float32
    weight, mask, codebook, index = grid_tensor((40, 50), 0.2)
    entry, sections, _ = encode_tensor("w", weight, mask, codebook, index, codec="context")
    assert "negatives" not in entry and dict(sections)["w:data"][0] == 2  # the grid kind: 1 + 12 bytes


def test_the_up_neighbour_is_found_and_pays_on_image_shaped_rows() -> None:
    """fc1 of LeNet-300-100 sees 28x28 images: a weight's significance follows the pixel above (offset 28)."""
    gen = torch.Generator().manual_seed(0)
    blobs = torch.nn.functional.avg_pool2d(torch.rand(64, 1, 28, 28, generator=gen), 7, 1, 3)  # smooth fields
    mask = (blobs > blobs.flatten(1).quantile(0.9, dim=1)[:, None, None, None]).reshape(64, 784)
    weight = torch.where(mask, torch.full_like(blobs.reshape(64, 784), 2 ** -5), torch.zeros(64, 784))
    codebook, index = torch.tensor([2 ** -5]), torch.zeros(int(mask.sum()), dtype=torch.long)
    ctx, _, ctx_stats = encode_tensor("w", weight, mask, codebook, index, codec="context")
    _, _, range_stats = encode_tensor("w", weight, mask, codebook, index, codec="range")
    assert (ctx["nb"], ctx["up"]) == (1, 28)
    assert ctx_stats.bytes < 0.9 * range_stats.bytes  # measured: 1,717 vs 2,088 bytes


def test_corrupt_streams_fail_cleanly_or_decode_identically() -> None:
    weight, mask, codebook, index = grid_tensor((20, 100), 0.2)
    entry, sections, _ = encode_tensor("w", weight, mask, codebook, index, codec="context")
    data, rng, refused = dict(sections)["w:data"], np.random.default_rng(0), 0
    for _ in range(150):
        bad = bytearray(data)
        bad[rng.integers(13, len(bad))] ^= 1 << int(rng.integers(8))
        try:
            decoded = decode_tensor(entry, {"w:data": bytes(bad)})
        except ValueError as err:
            assert str(err).startswith("w: ") or "stream" in str(err)
            refused += 1
        else:
            assert torch.equal(decoded, weight)
    assert refused >= 140
    for field, value in [("nb", 2), ("up", 1), ("kept", 10 ** 9), ("clusters", 0)]:
        with pytest.raises(ValueError):
            decode_tensor(dict(entry, **{field: value}), dict(sections))


def test_levels_minimise_distortion_plus_rate() -> None:
    values = torch.tensor([0.0, 0.26, -0.74, 1.49, 0.51])
    assert ptq.levels_of(values, 0.5).tolist() == [0, 1, -1, 3, 1]  # rounding (0.74 / 0.5 = 1.48)
    spread = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    plain, strong = ptq.levels_of(spread, 0.25), ptq.levels_of(spread, 0.25, lam=0.5)

    def entropy(levels: torch.Tensor) -> float:
        p = torch.bincount(levels - levels.min()).double()
        p = p[p > 0] / p.sum()
        return float(-(p * p.log2()).sum())

    assert entropy(strong) < entropy(plain) and (strong == 0).sum() > (plain == 0).sum()
    assert (strong - spread / 0.25).abs().max() < 1.0  # only the neighbouring levels or 0 are ever chosen
    with pytest.raises(ValueError, match="step must be a positive number"):
        ptq.levels_of(spread, 0.0)


def test_the_search_takes_the_smallest_file_within_the_limit() -> None:
    """A made-up model: error grows with each step, bytes fall; the search must stop where the limit binds."""
    def measure(setting: ptq.Setting) -> tuple[float, int]:
        error = 10 + 20 * setting["a"] + 5 * setting["b"] + setting.get("lam", 0)
        return error, int(1000 / setting["a"] + 100 / setting["b"] + 10 * (1 - setting.get("lam", 0)))

    setting, error, size = ptq.search(["a", "b"], {"a": 100, "b": 10}, {"a": 0.01, "b": 0.01}, measure, 11.0)
    assert error <= 11.0 and size == measure(setting)[1]
    finer = {k: (v / ptq.STEP_RATIO if k in "ab" else v) for k, v in setting.items()}
    assert measure(finer)[1] > size
    with pytest.raises(ValueError, match="no step keeps the validation error within 9.00 %"):
        ptq.search(["a"], {"a": 1}, {"a": 0.01}, lambda s: (10.0, 1), 9.0)


def test_errors_counts_wrong_answers_and_the_probability_off_the_true_class() -> None:
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[3.0, 0.0], [0.0, 3.0], [3.0, 0.0], [0.0, 0.0]])
    y = torch.tensor([0, 1, 1, 0])
    p_right = float(torch.tensor([3.0, 0.0]).softmax(0)[0])
    top1, expected = ptq.errors(model, [(x[:2], y[:2]), (x[2:], y[2:])])
    assert top1 == pytest.approx(100 * 1 / 4)  # the third is wrong; the fourth a tie, argmax 0: right
    assert expected == pytest.approx(100 * (2 * (1 - p_right) + p_right + 0.5) / 4, rel=1e-6)


@pytest.mark.slow  # ~35 s: a tiny run, then ~30 measured trials
def test_dcz_encode_budget_writes_a_smaller_file_within_it(tmp_path: Path, idx_dir: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config(idx_dir, tmp_path / "runs", max_epochs=2)
    cfg["trainer"]["callbacks"] = {"IterativePruning": {"keep_ratio": {"fc1": 0.08, "fc2": 0.09, "fc3": 0.26}}}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert train.main(["-c", str(tmp_path / "c.json")]) == 0
    (run,) = sorted((tmp_path / "runs" / "tiny").iterdir())
    out = tmp_path / "ptq.dcz"
    assert dcz.main(["encode", str(run / "best.ckpt"), "--budget", "1", "--out", str(out), "--val-batches", "1"]) == 0
    printed = capsys.readouterr().out
    assert "post-training: validation top-1 error" in printed and out.stat().st_size < (run / "model.dcz").stat().st_size
    report = json.loads((tmp_path / "compression_report.json").read_text())
    done = report["post_training"]
    assert done["val_expected_err"] <= done["val_expected_err_before"] + 1  # the budget bounds the expected error
    decoded, header = dcz.read_compressed(out)
    assert {t.get("codec") for t in header["tensors"]} == {"ctx-v1"}
    assert test.main(["-r", str(out), "--json", "--set", f"data_loader.args.data_dir={idx_dir}"]) == 0
    assert dcz.main(["encode", str(run / "best.ckpt"), "--budget", "-1"]) == 2
    assert "--budget must be >= 0" in capsys.readouterr().err
