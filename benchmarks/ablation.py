"""What each beyond-the-paper technique buys, from one dense checkpoint: an ablation table and a rate-vs-error curve.

    python benchmarks/ablation.py --model lenet300                       # trains the dense stage first
    python benchmarks/ablation.py --model lenet5 --dense runs/.../dense.ckpt --scales 1.0

The beyond recipe (``configs/<model>_fashionmnist_beyond.json``) is a dense cosine cycle followed by a
compression cycle. Every row here runs that compression cycle (``train.py --weights DENSE``, the recipe's
epochs shifted to start at 0: the same schedule, the same learning rates) from the *same* dense checkpoint,
switching one technique on at a time:

1. ``paper``: the paper-faithful recipe's keep ratios and bits (``*_pipeline.json``), Huffman coding;
2. ``+ sparser, fewer bits``: the beyond recipe's keep ratios, k-means at ``KMEANS_BITS`` (3-5 bits, trained from
   epoch 50, as the LeNet-5 recipe does and LeNet-300-100's did until searched grids replaced it), still Huffman,
   no teacher;
3. ``+ distillation``: the dense model teaches the compressed one (``Distillation``);
3b. ``+ <Arch> teacher`` (when the recipe names a ``Distillation.teacher``, or ``--teacher CKPT`` gives one): that
   other network teaches instead; a config is trained once into ``--save-dir``/teacher, as train.py trains it
   (``teacher.py``);
4. ``+ range codec``: the last taught row's checkpoint re-encoded with ``export.codec: "range"`` (no training: the
   same weights, so the same error, fewer bytes);
5. ``+ float16 biases``: the same checkpoint, range-coded with ``export.raw_dtype: "float16"`` too (the
   error is the file's, biases rounded);
6. ``+ the recipe's quantization and codec``: that cycle trained again with the recipe's own ``Quantization`` and
   export (LeNet-300-100: weights and biases on uniform grids searched under a validation budget, ``context``
   codec; LeNet-5: 4-bit shared long biases, ``range`` codec; float16 for what stays raw): the beyond recipe's
   compression cycle as shipped.

Rows 1-5 store their biases raw.

``--scales`` adds points to the curve: both recipes with every keep ratio times each scale (1.0 is the
table's rows). Into ``--out``: ``ablation_<model>.md``, ``ablation_<model>.json``, ``rate_vs_error_<model>.png``.
The ``train.py`` / ``test.py`` calls are ``runs.py``'s (shared with ``reproduce.py``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, like train.py
sys.path.insert(0, str(Path(__file__).resolve().parent))  # runs.py and results_tables.py beside this file

from results_tables import ReproduceError
from runs import ROOT, evaluate_dcz, last_error, path_override, train

from compression.atomic import atomic_write_bytes, atomic_write_text
from parse_config import ConfigError, parse_config
from teacher import FOLDER, teacher_command, teacher_config
from utils import commit_id

MODELS = ("lenet300", "lenet5")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Ablation of the beyond-the-paper techniques from one dense model.")
    parser.add_argument("--model", choices=MODELS, default="lenet300", help="which LeNet (Fashion-MNIST)")
    parser.add_argument("--dense", default=None, metavar="CKPT",
                        help="dense checkpoint to start every row from (default: train the recipe's dense stage)")
    parser.add_argument("--scales", default="1.0",
                        help="keep-ratio multipliers of the curve's points, comma-separated (1.0: the table)")
    parser.add_argument("--save-dir", default=str(ROOT / "runs" / "ablation"), help="where the runs go")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="where the tables go")
    parser.add_argument("--teacher", default=None, metavar="CKPT",
                        help="checkpoint of the other network that teaches (default: the recipe's "
                             "Distillation.teacher, a config trained once)")
    parser.add_argument("--reuse", action="store_true",
                        help="take fits already finished under --save-dir with the same config (an interrupted or "
                             "earlier ablation) instead of training them again")
    parser.add_argument("--jobs", type=int, default=1,
                        help="fits trained at once, each with CPUs / jobs torch threads unless OMP_NUM_THREADS is "
                             "set (the rows are independent: 2 on 2 cores saves wall time, changes no row)")
    return parser


# The k-means quantization of rows 2-5 (LeNet-5's recipe's; LeNet-300-100's until searched grids replaced it).
KMEANS_BITS = {"LeNet300": {"fc1": 3, "fc2": 4, "fc3": 5}, "LeNet5": {"Conv2d": 5, "fc1": 3, "fc2": 4}}
KMEANS = {"init": "linear", "epoch": 50, "lr": 0.01}


def read_recipe(model: str, kind: str) -> dict[str, Any]:
    return json.loads((ROOT / "configs" / f"{model}_fashionmnist_{kind}.json").read_text())


def first_compression_epoch(cfg: dict[str, Any]) -> int:
    cbs = cfg["trainer"]["callbacks"]
    return min([cbs["IterativePruning"]["start_epoch"], cbs["Quantization"]["epoch"]]
               + ([cbs["Distillation"]["epoch"]] if "Distillation" in cbs else []))


def compression_cycle(beyond: dict[str, Any], dense: Path, name: str, keep: dict[str, float],
                      bits: dict[str, int] | None, distill: bool, codec: str, teacher: str | None = None
                      ) -> dict[str, Any]:
    """The beyond recipe's compression epochs as a run of their own from ``dense``, with these keep ratios and
    k-means ``bits`` (``KMEANS``, raw float32 biases), or with ``bits=None`` the recipe's own quantization and
    its ``raw_dtype``.
    With ``distill``, the checkpoint ``teacher`` teaches, else the dense model itself (the recipe's own
    ``Distillation.teacher`` never: a config would be trained again by every row)."""
    cfg = copy.deepcopy(beyond)
    shift = first_compression_epoch(cfg)
    cbs = cfg["trainer"]["callbacks"]
    cbs["IterativePruning"].update(keep_ratio=keep, start_epoch=cbs["IterativePruning"]["start_epoch"] - shift,
                                   end_epoch=cbs["IterativePruning"]["end_epoch"] - shift)
    if bits is not None:
        cbs["Quantization"] = {"bits": bits, **KMEANS}
    cbs["Quantization"]["epoch"] -= shift
    if distill:
        cbs["Distillation"]["epoch"] -= shift
        cbs["Distillation"].pop("teacher", None)
        if teacher is not None:
            cbs["Distillation"]["teacher"] = teacher
    else:
        cbs.pop("Distillation", None)
    cfg["trainer"]["max_epochs"] -= shift
    sched = cfg.get("lr_scheduler") or {}
    if sched.get("type") == "CosineCycles":  # the row starts where the recipe's compression cycle starts
        cycles, peaks = sched["args"]["cycles"], sched["args"].get("peaks") or [1.0] * len(sched["args"]["cycles"])
        while shift and cycles and cycles[0] <= shift:
            shift -= cycles[0]
            cycles, peaks = cycles[1:], peaks[1:]
        if shift or not cycles:
            raise ReproduceError(f"{beyond['name']}: its compression does not start at a cycle boundary")
        sched["args"].update(cycles=cycles, peaks=peaks)
    elif sched:
        raise ReproduceError(f"{beyond['name']}: ablation rows need a CosineCycles schedule, got {sched.get('type')}")
    cfg.update(name=name, pretrained=str(dense))
    cfg["export"].update(codec=codec, raw_dtype=beyond["export"].get("raw_dtype", "float32") if bits is None
                         else "float32")
    return cfg


def trained_checkpoint(cmd: list[str], runs: Path, pattern: str, what: str) -> Path:
    """Runs the train.py command ``cmd``; returns the one new ``last.ckpt`` under ``runs`` that ``pattern`` finds.

    Raises:
        ReproduceError: train.py failed, or left no new checkpoint (or several).
    """
    before = set(runs.glob(pattern))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    new = sorted(set(runs.glob(pattern)) - before)
    if proc.returncode != 0 or len(new) != 1:
        raise ReproduceError(f"training {what} failed (exit {proc.returncode}, {len(new)} new checkpoints): "
                             f"{last_error(proc.stdout + proc.stderr)}")
    return new[0]


def train_dense(beyond: dict[str, Any], save_dir: Path) -> Path:
    """Trains the beyond recipe's dense stage alone; returns its last checkpoint (what ``dense.ckpt`` holds)."""
    cfg = copy.deepcopy(beyond)
    cfg.update(name=f"{beyond['name']}_dense")
    cfg["trainer"].update(max_epochs=first_compression_epoch(beyond), callbacks={})
    path = save_dir / f"{cfg['name']}.json"
    path.write_text(json.dumps(cfg, indent=2))
    cmd = [sys.executable, str(ROOT / "train.py"), "-c", str(path)] + path_override("trainer.save_dir", save_dir)
    return trained_checkpoint(cmd, save_dir, f"{cfg['name']}/*/last.ckpt", "the dense stage")


def teacher_arch(beyond: dict[str, Any], teacher: str | Path) -> str:
    """The architecture of the teacher checkpoint ``teacher`` of the recipe ``beyond``, from the config stored
    with it (``teacher_config``); "another network" without one."""
    try:
        return teacher_config(parse_config(beyond), teacher).arch.type
    except ConfigError:
        return "another network"


def find_teacher(args: argparse.Namespace, beyond: dict[str, Any], save_dir: Path) -> str | None:
    """The checkpoint of the other network that teaches: ``--teacher``, else the recipe's ``Distillation.teacher``
    (a config trained once into ``save_dir``/teacher, as train.py trains it); None: the recipe has none.

    Raises:
        ReproduceError: no such checkpoint, its training failed, or a teacher of other data (``teacher_config``).
    """
    named = (beyond["trainer"]["callbacks"].get("Distillation") or {}).get("teacher")
    if args.teacher:
        ckpt = Path(args.teacher).expanduser().resolve()
        if not ckpt.is_file():
            raise ReproduceError(f"--teacher {ckpt}: no such checkpoint")
    elif named is None:
        return None
    elif named.endswith(".json"):
        ckpt = trained_checkpoint(teacher_command(ROOT / named, save_dir / FOLDER), save_dir, f"{FOLDER}/*/*/last.ckpt",
                                  f"the teacher {named}")
    else:
        ckpt = ROOT / named
    try:
        teacher_config(parse_config(beyond), ckpt)
    except ConfigError as err:
        raise ReproduceError(str(err)) from None
    return str(ckpt)


def run_row(cfg: dict[str, Any], save_dir: Path) -> dict[str, Any]:
    path = save_dir / f"{cfg['name']}.json"
    path.write_text(json.dumps(cfg, indent=2))
    run = train(path, ["trainer.progress_bar=none"], save_dir, None)
    return {**json.loads((run / "summary.json").read_text()), "run_dir": str(run)}


def recode(row: dict[str, Any], name: str, raw_dtype: str) -> dict[str, Any]:
    """Row ``row``'s best checkpoint encoded with the range codec, evaluated by test.py (the file alone)."""
    run = Path(row["run_dir"])
    out = run / f"model_range_{raw_dtype}.dcz"
    cmd = [sys.executable, str(ROOT / "dcz.py"), "encode", str(run / "best.ckpt"), "--out", str(out), "--codec",
           "range", "--raw-dtype", raw_dtype]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ReproduceError(f"dcz.py encode failed on {run / 'best.ckpt'}: {last_error(proc.stdout + proc.stderr)}")
    size = out.stat().st_size
    return {**row, "recipe": name, "top1_err": evaluate_dcz(out, None), "dcz_bytes": size,
            "rate": row["dense_bytes"] / size, "file": out.name, "codec": "range", "raw_dtype": raw_dtype}


def scaled(keep: dict[str, float], scale: float) -> dict[str, float]:
    return {k: round(min(1.0, v * scale), 4) for k, v in keep.items()}


def table(model: str, dense_err: float, rows: list[dict[str, Any]], commit: str, command: str) -> str:
    lines = [f"# Ablation: {model} on Fashion-MNIST, every row from the same dense checkpoint", "",
             (f"`{command}` at commit `{commit}`. Dense top-1 error {dense_err:.2f} % (test split); each row is "
              "the beyond recipe's compression cycle with the techniques named switched on, its `model.dcz` "
              "measured on disk and evaluated by `test.py`."), "",
             "| row | keep ratios | bits | codec | teacher | biases | file bytes | rate | top-1 error | vs dense |",
             "|---|---|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        keep = " / ".join(f"{k} {100 * v:g}%" for k, v in r["keep"].items())
        bits = (" / ".join(f"{k} {v}" for k, v in r["bits"].items()) if isinstance(r["bits"], dict)
                else f"{r['bits']} (searched grids)")
        biases = r.get("raw_dtype", "float32") + (f", long ones {r['bias_bits']}-bit" if r.get("bias_bits") else "")
        teacher = r.get("teacher") or ("itself" if r["distill"] else "no")
        lines.append(f"| {r['recipe']} | {keep} | {bits} | {r['codec']} | {teacher} | {biases} | "
                     f"{r['dcz_bytes']:,} | **{r['rate']:.1f}×** | {r['top1_err']:.2f} % | "
                     f"{r['top1_err'] - dense_err:+.2f} pt |")
    return "\n".join(lines) + "\n"


def plot(model: str, dense_err: float, points: dict[str, list[tuple[float, float]]]) -> bytes:
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=90)
    for label, marker in (("paper-faithful (Han 2016)", "o"), ("ours, beyond the paper", "s")):
        pts = sorted(points.get(label, []))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label)
    ax.axhline(dense_err, color="grey", linestyle="--", label=f"dense ({dense_err:.2f} %)")
    ax.axhline(dense_err + (0.5 if model == "lenet300" else 0.3), color="grey", linestyle=":", label="error budget")
    ax.set(xscale="log", xlabel="compression rate (dense float32 bytes / model.dcz bytes)",
           ylabel="top-1 test error (%)", title=f"{model}, Fashion-MNIST: rate vs error")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def plan_rows(args: argparse.Namespace, beyond: dict[str, Any], paper: dict[str, Any], dense: Path,
              teacher: str | None = None) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """Every fit of the table and the curve, in table order: ``(tag, config, row fields)``."""
    scales = [float(s) for s in args.scales.split(",") if s.strip()]
    if 1.0 not in scales or any(s <= 0 for s in scales):
        raise ReproduceError(f"--scales {args.scales!r}: expected positive numbers including 1.0 (the table's "
                             "rows), e.g. 1.0,1.4")
    cbs, paper_cbs = beyond["trainer"]["callbacks"], paper["trainer"]["callbacks"]
    ours = (cbs["IterativePruning"]["keep_ratio"], KMEANS_BITS[beyond["arch"]["type"]])
    # (row, keep ratios, bits, distill, teacher checkpoint: None for the dense model itself)
    variants = [("paper", paper_cbs["IterativePruning"]["keep_ratio"], paper_cbs["Quantization"]["bits"], False, None),
                ("+ sparser, fewer bits", *ours, False, None), ("+ distillation", *ours, True, None)]
    label = None  # the teacher's architecture
    if teacher is not None:
        label = teacher_arch(beyond, teacher)
        variants.append((f"+ {label} teacher", *ours, True, teacher))
    last_taught = variants[-1][0]
    fits = []
    for scale in scales:
        for i, (name, keep, bits, distill, by) in enumerate(variants):
            if scale != 1.0 and name not in ("paper", last_taught):
                continue  # the curve compares the two recipes; the middle rows are the table's only
            keep = scaled(keep, scale)
            tag = f"{args.model}_ablation_{i + 1}" + ("" if scale == 1.0 else f"_x{scale:g}")
            fields = {"keep": keep, "bits": bits, "scale": scale, "index": i, "last_taught": name == last_taught,
                      "teacher": "no" if not distill else "itself" if by is None else label}
            fits.append((tag, compression_cycle(beyond, dense, tag, keep, bits, distill, "huffman", teacher=by),
                         {**fields, "recipe": name, "distill": distill, "codec": "huffman"}))
            if name == last_taught:  # then the recipe's quantization and codec: as shipped, the curve's point for ours
                codec = beyond["export"].get("codec", "huffman")
                cfg = compression_cycle(beyond, dense, tag + "_grids", keep, None, True, codec, teacher=by)
                fits.append((tag + "_grids", cfg, {
                    **fields, "last_taught": False, "recipe": "+ the recipe's quantization and codec",
                    "distill": True, "codec": codec, "raw_dtype": cfg["export"]["raw_dtype"], "shipped": True,
                    "bits": cfg["trainer"]["callbacks"]["Quantization"]["bits"]}))
    return fits


def finished_run(cfg: dict[str, Any], folder: Path) -> dict[str, Any] | None:
    """The row of a finished run of ``cfg`` under ``folder`` (its config equal, a summary.json), else None."""
    def settings(raw: dict[str, Any]) -> dict[str, Any]:  # all but where the run went and how it looked
        dump = parse_config(raw).model_dump(mode="json")
        dump["trainer"].pop("save_dir"), dump["trainer"].pop("progress_bar")
        return dump

    for summary in sorted(folder.glob(f"{cfg['name']}/*/summary.json")):
        run = summary.parent
        try:
            same = settings(json.loads((run / "config.json").read_text())) == settings(cfg)
        except (OSError, ValueError, ConfigError):
            same = False
        if same:
            return {**json.loads(summary.read_text()), "run_dir": str(run)}
    return None


def run_fits(fits: list[tuple[str, dict[str, Any], dict[str, Any]]], save_dir: Path,
             jobs: int, reuse: bool = False) -> dict[str, dict[str, Any]]:
    """Trains every fit (``jobs`` at a time, each in a folder of its own); returns their rows by tag. With
    ``reuse``, a fit already finished under ``save_dir`` with the same config is taken as it is."""
    def one(fit: tuple[str, dict[str, Any], dict[str, Any]]) -> tuple[str, dict[str, Any]]:
        tag, cfg, fields = fit
        folder = save_dir / tag if jobs > 1 else save_dir  # train() finds a run as the one new folder
        folder.mkdir(parents=True, exist_ok=True)
        done = finished_run(cfg, folder) if reuse else None
        return tag, {**(done or run_row(cfg, folder)), **fields}

    with ThreadPoolExecutor(max_workers=jobs) as pool:  # each worker waits on its own train.py process
        return dict(pool.map(one, fits))


def collect(args: argparse.Namespace) -> tuple[float, list[dict[str, Any]], dict[str, list[tuple[float, float]]]]:
    save_dir = Path(args.save_dir).expanduser().resolve()
    save_dir.mkdir(parents=True, exist_ok=True)
    beyond, paper = read_recipe(args.model, "beyond"), read_recipe(args.model, "pipeline")
    dense = Path(args.dense).expanduser().resolve() if args.dense else train_dense(beyond, save_dir)
    if not dense.is_file():
        raise ReproduceError(f"--dense {dense}: no such checkpoint")
    fits = plan_rows(args, beyond, paper, dense, find_teacher(args, beyond, save_dir))
    done = run_fits(fits, save_dir, args.jobs, args.reuse)
    rows, points = [], {}
    for tag, _, fields in fits:
        row = done[tag]
        if fields["scale"] == 1.0:
            rows.append(row)
            if fields.get("last_taught"):  # the same checkpoint, range-coded, then float16 biases
                rows += [recode(row, "+ range codec", "float32"), recode(row, "+ float16 biases", "float16")]
        if fields["recipe"] == "paper" or fields.get("shipped"):  # the paper's and the shipped recipe's
            label = "ours, beyond the paper" if fields["distill"] else "paper-faithful (Han 2016)"
            points.setdefault(label, []).append((row["rate"], row["top1_err"]))
    dense_err = rows[0]["dense_top1_err"]
    return dense_err, rows, points


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = get_args_parser().parse_args(argv)
    if args.jobs < 1:
        print(f"error: --jobs {args.jobs}: expected a number of fits >= 1", file=sys.stderr)
        return 2
    if args.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:  # read by torch in every train.py started
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    commit, out = commit_id(), Path(args.out).expanduser().resolve()
    try:
        dense_err, rows, points = collect(args)
    except ReproduceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "benchmarks/ablation.py", *argv])
    text = table(args.model, dense_err, rows, commit, command)
    keys = ("recipe", "keep", "bits", "codec", "raw_dtype", "bias_bits", "distill", "teacher", "dcz_bytes",
            "rate", "top1_err", "dense_top1_err", "dense_bytes", "wall_s", "run_dir")
    data = {"model": args.model, "commit": commit, "command": command,
            "rows": [{k: r.get(k) for k in keys} for r in rows],
            "curve": {k: [list(p) for p in sorted(v)] for k, v in points.items()}}
    atomic_write_text(out / f"ablation_{args.model}.md", text)
    atomic_write_text(out / f"ablation_{args.model}.json", json.dumps(data, indent=2) + "\n")
    atomic_write_bytes(out / f"rate_vs_error_{args.model}.png", plot(args.model, dense_err, points))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
