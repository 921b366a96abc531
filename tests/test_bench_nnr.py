"""benchmarks/bench_nnr.py: NNR's curve and ours on one pruned checkpoint, through the real subprocess plumbing.

``nncodec`` is never installed here (it pins numpy < 2): a stand-in driver with ``nnr_codec.py``'s interface
rounds the tensors to NNR's grid for the qp and reports a size, so the benchmark's side of the exchange (tensors
out, bytes and decoded tensors back, evaluation, the comparison) runs for real.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import load_script, tiny_config

import train

bench = load_script("benchmarks/bench_nnr")
FAKE_DRIVER = '''
import argparse, json, pathlib, numpy as np
p = argparse.ArgumentParser(); p.add_argument("src"); p.add_argument("out"); p.add_argument("--qp", type=int)
p.add_argument("--dq", action="store_true"); a = p.parse_args()
step = (4 + a.qp % 4) * 2.0 ** (a.qp // 4 - 2)
with np.load(a.src) as d:
    t = {k: (np.round(d[k] / step) * step).astype(np.float32) for k in d.files}
out = pathlib.Path(a.out); out.mkdir(parents=True, exist_ok=True); np.savez(out / "decoded.npz", **t)
print(json.dumps({"bytes": int(sum(np.count_nonzero(v) for v in t.values())) // 4 + a.qp + 100}))
'''


def test_both_curves_and_the_comparison(tmp_path: Path, idx_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config(idx_dir, tmp_path / "runs", max_epochs=1)
    cfg["trainer"]["callbacks"] = {"IterativePruning": {"keep_ratio": 0.1}}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert train.main(["-c", str(tmp_path / "c.json")]) == 0
    (run,) = sorted((tmp_path / "runs" / "tiny").iterdir())
    driver = tmp_path / "fake_nnr.py"
    driver.write_text(FAKE_DRIVER)
    monkeypatch.setattr(bench, "DRIVER", driver)
    out = tmp_path / "rows.json"
    monkeypatch.setattr(sys, "argv", ["bench_nnr.py", str(run / "best.ckpt"), "--nnr-python", sys.executable,
                                      "--qps=-20,-12", "--budgets", "", "--dcz", str(run / "model.dcz"),
                                      "--json", str(out)])
    capsys.readouterr()
    bench.main()
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["checkpoint (float32)", "NNR (nncodec 2.1.3)", "NNR (nncodec 2.1.3)",
                                           "ours: file"]
    assert [r["setting"] for r in rows[1:3]] == ["qp -20", "qp -12"]
    assert rows[3]["bytes"] == (run / "model.dcz").stat().st_size and rows[1]["bytes"] > 0
    assert all(0 <= r["test_top1_err"] <= 100 and 0 <= r["val_top1_err"] <= 100 for r in rows)
    assert "ours vs the smallest NNR file at a test error no higher:" in printed


def test_the_comparison_takes_the_smallest_nnr_file_no_worse(capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"method": "NNR", "setting": "qp -20", "bytes": 1000, "test_top1_err": 10.0},
            {"method": "NNR", "setting": "qp -16", "bytes": 800, "test_top1_err": 10.5},
            {"method": "ours: file", "setting": "a.dcz", "bytes": 850, "test_top1_err": 10.2},
            {"method": "ours: file", "setting": "b.dcz", "bytes": 700, "test_top1_err": 9.0}]
    bench.print_comparison(rows)
    printed = capsys.readouterr().out
    assert "a.dcz: 850 B at 10.20 % vs NNR qp -20 1,000 B at 10.00 %: -15.0 %" in printed
    assert "b.dcz: 700 B at 9.00 %: no NNR point that good" in printed
