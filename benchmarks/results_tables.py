"""The results of ``benchmarks/reproduce.py`` drawn: the paper's Table 1 form (ours, then the paper's own MNIST
rows in a table of their own), Tables 2/3 per layer, and the rate-vs-error curve (PNG bytes)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

NETWORKS = {"LeNet300": "LeNet-300-100", "LeNet5": "LeNet-5"}  # our arch type -> the paper's name
MISMATCH_PT = 0.01  # model.dcz alone vs summary.json: more than this many error points is flagged
PAPER_LABEL = "paper, MNIST (transcribed from arXiv 1510.00149v5)"
# Han et al. 2016 Table 1: network, top-1 error reference -> compressed (%), parameters, rate (P+Q+H).
PAPER_ROWS = (("LeNet-300-100", 1.64, 1.58, "1070 KB", "27 KB", 40), ("LeNet-5", 0.80, 0.74, "1720 KB", "44 KB", 39))


class ReproduceError(Exception):
    """A mistake in the input (flags, recipes, run folders) or a failed step: one line for the user."""


def mismatch(row: dict[str, Any]) -> bool:
    return row["dcz_top1_err"] is not None and abs(row["dcz_top1_err"] - row["top1_err"]) > MISMATCH_PT


# ----------------------------------------------------------------------------------------- tables, figure


def _kb(n: float) -> str:
    # The paper's KB are 1000 bytes: LeNet-300-100's 266,610 float32 parameters are its "1070 KB".
    return f"{n / 1000:,.1f} KB" if n < 100_000 else f"{n / 1000:,.0f} KB"


def _err(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f} %"


def _rate(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}×"


def _network(r: dict[str, Any]) -> str:
    return NETWORKS.get(r["model"], r["model"])


def table1(rows: list[dict[str, Any]], commit: str, command: str) -> str:
    """Ours in the paper's Table 1 form, then the paper's MNIST rows in a table of their own."""
    lines = ["# Table 1: Deep Compression, reproduced", "",
             (f"`{command}` at commit `{commit}`. Top-1 error on the test split; dense = end of the dense stage, "
              "pruned = end of the pruning stage, compressed = `model.dcz` (as the run measured it, and as "
              "`test.py` measures the file alone)."), "",
             ("| Network | Dataset | Recipe | Top-1 error: dense → compressed | Pruned only | model.dcz alone "
              "(test.py) | Parameters → file | Compression rate | P / P+Q / P+Q+H | Training |"),
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        check = _err(r["dcz_top1_err"]) + (" **mismatch**" if mismatch(r) else "")
        paper = " / ".join(_rate(r.get(k)) for k in ("rate_p", "rate_pq", "rate_pqh"))
        wall = f"{r['wall_s']:.0f} s" if r["wall_s"] < 120 else f"{r['wall_s'] / 60:.0f} min"
        lines.append(f"| {_network(r)} | {r['dataset']} | {r['recipe']} | {_err(r['dense_top1_err'])} → "
                     f"{_err(r['top1_err'])} | {_err(r['pruned_top1_err'])} | {check} | {_kb(r['dense_bytes'])} → "
                     f"{_kb(r['dcz_bytes'])} | **{_rate(r['rate'])}** | {paper} | {wall} |")
    for r in (r for r in rows if r.get("seeds")):
        runs = "; ".join(f"seed {s['seed']}: {_err(s['top1_err'] if s['dcz_top1_err'] is None else s['dcz_top1_err'])}"
                         f", {s['dcz_bytes']:,.0f} bytes ({_rate(s['rate'])})" for s in r["seeds"])
        lines += ["", f"{r['recipe']}: the mean of {len(r['seeds'])} runs (file error, file bytes): {runs}."]
    lines += ["", ("Compression rate: float32 bytes of all parameters over the bytes of `model.dcz` on disk "
                   "(header, codebooks, biases included). P / P+Q / P+Q+H: the paper's accounting (coded bits of "
                   "every tensor against 32 bits per weight: pruning, + quantization, + Huffman coding), the one "
                   "its Table 1 reports.")]
    if any(mismatch(r) for r in rows):
        lines += ["", (f"**mismatch**: `test.py` on `model.dcz` differs from the run's own figure by more than "
                       f"{MISMATCH_PT} points.")]
    lines += ["", f"## {PAPER_LABEL}", "",
              ("| Network | Dataset | Top-1 error: reference → compressed | Parameters → compressed "
               "| Compression rate |"),
              "|---|---|---:|---:|---:|"]
    lines += [f"| {net} | MNIST | {ref:.2f} % → {comp:.2f} % | {size} → {small} | {rate}× |"
              for net, ref, comp, size, small, rate in PAPER_ROWS]
    return "\n".join(lines) + "\n"


def table23(runs: list[tuple[Path, dict[str, Any], dict[str, Any]]]) -> str:
    """Per layer, the paper's Table 2/3 columns and both totals, from each run's ``compression_report.json``
    (rendered by ``compression.report.to_markdown``, the one renderer of that report).

    Raises:
        ReproduceError: a report without the fields the renderer needs (e.g. one from an older version).
    """
    from compression.report import to_markdown  # imports torch: only once the tables are due

    parts = ["# Tables 2 and 3: compression per layer\n"]
    for run, summary, report in runs:
        title = f"{_network(summary)} on {summary['dataset']} ({summary['recipe']})"
        try:
            parts.append("#" + to_markdown(report, title))  # its "# title" becomes a section of ours
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ReproduceError(f"{run / 'compression_report.json'}: cannot render it ({type(err).__name__}: "
                                 f"{err}); was it written by an older version?") from None
    return "\n".join(parts)


def plot(rows: list[dict[str, Any]]) -> bytes:
    """PNG of test error against compression rate: a point per stage (dense, pruned, file), a line per recipe."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # non-interactive, no display needed
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for r in rows:
        points = [(name, x, y) for name, x, y in (("dense", 1.0, r["dense_top1_err"]),
                                                  ("pruned (P)", r["rate_p"], r["pruned_top1_err"]),
                                                  ("model.dcz", r["rate"], r["top1_err"])) if x and y is not None]
        ax.plot([x for _, x, _ in points], [y for _, _, y in points], marker="o",
                label=f"{_network(r)}, {r['dataset']} ({r['recipe']})")
        for name, x, y in points:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}×"))
    ax.set(xlabel="compression rate (× smaller than dense float32, log scale)", ylabel="test top-1 error (%)",
           title="Deep Compression: test error against compression rate")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    return png.getvalue()


# ------------------------------------------------------------------------------------------------- driver
