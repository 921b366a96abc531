"""Small helpers shared by the scripts: reading checkpoints safely, counting parameters."""

from __future__ import annotations

import pickle
import pickletools
import re
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint path that does not exist or is not one of our checkpoints."""


# torch writes checkpoint archives uncompressed (ZIP_STORED): what they unpack to is what is on disk. An
# archive whose entries inflate far beyond its size is crafted; it is refused before torch.load reads it.
MAX_INFLATE_BYTES = 64 << 20  # slack over the file's own size (zip directory, alignment padding)
_CHUNK = 16 << 20  # bytes read at a time while checking a member's CRC


def _check_archive(path: Path) -> None:
    """Verifies the zip before torch reads it, whose own reader checks no CRC: every member stored uncompressed
    (as torch writes them), the whole within the file's size, and each member's bytes matching its CRC-32.

    Raises:
        CheckpointError: naming the member that fails.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            limit, unpacked = path.stat().st_size + MAX_INFLATE_BYTES, sum(info.file_size for info in members)
            if unpacked > limit:
                raise CheckpointError(f"{path} would unpack to {unpacked:,} bytes from {path.stat().st_size:,} on "
                                      f"disk (more than {limit:,}): not a checkpoint torch wrote; refused unread")
            for info in members:
                if info.flag_bits & 0x1:  # encrypted: torch never writes it (and zipfile would ask for a password)
                    raise CheckpointError(f"{path}: member {info.filename} is marked encrypted: not a checkpoint "
                                          f"torch wrote; refused")
                if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                    raise CheckpointError(f"{path}: member {info.filename} is compressed or declares "
                                          f"{info.compress_size:,} bytes stored for {info.file_size:,}: not a "
                                          f"checkpoint torch wrote; refused")
                with archive.open(info) as member:  # raises BadZipFile on a CRC or size mismatch
                    while member.read(_CHUNK):
                        pass
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError, NotImplementedError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{path} is corrupt (its bytes do not match the archive's checksums: {err}); "
                              f"use another checkpoint, e.g. the run's best.ckpt or an earlier copy") from None


def check_checkpoint_file(path: str | Path) -> Path:
    """Checks before loading: the file exists, is a zip archive that unpacks to about its size, and every member
    matches its CRC-32 (``_check_archive``).

    Raises:
        CheckpointError: naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (not a zip archive; truncated or another format)")
    _check_archive(path)
    return path


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Loads a Lightning checkpoint on the CPU without executing code (``weights_only=True``).

    ``mmap=True``: tensors are read from the file when used, so what the caller drops (the optimizer state)
    never costs memory; for callers done with the checkpoint before anything can rewrite the file (export).

    Raises:
        CheckpointError: missing file, unreadable file, or no ``state_dict`` inside.
    """
    path = check_checkpoint_file(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError) as err:
        text = str(err).strip()
        if isinstance(err, pickle.UnpicklingError):  # a pickle that would import and call something: name it
            named = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
            what = f"it asks to load the Python object {named.group(1)}" if named else _pickle_globals(path)
            raise CheckpointError(f"{path} was refused: {what}, which weights_only=True blocks (a checkpoint of "
                                  f"ours holds tensors and plain values only)") from None
        first = text.splitlines()[0][:200] if text else type(err).__name__
        raise CheckpointError(f"{path} could not be loaded safely (weights_only=True): {first}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a training checkpoint (no 'state_dict' inside)")
    _check_entries(path, ckpt)
    return ckpt


def _pickle_globals(path: Path) -> str:
    """What a refused checkpoint's pickle asks for, read without running it (``pickletools`` only parses)."""
    names, strings = [], []
    try:
        with zipfile.ZipFile(path) as archive:
            data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except (StopIteration, ValueError, zipfile.BadZipFile, OSError):
        return "its pickle cannot be read"
    foreign = [n for n in dict.fromkeys(names) if n not in _allowed_globals()]
    if foreign:
        return f"it asks to load the Python object{'s' if len(foreign) > 1 else ''} {', '.join(foreign[:5])}"
    return "its pickle uses instructions outside what a checkpoint needs"


def _allowed_globals() -> set[str]:
    """The objects ``torch.load(weights_only=True)`` admits, as ``module.name`` (torch's own list where it has one)."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
        allowed = set(_get_allowed_globals())
    except (ImportError, AttributeError):  # another torch: the objects our checkpoints use
        allowed = {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch.FloatStorage"}
    return allowed | {f"{g.__module__}.{g.__name__}" for g in torch.serialization.get_safe_globals()
                      if hasattr(g, "__module__") and hasattr(g, "__name__")}


def _check_entries(path: Path, ckpt: dict[str, Any]) -> None:
    """The entries our code reads have the types it expects (a crafted file gets one clear error)."""
    for key in ("state_dict", "masks", "quant_index"):
        value = ckpt.get(key, {})
        if not isinstance(value, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in value.items()):
            raise CheckpointError(f"{path} is not a training checkpoint: {key!r} must map names to tensors")
    for key in ("epoch", "global_step"):
        if key in ckpt and (not isinstance(ckpt[key], int) or isinstance(ckpt[key], bool) or ckpt[key] < 0):
            raise CheckpointError(f"{path} is not a training checkpoint: {key!r} must be a count, got {ckpt[key]!r}")
    if "config" in ckpt and not isinstance(ckpt["config"], dict):
        raise CheckpointError(f"{path} is not a training checkpoint: 'config' must be an object")


def _csr_weight(module: nn.Module) -> torch.Tensor | None:
    """The CSR weight of a sparse inference layer (``compression.sparse.SparseLinear``), else None."""
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) and weight.layout == torch.sparse_csr else None


def layer_sparsity(model: nn.Module) -> list[dict[str, Any]]:
    """Per ``Linear``/``Conv2d`` weight (dense or CSR): name, shape, total, non-zero, % kept and std
    (Distiller's summary)."""
    rows = []
    for name, module in model.named_modules():
        csr = _csr_weight(module)
        if csr is not None:  # std over all entries, the zeros included, as for a dense weight
            values, total = csr.values().double(), csr.shape[0] * csr.shape[1]
            nonzero, mean = int(torch.count_nonzero(values)), float(values.sum()) / total
            var = (float((values ** 2).sum()) - total * mean ** 2) / max(total - 1, 1)
            rows.append({"name": name, "shape": list(csr.shape), "total": total, "nonzero": nonzero,
                         "kept_pct": 100.0 * nonzero / total, "std": max(var, 0.0) ** 0.5})
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
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
    """Returns (total, non-zero) parameter counts (a sparse layer's CSR weight and bias count as its dense
    ``Linear``'s would)."""
    tensors = list(model.parameters())
    total = sum(p.numel() for p in tensors)
    nonzero = sum(int(torch.count_nonzero(p)) for p in tensors)
    for module in model.modules():
        csr = _csr_weight(module)
        if csr is not None:
            bias = getattr(module, "bias", None)
            total += csr.shape[0] * csr.shape[1] + (bias.numel() if bias is not None else 0)
            nonzero += int(torch.count_nonzero(csr.values())) + (int(torch.count_nonzero(bias)) if bias is not None
                                                                 else 0)
    return total, nonzero


ROOT = Path(__file__).resolve().parent


def commit_id(root: Path = ROOT) -> str:
    """``git rev-parse --short HEAD`` of the code in ``root``, ``+dirty`` with changes to tracked files,
    ``unknown`` without git (or outside a repository): the code a run or a table was made with."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()
    try:
        sha, changes = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if changes else "")
