"""Ours against MPEG's NNR codec (DeepCABAC, ``nncodec``) on the same pruned checkpoint: both rate / error curves.

NNR is what a researcher would run after the fact on our ``pruned.ckpt``; this prints, on the test split, the
bytes and errors of NNR's bitstream at several quantization parameters and of ours: the post-training path
(``dcz.py encode --budget``, ctx-v1) at several budgets, and any ``.dcz`` given with ``--dcz`` (e.g. the run's own
``model.dcz``, trained quantization). Each of our files is then set against the smallest NNR file whose test
error is no higher.

``nncodec`` lives in an environment of its own (it builds a C++ extension and pins numpy < 2, so it is never our
dependency); ``--nnr-python`` names that environment's Python, which runs ``benchmarks/nnr_codec.py``. Without it
only our curve is printed.

    python benchmarks/bench_nnr.py runs/<name>/<ts>/pruned.ckpt --nnr-python /opt/nnr/bin/python \\
        [--dcz runs/<name>/<ts>/model.dcz] [--qps -24,-22,-20,-18,-16] [--budgets 0.05,0.1,0.2,0.3] [--json out.json]

Set-up of such an environment (Python 3.11; a CPU torch wheel is enough):
``python -m venv /opt/nnr && /opt/nnr/bin/pip install torch nncodec==2.1.3``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builders import load_trained_model, make_evaluator  # noqa: E402
from compression.atomic import atomic_write_text  # noqa: E402
from parse_config import add_override_args, overrides_from_args  # noqa: E402
from post_training import quantize_checkpoint  # noqa: E402
from trainer.export import read_compressed  # noqa: E402

DRIVER = Path(__file__).resolve().with_name("nnr_codec.py")


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def nnr_point(python: str, tensors: dict[str, torch.Tensor], qp: int, scratch: Path, dq: bool
              ) -> tuple[int, dict[str, torch.Tensor]]:
    """NNR's bytes at ``qp`` and the tensors its bitstream decodes to."""
    src, out = scratch / "tensors.npz", scratch / f"nnr_qp{qp}"
    np.savez(src, **{name: t.detach().cpu().numpy().astype(np.float32) for name, t in tensors.items()})
    command = [python, str(DRIVER), str(src), str(out), "--qp", str(qp), *(["--dq"] if dq else [])]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"nncodec failed (qp {qp}): {done.stderr.strip().splitlines()[-1:]}")
    size = json.loads(done.stdout.strip().splitlines()[-1])["bytes"]
    with np.load(out / "decoded.npz") as data:
        return size, {name: torch.from_numpy(data[name].copy()) for name in data.files}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    overrides = overrides_from_args(args)
    model, cfg, _ = load_trained_model(args.checkpoint, None, overrides)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dense_bytes = 4 * sum(p.numel() for p in model.parameters())
    test, val = make_evaluator(cfg, model, "test"), make_evaluator(cfg, model, "val")
    rows: list[dict[str, Any]] = []

    def measure(method: str, setting: str, size: int, state: dict[str, torch.Tensor]) -> None:
        model.load_state_dict(state)
        row = {"method": method, "setting": setting, "bytes": size, "rate": dense_bytes / size,
               "val_top1_err": val()["top1_err"], "test_top1_err": test()["top1_err"]}
        rows.append(row)
        print(f"{method:<34} {setting:<22} {size:>9,} B {row['rate']:>6.1f}x  val {row['val_top1_err']:.2f} %  "
              f"test {row['test_top1_err']:.2f} %", flush=True)

    measure("checkpoint (float32)", Path(args.checkpoint).name, dense_bytes, original)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        if args.nnr_python:
            for qp in args.qps:
                size, decoded = nnr_point(args.nnr_python, original, int(qp), scratch, args.dq)
                measure("NNR (nncodec 2.1.3)", f"qp {int(qp)}{' dq' if args.dq else ''}", size,
                        {**original, **decoded})
        else:
            print("no --nnr-python: NNR's curve skipped (install nncodec in an environment of its own)")
        for budget in args.budgets:
            out = scratch / f"ours_{budget:g}.dcz"
            quantize_checkpoint(args.checkpoint, out, budget, limit_batches=args.val_batches, overrides=overrides)
            measure("ours: post-training (ctx-v1)", f"budget +{budget:g} pt", out.stat().st_size,
                    read_compressed(out)[0].state_dict())
        for path in args.dcz:
            measure("ours: file", str(path), Path(path).stat().st_size, read_compressed(path)[0].state_dict())
    print_comparison(rows)
    return rows


def print_comparison(rows: list[dict[str, Any]]) -> None:
    """Each of our files against the smallest NNR file at no higher test error."""
    nnr = [r for r in rows if r["method"].startswith("NNR")]
    if not nnr:
        return
    print("\nours vs the smallest NNR file at a test error no higher:")
    for row in (r for r in rows if r["method"].startswith("ours")):
        rivals = [r for r in nnr if r["test_top1_err"] <= row["test_top1_err"] + 1e-9]
        if not rivals:
            print(f"  {row['setting']}: {row['bytes']:,} B at {row['test_top1_err']:.2f} %: no NNR point that good")
            continue
        best = min(rivals, key=lambda r: r["bytes"])
        print(f"  {row['setting']}: {row['bytes']:,} B at {row['test_top1_err']:.2f} % vs NNR {best['setting']} "
              f"{best['bytes']:,} B at {best['test_top1_err']:.2f} %: {100 * (row['bytes'] / best['bytes'] - 1):+.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a pruned checkpoint written by train.py (pruned.ckpt)")
    parser.add_argument("--nnr-python", default=None, help="Python of an environment where nncodec is installed")
    parser.add_argument("--qps", type=floats, default=[-24, -22, -20, -18, -16], help="NNR's qps (comma-separated)")
    parser.add_argument("--dq", action="store_true", help="NNR with dependent quantization")
    parser.add_argument("--budgets", type=floats, default=[0.05, 0.1, 0.2, 0.3],
                        help="our post-training budgets, points of validation error (comma-separated; '' for none)")
    parser.add_argument("--val-batches", type=int, default=None, help="validation batches per search trial")
    parser.add_argument("--dcz", action="append", default=[], help="one of our files to measure too (repeatable)")
    add_override_args(parser)  # e.g. --set data_loader.args.data_dir=/data/fashion-mnist
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()
    rows = run(args)
    if args.json:
        atomic_write_text(args.json, json.dumps({"checkpoint": args.checkpoint, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
