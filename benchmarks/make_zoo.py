"""The zoo: the ``.dcz`` file of each shipped Fashion-MNIST recipe, copied from its run, with its Table 1 figures.

    python benchmarks/reproduce.py --kinds pipeline,beyond --save-dir /tmp/zoo/runs --out /tmp/zoo/out
    python benchmarks/make_zoo.py /tmp/zoo/runs/*/*/

For each run folder (its ``summary.json`` and ``model.dcz``): ``zoo/<recipe>.dcz``, a row of ``zoo/zoo.json``
(bytes, rate, test top-1 error, the commit that trained it, the command that re-makes it, the file's SHA-256 and
the SHA-256 of the weights it decodes to) and a golden copy ``tests/fixtures/dcz/<recipe>-<commit>.dcz`` with its
digest in ``tests/fixtures/dcz/digests.json``: a file once published keeps decoding to the same weights whatever the
format becomes (``tests/test_zoo.py``). Rows of ``zoo.json`` for recipes not given stay as they are (one recipe
re-made updates its row alone). Then the README's zoo table is these rows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compression.atomic import atomic_write_bytes, atomic_write_text  # noqa: E402
from trainer.export import read_compressed, weights_digest  # noqa: E402

ZOO, FIXTURES = ROOT / "zoo", ROOT / "tests" / "fixtures" / "dcz"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Copy the shipped recipes' .dcz files into zoo/ with their figures.")
    parser.add_argument("runs", nargs="+", help="run folders of the shipped recipes (summary.json + model.dcz)")
    return parser


def row(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    recipe, data = summary["recipe"], (run / "model.dcz").read_bytes()
    config = "config.json" if recipe == "lenet300_fashionmnist_pipeline" else f"configs/{recipe}.json"
    return {"file": f"zoo/{recipe}.dcz", "recipe": config, "model": summary["model"], "bytes": len(data),
            "rate": round(summary["rate"], 1), "dense_top1_err": summary["dense_top1_err"],
            "top1_err": summary["top1_err"], "commit": summary["commit"],
            "command": f"python train.py -c {config}", "sha256": hashlib.sha256(data).hexdigest(),
            "weights_sha256": weights_digest(read_compressed(run / "model.dcz")[0])}


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    pairs = sorted(((row(Path(run)), Path(run)) for run in args.runs), key=lambda pair: pair[0]["file"])
    ZOO.mkdir(exist_ok=True)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    digests_path = FIXTURES / "digests.json"
    digests = json.loads(digests_path.read_text()) if digests_path.is_file() else {}
    for r, run in pairs:
        data = (run / "model.dcz").read_bytes()
        atomic_write_bytes(ROOT / r["file"], data)
        golden = f"{Path(r['file']).stem}-{r['commit'].removesuffix('+dirty')}.dcz"
        atomic_write_bytes(FIXTURES / golden, data)
        digests[golden] = r["weights_sha256"]
    zoo_path = ZOO / "zoo.json"
    kept = {r["file"]: r for r in (json.loads(zoo_path.read_text()) if zoo_path.is_file() else [])}
    rows = sorted({**kept, **{r["file"]: r for r, _ in pairs}}.values(), key=lambda r: r["file"])
    atomic_write_text(zoo_path, json.dumps(rows, indent=2) + "\n")
    atomic_write_text(digests_path, json.dumps(dict(sorted(digests.items())), indent=2) + "\n")
    for r in rows:
        print(f"| `{r['file']}` | {r['bytes']:,} | {r['rate']:.1f}× | {r['top1_err']:.2f} % | `{r['recipe']}` | "
              f"`{r['command']}` | {r['commit']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
