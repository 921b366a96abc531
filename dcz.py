"""The ``.dcz`` compressed model file from the command line, and its Python API for users.

    python dcz.py encode runs/<name>/<ts>/best.ckpt [--out model.dcz] [--index-bits 5]

Python API (re-exported from ``trainer/export.py``, which binds ``compression/model_file.py`` to our
models)::

    from dcz import load_compressed, read_compressed, save_compressed
    model = load_compressed("model.dcz")             # a plain nn.Module, weights bit-identical to the encoded ones
    model, header = read_compressed("model.dcz")     # header: arch, class names, input normalisation, tensors
    report = save_compressed(model, "model.dcz", arch={"type": "LeNet300", "args": {"num_classes": 10}},
                             masks=masks, codebooks=codebooks, indices=indices)
"""

from __future__ import annotations

import argparse
import sys

from compression.model_file import CompressedFileError, IndexBits
from compression.report import to_markdown
from compression.sparse_index import MAX_INDEX_BITS
from parse_config import ConfigError, parse_config
from trainer.export import encode_checkpoint, is_compressed_file, load_compressed, read_compressed, save_compressed
from utils import CheckpointError, load_checkpoint

__all__ = ["CompressedFileError", "is_compressed_file", "load_compressed", "read_compressed", "save_compressed"]


def _index_bits(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit() or not 1 <= int(text) <= MAX_INDEX_BITS:
        raise argparse.ArgumentTypeError(f"must be 1..{MAX_INDEX_BITS} or 'auto', got {text!r}")
    return int(text)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write the .dcz compressed file of a checkpoint.")
    sub = parser.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="encode a checkpoint into model.dcz + compression_report.{md,json}")
    enc.add_argument("checkpoint", help="a .ckpt written by train.py (pruned and/or quantized)")
    enc.add_argument("--out", default=None, help="output file (default: model.dcz beside the checkpoint)")
    enc.add_argument("--index-bits", type=_index_bits, default=None,
                     help=f"bits of a relative index before Huffman coding, 1..{MAX_INDEX_BITS} or 'auto' "
                          "(default: the checkpoint's config's export.index_bits)")
    return parser


def stored_index_bits(ckpt_path: str) -> IndexBits:
    """``export.index_bits`` of the config stored in a checkpoint, validated like any config.

    Raises:
        CheckpointError: unreadable checkpoint. ConfigError: it holds no valid config.
    """
    config = load_checkpoint(ckpt_path).get("config")
    if not isinstance(config, dict):
        raise ConfigError(f"{ckpt_path} holds no config (not written by train.py): pass --index-bits")
    return parse_config(config).export.index_bits


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        bits = args.index_bits if args.index_bits is not None else stored_index_bits(args.checkpoint)
        out, report = encode_checkpoint(args.checkpoint, args.out, bits)
    except (CheckpointError, ConfigError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(to_markdown(report, f"Compression report: {out}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
