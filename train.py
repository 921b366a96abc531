"""Train (and prune / quantize, through config callbacks) a model from a JSON config.

    python train.py -c config.json                       # new run in runs/<name>/<timestamp>/
    python train.py -r runs/<name>/<ts>/last.ckpt        # resume that run exactly
    python train.py -c configs/x.json --weights dense.ckpt   # new run starting from trained weights
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import lightning.pytorch as pl

from builders import build_config_callbacks, build_datamodule, build_lit_model, build_trainer
from compression.model_file import IndexBits
from data import DataNotFoundError
from logger import get_logger, setup_logging
from parse_config import ConfigError, add_override_args, load_config, make_run_dir, overrides_from_args, write_config
from trainer.export import encode_checkpoint
from utils import CheckpointError, count_parameters, load_checkpoint

USER_ERRORS = (ConfigError, DataNotFoundError, CheckpointError)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a model from a JSON config.", add_help=True)
    parser.add_argument("-c", "--config", default=None, help="config file (default: the one stored with -r)")
    parser.add_argument("-r", "--resume", default=None, help="checkpoint to resume (e.g. runs/.../last.ckpt)")
    parser.add_argument("--weights", default=None,
                        help="start a NEW run from this checkpoint's weights (sets the `pretrained` key)")
    add_override_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        return train(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def train(args: argparse.Namespace) -> int:
    if args.resume and args.weights:
        raise ConfigError("--weights starts a new run and -r resumes one: use only one of them")
    overrides = overrides_from_args(args)
    if args.weights:
        overrides.append(("pretrained", args.weights))
    if args.resume and not Path(args.resume).is_file():
        raise CheckpointError(f"checkpoint not found: {args.resume}")
    cfg = load_config(args.config, args.resume, overrides)
    if cfg.seed is not None:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
    # Everything that can reject the config happens before the run folder exists (the Trainer, which needs
    # the folder's path, removes it again if it refuses). A resumed run takes every weight from its
    # checkpoint, so `pretrained` is not loaded again.
    datamodule = build_datamodule(cfg)
    if not os.environ.get("DC_RUN_DIR"):  # the launching process (DDP workers find the data in place)
        datamodule.prepare_data()  # download if asked: missing data fails here, not inside the fit
    datamodule.setup("fit")
    lit_model = build_lit_model(cfg, load_pretrained=not args.resume)
    start_epoch = 0
    if args.resume:  # codebooks must exist before the optimizer is rebuilt and its state restored
        ckpt = load_checkpoint(args.resume)
        lit_model.load_compression(ckpt)
        start_epoch = int(ckpt.get("epoch", 0))  # (the epoch it was saved in: conservative by one)
    callbacks = build_config_callbacks(cfg, lit_model.model, quantized=lit_model.compression.index,
                                       start_epoch=start_epoch)
    run_dir = Path(args.resume).parent if args.resume else make_run_dir(cfg)
    try:  # the Trainer checks accelerator, devices, strategy and precision
        trainer = build_trainer(cfg, run_dir, callbacks=callbacks)
    except ConfigError:
        if not args.resume and not os.environ.get("DC_RUN_DIR"):  # the folder made above holds only config.json
            (run_dir / "config.json").unlink()
            run_dir.rmdir()
        raise
    if args.resume and not os.environ.get("DC_RUN_DIR"):  # once, not by every DDP worker
        write_config(cfg, run_dir / "config.json")  # the run now continues under this config
    setup_logging(run_dir)
    log = get_logger("train")
    total, nonzero = count_parameters(lit_model.model)
    log.info(f"{cfg.name}: {cfg.arch.type} ({total:,} parameters, {nonzero:,} non-zero) on "
             f"{cfg.data_loader.type}; run folder {run_dir}")
    os.environ["DC_RUN_DIR"] = str(run_dir)  # DDP workers re-running this script join this run folder
    try:
        trainer.fit(lit_model, datamodule=datamodule, ckpt_path=args.resume, weights_only=True)
    finally:
        os.environ.pop("DC_RUN_DIR", None)
    best = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
    log.info(f"done at epoch {trainer.current_epoch}; best {cfg.trainer.monitor_metric} = "
             f"{float(best) if best is not None else float('nan'):.4f}; checkpoints in {run_dir}")
    compressed = lit_model.masks or len(lit_model.compression.codebooks)
    if cfg.export.enabled and compressed and trainer.is_global_zero:
        export(trainer, run_dir, cfg.export.index_bits)
    return 0


def export(trainer: pl.Trainer, run_dir: Path, index_bits: IndexBits) -> None:
    """Writes model.dcz and compression_report.{md,json} for the best checkpoint (else the last one)."""
    log = get_logger("train")
    best_path = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    source = Path(best_path) if best_path and Path(best_path).is_file() else run_dir / "last.ckpt"
    out, report = encode_checkpoint(source, run_dir / "model.dcz", index_bits)
    f, t = report["file"], report["paper_total"]
    log.info(f"wrote {out} from {source.name}: {f['bytes']:,} bytes, {f['rate']:.1f}x smaller than the dense "
             f"float32 parameters ({f['dense_float32_bytes']:,} bytes); paper's accounting P+Q {t['rate_pq']:.1f}x, "
             f"P+Q+H {t['rate_pqh']:.1f}x; report in {out.with_name('compression_report.md')}")
    metrics = {"compression/file_bytes": f["bytes"], "compression/file_rate": f["rate"],
               "compression/rate_pq": t["rate_pq"], "compression/rate_pqh": t["rate_pqh"]}
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
        logger.save()


if __name__ == "__main__":
    sys.exit(main())
