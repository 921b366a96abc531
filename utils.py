"""Small helpers shared by the scripts: reading checkpoints safely, counting parameters."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint path that does not exist or is not one of our checkpoints."""


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads a Lightning checkpoint on the CPU without executing code (``weights_only=True``).

    Raises:
        CheckpointError: missing file, unreadable file, or no ``state_dict`` inside.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (not a zip archive; truncated or another format)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} could not be loaded safely (weights_only=True): {first}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a training checkpoint (no 'state_dict' inside)")
    return ckpt


def layer_sparsity(model: nn.Module) -> list[dict[str, Any]]:
    """Per ``Linear``/``Conv2d`` weight: name, shape, total, non-zero, % kept and std (Distiller's summary)."""
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            w = module.weight.detach()
            nonzero = int(torch.count_nonzero(w))
            rows.append({"name": name, "shape": list(w.shape), "total": w.numel(), "nonzero": nonzero,
                         "kept_pct": 100.0 * nonzero / w.numel(), "std": float(w.float().std())})
    return rows


def format_sparsity(rows: list[dict[str, Any]]) -> str:
    """The per-layer sparsity table as aligned text."""
    width = max([len(r["name"]) for r in rows] + [5])
    lines = [f"  {'layer':<{width}}  {'shape':<18} {'total':>12} {'non-zero':>12} {'% kept':>8} {'std':>9}"]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"  {r['name']:<{width}}  {shape:<18} {r['total']:>12,} {r['nonzero']:>12,} "
                     f"{r['kept_pct']:>8.2f} {r['std']:>9.4f}")
    return "\n".join(lines)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Returns (total, non-zero) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    return total, nonzero
