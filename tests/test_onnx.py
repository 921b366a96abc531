"""``dcz.py export --onnx``: a ``.dcz`` file's model as ONNX, checked with onnxruntime against our own decode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compression.kmeans import kmeans_1d
from compression.pruning import magnitude_mask
from helpers import load_script
from models import MODELS
from trainer.export import export_onnx, read_compressed, save_compressed

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def compressed_file(path: Path, arch: str, args: dict, shape: tuple[int, ...], keep: float = 0.1, bits: int = 4) -> Path:
    """A ``.dcz`` of ``arch`` with random weights, every Linear/Conv2d pruned to ``keep`` and quantized to ``bits``."""
    torch.manual_seed(0)
    model = MODELS[arch](**args).eval()
    masks, codebooks, indices = {}, {}, {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            weight, key = module.weight, f"{name}.weight"
            mask = magnitude_mask(weight, keep)
            result = kmeans_1d(weight.detach()[mask].double().numpy(), 2 ** bits)
            book, index = torch.from_numpy(result.centroids).float(), torch.from_numpy(result.labels)
            with torch.no_grad():
                weight.zero_()
                weight[mask] = book[index]
            masks[key], codebooks[key], indices[key] = mask, book, index
    save_compressed(model, path, arch={"type": arch, "args": args}, masks=masks, codebooks=codebooks,
                    indices=indices, metadata={"input": {"shape": list(shape)}})
    return path


def run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    return ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0]


CASES = [("LeNet300", {}, (1, 28, 28)), ("LeNet5", {}, (1, 28, 28)),
         ("VGG16CIFAR", {"num_classes": 100}, (3, 32, 32))]


@pytest.mark.parametrize(("arch", "args", "shape"), CASES, ids=[c[0] for c in CASES])
def test_both_forms_run_in_onnxruntime_as_our_decode_does(tmp_path: Path, arch: str, args: dict,
                                                          shape: tuple[int, ...]) -> None:
    dcz = compressed_file(tmp_path / "m.dcz", arch, args, shape)
    decoded, _ = read_compressed(dcz)
    sizes = {form: export_onnx(dcz, tmp_path / f"{form}.onnx", form) for form in ("dense", "compact")}
    for batch in (1, 5):  # the batch dimension is dynamic
        x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            ours = decoded(x).numpy()
        for form in sizes:
            theirs = run_onnx(tmp_path / f"{form}.onnx", x)
            assert theirs.shape == ours.shape and np.abs(theirs - ours).max() < 1e-5, form
            assert (theirs.argmax(1) == ours.argmax(1)).all(), form  # the same predictions: the same error
    # compact: one byte per weight and its values, against float32's four
    assert sizes["compact"] * 3 < sizes["dense"] and sizes["dense"] == (tmp_path / "dense.onnx").stat().st_size


def test_the_compact_form_stores_the_weights_bit_exactly(tmp_path: Path) -> None:
    from onnx import numpy_helper

    dcz = compressed_file(tmp_path / "m.dcz", "LeNet5", {}, (1, 28, 28))
    decoded, _ = read_compressed(dcz)
    export_onnx(dcz, tmp_path / "c.onnx", "compact")
    stored = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "c.onnx")).graph.initializer}
    for name, weight in decoded.state_dict().items():
        if not name.endswith("weight"):
            continue
        layer = name.removesuffix(".weight")
        values, index = stored[f"{layer}.values"], stored[f"{layer}.index"]
        assert index.dtype == np.uint8 and index.shape == tuple(weight.shape) and len(values) <= 17  # 16 + the zero
        assert np.array_equal(values[index.astype(np.int64)].view(np.int32), weight.numpy().view(np.int32)), name


def test_dcz_export_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dcz = load_script("dcz")
    path = compressed_file(tmp_path / "m.dcz", "LeNet300", {}, (1, 28, 28))
    assert dcz.main(["export", str(path), "--onnx", str(tmp_path / "m.onnx")]) == 0
    assert f"wrote {tmp_path / 'm.onnx'}:" in capsys.readouterr().out and (tmp_path / "m.onnx").is_file()
    (tmp_path / "bad.dcz").write_bytes(path.read_bytes()[:100])
    assert dcz.main(["export", str(tmp_path / "bad.dcz"), "--onnx", str(tmp_path / "bad.onnx")]) == 2
    assert capsys.readouterr().err.startswith("error: ") and not (tmp_path / "bad.onnx").exists()


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "shape"), [("AlexNet", (3, 224, 224)), ("VGG16", (3, 224, 224))])
def test_the_big_models_export_too(tmp_path: Path, arch: str, shape: tuple[int, ...]) -> None:
    dcz = compressed_file(tmp_path / "m.dcz", arch, {"num_classes": 10}, shape)
    decoded, _ = read_compressed(dcz)
    export_onnx(dcz, tmp_path / "c.onnx", "compact")
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = decoded(x).numpy()
    assert np.abs(run_onnx(tmp_path / "c.onnx", x) - ours).max() < 1e-4
