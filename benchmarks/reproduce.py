"""Reproduce Table 1 of Han et al. 2016 (Deep Compression, arXiv 1510.00149v5) with one command.

Each recipe (``configs/<model>_<dataset>_pipeline.json``, or ``--recipe``) runs the whole pipeline of Fig. 1
in one ``train.py`` fit, in a subprocess: dense training, iterative pruning with retraining, trained
quantization, Huffman coding. Its run folder holds ``summary.json`` (the Table 1 row) and
``compression_report.json`` (Tables 2/3). ``test.py`` then evaluates ``model.dcz`` in a fresh process: a
check that the file alone gives the error the run reported.

    python benchmarks/reproduce.py                                   # LeNet-300-100 and LeNet-5, Fashion-MNIST
    python benchmarks/reproduce.py --dataset mnist --data-dir /data/mnist
    python benchmarks/reproduce.py --kinds pipeline,beyond         # also ours beyond the paper
    python benchmarks/reproduce.py --from-runs runs/reproduce/*/*    # tables from finished runs, no training
    python benchmarks/reproduce.py --kinds beyond --seeds 42,1,2      # each recipe three times: means, each seed listed
    python benchmarks/reproduce.py --kinds structured --seeds 42,1,2  # the recipes that remove whole units

Into ``--out``: ``<model>_<dataset>_<recipe>.json`` per run, ``table1.md`` (ours, then the paper's MNIST
rows in a table of their own), ``table23.md`` (per layer) and ``rate_vs_error.png``. The ``train.py`` / ``test.py``
calls are ``runs.py``'s; the tables and the figure, ``results_tables.py``'s.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, like train.py
sys.path.insert(0, str(Path(__file__).resolve().parent))  # runs.py and results_tables.py beside this file

from results_tables import PAPER_LABEL, ReproduceError, mismatch, plot, table1, table23  # noqa: F401
from runs import ROOT, evaluate_dcz, train

from compression.atomic import atomic_write_bytes, atomic_write_text
from utils import commit_id

MODELS = ("lenet300", "lenet5")
DATASETS = ("fashionmnist", "mnist")
KINDS = ("pipeline", "beyond", "structured")  # the paper-faithful recipes; ours beyond the paper; and with whole
# units removed (StructuredPruning): the last two Fashion-MNIST only
REQUIRED = ("model", "dataset", "recipe", "dense_top1_err", "top1_err", "dcz_bytes", "dense_bytes", "rate", "wall_s")
NUMBERS = REQUIRED[3:]  # dense_top1_err may be null: a recipe that prunes from epoch 0 has no dense stage
EXTRA = ("rate_p", "rate_pq", "rate_pqh", "pruned_top1_err", "stages")
SEED_KEYS = ("dense_top1_err", "pruned_top1_err", "top1_err", "dcz_top1_err", "dcz_bytes", "rate", "rate_p",
             "rate_pq", "rate_pqh", "wall_s")  # what a row of several seeds averages, and lists per seed


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Reproduce the Deep Compression results table (Han et al. 2016).")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--dataset", choices=DATASETS, default="fashionmnist", help="dataset of the shipped recipes")
    parser.add_argument("--data-dir", default=None,
                        help="dataset folder for train.py and test.py (default: the recipe's, then the system's)")
    parser.add_argument("--kinds", default="pipeline",
                        help=f"comma-separated, of {', '.join(KINDS)}: configs/<model>_<dataset>_<kind>.json "
                             "(pipeline: the paper-faithful recipes; beyond: ours beyond the paper; structured: "
                             "beyond, with whole units removed)")
    parser.add_argument("--recipe", action="append", default=[], metavar="PATH",
                        help="run this config file instead of the shipped recipes (repeatable)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override passed to every train.py call, e.g. trainer.max_epochs=3 (repeatable)")
    parser.add_argument("--save-dir", default=str(ROOT / "runs" / "reproduce"),
                        help="where the runs go (default: runs/reproduce/ in the repository)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                        help="where the tables go (default: benchmarks/results/ in the repository)")
    parser.add_argument("--with-rows", nargs="+", default=[], metavar="ROW_JSON",
                        help="result rows written earlier (<model>_<dataset>_<recipe>.json) that join table1.md and "
                             "the curve as they are (no run folder: no per-layer table, no file check)")
    parser.add_argument("--from-runs", nargs="+", default=None, metavar="RUN_DIR",
                        help="skip training: build the tables from these finished run folders")
    parser.add_argument("--seeds", default=None, metavar="S1,S2,...",
                        help="train each recipe once per seed (--set seed=S); a row is then the mean of its runs, "
                             "each seed's figures listed (default: the recipe's seed, once)")
    parser.add_argument("--no-check", action="store_true", default=False,
                        help="skip the test.py evaluation of each model.dcz (dcz_top1_err is then null)")
    return parser


# -------------------------------------------------------------------------------------------- run folders


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; a missing, unreadable or malformed file is a ``ReproduceError``."""
    if not path.is_file():
        raise ReproduceError(f"{path.parent} is not a finished pipeline run: it has no {path.name}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReproduceError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise ReproduceError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_run(run: Path, need_dcz: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """``summary.json`` and ``compression_report.json`` of a run folder, checked for what the tables use.

    Raises:
        ReproduceError: a missing folder or file, or a summary without the keys the tables need.
    """
    if not run.is_dir():
        raise ReproduceError(f"run folder not found: {run}")
    summary, report = read_json(run / "summary.json"), read_json(run / "compression_report.json")
    missing = [k for k in REQUIRED if k not in summary]
    bad = [k for k in NUMBERS if k not in missing and (isinstance(summary[k], bool) or not isinstance(
        summary[k], (int, float)) and not (k == "dense_top1_err" and summary[k] is None))]
    if missing or bad:
        raise ReproduceError(f"{run / 'summary.json'}: missing {', '.join(missing) or '-'}; "
                             f"not a number: {', '.join(bad) or '-'}")
    if need_dcz and not (run / "model.dcz").is_file():
        raise ReproduceError(f"{run} has no model.dcz to check (pass --no-check to skip the check)")
    return summary, report


def result_row(summary: dict[str, Any], dcz_top1_err: float | None, commit: str) -> dict[str, Any]:
    """The results JSON of one run: the ten required keys, then the stage figures and the file's check.
    ``commit`` is the code the run trained with (its summary's), else (a run from before summaries named it)
    the code building the tables."""
    row = {**{k: summary[k] for k in REQUIRED}, "commit": summary.get("commit") or commit}
    return {**row, **{k: summary.get(k) for k in EXTRA}, "dcz_top1_err": dcz_top1_err}


def earlier_rows(paths: list[str], new: set[str]) -> list[dict[str, Any]]:
    """The ``--with-rows`` files, checked for the keys the tables use; none may be a row this call writes.

    Raises:
        ReproduceError: an unreadable file, missing keys, or the same model, dataset and recipe as a new row.
    """
    rows = []
    for name in paths:
        path = Path(name).expanduser().resolve()
        row = read_json(path)
        missing = [k for k in (*REQUIRED, "pruned_top1_err", "dcz_top1_err") if k not in row]
        if missing:
            raise ReproduceError(f"--with-rows {path}: not a result row (missing {', '.join(missing)})")
        if row_file(row) in new:
            raise ReproduceError(f"--with-rows {path}: the runs given make this row again; pass one of them")
        rows.append(row)
    return rows


def row_file(row: dict[str, Any]) -> str:
    """``<model>_<dataset>_<recipe>.json``, lowercased; a recipe named after its model and dataset already
    (``lenet300_fashionmnist_pipeline``) is not prefixed twice."""
    prefix, recipe = f"{row['model']}_{row['dataset']}_".lower(), row["recipe"].lower()
    stem = recipe if recipe.startswith(prefix) else prefix + recipe
    return re.sub(r"[^a-z0-9_.-]+", "-", stem) + ".json"


def recipes_to_run(args: argparse.Namespace) -> list[Path]:
    """``--recipe`` files, else the shipped ``configs/<model>_<dataset>_<kind>.json``; all must exist."""
    models = [m.strip().lower() for m in args.models.split(",") if m.strip()]
    if not args.recipe and (not models or any(m not in MODELS for m in models)):
        raise ReproduceError(f"--models {args.models!r}: expected a comma-separated list of {', '.join(MODELS)}")
    kinds = [k.strip().lower() for k in args.kinds.split(",") if k.strip()]
    if not args.recipe and (not kinds or any(k not in KINDS for k in kinds)):
        raise ReproduceError(f"--kinds {args.kinds!r}: expected a comma-separated list of {', '.join(KINDS)}")
    recipes = [Path(p).expanduser().resolve() for p in args.recipe]
    if not recipes:  # a kind need not have a recipe for every model (structured: LeNet-5 only)
        shipped = [ROOT / "configs" / f"{m}_{args.dataset}_{k}.json" for k in kinds for m in models]
        recipes = [r for r in shipped if r.is_file()]
        if not recipes:
            raise ReproduceError(f"recipe not found: {', '.join(map(str, shipped))}")
        for recipe in (r for r in shipped if r not in recipes):
            print(f"note: no shipped recipe {recipe.name}: skipped", file=sys.stderr)
    for recipe in recipes:
        if not recipe.is_file():
            raise ReproduceError(f"recipe not found: {recipe}")
    bad = [item for item in args.overrides if not item.partition("=")[0].strip() or "=" not in item]
    if bad:
        raise ReproduceError(f"--set {bad[0]!r}: expected KEY=VALUE, e.g. --set trainer.max_epochs=3")
    return recipes


def run_folders(args: argparse.Namespace, data_dir: Path | None) -> list[Path]:
    """``--from-runs``, else the run folders of the recipes, trained one after the other."""
    if args.from_runs:
        return [Path(p).expanduser().resolve() for p in args.from_runs]
    recipes, save_dir, runs = recipes_to_run(args), Path(args.save_dir).expanduser().resolve(), []
    seeds = parse_seeds(args.seeds)
    for recipe, seed in [(r, s) for r in recipes for s in seeds]:
        try:
            runs.append(train(recipe, args.overrides + ([] if seed is None else [f"seed={seed}"]), save_dir,
                              data_dir))
        except ReproduceError as err:  # the runs before it are done: say where
            done = f"; finished runs (tables with --from-runs): {' '.join(map(str, runs))}" if runs else ""
            raise ReproduceError(f"{err}{done}") from None
    return runs


def parse_seeds(text: str | None) -> list[int | None]:
    """``--seeds 42,1,2`` as integers (None: the recipe's own seed, one run).

    Raises:
        ReproduceError: not a comma-separated list of distinct integers.
    """
    if text is None:
        return [None]
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) < len(seeds):
        raise ReproduceError(f"--seeds {text!r}: expected distinct integers separated by commas, e.g. 42,1,2")
    return seeds


def run_seed(run: Path) -> int | None:
    """The seed a run trained with (its ``config.json``), None when it does not say."""
    try:
        seed = json.loads((run / "config.json").read_text()).get("seed")
    except (OSError, ValueError, AttributeError):
        return None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def merge_seeds(rows: list[dict[str, Any]], seeds: list[int | None], runs: list[Path]) -> dict[str, Any]:
    """One row from runs of one recipe with different seeds: the first run's row with the mean of each of
    ``SEED_KEYS`` and ``seeds``: each run's seed, folder and figures.

    Raises:
        ReproduceError: two runs with the same (or an unknown) seed.
    """
    if None in seeds or len(set(seeds)) < len(seeds):
        raise ReproduceError(f"several runs of {rows[0]['recipe']} with the same or an unknown seed "
                             f"({', '.join(map(str, runs))}): pass one run of each seed")
    merged = dict(rows[0])
    for key in SEED_KEYS:
        values = [r.get(key) for r in rows]
        merged[key] = None if any(v is None for v in values) else sum(values) / len(values)
    merged["seeds"] = [{"seed": seed, "run": str(run), **{k: r.get(k) for k in SEED_KEYS}}
                       for seed, run, r in zip(seeds, runs, rows)]
    return merged


def collect(args: argparse.Namespace, commit: str) -> tuple[list[dict[str, Any]], list[tuple[Path, dict, dict]]]:
    """Trains (or takes ``--from-runs``), checks each model.dcz; returns the rows (one per recipe: runs of one
    recipe with different seeds make one row, ``merge_seeds``) and each recipe's first (run, summary, report)."""
    if args.from_runs and args.recipe:
        raise ReproduceError("--from-runs builds tables from finished runs and --recipe trains new ones: pick one")
    data_dir = Path(args.data_dir).expanduser().resolve() if args.data_dir else None
    if data_dir is not None and not data_dir.is_dir():
        raise ReproduceError(f"--data-dir {args.data_dir}: no such folder")
    runs = run_folders(args, data_dir)
    loaded = [(run, *load_run(run, need_dcz=not args.no_check)) for run in runs]
    rows = [result_row(summary, None, commit) for _, summary, _ in loaded]
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row_file(row), []).append(i)
    for ids in (ids for ids in groups.values() if len(ids) > 1):  # checked before the slow file checks
        merge_seeds([rows[i] for i in ids], [run_seed(loaded[i][0]) for i in ids], [loaded[i][0] for i in ids])
    for (run, _, _), row in zip(loaded, [] if args.no_check else rows):
        row["dcz_top1_err"] = evaluate_dcz(run / "model.dcz", data_dir)
        if mismatch(row):
            print(f"warning: {run / 'model.dcz'}: test.py gives top-1 error {row['dcz_top1_err']:.2f} %, "
                  f"summary.json {row['top1_err']:.2f} %", file=sys.stderr)
    merged = [rows[ids[0]] if len(ids) == 1 else
              merge_seeds([rows[i] for i in ids], [run_seed(loaded[i][0]) for i in ids], [loaded[i][0] for i in ids])
              for ids in groups.values()]
    return merged, [loaded[ids[0]] for ids in groups.values()]  # per-layer tables: each recipe's first run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = get_args_parser().parse_args(argv)
    commit, out = commit_id(), Path(args.out).expanduser().resolve()
    try:  # everything is measured and rendered before the first file is written
        rows, loaded = collect(args, commit)
        earlier = earlier_rows(args.with_rows, {row_file(r) for r in rows})
        files = {out / row_file(r): json.dumps(r, indent=2) + "\n" for r in rows}
        files[out / "table1.md"] = text = table1(rows + earlier, commit,
                                                 shlex.join(["python", "benchmarks/reproduce.py", *argv]))
        files[out / "table23.md"] = table23(loaded) + "".join(
            f"\n{row['model']} on {row['dataset']} ({row['recipe']}): a row from an earlier run (`--with-rows`, "
            f"trained at commit {row.get('commit', 'unknown')}); its per-layer table was built with it.\n"
            for row in earlier)
        png = plot(rows + earlier)
    except ReproduceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"error: --out {out}: cannot create the folder: {err.strerror}", file=sys.stderr)
        return 2
    for path, content in files.items():
        atomic_write_text(path, content)
    atomic_write_bytes(out / "rate_vs_error.png", png)
    print(text)
    print(f"wrote {', '.join(p.name for p in files)}, rate_vs_error.png in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
