"""The ``.dcz`` compressed model file from the command line, and its Python API for users.

    python dcz.py encode runs/<name>/<ts>/best.ckpt [--out model.dcz] [--index-bits 5] [--codec range]
    python dcz.py encode runs/<name>/<ts>/pruned.ckpt --budget 0.1   # post-training: a searched uniform grid
    python dcz.py info model.dcz         # the per-layer table, from the file alone
    python dcz.py export model.dcz --onnx model.onnx [--form compact|dense]   # for ONNX runtimes
    python dcz.py bench model.dcz        # dense vs sparse (CSR) latency of the decoded model, batch 1 and 64

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
import statistics
import sys
import time
from pathlib import Path

import torch

from builders import encode_run_checkpoint
from compression.model_codec import CODECS, HUFFMAN, RAW_STORAGE
from compression.model_file import CompressedFileError, file_table
from compression.report import to_markdown
from compression.sparse_index import MAX_INDEX_BITS
from compression.onnx_export import FORMS
from parse_config import Config, ConfigError, parse_config, without_callbacks
from logger import setup_logging
from post_training import quantize_checkpoint
from trainer.export import export_onnx, input_shape, is_compressed_file, load_compressed, read_compressed, save_compressed
from utils import CheckpointError, load_checkpoint

__all__ = ["CompressedFileError", "export_onnx", "is_compressed_file", "load_compressed", "read_compressed",
           "save_compressed"]


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
    enc.add_argument("--codec", choices=list(CODECS), default=None,
                     help="entropy coder: 'huffman' (the paper's), 'range' or 'context' (smaller, smallest; beyond "
                          "the paper) (default: the checkpoint's config's export.codec; with --budget: context)")
    enc.add_argument("--raw-dtype", choices=list(RAW_STORAGE), default=None,
                     help="storage of the unpruned tensors (biases...): float16 halves them, lossy for them alone "
                          "(default: the checkpoint's config's export.raw_dtype)")
    enc.add_argument("--budget", type=float, default=None, metavar="PTS",
                     help="post-training quantization, no retraining: every weight and bias on a uniform grid whose "
                          "steps are searched for the smallest file whose expected validation top-1 error (mean "
                          "probability off the true class) is at most the checkpoint's own + PTS points (e.g. 0.1); "
                          "needs the run's data")
    enc.add_argument("--val-batches", type=float, default=None,
                     help="with --budget: validation batches per trial, a count or a fraction (default: all)")
    info = sub.add_parser("info", help="print a .dcz file's per-layer table from the file alone")
    info.add_argument("file", help="a .dcz file")
    export = sub.add_parser("export", help="write a .dcz file's model as ONNX, for deployment runtimes")
    export.add_argument("file", help="a .dcz file")
    export.add_argument("--onnx", required=True, help="the .onnx file to write")
    export.add_argument("--form", choices=FORMS, default="compact",
                        help="compact: quantized weights as small integers into their values, computed in the graph "
                             "(several times smaller, bit-exact weights); dense: every weight float32")
    bench = sub.add_parser("bench", help="dense vs sparse latency of a .dcz file's model on this machine")
    bench.add_argument("file", help="a .dcz file")
    bench.add_argument("--batch-sizes", default="1,64", help="comma-separated batch sizes")
    bench.add_argument("--repeats", type=int, default=50, help="timed forward passes per case (median reported)")
    bench.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return parser


def format_table(header: dict, rows: list[dict]) -> str:
    """The per-layer table of ``dcz.py info``."""
    def cell(value: object, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    arch = header.get("arch") if isinstance(header.get("arch"), dict) else {}
    lines = [f"{arch.get('type')} {arch.get('args', {})}, "
             f"{len(rows)} tensors, classes: {len(names) if isinstance(names := header.get('class_names'), list) else 0}",
             "| tensor | encoding | weights | kept | clusters | fillers | index bits | weight bits P+Q+H | "
             "index bits P+Q+H | bytes | rate |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        coded = r["encoding"] if r.get("codec") in (None, HUFFMAN) else f"{r['encoding']}, {r['codec']}"
        lines.append(f"| {r['layer']} | {coded} | {r['weights']:,} | {r['kept_pct']:.1f}% | "
                     f"{cell(r['clusters'], '')} | {r['fillers']:,} | {cell(r['index_bits'], '')} | "
                     f"{cell(r['weight_bits_pqh'], '.2f')} | {cell(r['index_bits_pqh'], '.2f')} | {r['bytes']:,} | "
                     f"{r['rate']:.1f}x |")
    weights, stored = sum(r["weights"] for r in rows), sum(r["bytes"] for r in rows)
    lines.append(f"total: {weights:,} weights, {stored:,} bytes of sections ({4 * weights / max(stored, 1):.1f}x "
                 f"smaller than float32, before the header)")
    return "\n".join(lines)


def latency_ms(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median wall time of one forward pass, in milliseconds (after warm-up passes)."""
    with torch.no_grad():
        for _ in range(3):
            model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def bench(path: str, batch_sizes: list[int], repeats: int) -> str:
    """Dense and sparse decodes of ``path`` timed side by side, alternating, on random inputs."""
    dense, header = read_compressed(path)
    sparse = load_compressed(path, sparse=True)
    shape = input_shape(path, header)
    lines = [f"{path}: {header['arch']['type']}, torch threads {torch.get_num_threads()}, median of {repeats}",
             "| batch | dense (ms) | sparse (ms) | speed-up |", "|---:|---:|---:|---:|"]
    for n in batch_sizes:
        x = torch.randn(n, *shape)
        with torch.no_grad():
            if not torch.allclose(dense(x), sparse(x), rtol=1e-4, atol=1e-4):
                raise ValueError(f"{path}: dense and sparse outputs differ at batch {n}")
        d, s = latency_ms(dense, x, repeats), latency_ms(sparse, x, repeats)
        lines.append(f"| {n} | {d:.3f} | {s:.3f} | {d / s:.2f}x |")
    return "\n".join(lines)


def stored_config(ckpt_path: str) -> Config:
    """The config stored in a checkpoint (architecture, data, ``export`` defaults), validated like any config.

    Raises:
        CheckpointError: unreadable checkpoint. ConfigError: it holds no valid config.
    """
    config = load_checkpoint(ckpt_path).get("config")
    if not isinstance(config, dict):
        raise ConfigError(f"{ckpt_path} holds no config: it was not written by train.py")
    return parse_config(without_callbacks(config))


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        if args.command == "info":
            print(format_table(*file_table(args.file)))
        elif args.command == "export":
            size = export_onnx(args.file, args.onnx, args.form)
            print(f"wrote {args.onnx}: {size:,} bytes ({args.form} ONNX, any batch size) from {args.file} "
                  f"({Path(args.file).stat().st_size:,} bytes)")
        elif args.command == "bench":
            sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
            if args.threads:
                torch.set_num_threads(args.threads)
            print(bench(args.file, sizes, args.repeats))
        elif args.budget is not None:
            setup_logging(None)  # the search's trials, one line each
            if args.index_bits is not None:
                raise ValueError("--index-bits sets the Huffman layout; --budget writes uniform grids: drop one")
            limit = None if args.val_batches is None else (int(args.val_batches) if args.val_batches >= 1
                                                             else args.val_batches)
            out, report = quantize_checkpoint(args.checkpoint, args.out, args.budget, args.codec or "context",
                                              args.raw_dtype or "float16", limit)
            done = report["post_training"]
            print(to_markdown(report, f"Compression report: {out}"))
            print(f"post-training: validation top-1 error {done['val_top1_err_before']:.2f} % -> "
                  f"{done['val_top1_err']:.2f} %, expected {done['val_expected_err_before']:.3f} % -> "
                  f"{done['val_expected_err']:.3f} % (budget +{args.budget:g}); {out.stat().st_size:,} bytes")
        else:
            cfg = stored_config(args.checkpoint)
            given = {"index_bits": args.index_bits, "codec": args.codec, "raw_dtype": args.raw_dtype}
            options = cfg.export.model_copy(update={k: v for k, v in given.items() if v is not None})
            out, report = encode_run_checkpoint(args.checkpoint, args.out, cfg, options)
            print(to_markdown(report, f"Compression report: {out}"))
    except (CheckpointError, ConfigError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # the model refused the input (bench): say so in one line
        print(f"error: {args.command} {getattr(args, 'file', '')}: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
