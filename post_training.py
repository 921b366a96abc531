"""The post-training path (``dcz.py encode CKPT --budget PTS``): quantize and code a pruned checkpoint, no retraining.

For a user who brings a pruned model, as MPEG's NNR does: every weight tensor (and bias) goes on a uniform grid
whose step is searched, tensor by tensor, for the smallest real file whose validation top-1 error is at most the
checkpoint's own plus ``budget`` points (``compression.ptq``; the error bounded is the expected top-1 error, the mean
probability off the true class, far less noisy than the count of wrong answers). Each trial is measured, not
estimated: the model is evaluated on the validation split and the ``.dcz`` is written and its bytes counted. The
config layer: it reads the run's config for the data and the architecture.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from builders import build_datamodule, file_metadata, load_trained_model
from compression import ptq
from compression.atomic import atomic_write_text
from compression.report import to_markdown
from compression.layers import prunable_layers
from logger import get_logger
from parse_config import Config, ConfigError
from trainer.compression_state import CompressionState
from trainer.export import save_compressed

log = get_logger("post_training")


def quantize_checkpoint(ckpt_path: str | Path, out: str | Path | None, budget: float, codec: str = "context",
                        raw_dtype: str = "float16", limit_batches: int | float | None = None,
                        overrides: list[tuple[str, Any]] | None = None) -> tuple[Path, dict[str, Any]]:
    """Writes the smallest ``.dcz`` of a pruned checkpoint whose validation error is within ``budget`` points.

    Args:
        ckpt_path: A checkpoint written by train.py (pruned; a quantized one is re-quantized from its weights).
        out: The ``.dcz`` path (None: ``model.dcz`` beside the checkpoint).
        budget: Expected validation top-1 error allowed above the checkpoint's own, in points (0.1: 13.80 % ->
            13.90 %; ``compression.ptq.errors``).
        codec: The entropy coder (``"context"``: the one that codes grids best).
        raw_dtype: Storage of the tensors left on no grid (none, unless a layer is not prunable).
        limit_batches: Validation batches per trial (None: the whole split).
        overrides: Config overrides (dotted key, value) on the checkpoint's config, e.g. the data folder.

    Returns:
        (path of the .dcz file, its report with a ``post_training`` entry: setting, errors), also written beside
        the file as ``compression_report.md`` and ``.json``.

    Raises:
        CheckpointError, ConfigError, DataNotFoundError: as test.py. ValueError: a negative budget, or no step
        that keeps the error within the budget.
    """
    if not budget >= 0:
        raise ValueError(f"--budget must be >= 0 points of validation error, got {budget!r}")
    model, cfg, ckpt = load_trained_model(ckpt_path, None, overrides or [])
    masks, _, _ = CompressionState.tensors_of(ckpt)
    weights = {f"{name}.weight": layer.weight for name, layer in prunable_layers(model).items()}
    biases = [f"{name}.bias" for name, layer in prunable_layers(model).items() if layer.bias is not None]
    params = dict(model.named_parameters())
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
                          else "cpu")
    model.to(device).eval()
    batches = validation_batches(cfg, limit_batches, device)
    top1, base = ptq.errors(model, batches())
    log.info(f"{ckpt_path}: validation top-1 error {top1:.2f} %, expected {base:.3f} %; budget +{budget:g} points")
    out = Path(out) if out is not None else Path(ckpt_path).with_name("model.dcz")
    out.parent.mkdir(parents=True, exist_ok=True)
    arch, metadata = {"type": cfg.arch.type, "args": dict(cfg.arch.args)}, file_metadata(cfg)

    def write(state: ptq.State, path: Path) -> dict[str, Any]:
        return save_compressed(model, path, arch=arch, metadata=dict(metadata), codec=codec, raw_dtype=raw_dtype,
                               index_bits="auto", **state)

    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        trial_path = Path(scratch) / "trial.dcz"

        def size_of(state: ptq.State) -> int:
            write(state, trial_path)
            return trial_path.stat().st_size

        setting, error, size, state = ptq.search_grids({n: params[n] for n in [*weights, *biases]}, masks,
                                                       list(weights), lambda: ptq.errors(model, batches())[1],
                                                       size_of, base + budget, log.info)
    report = write(state, out)
    report["post_training"] = {"checkpoint": str(ckpt_path), "budget": budget, "val_top1_err_before": top1,
                               "val_top1_err": ptq.errors(model, batches())[0], "val_expected_err_before": base,
                               "val_expected_err": error, "setting": setting}
    report["source"] = {"checkpoint": str(ckpt_path), "file": str(out)}
    atomic_write_text(out.with_name("compression_report.md"), to_markdown(report, f"Compression report: {out.name}"))
    atomic_write_text(out.with_name("compression_report.json"), json.dumps(report, indent=2) + "\n")
    log.info(f"chosen: {ptq.describe(setting)}: {error:.3f} % expected validation error, {size:,} bytes")
    return out, report


def validation_batches(cfg: Config, limit_batches: int | float | None, device: torch.device):
    """A callable giving the validation split's (inputs, labels) batches on ``device``, as the model sees them
    (``limit_batches``: a count, or a fraction of the split; None: all).

    Raises:
        DataNotFoundError: the data is missing. ConfigError: an empty validation split.
    """
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("validate")
    loader = datamodule.val_dataloader()
    if len(loader) == 0:
        raise ConfigError("the validation split is empty (data_loader.args.validation_split is 0): the budget is "
                          "measured on it")
    count = len(loader) if limit_batches is None else (
        int(limit_batches) if limit_batches >= 1 else max(1, int(limit_batches * len(loader))))

    return lambda: ptq.on_device(loader, device, lambda batch: datamodule.on_after_batch_transfer(batch, 0), count)
