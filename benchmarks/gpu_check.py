"""One-command check of a CUDA machine: the pipeline on the GPU, its speed, its memory, mixed precision.

Run through ``benchmarks/gpu_check.sh``. On a machine with CUDA (about 2-3 minutes, under 5):

1. ``lenet5``: the shipped LeNet-5 recipe (``configs/lenet5_fashionmnist_pipeline.json``) through ``train.py``,
   shrunk by ``--set`` to 4 epochs (dense 2, one pruning step, clustering), on CUDA and on the CPU: the
   steady-state epoch time of each (training + validation, from ``info.log``), the file and its error.
2. ``alexnet``: AlexNet (Caffe form, 10 classes) training steps at batch 128, 224 px, with the recipe's
   pruning (paper ratios, one shot at epoch 0) and quantization (conv 8 / fc 5 bits, from epoch 1) active:
   images/s in each stage, ``torch.cuda.max_memory_allocated``, then the ``.dcz`` encoded and decoded on the
   host (wall times, bit-exact against the trained weights).
3. ``precision``: the same AlexNet run under ``16-mixed`` and ``bf16-mixed``: every quantized layer must keep
   at most ``2**bits`` distinct values, pruned weights zero, and its file decode bit-exactly.

The data is generated (random images; Fashion-MNIST-format idx files for LeNet-5): nothing is downloaded.
Without CUDA the same checks run on the CPU with small sizes (a few steps, 64 px images), which is what CI
runs; Lightning turns ``16-mixed`` into ``bf16-mixed`` there (reported as ``effective``). The last line
printed is one JSON object (``"ok": true`` when every check passed; exit code 1 otherwise).

    bash benchmarks/gpu_check.sh                    # auto-detects CUDA
    bash benchmarks/gpu_check.sh --device cpu --parts alexnet,precision
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

PARTS = ("lenet5", "alexnet", "precision")
# Sizes per device kind: LeNet-5 train/test images; AlexNet steps (split over 2 epochs), batch, image size.
SIZES = {"cuda": {"mnist": (20000, 2000), "steps": 300, "batch": 128, "image": 224, "precision_steps": 60},
         "cpu": {"mnist": (640, 160), "steps": 4, "batch": 4, "image": 64, "precision_steps": 4}}
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*?(stage \w+ \(epoch (\d+),|epoch (\d+): val/)")


# ---------------------------------------------------------------------------------------------- LeNet-5
def epoch_seconds(info_log: Path) -> list[float]:
    """Each epoch's time from ``info.log``: its stage line (epoch start) to its validation line."""
    start, out = {}, []
    for line in info_log.read_text().splitlines():
        match = _STAMP.match(line)
        if not match:
            continue
        t = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if match.group(3) is not None:
            start[int(match.group(3))] = t
        elif int(match.group(4)) in start:
            out.append(t - start[int(match.group(4))])
    return out


def lenet5_pipeline(device: str, data_dir: Path, work: Path) -> dict[str, Any]:
    """The shipped LeNet-5 recipe through train.py on ``device`` (a subprocess, as a user runs it)."""
    overrides = {"data_loader.args.data_dir": str(data_dir), "trainer.max_epochs": 4, "trainer.accelerator": device,
                 "trainer.devices": 1, "trainer.save_dir": str(work / f"runs_{device}"), "trainer.progress_bar": "none",
                 "trainer.callbacks.IterativePruning.start_epoch": 2, "trainer.callbacks.IterativePruning.end_epoch": 2,
                 "trainer.callbacks.Quantization.epoch": 3, "lr_scheduler.args.milestones": [2, 3]}
    args = [sys.executable, str(ROOT / "train.py"), "-c", str(ROOT / "configs" / "lenet5_fashionmnist_pipeline.json")]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, cwd=work)
    if proc.returncode != 0:
        raise RuntimeError(f"train.py on {device} failed: {proc.stderr[-2000:]}")
    (run,) = sorted((work / f"runs_{device}" / "lenet5_fashionmnist_pipeline").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    epochs = epoch_seconds(run / "info.log")
    return {"epoch_s": min(epochs), "epochs_s": [round(e, 3) for e in epochs], "rate": summary["rate"],
            "top1_err": summary["top1_err"], "wall_s": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------- AlexNet
class RepeatBatches:
    """``steps`` batches cycled from a few generated ones already on the device (no loader, no copies)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch: int, steps: int) -> None:
        self.images, self.labels, self.batch, self.steps = images, labels, batch, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Any:
        n = len(self.labels) // self.batch
        for i in range(self.steps):
            j = (i % n) * self.batch
            yield self.images[j: j + self.batch], self.labels[j: j + self.batch]


class StepTimer(pl.Callback):
    """Images per second of each epoch's training steps after ``warmup`` steps (the device synchronised)."""

    def __init__(self, warmup: int, batch: int) -> None:
        self.warmup, self.batch = warmup, batch
        self.rates: list[float] = []  # one per epoch
        self._start: float | None = None

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if batch_idx == self.warmup:
            self._start = self._now()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        steps = trainer.num_training_batches - self.warmup
        if self._start is not None and steps > 0:
            self.rates.append(steps * self.batch / (self._now() - self._start))
        self._start = None


def alexnet_run(device: str, size: dict[str, Any], precision: str, steps: int, work: Path,
                index_bits: int) -> dict[str, Any]:
    """AlexNet training steps with pruning (epoch 0) and quantization (epoch 1) active, then its file."""
    from builders import build_config_callbacks, build_lit_model, build_trainer
    from parse_config import apply_overrides, parse_config, read_json

    raw = read_json(ROOT / "configs" / "alexnet_imagenette_pipeline.json")
    cfg = parse_config(apply_overrides(raw, [
        ("trainer.max_epochs", 2), ("trainer.accelerator", device), ("trainer.devices", 1),
        ("trainer.precision", precision), ("trainer.progress_bar", "none"), ("trainer.limit_val_batches", 0),
        ("trainer.callbacks.IterativePruning.schedule", "one_shot"),
        ("trainer.callbacks.IterativePruning.start_epoch", 0), ("trainer.callbacks.IterativePruning.end_epoch", 0),
        ("trainer.callbacks.Quantization.epoch", 1), ("export.index_bits", index_bits)]))
    torch.manual_seed(0)
    lit = build_lit_model(cfg)
    callbacks = build_config_callbacks(cfg, lit.model)
    batch = size["batch"]
    timer = StepTimer(warmup=min(3, steps // 2 - 1), batch=batch)
    trainer = build_trainer(cfg, run_dir=None, callbacks=[*callbacks, timer], enable_model_summary=False,
                            num_sanity_val_steps=0)
    on = torch.device("cuda" if device == "cuda" else "cpu")
    images = torch.randn(4 * batch, 3, size["image"], size["image"], device=on)  # (N, 3, H, W)
    labels = torch.randint(0, 10, (4 * batch,), device=on)
    if on.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.fit(lit, train_dataloaders=RepeatBatches(images, labels, batch, steps // 2))
    result: dict[str, Any] = {"precision": precision, "effective": str(trainer.precision), "steps": steps,
                              "batch": batch, "image": size["image"], "fit_s": time.perf_counter() - start,
                              "images_per_s": {"pruned": timer.rates[0] if timer.rates else None,
                                               "quantized": timer.rates[1] if len(timer.rates) > 1 else None}}
    if on.type == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    quantization = next(c for c in callbacks if type(c).__name__ == "Quantization")
    result["codebooks"] = check_codebooks(lit, quantization.layer_bits)
    result.update(encode_decode(lit, cfg, work / f"alexnet_{precision}.dcz", index_bits))
    del images, labels, trainer
    return result


def check_codebooks(lit: Any, layer_bits: dict[str, int]) -> dict[str, Any]:
    """Every quantized layer: at most 2**bits distinct kept values, pruned weights exactly zero."""
    params = dict(lit.model.named_parameters())
    worst, ok = {}, True
    for layer, bits in layer_bits.items():
        name = f"{layer}.weight"
        w, mask = params[name].detach().cpu(), lit.masks[name].cpu()
        distinct = len(torch.unique(w[mask]))
        ok &= distinct <= 2 ** bits and int(torch.count_nonzero(w[~mask])) == 0 and name in lit.compression.index
        worst[layer] = f"{distinct}/{2 ** bits}"
    return {"ok": bool(ok), "distinct_of_allowed": worst}


def encode_decode(lit: Any, cfg: Any, path: Path, index_bits: int) -> dict[str, Any]:
    """The trained model written as a ``.dcz`` on the host and read back (bit-exact against its weights)."""
    from trainer.compression_state import CompressionState
    from builders import file_metadata
    from trainer.export import read_compressed, save_compressed

    model = lit.model.cpu()
    masks, codebooks, indices = CompressionState.tensors_of({"state_dict": lit.state_dict(),
                                                              **lit.compression.checkpoint_entries()})
    start = time.perf_counter()
    with torch.no_grad():
        report = save_compressed(model, path, arch={"type": cfg.arch.type, "args": cfg.arch.args}, masks=masks,
                                 codebooks=codebooks, indices=indices, index_bits=index_bits,
                                 metadata=file_metadata(cfg))
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    decoded, _ = read_compressed(path)
    decode_s = time.perf_counter() - start
    expected = model.state_dict()
    exact = all(torch.equal(v, expected[k]) for k, v in decoded.state_dict().items())
    return {"encode_s": encode_s, "decode_s": decode_s, "file_bytes": report["file"]["bytes"],
            "rate": report["file"]["rate"], "bit_exact": bool(exact)}


# ---------------------------------------------------------------------------------------------- main
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Check the pipeline on a CUDA machine (or, small, on the CPU).")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: CUDA when torch sees a GPU, else the CPU with small sizes")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--index-bits", type=int, default=4,
                        help="relative-index width of the AlexNet files (paper's Table 4: 4)")
    parser.add_argument("--workdir", default=None, help="keep runs and files here (default: a temporary folder)")
    return parser


def run_part(name: str, fn: Any, summary: dict[str, Any]) -> None:
    try:
        summary[name] = fn()
    except Exception as err:  # one failed part must not hide the others' figures
        summary[name] = {"error": f"{type(err).__name__}: {str(err)[-500:]}"}
        summary["failures"].append(name)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        print(f"error: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    size, started = SIZES[device], time.perf_counter()
    summary: dict[str, Any] = {"check": "gpu_check", "device": device, "torch": torch.__version__,
                               "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None, "failures": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if "lenet5" in parts:
            from helpers import write_mnist_folder  # tests/helpers.py: Fashion-MNIST-format idx files

            data = write_mnist_folder(work / "fmnist", *size["mnist"])

            def lenet5() -> dict[str, Any]:
                out = {d: lenet5_pipeline(d, data, work) for d in (["cuda", "cpu"] if device == "cuda" else ["cpu"])}
                if "cuda" in out:
                    out["speedup"] = out["cpu"]["epoch_s"] / out["cuda"]["epoch_s"]
                return out

            run_part("lenet5", lenet5, summary)
        if "alexnet" in parts:
            run_part("alexnet", lambda: alexnet_run(device, size, "32-true", size["steps"], work, args.index_bits),
                     summary)
        if "precision" in parts:
            def precision() -> dict[str, Any]:
                return {p: alexnet_run(device, size, p, size["precision_steps"], work, args.index_bits)
                        for p in ("16-mixed", "bf16-mixed")}

            run_part("precision", precision, summary)
    for name in ("alexnet", *(f"precision.{p}" for p in ("16-mixed", "bf16-mixed"))):
        part = summary.get(name.split(".")[0], {})
        result = part.get(name.split(".")[1], {}) if "." in name else part
        if "codebooks" in result and not (result["codebooks"]["ok"] and result["bit_exact"]):
            summary["failures"].append(name)
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    summary["ok"] = not summary["failures"]
    print(json.dumps(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
