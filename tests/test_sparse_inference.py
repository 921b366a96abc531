"""Sparse inference from the .dcz: CSR layers built from the file's positions give the dense decode's
predictions for every model family, refuse training, and are reachable from test.py and dcz.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from compression.kmeans import kmeans_1d
from compression.pruning import magnitude_mask
from compression.sparse import SparseLinear, csr_from_positions
from helpers import load_script
from models import MODELS
from trainer.export import read_compressed, save_compressed

dcz = load_script("dcz")
test = load_script("test")


def test_csr_from_positions_by_hand() -> None:
    # A 2x3 matrix with 5 at (0, 1), 7 at (1, 0) and a filler (value 0) at (1, 2): row-major positions 1, 3, 5.
    csr = csr_from_positions(np.array([1, 3, 5]), np.array([5.0, 7.0, 0.0], np.float32), (2, 3))
    assert torch.equal(csr.to_dense(), torch.tensor([[0.0, 5.0, 0.0], [7.0, 0.0, 0.0]]))
    assert csr.values().numel() == 2  # the filler is not stored
    with pytest.raises(ValueError, match="strictly ascending"):
        csr_from_positions(np.array([3, 1]), np.array([1.0, 2.0], np.float32), (2, 3))


def compress(model: nn.Module, keep: float) -> dict[str, dict[str, torch.Tensor]]:
    """Prunes and quantizes (16 values) every Linear except the last; the first Linear is pruned away
    entirely and, when there are three or more, the second is left dense. Conv layers: pruned to 50 %."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    state: dict[str, dict[str, torch.Tensor]] = {"masks": {}, "codebooks": {}, "indices": {}}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for layer in [*convs, *linears[:-1]]:
            if len(linears) >= 3 and layer == linears[1]:
                continue  # left dense
            w = params[f"{layer}.weight"]
            if layer == linears[0]:
                mask = torch.zeros_like(w, dtype=torch.bool)  # pruned away entirely
            else:
                mask = magnitude_mask(w, 0.5 if layer in convs else keep)
            w.masked_fill_(~mask, 0.0)
            state["masks"][f"{layer}.weight"] = mask
            if mask.any():
                result = kmeans_1d(w[mask].double().numpy(), 16)
                book, index = torch.from_numpy(result.centroids).float(), torch.from_numpy(result.labels)
                w[mask] = book[index]
                state["codebooks"][f"{layer}.weight"], state["indices"][f"{layer}.weight"] = book, index
    return state


@pytest.mark.parametrize(("arch", "args", "shape"), [
    ("LeNet300", {}, (1, 28, 28)), ("LeNet5", {}, (1, 28, 28)),
    ("AlexNet", {"num_classes": 10}, (3, 224, 224)), ("VGG16CIFAR", {"num_classes": 10}, (3, 32, 32)),
])
def test_sparse_and_dense_decodes_agree(tmp_path: Path, arch: str, args: dict[str, Any],
                                        shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = MODELS[arch](**args).eval()
    path = tmp_path / "m.dcz"
    save_compressed(model, path, arch={"type": arch, "args": args}, **compress(model, 0.1))
    dense, _ = read_compressed(path)
    sparse, _ = read_compressed(path, sparse=True)
    kinds = {n: type(m).__name__ for n, m in sparse.named_modules() if isinstance(m, (nn.Linear, SparseLinear))}
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert kinds[linears[0]] == "SparseLinear" and kinds[linears[-1]] == "Linear"  # pruned: CSR; dense: as is
    if len(linears) >= 3:
        assert kinds[linears[1]] == "Linear"
    x = torch.randn(4, *shape)
    with torch.no_grad():
        a, b = dense(x), sparse(x)
    assert torch.equal(a.argmax(1), b.argmax(1)) and torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_the_sparse_model_refuses_training(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MODELS["LeNet300"]()
    save_compressed(model, tmp_path / "m.dcz", arch={"type": "LeNet300", "args": {}}, **compress(model, 0.1))
    sparse, _ = read_compressed(tmp_path / "m.dcz", sparse=True)
    sparse.train()
    with pytest.raises(RuntimeError, match="SparseLinear is for inference"):
        sparse(torch.randn(1, 1, 28, 28))


def test_test_py_sparse_and_dcz_info_and_bench(tmp_path: Path, idx_dir: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from helpers import tiny_config

    torch.manual_seed(0)
    model = MODELS["LeNet300"]()
    from builders import file_metadata
    from parse_config import parse_config

    save_compressed(model, tmp_path / "m.dcz", arch={"type": "LeNet300", "args": {}}, **compress(model, 0.1),
                    metadata=file_metadata(parse_config(tiny_config(idx_dir, tmp_path))))
    results = []
    for flags in ([], ["--sparse"]):
        assert test.main(["-r", str(tmp_path / "m.dcz"), "--json", "--set", f"data_loader.args.data_dir={idx_dir}",
                          *flags]) == 0
        results.append(json.loads(capsys.readouterr().out))
    for key in ("top1_err", "top5_err", "params", "nonzero"):
        assert results[0][key] == pytest.approx(results[1][key], abs=1e-4), key
    assert dcz.main(["info", str(tmp_path / "m.dcz")]) == 0
    out = capsys.readouterr().out
    # fc1 pruned away entirely (stored sparse, nothing to look up), fc2 left dense (raw), fc3 untouched.
    assert "| fc1.weight | sparse | 235,200 | 0.0% |" in out and "| fc2.weight | raw | 30,000 | 100.0% |" in out
    assert dcz.main(["bench", str(tmp_path / "m.dcz"), "--repeats", "3"]) == 0
    assert "| 64 |" in capsys.readouterr().out
    ckpt = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    assert test.main(["-r", str(ckpt), "--sparse"]) == 2


def test_sparse_linear_takes_inputs_like_nn_linear_and_copies() -> None:
    import copy

    torch.manual_seed(0)
    dense = nn.Linear(20, 7).eval()
    with torch.no_grad():
        dense.weight.masked_fill_(~magnitude_mask(dense.weight, 0.3), 0.0)
    w = dense.weight.detach().numpy().ravel()
    sparse = SparseLinear(csr_from_positions(np.flatnonzero(w), w[np.flatnonzero(w)], (7, 20)),
                          dense.bias.detach().clone()).eval()
    for shape in [(20,), (1, 20), (4, 20), (2, 3, 20)]:  # the leading dimensions are kept, as nn.Linear does
        x = torch.randn(*shape)
        with torch.no_grad():
            assert sparse(x).shape == dense(x).shape and torch.allclose(sparse(x), dense(x), atol=1e-6)
    with pytest.raises(RuntimeError, match="input has 10 features, expected 20"):
        sparse(torch.randn(4, 10))
    clone = copy.deepcopy(sparse)  # the CSR parts are buffers: copied, saved and moved like any tensor
    assert torch.equal(clone.weight.to_dense(), dense.weight.detach())
    assert {"crow_indices", "col_indices", "values", "bias"} == set(sparse.state_dict())
