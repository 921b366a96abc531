"""Our models <-> ``.dcz`` files: a trained checkpoint exported to ``model.dcz`` + its report, and the
file read back into one of ``models.MODELS``.

The file format and its codec are ``compression.model_file`` (which knows no model); this module binds
them to the project's architectures and to the checkpoints ``LitClassifier`` writes (network weights,
masks, codebooks and indices: ``CompressionState.tensors_of``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compression.atomic import atomic_write_text
from compression.model_codec import DEFAULT_CODEC
from compression.model_file import IndexBits, is_compressed_file
from compression.model_file import read_compressed as _read_compressed
from compression.model_file import save_compressed as _save_compressed
from compression.report import to_markdown
from data import DATAMODULES
from models import MODELS
from trainer.compression_state import CompressionState
from trainer.lit_model import network_state
from utils import load_checkpoint

__all__ = ["encode_checkpoint", "is_compressed_file", "load_compressed", "read_compressed", "save_compressed"]


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


# Where the data is and whether to download it are the evaluating user's to say, never the file's: a file
# that named a folder would decide where test.py writes, and would leak the training machine's paths.
MACHINE_KEYS = ("data_dir", "download")


def file_metadata(config: Mapping[str, Any]) -> dict[str, Any]:
    """Header fields beside the tensors: class count and names, input normalisation, and what test.py
    needs to evaluate the file (the dataset it was trained on, without ``MACHINE_KEYS``); the training
    settings stay out."""
    datamodule = DATAMODULES[config["data_loader"]["type"]]
    evaluation = {key: config[key] for key in ("name", "loss", "metrics") if key in config}
    args = {k: v for k, v in config["data_loader"].get("args", {}).items() if k not in MACHINE_KEYS}
    evaluation["data_loader"] = {"type": config["data_loader"]["type"], "args": args}
    return {"num_classes": config["arch"]["args"].get("num_classes"), "class_names": list(datamodule.classes),
            "eval": evaluation, "input": {"mean": list(datamodule.mean), "std": list(datamodule.std),
                                             "shape": list(datamodule.input_shape)}}


def encode_checkpoint(ckpt_path: str | Path, out: str | Path | None, index_bits: IndexBits,
                      codec: str | None = None, raw_dtype: str | None = None) -> tuple[Path, dict]:
    """Writes ``model.dcz``, ``compression_report.md`` and ``.json`` for a (pruned / quantized) checkpoint.

    Args:
        ckpt_path: A checkpoint written by train.py.
        out: The ``.dcz`` path (None: ``model.dcz`` beside the checkpoint); the reports go beside it.
        index_bits: Relative-index width (``export.index_bits`` of the config: a number, ``"auto"`` or by type).
        codec: Entropy coder (``export.codec``: ``"huffman"``, the paper's, or ``"range"``); None: the one the
            checkpoint's own config names (a config written before the option existed: ``"huffman"``).
        raw_dtype: ``export.raw_dtype`` (``"float32"``, or ``"float16"``: unmasked tensors rounded, half the
            bytes); None: the checkpoint's own config's (``"float32"`` before the option existed).

    Returns:
        (path of the .dcz file, report).

    Raises:
        CheckpointError: a missing or unreadable checkpoint. ValueError: one not written by train.py.
    """
    ckpt = load_checkpoint(ckpt_path, mmap=True)  # the optimizer state is never read
    config = ckpt.get("config")
    if not isinstance(config, dict):
        raise ValueError(f"{ckpt_path} holds no config: it was not written by train.py")
    arch = {"type": config["arch"]["type"], "args": config["arch"]["args"]}
    if arch["type"] not in MODELS or config.get("data_loader", {}).get("type") not in DATAMODULES:
        raise ValueError(f"{ckpt_path}: its config names an unknown architecture or dataset "
                         f"({arch['type']!r}, {config.get('data_loader', {}).get('type')!r})")
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
    stored = config.get("export") if isinstance(config.get("export"), dict) else {}
    if codec is None:  # the run's own choice; save_compressed refuses a name it does not know
        codec = stored.get("codec", DEFAULT_CODEC)
    if raw_dtype is None:
        raw_dtype = stored.get("raw_dtype", "float32")
    out = Path(out) if out is not None else Path(ckpt_path).with_name("model.dcz")
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        report = save_compressed(model, out, arch=arch, masks=masks, codebooks=codebooks, indices=indices,
                                 index_bits=index_bits, metadata=file_metadata(config), codec=codec,
                                 raw_dtype=raw_dtype)
    report["source"] = {"checkpoint": str(ckpt_path), "file": str(out)}
    atomic_write_text(out.with_name("compression_report.md"), to_markdown(report, f"Compression report: {out.name}"))
    atomic_write_text(out.with_name("compression_report.json"), json.dumps(report, indent=2) + "\n")
    return out, report
