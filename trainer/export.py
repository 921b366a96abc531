"""Our models <-> ``.dcz`` files: a trained checkpoint exported to ``model.dcz`` + its report, and the
file read back into one of ``models.MODELS``.

The file format and its codec are ``compression.model_file`` (which knows no model); this module binds
them to the project's architectures and to the checkpoints ``LitClassifier`` writes (network weights,
masks, codebooks and indices: ``CompressionState.tensors_of``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compression.atomic import atomic_write_bytes, atomic_write_text
from compression.model_file import IndexBitsSpec, is_compressed_file
from compression.model_file import read_compressed as _read_compressed
from compression.model_file import save_compressed as _save_compressed
from compression.onnx_export import to_onnx
from compression.report import to_markdown
from data import DATAMODULES
from models import MODELS
from trainer.compression_state import CompressionState
from trainer.lit_model import check_checkpoint, network_state
from utils import load_checkpoint

__all__ = ["encode_checkpoint", "export_onnx", "input_shape", "is_compressed_file", "load_compressed",
           "read_compressed", "save_compressed", "weights_digest"]


def save_compressed(model: nn.Module, path: str | Path, *, arch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """``compression.model_file.save_compressed`` for one of ``models.MODELS`` (``arch["type"]`` checked)."""
    if arch.get("type") not in MODELS:
        raise ValueError(f"arch type {arch.get('type')!r} is not one of {', '.join(MODELS)}")
    return _save_compressed(model, path, arch=arch, **kwargs)


def read_compressed(path: str | Path, sparse: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The model stored in a ``.dcz`` file (one of ``models.MODELS``, in eval mode) and the file's header.

    Args:
        sparse: Pruned ``Linear`` layers as ``SparseLinear`` (CSR, built from the file's positions; for
            inference only: the model refuses to run in training mode).

    Raises:
        compression.model_file.CompressedFileError: missing, truncated, corrupt or foreign file.
    """
    return _read_compressed(path, MODELS, sparse=sparse)


def load_compressed(path: str | Path, sparse: bool = False) -> nn.Module:
    """The model stored in a ``.dcz`` file (see ``read_compressed``)."""
    return read_compressed(path, sparse)[0]


def input_shape(path: str | Path, header: dict) -> list[int]:
    """One sample's shape: from the header, else from the dataset it names (files written before it was stored).

    Raises:
        ValueError: neither is there.
    """
    given = header.get("input", {}).get("shape") if isinstance(header.get("input"), dict) else None
    if isinstance(given, list) and given and all(isinstance(d, int) and d > 0 for d in given):
        return given
    evaluation = header.get("eval") if isinstance(header.get("eval"), dict) else {}
    dataset = (evaluation.get("data_loader") or {}).get("type") if isinstance(evaluation.get("data_loader"),
                                                                             dict) else None
    if dataset in DATAMODULES:
        return list(DATAMODULES[dataset].input_shape)
    raise ValueError(f"{path} does not say what input its model takes (no input.shape, no known dataset)")


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state (names, dtypes, shapes, bytes in order): what a ``.dcz`` promises to decode to."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def export_onnx(path: str | Path, out: str | Path, form: str = "compact") -> int:
    """Writes the model of a ``.dcz`` file as ONNX (``compression.onnx_export``: ``dense`` float32, or ``compact``,
    quantized weights as indices into their values), for inputs of any batch size; returns the bytes written.

    Raises:
        compression.model_file.CompressedFileError: the file cannot be read. ValueError: an unknown form, or a file
            that does not say what input its model takes. OSError: ``out`` cannot be written (nothing half-written).
    """
    model, header = read_compressed(path)
    data = to_onnx(model, input_shape(path, header), form)
    atomic_write_bytes(out, data)
    return len(data)


def encode_checkpoint(ckpt_path: str | Path, out: str | Path | None, arch: Mapping[str, Any],
                      metadata: Mapping[str, Any], index_bits: IndexBitsSpec, codec: str, raw_dtype: str
                      ) -> tuple[Path, dict]:
    """Writes ``model.dcz``, ``compression_report.md`` and ``.json`` for a (pruned / quantized) checkpoint.

    Args:
        ckpt_path: A checkpoint written by train.py.
        out: The ``.dcz`` path (None: ``model.dcz`` beside the checkpoint); the reports go beside it.
        arch: ``{"type": one of models.MODELS, "args": {...}}``: the network the checkpoint holds.
        metadata: Header fields beside the tensors (class names, input normalisation, evaluation settings).
        index_bits: Relative-index width (``export.index_bits``: a number, ``"auto"`` or by type).
        codec: Entropy coder, a key of ``compression.model_codec.CODECS`` (``export.codec``).
        raw_dtype: ``export.raw_dtype`` (``"float32"``, or ``"float16"``: unmasked tensors rounded, half the bytes).

    Returns:
        (path of the .dcz file, report).

    Raises:
        CheckpointError: a missing or unreadable checkpoint. ValueError: weights that do not fit ``arch``.
    """
    ckpt = load_checkpoint(ckpt_path, mmap=True)  # the optimizer state is never read
    arch = {"type": arch["type"], "args": dict(arch["args"])}
    if arch["type"] not in MODELS:
        raise ValueError(f"{ckpt_path}: unknown architecture {arch['type']!r}")
    check_checkpoint(ckpt, ckpt_path)
    ckpt.pop("optimizer_states", None)  # momentum etc.: as large as the weights, and not part of the file
    with torch.device("meta"):  # no random init of weights about to be replaced, no second copy of them
        model = MODELS[arch["type"]](**arch["args"])
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    try:  # the checkpoint's tensors become the model's (cast only where a run trained in another dtype)
        model.load_state_dict({k: v.to(dtypes.get(k, v.dtype)) for k, v in network_state(ckpt).items()},
                              assign=True)
    except RuntimeError as err:
        raise ValueError(f"{ckpt_path} does not fit {arch['type']}: {str(err).splitlines()[0][:200]}") from None
    masks, codebooks, indices = CompressionState.tensors_of(ckpt)
    out = Path(out) if out is not None else Path(ckpt_path).with_name("model.dcz")
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        report = save_compressed(model, out, arch=arch, masks=masks, codebooks=codebooks, indices=indices,
                                 index_bits=index_bits, metadata=dict(metadata), codec=codec,
                                 raw_dtype=raw_dtype)
    report["source"] = {"checkpoint": str(ckpt_path), "file": str(out)}
    atomic_write_text(out.with_name("compression_report.md"), to_markdown(report, f"Compression report: {out.name}"))
    atomic_write_text(out.with_name("compression_report.json"), json.dumps(report, indent=2) + "\n")
    return out, report
