"""The ``.dcz`` compressed model file: write it, read it back, and the ``encode`` command.

    python dcz.py encode runs/<name>/<ts>/best.ckpt [--out model.dcz] [--index-bits 5]

Python API::

    from dcz import load_compressed, save_compressed
    model = load_compressed("model.dcz")             # a plain nn.Module, weights bit-identical to the encoded ones
    report = save_compressed(model, "model.dcz", arch={"type": "LeNet300", "args": {"num_classes": 10}},
                             masks=masks, codebooks=codebooks, indices=indices)

The file (``compression.container``): magic + version, a JSON header (architecture and its arguments,
input normalisation, class count and names, the data and metrics to evaluate it with, one entry per tensor)
and CRC32-checked sections (``compression.model_codec``). No pickle anywhere; reading validates every size
before allocating.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compression.container import MAGIC, ContainerError, read_container, write_container
from compression.model_codec import decode_tensor, encode_tensor
from compression.report import build_report, to_markdown
from models import MODELS

AUTO_INDEX_BITS = range(2, 13)  # widths tried by index_bits="auto"
MAX_PARAMETERS = 1 << 31  # a header declaring more than 2G weights (8 GiB) is not one of ours


class CompressedFileError(ValueError):
    """A ``.dcz`` file that cannot be read: the message names the file, the part and what was expected."""


def save_compressed(model: nn.Module, path: str | Path, *, arch: dict[str, Any],
                    masks: dict[str, torch.Tensor] | None = None, codebooks: dict[str, torch.Tensor] | None = None,
                    indices: dict[str, torch.Tensor] | None = None, index_bits: int | str | dict[str, Any] = 5,
                    metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Writes ``model`` as a ``.dcz`` file (atomically) and returns the compression report.

    Args:
        model: The network whose ``state_dict`` is stored (weights already pruned / quantized).
        path: Output file.
        arch: ``{"type": name in models.MODELS, "args": {...}}``: how the decoder rebuilds the model.
        masks: Pruning masks by parameter name; those tensors are stored sparse.
        codebooks, indices: Shared values and centroid indices by parameter name (quantized tensors).
        index_bits: Bits of a relative position before Huffman coding: one number, ``"auto"`` (per tensor,
            the width in 2..12 with the smallest coded size), or ``{"Conv2d": 8, "Linear": "auto"}`` by type.
        metadata: Extra header fields (``input`` normalisation, ``class_names``, ``config``...).

    Returns:
        The report (``compression.report.build_report``) measured on the written file.
    """
    masks, codebooks, indices = masks or {}, codebooks or {}, indices or {}
    if arch.get("type") not in MODELS:
        raise ValueError(f"arch type {arch.get('type')!r} is not one of {', '.join(MODELS)}")
    kinds = {f"{n}.weight": type(m).__name__ for n, m in model.named_modules()}
    entries, sections, stats = [], [], []
    for name, tensor in model.state_dict().items():
        bits = index_bits if not isinstance(index_bits, dict) else index_bits.get(kinds.get(name, ""), 5)
        args = (name, tensor, masks.get(name), codebooks.get(name), indices.get(name))
        if bits == "auto":  # beyond the paper: the width that gives this tensor the smallest coded size
            entry, parts, stat = min((encode_tensor(*args, b) for b in AUTO_INDEX_BITS), key=lambda e: e[2].bytes)
        else:
            entry, parts, stat = encode_tensor(*args, bits)
        entries.append(entry)
        sections += parts
        stats.append(stat)
    header = {"format": "deep-compression", "arch": arch, "tensors": entries, **(metadata or {})}
    size = write_container(path, header, sections)
    dense = sum(p.numel() for p in model.parameters())
    header_bytes = len(json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode())
    return build_report(stats, size, dense, header_bytes)


def read_compressed(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuilds the model stored in a ``.dcz`` file from the file alone.

    Returns:
        (model in eval mode, header).

    Raises:
        CompressedFileError: missing, truncated, corrupt or foreign file, or a header that does not
            describe one of our models.
    """
    try:
        header, sections = read_container(path)
    except ContainerError as err:
        raise CompressedFileError(str(err)) from None
    model = _empty_model(path, header)
    expected = model.state_dict()
    by_name = dict(sections)
    state = {}
    for entry in header["tensors"]:
        name = entry.get("name") if isinstance(entry, dict) else None
        if name not in expected or list(expected[name].shape) != entry.get("shape"):
            raise CompressedFileError(f"{path}: tensor {name!r} does not belong to {header['arch']['type']}")
        try:
            state[name] = decode_tensor(entry, by_name)
        except ValueError as err:
            raise CompressedFileError(f"{path}: {err}") from None
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CompressedFileError(f"{path}: tensors missing from the file: {', '.join(missing[:5])}")
    model.load_state_dict(state)
    return model.eval(), header


def is_compressed_file(path: str | Path) -> bool:
    """True for a ``.dcz`` path or a file starting with the container's magic bytes."""
    path = Path(path)
    if path.suffix == ".dcz":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def load_compressed(path: str | Path) -> nn.Module:
    """The model stored in a ``.dcz`` file (see ``read_compressed``)."""
    return read_compressed(path)[0]


def _empty_model(path: str | Path, header: dict[str, Any]) -> nn.Module:
    """Builds the declared architecture after checking, on the meta device, that its size is sane."""
    arch = header.get("arch")
    if not isinstance(arch, dict) or arch.get("type") not in MODELS or not isinstance(arch.get("args", {}), dict):
        raise CompressedFileError(f"{path}: header names no known architecture (got {str(arch)[:100]}); "
                                  f"known: {', '.join(MODELS)}")
    if not isinstance(header.get("tensors"), list):
        raise CompressedFileError(f"{path}: header has no tensor table")
    try:
        with torch.device("meta"):  # no memory: a hostile num_classes cannot make us allocate
            meta = MODELS[arch["type"]](**arch.get("args", {}))
    except (TypeError, ValueError) as err:
        raise CompressedFileError(f"{path}: cannot build {arch['type']} with {arch.get('args')}: {err}") from None
    count = sum(math.prod(t.shape) for t in meta.state_dict().values())
    if count > MAX_PARAMETERS:
        raise CompressedFileError(f"{path}: header declares {count:,} weights, "
                                  f"more than the {MAX_PARAMETERS:,} allowed")
    return MODELS[arch["type"]](**arch.get("args", {}))


# ------------------------------------------------------------------------------------------ checkpoints
def encode_checkpoint(ckpt_path: str | Path, out: str | Path | None = None,
                      index_bits: int | str | dict[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """Writes ``model.dcz``, ``compression_report.md`` and ``.json`` for a (pruned / quantized) checkpoint.

    Returns:
        (path of the .dcz file, report).
    """
    from data import DATAMODULES
    from utils import load_checkpoint, model_state

    ckpt = load_checkpoint(ckpt_path)
    config = ckpt.get("config")
    if not isinstance(config, dict):
        raise ValueError(f"{ckpt_path} holds no config: it was not written by train.py")
    arch = {"type": config["arch"]["type"], "args": config["arch"]["args"]}
    model = MODELS[arch["type"]](**arch["args"])
    model.load_state_dict(model_state(ckpt))
    key = {n: f"compression.codebooks.{n.replace('.', '__')}" for n in ckpt.get("quant_index", {})}
    codebooks = {n: ckpt["state_dict"][k] for n, k in key.items()}
    datamodule = DATAMODULES[config["data_loader"]["type"]]
    # What test.py needs to evaluate the file (the data it was trained on); the training settings stay out.
    evaluation = {key: config[key] for key in ("name", "data_loader", "loss", "metrics") if key in config}
    metadata = {"num_classes": arch["args"].get("num_classes"), "class_names": list(datamodule.classes),
                "eval": evaluation,
                "input": {"mean": list(datamodule.mean), "std": list(datamodule.std)}}
    bits = index_bits if index_bits is not None else config.get("export", {}).get("index_bits", 5)
    out = Path(out) if out is not None else Path(ckpt_path).with_name("model.dcz")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = save_compressed(model, out, arch=arch, masks=ckpt.get("masks", {}), codebooks=codebooks,
                             indices=ckpt.get("quant_index", {}), index_bits=bits, metadata=metadata)
    report["source"] = {"checkpoint": str(ckpt_path), "file": str(out)}
    _write_text(out.with_name("compression_report.md"), to_markdown(report, f"Compression report: {out.name}"))
    _write_text(out.with_name("compression_report.json"), json.dumps(report, indent=2) + "\n")
    return out, report


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _index_bits(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit() or not 1 <= int(text) <= 16:
        raise argparse.ArgumentTypeError(f"must be 1..16 or 'auto', got {text!r}")
    return int(text)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write the .dcz compressed file of a checkpoint.")
    sub = parser.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="encode a checkpoint into model.dcz + compression_report.{md,json}")
    enc.add_argument("checkpoint", help="a .ckpt written by train.py (pruned and/or quantized)")
    enc.add_argument("--out", default=None, help="output file (default: model.dcz beside the checkpoint)")
    enc.add_argument("--index-bits", type=_index_bits, default=None,
                     help="bits of a relative index before Huffman coding, 1..16 or 'auto' "
                          "(default: the config's export.index_bits)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from utils import CheckpointError

    args = get_args_parser().parse_args(argv)
    try:
        out, report = encode_checkpoint(args.checkpoint, args.out, args.index_bits)
    except (CheckpointError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(to_markdown(report, f"Compression report: {out}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
