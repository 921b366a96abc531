"""Evaluate a checkpoint on the test split (or validation split) and print its errors and sizes.

    python test.py -r runs/<name>/<ts>/best.ckpt
    python test.py -r best.ckpt --json --set data_loader.args.data_dir=/elsewhere
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from torch import nn

from builders import evaluation_config, load_trained_model, make_evaluator
from compression.model_file import CompressedFileError
from data import DataNotFoundError
from logger import setup_logging
from parse_config import (Config, ConfigError, add_override_args, apply_overrides, overrides_from_args, parse_config,
                          read_json)
from trainer.export import is_compressed_file, read_compressed
from utils import CheckpointError, count_parameters, format_sparsity, layer_sparsity

USER_ERRORS = (ConfigError, DataNotFoundError, CheckpointError, CompressedFileError)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluate a checkpoint on the test split.")
    parser.add_argument("-r", "--resume", required=True,
                        help="checkpoint (.ckpt) or compressed file (.dcz) to evaluate")
    parser.add_argument("-c", "--config", default=None, help="config file (default: the one stored with -r)")
    parser.add_argument("--split", choices=("test", "val"), default="test", help="which split to evaluate")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    parser.add_argument("--sparse", action="store_true",
                        help="a .dcz only: run pruned Linear layers as sparse CSR layers (inference; see dcz.py bench)")
    add_override_args(parser)
    return parser


def load_model(args: argparse.Namespace) -> tuple[nn.Module, Config, dict[str, Any]]:
    """The model and config of a checkpoint or of a ``.dcz`` file (rebuilt from the file alone)."""
    path = Path(args.resume)
    if is_compressed_file(path):
        model, header = read_compressed(path, sparse=args.sparse)
        raw = read_json(args.config) if args.config else evaluation_config(header)
        if raw is None:
            raise ConfigError(f"{path} carries no data settings to evaluate with: pass -c CONFIG.json")
        cfg = parse_config(apply_overrides(raw, overrides_from_args(args)))
        return model, cfg, {"epoch": None, "format": "dcz", "file_bytes": path.stat().st_size, "sparse": args.sparse}
    if args.sparse:
        raise ConfigError(f"--sparse reads a .dcz file; {path} is a checkpoint: encode it with dcz.py encode first")
    model, cfg, ckpt = load_trained_model(path, args.config, overrides_from_args(args))
    return model, cfg, {"epoch": ckpt.get("epoch"), "format": "ckpt"}


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Loads the checkpoint or .dcz file into a fresh model and evaluates it; returns the figures."""
    ckpt_path = Path(args.resume)
    model, cfg, info = load_model(args)
    # The whole split, whatever smoke-run limits the training config had; with --json stdout carries only
    # the JSON object, so no progress bar.
    metrics = make_evaluator(cfg, model, args.split, quiet=args.json)()
    total, nonzero = count_parameters(model)
    out: dict[str, Any] = {"checkpoint": str(ckpt_path), "split": args.split, "arch": cfg.arch.type,
                           "dataset": cfg.data_loader.type, **info}
    for name in ("loss", *cfg.metrics):
        out[name] = metrics[name]
    out.update(params=total, nonzero=nonzero, kept_pct=100.0 * nonzero / total, layers=layer_sparsity(model))
    return out


def format_results(out: dict[str, Any]) -> str:
    lines = [f"{out['arch']} on {out['dataset']} ({out['split']} split), checkpoint {out['checkpoint']}"]
    for name in ("top1_err", "top5_err"):
        if name in out:
            lines.append(f"  {name:<9} {out[name]:8.2f} %")
    lines.append(f"  {'loss':<9} {out['loss']:8.4f}")
    lines.append(f"  {'params':<9} {out['params']:>8,}")
    lines.append(f"  {'nonzero':<9} {out['nonzero']:>8,} ({out['kept_pct']:.2f} % kept)")
    return "\n".join(lines + ["", format_sparsity(out["layers"])])


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    setup_logging(None)
    try:
        out = evaluate(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(out) if args.json else format_results(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
