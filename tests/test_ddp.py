"""Two-process DDP on CPU (gloo): one run folder, masks and codebooks agreed, the file written once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT, tiny_config


@pytest.mark.slow
def test_prune_and_quantize_under_ddp_with_two_processes(tmp_path: Path, idx_dir: Path) -> None:
    # strategy "auto" with 2 devices: Lightning picks DDP itself (the codebooks must work under any DDP name)
    cfg = tiny_config(idx_dir, tmp_path / "runs", max_epochs=2, devices=2, strategy="auto")
    cfg["trainer"]["callbacks"] = {"IterativePruning": {"keep_ratio": 0.1}, "Quantization": {"bits": 4, "epoch": 1}}
    (tmp_path / "ddp.json").write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "-c", str(tmp_path / "ddp.json")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = sorted((tmp_path / "runs" / "tiny").iterdir())  # the second rank joined the first's folder
    ckpt = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    for name, mask in ckpt["masks"].items():
        w = ckpt["state_dict"][f"model.{name}"]
        assert int(mask.sum()) == round(0.1 * mask.numel()) and torch.count_nonzero(w[~mask]) == 0
        assert len(torch.unique(w[mask])) <= 16
    assert (run / "model.dcz").is_file()
