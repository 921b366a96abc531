"""AlexNet and VGG-16 through their shipped one-file recipes on tiny generated data (the big-models issue's
CPU part): pruning at the paper's per-layer ratios, dropout adjusted, conv 8 / fc 5 bits, the .dcz written and
decoded bit-exactly. Slow (a 61M-parameter model's checkpoints are written every epoch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import ROOT, load_ckpt, load_script
from trainer.export import read_compressed

train = load_script("train")
WNIDS = ("n01440764", "n02102040", "n02979186", "n03000684", "n03028079", "n03394916", "n03417042", "n03425413",
         "n03445777", "n03888605")  # Imagenette's classes, ImageFolder's (sorted) label order


def imagenette_tree(root: Path, per_class: int = 3) -> Path:
    """``train/`` and ``val/`` ImageFolder trees of small PNGs, one colour cast per class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 1)):
        for c, wnid in enumerate(WNIDS):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
                pixels[:, :, c % 3] = 25 * c
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.mark.slow
def test_alexnet_recipe_end_to_end_on_a_tiny_imagenette(tmp_path: Path) -> None:
    data = imagenette_tree(tmp_path / "imagenette2")
    # The shipped recipe, its epochs shrunk: dense 0, pruning (one step to the paper's ratios) 1, quantization 2.
    overrides = {"data_loader.args.data_dir": str(data), "data_loader.args.batch_size": 8,
                 "data_loader.args.num_workers": 0, "trainer.max_epochs": 3, "trainer.save_dir": str(tmp_path / "runs"),
                 "trainer.progress_bar": "none", "trainer.callbacks.IterativePruning.start_epoch": 1,
                 "trainer.callbacks.IterativePruning.end_epoch": 1, "trainer.callbacks.Quantization.epoch": 2,
                 "lr_scheduler.args.milestones": [1, 2]}
    args = ["-c", str(ROOT / "configs" / "alexnet_imagenette_pipeline.json")]
    for key, value in overrides.items():
        args += ["--set", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    assert train.main(args) == 0
    (run,) = sorted((tmp_path / "runs" / "alexnet_imagenette_pipeline").iterdir())
    ckpt = load_ckpt(run / "best.ckpt")
    recipe = json.loads((ROOT / "configs" / "alexnet_imagenette_pipeline.json").read_text())
    keep = recipe["trainer"]["callbacks"]["IterativePruning"]["keep_ratio"]
    for name, mask in ckpt["masks"].items():
        layer = name.split(".")[-2]
        assert int(mask.sum()) == round(keep[layer] * mask.numel()), name  # the paper's ratio, exactly
        w = ckpt["state_dict"][f"model.{name}"]
        assert len(torch.unique(w[mask])) <= (256 if "conv" in layer else 32), name  # conv 8 / fc 5 bits
    # Dropout before fc6 / fc7 scaled from its original 0.5 (Han 2015: D_r = D_o * sqrt(C_ir / C_io)).
    assert ckpt["callbacks"]["IterativePruning"]["dropout_p"] == {"classifier.drop6": 0.5, "classifier.drop7": 0.5}
    decoded, header = read_compressed(run / "model.dcz")
    for name, value in decoded.state_dict().items():
        assert torch.equal(value, ckpt["state_dict"][f"model.{name}"]), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rate"] > 25 and [s["name"] for s in summary["stages"]] == ["dense", "prune", "quantize"]
