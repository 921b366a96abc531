"""One training epoch of LeNet-300-100 on MNIST-size data: our Trainer vs a plain PyTorch loop.

Both sides train the same model (same seed, same SGD settings, same batch size) on the same 54,000
in-memory Fashion-MNIST images (60k minus the 10 % validation split), side by side in one process.
Each round runs every side once, in an order rotated from round to round; a side's ratio is the median
over rounds of (its time / the plain loop's time in the same round), which cancels the drift of a shared
machine's speed better than a ratio of medians taken across rounds.
Validation is off on all sides: this times the training epoch. Besides ours and the plain loop, two
reference sides show where the time goes: "Lightning floor" (Lightning's loop around a raw torch step,
nothing else) and "bare Lightning" (our module in a default Trainer without logger or callbacks).

    python benchmarks/bench_train_epoch.py --data-dir ../shared/data/fashion-mnist --runs 11 --batch-size 128
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import FashionMNIST  # noqa: E402
from models import LeNet300  # noqa: E402
from parse_config import parse_config  # noqa: E402
from trainer.lit_model import LitClassifier  # noqa: E402
from builders import build_trainer, training_parts  # noqa: E402

# Wall time by default; --clock cpu switches to the process's CPU time (all its threads), which leaves out
# the time this shared VM's other tenants take from us: with --threads 1 it is the work each side does.
clock = time.perf_counter


class EpochTimer(pl.Callback):
    """Wall time of the training epoch alone (no setup, no checkpointing)."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = clock()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds = clock() - self.start


def config(data_dir: str, batch_size: int, progress_bar: str) -> dict:
    return {"name": "bench", "seed": 0, "arch": {"type": "LeNet300"},
            "data_loader": {"type": "FashionMNIST", "args": {"data_dir": data_dir, "batch_size": batch_size}},
            "optimizer": {"type": "SGD", "args": {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}},
            "trainer": {"max_epochs": 1, "limit_val_batches": 0, "progress_bar": progress_bar}}


def ours(data_dir: str, batch_size: int, progress_bar: str, tmp: Path) -> float:
    cfg = parse_config(config(data_dir, batch_size, progress_bar))
    torch.manual_seed(0)
    lit = LitClassifier(LeNet300(), training_parts(cfg))
    timer = EpochTimer()
    trainer = build_trainer(cfg, tmp, callbacks=[timer], num_sanity_val_steps=0, enable_model_summary=False)
    dm = FashionMNIST(data_dir, batch_size=batch_size)
    trainer.fit(lit, datamodule=dm)
    return timer.seconds


class _RawStep(LitClassifier):
    """Our module with the optimizer step written against torch directly (no LightningOptimizer, no
    manual_backward): only for the floor below, since it skips precision plugins and the step counter."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers(use_pl_optimizer=False)
        loss, _, _ = self.model_step(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss


def bare_trainer(data_dir: str, batch_size: int, module: type[LitClassifier], **trainer_args: Any) -> float:
    """``module`` in a Trainer with no logger, checkpoint or callback. With ``LitClassifier`` and Lightning's
    default profiler ("bare Lightning"): what Lightning's loop costs around our module's training step. With
    ``_RawStep`` ("Lightning floor"): the least any Trainer-based run can spend."""
    cfg = parse_config(config(data_dir, batch_size, "none"))
    torch.manual_seed(0)
    lit = module(LeNet300(), training_parts(cfg))
    timer = EpochTimer()
    trainer = pl.Trainer(max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[timer], accelerator="cpu", devices=1, **trainer_args)
    trainer.fit(lit, datamodule=FashionMNIST(data_dir, batch_size=batch_size))
    return timer.seconds


def plain(images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    torch.manual_seed(0)
    model = LeNet300()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scale, shift = 1.0 / (255 * FashionMNIST.std[0]), -FashionMNIST.mean[0] / FashionMNIST.std[0]
    start = clock()
    order = torch.randperm(len(labels))
    for i in range(0, len(labels), batch_size):
        idx = order[i:i + batch_size]
        x = images[idx].float().mul_(scale).add_(shift)  # (x / 255 - mean) / std, as data.py does it
        loss = torch.nn.functional.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/fashion-mnist", help="folder with the idx files")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size on both sides")
    parser.add_argument("--runs", type=int, default=5, help="rounds; every side runs once per round")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or the process's CPU time (time.process_time)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads for all sides (0: torch's default)")
    parser.add_argument("--tmp", default=str(Path(tempfile.gettempdir()) / "dc_bench_runs"),
                        help="scratch run folder")
    args = parser.parse_args()
    import warnings
    warnings.filterwarnings("ignore")
    import logging
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    dm = FashionMNIST(args.data_dir, batch_size=args.batch_size)
    dm.setup("fit")
    images, labels = dm.train_set
    sides = {
        "plain loop": lambda: plain(images, labels, args.batch_size),
        "Lightning floor": lambda: bare_trainer(args.data_dir, args.batch_size, _RawStep),
        "bare Lightning": lambda: bare_trainer(args.data_dir, args.batch_size, LitClassifier),
        "ours (no bar)": lambda: ours(args.data_dir, args.batch_size, "none", Path(args.tmp)),
        "ours (tqdm bar)": lambda: ours(args.data_dir, args.batch_size, "tqdm", Path(args.tmp)),
    }
    names = list(sides)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.runs):  # rotate the order so that no side always runs first or last
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(sides[name]())
    print(f"machine: {platform.platform()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"lightning {pl.__version__}, clock: {args.clock}")
    print(f"LeNet-300-100, {len(labels):,} images, batch {args.batch_size}, {args.runs} rounds")
    print(f"{'side':<18}{'median s':>10}{'ratio':>8}   per-round ratios (time / plain loop's time in that round)")
    for name in names:
        ratios = [t / p for t, p in zip(times[name], times["plain loop"])]
        print(f"{name:<18}{statistics.median(times[name]):>10.3f}{statistics.median(ratios):>8.2f}   "
              f"{' '.join(f'{r:.2f}' for r in ratios)}")
    print("plain loop times (s): " + " ".join(f"{t:.3f}" for t in times["plain loop"]))


if __name__ == "__main__":
    main()
