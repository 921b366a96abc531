"""Train (and prune / quantize, through config callbacks) a model from a JSON config.

    python train.py -c config.json                       # new run in runs/<name>/<timestamp>/
    python train.py -r runs/<name>/<ts>/last.ckpt        # resume that run exactly
    python train.py -c configs/x.json --weights dense.ckpt   # new run starting from trained weights
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from builders import (build_config_callbacks, build_datamodule, build_lit_model, build_model, build_trainer,
                      check_model_and_machine, encode_run_checkpoint, make_evaluator, pipeline_stages)
from compression.atomic import atomic_write_text, remove_stale_temporaries
from data import DataNotFoundError
from logger import get_logger, is_worker, setup_logging
from parse_config import (Config, ConfigError, add_override_args, load_config, make_run_dir,
                          overrides_from_args, write_config)
from teacher import train_teacher
from trainer.callbacks import Distillation
from trainer.callbacks.stages import CHECKPOINT_NAMES, PipelineStages
from trainer.compression_state import MASKS_KEY
from trainer.export import read_compressed
from trainer.lit_model import TrainingDivergedError, check_checkpoint, load_weights
from utils import CheckpointError, commit_id, count_parameters, load_checkpoint

USER_ERRORS = (ConfigError, DataNotFoundError, CheckpointError, TrainingDivergedError)
# Writing the run's files failed for a reason the user can fix (full disk, read-only folder, quota).
WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR}


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
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        last = args.run_dir / "last.ckpt" if getattr(args, "run_dir", None) else None
        then = f"resume with -r {last}" if last and last.is_file() else "start the run again (it has no checkpoint yet)"
        print(f"error: cannot write {err.filename or 'the run files'}: {err.strerror}; every file already written "
              f"is complete (atomic writes): free space or fix the folder's permissions, then {then}", file=sys.stderr)
        return 2
    except torch.distributed.DistError as err:  # e.g. the store's timeout: a process group that never formed
        print(f"error: the processes of this run did not all join (trainer.devices x trainer.num_nodes of them; "
              f"{str(err).splitlines()[0][:200]}): check the device counts and the launcher, then start again",
              file=sys.stderr)
        return 2


def train(args: argparse.Namespace) -> int:
    """One run from the parsed command line: config, checks, run folder, fit, then the file and its Table 1 row.

    Raises:
        ConfigError, DataNotFoundError, CheckpointError, TrainingDivergedError: what ``main`` reports (exit 2).
    """
    started = time.monotonic()
    setup_logging(None)  # the console until the run folder exists (then info.log too)
    if args.resume and args.weights:
        raise ConfigError("--weights starts a new run and -r resumes one: use only one of them")
    overrides = overrides_from_args(args)
    if args.weights:
        overrides.append(("pretrained", args.weights))
    ckpt = None
    if args.resume:  # a bad checkpoint is refused before its folder's config is even looked at (verified once)
        ckpt = load_checkpoint(args.resume)
        check_checkpoint(ckpt, args.resume)
    cfg = load_config(args.config, args.resume, overrides)
    if cfg.seed is not None:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
    # Everything that can reject the config happens before the run folder exists (the Trainer, which needs
    # the folder's path, removes it again if it refuses). A resumed run takes every weight from its
    # checkpoint, so `pretrained` is not loaded again.
    check_model_and_machine(cfg)
    datamodule = build_datamodule(cfg)
    if not os.environ.get("DC_RUN_DIR"):  # the launching process (DDP workers find the data in place)
        datamodule.prepare_data()  # download if asked: missing data fails here, not inside the fit
    datamodule.setup("fit")
    lit_model = build_lit_model(cfg, load_pretrained=not args.resume)
    start_epoch = 0
    if ckpt is not None:  # codebooks must exist before the optimizer is rebuilt and its state restored
        lit_model.load_compression(ckpt)
        start_epoch = int(ckpt.get("epoch", 0))  # (the epoch it was saved in: conservative by one)
    callbacks = build_config_callbacks(cfg, lit_model.model, quantized=lit_model.compression.index,
                                       start_epoch=start_epoch)
    run_dir = args.run_dir = Path(args.resume).parent if args.resume else make_run_dir(cfg)
    first = not os.environ.get("DC_RUN_DIR") and not is_worker()  # not a DDP worker, whoever launched it
    if args.resume and first:
        remove_stale_temporaries(run_dir)  # what a killed write left behind (once, not by every DDP worker)
    stages = pipeline_stages(cfg, callbacks, run_dir)
    callbacks += [stages] if stages else []
    try:  # the Trainer checks accelerator, devices, strategy and precision
        trainer = build_trainer(cfg, run_dir, callbacks=callbacks)
    except ConfigError:
        if not args.resume and not os.environ.get("DC_RUN_DIR"):  # the folder made above holds only config.json
            (run_dir / "config.json").unlink()
            run_dir.rmdir()
        raise
    if args.resume and first:  # once, not by every DDP worker
        write_config(cfg, run_dir / "config.json")  # the run now continues under this config
    setup_logging(run_dir)
    log = get_logger("train")
    for callback in callbacks:
        if isinstance(callback, Distillation):
            train_teacher(cfg, callback, run_dir)  # a teacher config is trained first (teacher.py)
    total, nonzero = count_parameters(lit_model.model)
    device = f"{type(trainer.accelerator).__name__.removesuffix('Accelerator').lower()} x {trainer.num_devices}"
    log.info(f"{cfg.name}: {cfg.arch.type} ({total:,} parameters, {nonzero:,} non-zero) on "
             f"{cfg.data_loader.type}, {device}{f' x {trainer.num_nodes} nodes' if trainer.num_nodes > 1 else ''}; "
             f"run folder {run_dir}")
    os.environ["DC_RUN_DIR"] = str(run_dir)  # DDP workers re-running this script join this run folder
    try:
        trainer.fit(lit_model, datamodule=datamodule, ckpt_path=args.resume, weights_only=True)
    finally:
        os.environ.pop("DC_RUN_DIR", None)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # The fit is over: the export and the evaluations below run in rank 0 alone, on one device; a live
        # process group would make them shard the data and wait on ranks that have exited.
        torch.distributed.destroy_process_group()
    best = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
    log.info(f"done at epoch {trainer.current_epoch}; best {cfg.trainer.monitor_metric} = "
             f"{float(best) if best is not None else float('nan'):.4f}; checkpoints in {run_dir}")
    compressed = bool(lit_model.masks) or bool(lit_model.compression.index)  # not merely codebooks set up
    if cfg.export.enabled and compressed and trainer.is_global_zero:
        report = export(trainer, run_dir, cfg)
        summary = summarize(cfg, run_dir, report, stages, time.monotonic() - started)
        print(format_summary(summary))
    return 0


def export(trainer: pl.Trainer, run_dir: Path, cfg: Config) -> dict[str, Any]:
    """Writes model.dcz and compression_report.{md,json} for the best checkpoint (else the last one)."""
    log = get_logger("train")
    best_path = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    source = Path(best_path) if best_path and Path(best_path).is_file() else run_dir / "last.ckpt"
    out, report = encode_run_checkpoint(source, run_dir / "model.dcz", cfg)
    f, t = report["file"], report["paper_total"]
    log.info(f"wrote {out} from {source.name}: {f['bytes']:,} bytes, {f['rate']:.1f}x smaller than the dense "
             f"float32 parameters ({f['dense_float32_bytes']:,} bytes); paper's accounting P+Q {t['rate_pq']:.1f}x, "
             f"P+Q+H {t['rate_pqh']:.1f}x; report in {out.with_name('compression_report.md')}")
    metrics = {"compression/file_bytes": f["bytes"], "compression/file_rate": f["rate"],
               "compression/rate_pq": t["rate_pq"], "compression/rate_pqh": t["rate_pqh"]}
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
        logger.save()
    return report


def test_error(cfg: Config, model: nn.Module) -> float:
    """Top-1 error (%) of ``model`` on the test split of the run's data."""
    return make_evaluator(cfg, model, "test")()["top1_err"]


def checkpoint_error(cfg: Config, path: Path, dense_only: bool = False) -> float | None:
    """Test top-1 error of a checkpoint's network (None when there is no such file, or, with ``dense_only``,
    when the checkpoint holds a pruned model)."""
    if not path.is_file():
        return None
    ckpt = load_checkpoint(path)
    if dense_only and ckpt.get(MASKS_KEY):  # a pruned model
        return None
    model = build_model(cfg)
    load_weights(model, ckpt, path)
    return test_error(cfg, model)


def summarize(cfg: Config, run_dir: Path, report: dict[str, Any], stages: PipelineStages | None,
              wall_s: float) -> dict[str, Any]:
    """The paper's Table 1 row of this run (test split), written to ``summary.json`` in the run folder.

    The dense error is that of ``dense.ckpt`` (the end of the dense stage), else of the ``pretrained``
    checkpoint when it holds a dense (unpruned) model; the compressed error is that of ``model.dcz``.
    """
    dense_error = checkpoint_error(cfg, run_dir / CHECKPOINT_NAMES["dense"])
    if dense_error is None and cfg.pretrained:  # (a resumed run may no longer have it: then no dense error)
        dense_error = checkpoint_error(cfg, Path(cfg.pretrained), dense_only=True)
    f, t = report["file"], report["paper_total"]
    summary = {
        "model": cfg.arch.type, "dataset": cfg.data_loader.type, "recipe": cfg.name,
        "dense_top1_err": dense_error,
        "pruned_top1_err": checkpoint_error(cfg, run_dir / CHECKPOINT_NAMES["prune"]),
        "top1_err": test_error(cfg, read_compressed(run_dir / "model.dcz")[0]),
        "dcz_bytes": f["bytes"], "dense_bytes": f["dense_float32_bytes"], "rate": f["rate"],
        "rate_p": t["rate_p"], "rate_pq": t["rate_pq"], "rate_pqh": t["rate_pqh"],
        "wall_s": round(wall_s + (stages.earlier_s if stages else 0.0), 1),  # earlier processes of a resumed run
        "stages": [{**vars(s), "wall_s": round(s.wall_s, 1)} for s in stages.stages] if stages else [],
        "run_dir": str(run_dir),
        "commit": commit_id(),  # the code that finished the run (a resumed run: the last process's)
    }
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def format_summary(s: dict[str, Any]) -> str:
    """The Table 1 row as a few lines of text."""
    def err(value: float | None) -> str:
        return "–" if value is None else f"{value:.2f} %"

    stages = ", ".join(f"{st['name']} {st['wall_s']:.0f} s" for st in s["stages"])
    return "\n".join([
        f"Deep Compression of {s['model']} on {s['dataset']} (test split; paper's Table 1 form):",
        f"  top-1 error   dense {err(s['dense_top1_err'])} -> pruned {err(s['pruned_top1_err'])} -> "
        f"compressed file {err(s['top1_err'])}",
        f"  size          {s['dense_bytes']:,} bytes dense float32 -> {s['dcz_bytes']:,} bytes model.dcz: "
        f"{s['rate']:.1f}x smaller on disk",
        f"  paper's rates P {s['rate_p']:.1f}x, P+Q {s['rate_pq']:.1f}x, P+Q+H {s['rate_pqh']:.1f}x",
        f"  wall time     {s['wall_s']:.0f} s ({stages or 'one stage'})",
        f"  report        {Path(s['run_dir']) / 'compression_report.md'}; row in {Path(s['run_dir']) / 'summary.json'}",
    ])


if __name__ == "__main__":
    sys.exit(main())
