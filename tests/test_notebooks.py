"""The notebooks run top to bottom, as a reader would run them, and the stored ones read as a real run.

Each notebook is executed by nbclient in a fresh kernel whose working directory is ``notebooks/`` (as when
opened in Jupyter), in FAST mode (``DC_NOTEBOOK_FAST=1``: tiny generated idx data, a few batches per epoch, a
shortened schedule), with every file it writes under ``tmp_path`` (``DC_NOTEBOOK_RUNS``), nothing in the
repository. About 20-40 s per notebook on 2 CPU cores. Needs the test-only dependencies nbclient, nbformat and
ipykernel (``requirements-test.txt``); skipped without them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT_S = 180  # per cell; a whole FAST notebook takes well under a minute
MAX_NOTEBOOK_BYTES = 1 << 20  # stored with outputs, figures included (they are ~200-300 KB)

# notebook -> (run folder name under DC_NOTEBOOK_RUNS, files its run must have written there)
CASES = {
    "mnist-lenet300.ipynb": ("lenet300_fashionmnist_pipeline",
                             ["dense.ckpt", "pruned.ckpt", "best.ckpt", "model.dcz", "summary.json",
                              "compression_report.json", "compression_report.md"]),
    "mnist-lenet5.ipynb": ("lenet5_fashionmnist_pipeline",
                           ["dense.ckpt", "pruned.ckpt", "model.dcz", "summary.json",
                            "sensitivity/sensitivity.csv", "sensitivity/prune.png", "sensitivity/proposal.json",
                            "sensitivity/proposal_report.json"]),
}


def output_text(nb: nbformat.NotebookNode) -> str:
    """Everything the code cells printed or displayed as text (streams, text/plain, text/markdown)."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if out.output_type == "stream":
                parts.append(out.text)
            elif out.output_type in ("display_data", "execute_result"):
                parts += [out.data.get("text/markdown", ""), out.data.get("text/plain", "")]
    return "\n".join(parts)


def errors(nb: nbformat.NotebookNode) -> list[str]:
    return [f"{out.ename}: {out.evalue}" for cell in nb.cells if cell.cell_type == "code"
            for out in cell.get("outputs", []) if out.output_type == "error"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_notebook_runs_top_to_bottom_in_fast_mode(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    monkeypatch.setenv("DC_NOTEBOOK_FAST", "1")  # the kernel inherits this process's environment
    monkeypatch.setenv("DC_NOTEBOOK_RUNS", str(runs))
    for var in ("DC_NOTEBOOK_DATA", "DC_NOTEBOOK_DATASET", "DC_RUN_DIR"):
        monkeypatch.delenv(var, raising=False)
    before = sorted(p.name for p in NOTEBOOKS.iterdir())
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails

    assert errors(nb) == []
    folder, expected = CASES[name]
    run_dirs = sorted((runs / folder).iterdir())
    assert len(run_dirs) == 1, run_dirs
    missing = [f for f in expected if not (run_dirs[0] / f).is_file()]
    assert missing == [], f"{name} did not write {missing} in {run_dirs[0]}"
    text = output_text(nb)
    assert "FAST=True" in text
    assert "decoded model.dcz: test top-1 error" in text  # the file read back and evaluated
    assert "weights bit-identical to best.ckpt's: True" in text
    assert "Compression report: model.dcz" in text  # the per-layer table
    if name == "mnist-lenet5.ipynb":
        assert "proposal, each layer alone within" in text
        assert list((runs / "lenet5_budget_proposal").glob("*/model.dcz"))  # the proposal was trained and encoded
    assert sorted(p.name for p in NOTEBOOKS.iterdir()) == before  # nothing written beside the notebooks


@pytest.mark.parametrize("name", sorted(CASES))
def test_stored_notebook_holds_the_outputs_of_a_real_run(name: str) -> None:
    path = NOTEBOOKS / name
    nb = nbformat.read(path, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code), "run every cell before committing"
    assert errors(nb) == []
    text = output_text(nb)
    assert "FAST=False" in text, "the stored outputs must come from a real run, not the FAST smoke run"
    assert "decoded model.dcz: test top-1 error" in text
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES
