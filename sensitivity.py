"""Sweep each layer's sensitivity to pruning and to quantization, without retraining.

Han et al. 2015 (arXiv 1506.02626) §4, Fig. 6: prune one layer at a time, the rest untouched, plot each
layer's error against how much of it is pruned, and pick each layer's target from its curve (Distiller's
``compress_classifier.py --sense``). Here: keep ratios, and bits × k-means inits (Han et al. 2016 §3),
each layer alone (``compression/sensitivity.py``), evaluating the checkpoint on the val (or test) split.

    python sensitivity.py -r runs/<name>/<ts>/best.ckpt --kind prune --keep-ratios 1.0:0.1:0.1 --budget 0.5 --check

Into ``--out`` (default ``sensitivity/`` beside the checkpoint): ``sensitivity.csv``, ``baseline.json``,
``prune.png``, ``quantize_<init>.png``, TensorBoard events and, with ``--budget``, ``proposal.json`` (a
``trainer.callbacks`` fragment: ``--set "trainer.callbacks=$(cat proposal.json)"``) and ``proposal_report.json``;
with ``--recipe BASE.json`` too, ``recipe.json``: that config with the proposal's per-layer targets in its own
pruning and quantization schedule, ready for ``train.py -c``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from builders import build_config_callbacks, build_model, load_trained_model, make_evaluator
from compression.atomic import atomic_open, atomic_write_bytes, atomic_write_text
from compression.kmeans import INITS
from compression.layers import prunable_layers, resolve
from compression.quantization import MAX_BITS
from compression.sensitivity import (BUDGET_TOL, KINDS, QUANTIZE_EPOCH, Metrics, Point, check_jointly, propose,
                                     proposal_callbacks, run_sweeps, sweep_points)
from data import DataNotFoundError
from logger import setup_logging
from parse_config import Config, ConfigError, add_override_args, overrides_from_args, parse_config
from utils import CheckpointError

USER_ERRORS = (ConfigError, DataNotFoundError, CheckpointError)
COLUMNS = ("layer", "kind", "value", "init", "top1_err", "top5_err", "loss")
DEFAULT_KEEP_RATIOS = "1.0,0.9,0.8,0.7,0.6,0.5,0.4,0.3,0.2,0.1,0.05"


# ------------------------------------------------------------------------------------- sweep values (CLI)
def _range(text: str, flag: str, number: Callable[[str], float], ascending: bool) -> list[float]:
    """``START:STOP:STEP`` (``START:STOP`` for integers: step 1), both ends included; STEP > 0 is a size and
    the direction is fixed: keep ratios go down from dense, bits go up."""
    parts = text.split(":")
    if len(parts) == 2 and number is int:
        parts.append("1")
    try:
        start, stop, step = (number(p) for p in parts) if len(parts) == 3 else (0, 0, 0)
    except ValueError:
        raise ValueError(f"{flag} {text!r}: not a number range START:STOP:STEP") from None
    if step <= 0:
        raise ValueError(f"{flag} {text!r}: expected START:STOP:STEP with STEP > 0")
    if (stop < start) if ascending else (stop > start):
        example = "1:8" if ascending else "1.0:0.1:0.1"
        raise ValueError(f"{flag} {text!r}: inverted range; it must go {'up' if ascending else 'down'}, e.g. {example}")
    sign, count = (1 if ascending else -1), int(abs(stop - start) / step + 1e-9) + 1
    return [round(start + sign * i * step, 6) for i in range(count)]


def _values(text: str, flag: str, number: Callable[[str], float], ascending: bool) -> list[float]:
    """Comma-separated numbers and ranges -> distinct values, sorted from the mildest point."""
    values: list[float] = []
    for item in (s.strip() for s in text.split(",")):
        if ":" in item:
            values += _range(item, flag, number, ascending)
        elif item:
            try:
                values.append(number(item))
            except ValueError:
                kind = "an integer" if number is int else "a number"
                raise ValueError(f"{flag} {text!r}: {item!r} is not {kind}") from None
    if not values:
        raise ValueError(f"{flag} {text!r}: empty list")
    return sorted(set(values), reverse=not ascending)


def parse_keep_ratios(text: str) -> list[float]:
    """``"1.0,0.5,0.1"`` or ``"1.0:0.1:0.1"`` (descending range) -> distinct keep ratios, densest first.

    Raises:
        ValueError: not numbers, an empty list, an inverted range, or a ratio outside (0, 1].
    """
    values = _values(text, "--keep-ratios", float, ascending=False)
    bad = [v for v in values if not 0.0 < v <= 1.0]
    if bad:
        raise ValueError(f"--keep-ratios {text!r}: keep ratios must be in (0, 1], got {bad}")
    return values


def parse_bits(text: str) -> list[int]:
    """``"2,4,8"`` or ``"1:8"`` (ascending range) -> distinct bit widths, fewest first.

    Raises:
        ValueError: not integers, an empty list, an inverted range, or bits outside 1..16.
    """
    values = [int(v) for v in _values(text, "--bits", int, ascending=True)]
    bad = [v for v in values if not 1 <= v <= MAX_BITS]
    if bad:
        raise ValueError(f"--bits {text!r}: bits must be in 1..{MAX_BITS}, got {bad}")
    return values


def parse_inits(text: str) -> list[str]:
    """``"linear,density"`` -> k-means initialisations, in the given order.

    Raises:
        ValueError: an empty list or an unknown initialisation (the message lists the valid ones).
    """
    inits = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    unknown = [i for i in inits if i not in INITS]
    if not inits or unknown:
        raise ValueError(f"--inits {text!r}: unknown or missing init {unknown}; valid inits: {', '.join(INITS)}")
    return inits


def _batches(text: str) -> int | float:
    """``--limit-batches``: a count of batches (``20``) or a fraction of them (``0.25``), as Lightning takes."""
    value = float(text)  # ValueError: argparse reports an invalid value
    if value.is_integer() and "." not in text and value >= 1:
        return int(value)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a batch count >= 1 or a fraction in (0, 1], got {text}")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Per-layer pruning and quantization sensitivity of a checkpoint.")
    parser.add_argument("-r", "--resume", required=True, help="checkpoint (.ckpt) written by train.py")
    parser.add_argument("-c", "--config", default=None, help="config file (default: the one stored with -r)")
    parser.add_argument("--split", choices=("val", "test"), default="val", help="split to evaluate on")
    parser.add_argument("--kind", choices=(*KINDS, "both"), default="both", help="which sweeps to run")
    parser.add_argument("--layers", default=None,
                        help="comma-separated layer names or types (Linear, Conv2d); default: every prunable layer")
    parser.add_argument("--keep-ratios", default=DEFAULT_KEEP_RATIOS,
                        help="keep ratios in (0, 1]: a list '1.0,0.5,0.1' and/or descending ranges 'START:STOP:STEP'")
    parser.add_argument("--bits", default="1:8", help="bits in 1..16: a list '2,4,8' and/or ascending ranges 'LO:HI'")
    parser.add_argument("--inits", default="linear,density,forgy",
                        help="k-means initialisations (linear, density, forgy), comma-separated")
    parser.add_argument("--seed", type=int, default=0, help="seed of the forgy initialisation")
    parser.add_argument("--limit-batches", type=_batches, default=None,
                        help="evaluate on this many batches (an integer) or this fraction of them; default: all")
    parser.add_argument("--out", default=None, help="output folder (default: sensitivity/ beside the checkpoint)")
    parser.add_argument("--budget", type=float, default=None,
                        help="top-1 error points each layer may add: write proposal.json with per-layer targets")
    parser.add_argument("--check", action="store_true",
                        help="with --budget: apply the whole proposal at once, evaluate, and report it")
    parser.add_argument("--recipe", default=None, metavar="BASE.json",
                        help="with --budget: write recipe.json, this config with the proposal's keep ratios and bits "
                             "in its own IterativePruning / Quantization schedule (train it with train.py -c)")
    add_override_args(parser)
    return parser


def sweep_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed sweep values (checked before anything is loaded)."""
    try:
        settings = {"kinds": KINDS if args.kind == "both" else (args.kind,),
                    "keep_ratios": parse_keep_ratios(args.keep_ratios), "bits": parse_bits(args.bits),
                    "inits": parse_inits(args.inits)}
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if args.budget is not None and not 0 <= args.budget < float("inf"):
        raise ConfigError(f"--budget must be >= 0 error points, got {args.budget}")
    if args.check and args.budget is None:
        raise ConfigError("--check evaluates the proposal of --budget: pass --budget too")
    if args.recipe is not None and args.budget is None:
        raise ConfigError("--recipe puts the proposal of --budget into a config: pass --budget too")
    settings["recipe"] = read_recipe(args.recipe) if args.recipe is not None else None  # read before the sweep
    return settings


def read_recipe(path: str) -> dict[str, Any]:
    """The ``--recipe`` base config as JSON (checked whole once the proposal is in it)."""
    try:
        base = json.loads(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"--recipe {path}: cannot read it: {err.strerror}") from None
    except ValueError as err:
        raise ConfigError(f"--recipe {path}: not valid JSON: {err}") from None
    if not isinstance(base, dict):
        raise ConfigError(f"--recipe {path}: expected a JSON object (a config), got {type(base).__name__}")
    try:  # a broken base fails before the sweep, not after it
        parse_config(base)
    except ConfigError as err:
        raise ConfigError(f"--recipe {path}: {err}") from None
    return base


def proposal_recipe(base: dict[str, Any], fragment: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``base`` with the proposal's targets: its ``IterativePruning`` takes the proposed ``keep_ratio`` (one
    per layer; its criterion becomes ``magnitude``), its ``Quantization`` the proposed ``bits`` and ``init`` (a
    base with ``bits: "auto"`` loses its ``budget`` and ``val_batches``; its ``epoch`` and ``lr`` stay);
    schedules, distillation, optimizer and export stay the base's. A callback the base lacks is added as the
    proposal has it (one-shot pruning at epoch 0, k-means at epoch 1); one the proposal lacks (no layer
    within the budget) is removed."""
    cfg = copy.deepcopy(base)
    callbacks = cfg.setdefault("trainer", {}).setdefault("callbacks", {})
    for name in ("IterativePruning", "Quantization"):  # nothing proposed (no layer within the budget): none
        if name not in fragment:
            callbacks.pop(name, None)
    for name, args in fragment.items():
        if name not in callbacks:
            callbacks[name] = args
        elif name == "IterativePruning":
            callbacks[name] = {k: v for k, v in callbacks[name].items() if k not in ("sensitivity", "layers")}
            callbacks[name].update(criterion="magnitude", keep_ratio=args["keep_ratio"])
        else:
            # a base that searches grids (bits "auto") takes the proposed k-means bits: its search settings go
            callbacks[name] = {k: v for k, v in callbacks[name].items() if k not in ("layers", "budget", "val_batches")}
            callbacks[name].update(bits=args["bits"], init=args["init"])
    cfg["name"] = f"{base.get('name', 'recipe')}_proposal"
    return cfg


def load_model(args: argparse.Namespace) -> tuple[nn.Module, Config]:
    """The network of ``-r`` with its weights, and the config (``-c``, else the checkpoint's, plus overrides)."""
    model, cfg, _ = load_trained_model(args.resume, args.config, overrides_from_args(args))
    return model, cfg


def select_layers(model: nn.Module, text: str | None) -> dict[str, nn.Module]:
    """``--layers`` resolved to ``{full name: module}`` (names, last components or types, as in configs)."""
    layers = prunable_layers(model)
    if text is None:
        return layers
    names: list[str] = []
    try:
        for key in (k.strip() for k in text.split(",") if k.strip()):
            names += [n for n in resolve(model, key, "--layers") if n not in names]
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if not names:
        raise ConfigError(f"--layers {text!r}: no layer given; prunable layers: {', '.join(layers)}")
    return {n: layers[n] for n in names}


# ------------------------------------------------------------------------------------------------- outputs
def sweep(layers: dict[str, nn.Module], points: list[Point], evaluate: Callable[[], Metrics], baseline: Metrics,
          seed: int, csv_path: Path) -> list[tuple[Point, Metrics]]:
    """Runs the sweep with a progress bar (stderr); ``csv_path`` appears, complete, when the sweep ends."""
    from tqdm import tqdm

    results = []
    with atomic_open(csv_path) as raw:
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow(COLUMNS)
        for point, metrics in tqdm(run_sweeps(layers, points, evaluate, baseline, seed), total=len(points),
                                   desc="sensitivity", unit="point", file=sys.stderr, dynamic_ncols=True):
            writer.writerow([point.layer, point.kind, point.value, point.init, *(metrics[c] for c in COLUMNS[4:])])
            results.append((point, metrics))
        raw.write(text.getvalue().encode("utf-8"))
    return results


def _curves(results: list[tuple[Point, Metrics]]) -> dict[tuple[str, str], dict[str, list[tuple[float, Metrics]]]]:
    """``{(kind, init): {layer: [(value, metrics), ...] sorted by value}}``, sweeps in the order they ran."""
    curves: dict[tuple[str, str], dict[str, list[tuple[float, Metrics]]]] = {}
    for point, metrics in results:
        curves.setdefault((point.kind, point.init), {}).setdefault(point.layer, []).append((point.value, metrics))
    return {key: {layer: sorted(c, key=lambda x: x[0]) for layer, c in by_layer.items()}
            for key, by_layer in curves.items()}


def plot(kind: str, init: str, curves: dict[str, list[tuple[float, Metrics]]], baseline: Metrics,
         budget: float | None, path: Path) -> None:
    """Top-1 error against keep ratio (%) or bits, one curve per layer, baseline and budget as lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # non-interactive, no display needed
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    scale = 100.0 if kind == "prune" else 1.0
    for layer, curve in curves.items():
        ax.plot([v * scale for v, _ in curve], [m["top1_err"] for _, m in curve], marker="o", ms=3, label=layer)
    ax.axhline(baseline["top1_err"], color="k", ls="--", lw=1, label="baseline")
    if budget is not None:
        ax.axhline(baseline["top1_err"] + budget, color="r", ls=":", lw=1, label=f"baseline + {budget:g} pt")
    if kind == "prune":
        ax.set(xlabel="weights kept (%)", title="Pruning sensitivity (each layer alone)")
        ax.invert_xaxis()  # dense on the left, as in Han et al. 2015 Fig. 6
    else:
        ax.set(xlabel="bits per weight", title=f"Quantization sensitivity, {init} init (each layer alone)")
    ax.set_ylabel("top-1 error (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    atomic_write_bytes(path, png.getvalue())


def write_figures(results: list[tuple[Point, Metrics]], baseline: Metrics, budget: float | None,
                  out_dir: Path) -> list[Path]:
    """``prune.png``, ``quantize_<init>.png`` and the same curves in TensorBoard:
    ``sensitivity/prune/<layer>/top1_err`` at step = keep ratio in %, ``sensitivity/quantize_<init>/...`` at
    step = bits (also ``top5_err`` and ``loss``), written in increasing step order."""
    from torch.utils.tensorboard import SummaryWriter

    paths = []
    with SummaryWriter(log_dir=str(out_dir)) as writer:
        for name, value in baseline.items():
            writer.add_scalar(f"sensitivity/baseline/{name}", value, 0)
        for (kind, init), curves in _curves(results).items():
            sweep_name = kind if kind == "prune" else f"{kind}_{init}"
            paths.append(out_dir / f"{sweep_name}.png")
            plot(kind, init, curves, baseline, budget, paths[-1])
            for layer, curve in curves.items():
                for value, metrics in curve:
                    step = round(value * 100) if kind == "prune" else int(value)
                    for name, figure in metrics.items():
                        writer.add_scalar(f"sensitivity/{sweep_name}/{layer}/{name}", figure, step)
    return paths


def write_proposal(results: list[tuple[Point, Metrics]], baseline: Metrics, layers: dict[str, nn.Module],
                   args: argparse.Namespace, evaluate: Callable[[], Metrics], out_dir: Path,
                   base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``proposal.json`` (the callbacks fragment) and ``proposal_report.json``; with ``--check``, the proposal
    applied to all layers at once is evaluated first (and the weights restored); with ``base`` (``--recipe``),
    ``recipe.json``."""
    sizes = {name: module.weight.numel() for name, module in layers.items()}
    proposal = propose(results, baseline["top1_err"], args.budget, sizes)
    fragment = proposal_callbacks(proposal["keep_ratio"], proposal["bits"], proposal["init"], args.seed)
    report = {"checkpoint": str(args.resume), "split": args.split, "budget": args.budget, "baseline": baseline,
              **proposal, "callbacks": fragment,
              "needs_max_epochs": QUANTIZE_EPOCH + 1 if len(fragment) == 2 else 1}
    if args.check:
        joint = check_jointly(layers, proposal["keep_ratio"], proposal["bits"], proposal["init"] or "linear",
                              evaluate, args.seed)
        report["check"] = {stage: {**m, "added_top1_err": m["top1_err"] - baseline["top1_err"],
                                   "within_budget": m["top1_err"] <= proposal["limit"] + BUDGET_TOL}
                           for stage, m in joint.items()}
    if base is not None:
        recipe = proposal_recipe(base, fragment)
        try:  # what train.py checks before it trains: the config, then the callbacks against the model
            cfg = parse_config(recipe)
            build_config_callbacks(cfg, build_model(cfg))
        except ConfigError as err:
            raise ConfigError(f"--recipe {args.recipe} with the proposal in it is not a valid config: {err}") from None
        atomic_write_text(out_dir / "recipe.json", json.dumps(recipe, indent=2) + "\n")
        report["recipe"] = str(out_dir / "recipe.json")
    atomic_write_text(out_dir / "proposal.json", json.dumps(fragment, indent=2) + "\n")
    atomic_write_text(out_dir / "proposal_report.json", json.dumps(report, indent=2) + "\n")
    return report


def format_summary(baseline: Metrics, report: dict[str, Any] | None, split: str) -> str:
    """The baseline, and the proposal as a per-layer table (with the joint check when run)."""
    lines = [(f"baseline ({split} split): top-1 {baseline['top1_err']:.2f} %, "
              f"top-5 {baseline['top5_err']:.2f} %, loss {baseline['loss']:.4f}")]
    if report is None:
        return "\n".join(lines)
    width = max(len(n) for n in report["layers"]) + 2
    lines.append(f"proposal, each layer alone within top-1 {report['limit']:.2f} % (baseline + "
                 f"{report['budget']:g} pt), quantization init {report['init'] or '-'}:")
    lines.append(f"  {'layer':<{width}}{'keep':>6} {'top1_err':>9} {'bits':>5} {'top1_err':>9}")
    for name, row in report["layers"].items():
        cells = [f"{row[key]:.2f}" if isinstance(row[key], float) and "err" in key else str(row[key] or "-")
                 for key in ("keep_ratio", "prune_top1_err", "bits", "quantize_top1_err")]
        lines.append(f"  {name:<{width}}{cells[0]:>6} {cells[1]:>9} {cells[2]:>5} {cells[3]:>9}")
    steps = {"IterativePruning": "one-shot pruning at epoch 0", "Quantization": "k-means at epoch {epoch}"}
    if report["callbacks"]:
        lines.append("proposal.json, a trainer.callbacks fragment: " + ", ".join(
            steps[name].format(**args) for name, args in report["callbacks"].items())
            + f" (needs trainer.max_epochs >= {report['needs_max_epochs']})")
    for stage, m in report.get("check", {}).items():
        lines.append(f"check, all layers at once ({stage}): top-1 {m['top1_err']:.2f} % "
                     f"({m['added_top1_err']:+.2f} pt, {'within' if m['within_budget'] else 'OVER'} the budget)")
    if "recipe" in report:
        lines.append(f"recipe with these targets: {report['recipe']} (train it: python train.py -c {report['recipe']})")
    return "\n".join(lines)


def analyse(args: argparse.Namespace) -> tuple[Metrics, dict[str, Any] | None, list[Path]]:
    """The whole analysis; returns the baseline, the proposal report (with --budget) and the files written."""
    settings = sweep_settings(args)
    model, cfg = load_model(args)
    layers = select_layers(model, args.layers)
    out_dir = Path(args.out) if args.out else Path(args.resume).parent / "sensitivity"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--out {out_dir}: cannot create the folder: {err.strerror}") from None
    evaluate = make_evaluator(cfg, model, args.split, args.limit_batches)
    baseline = evaluate()
    atomic_write_text(out_dir / "baseline.json", json.dumps({"split": args.split, **baseline}, indent=2) + "\n")
    points = sweep_points(layers, settings["kinds"], settings["keep_ratios"], settings["bits"], settings["inits"])
    results = sweep(layers, points, evaluate, baseline, args.seed, out_dir / "sensitivity.csv")
    files = [out_dir / "sensitivity.csv", out_dir / "baseline.json",
             *write_figures(results, baseline, args.budget, out_dir)]
    report = None
    if args.budget is not None:
        report = write_proposal(results, baseline, layers, args, evaluate, out_dir, settings["recipe"])
        files += [out_dir / "proposal.json", out_dir / "proposal_report.json"]
        files += [Path(report["recipe"])] if "recipe" in report else []
    return baseline, report, files


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    setup_logging(None)
    try:
        baseline, report, files = analyse(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(baseline, report, args.split))
    print(f"wrote {', '.join(str(f) for f in files)} and TensorBoard events in {files[0].parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
