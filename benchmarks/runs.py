"""The repository's scripts run from the benchmarks: a ``train.py`` fit, a ``test.py`` check of a ``.dcz`` file.

Shared by ``reproduce.py`` (Table 1) and ``ablation.py``; each runs in a process of its own, so that a
benchmark measures what a user's command gives. The scripts that import this module put the repository
and ``benchmarks/`` on ``sys.path``.
"""

from __future__ import annotations

import codecs
import json
import subprocess
import sys
from pathlib import Path

from results_tables import ReproduceError

ROOT = Path(__file__).resolve().parents[1]


def last_error(output: str) -> str:
    """The child's own ``error:`` message (its last one), else its last line of output."""
    lines = [line.strip() for line in output.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line.removeprefix("error:").strip() for line in lines if line.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1]


def run_streamed(cmd: list[str]) -> tuple[int, str]:
    """Runs ``cmd`` in the repository root with its stdout and stderr passed on to our stdout as they come
    (progress bars included: our stderr is kept for our own error line); returns its exit code and the last
    8 KB of its output."""
    decoder, tail = codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
    with subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT) as proc:
        while chunk := proc.stdout.read1(1 << 16):
            text = decoder.decode(chunk)
            sys.stdout.write(text)
            sys.stdout.flush()
            tail = (tail + text)[-8192:]
    return proc.returncode, tail


def path_override(key: str, path: Path) -> list[str]:
    # JSON-quoted, so that a folder named like a number or ``true`` stays a string in the --set parser
    return ["--set", f"{key}={json.dumps(str(path))}"]


def train(recipe: Path, overrides: list[str], save_dir: Path, data_dir: Path | None) -> Path:
    """Runs one recipe through ``train.py``; returns the one new run folder with a summary.json.

    Raises:
        ReproduceError: train.py failed, or left no run folder (or several) with a summary.json.
    """
    cmd = [sys.executable, str(ROOT / "train.py"), "-c", str(recipe)]
    for item in overrides:
        cmd += ["--set", item]
    cmd += path_override("trainer.save_dir", save_dir)  # last: no --set can send the run elsewhere
    if data_dir is not None:
        cmd += path_override("data_loader.args.data_dir", data_dir)
    before = set(save_dir.glob("*/*"))  # <save_dir>/<name>/<timestamp>/
    print(f"training {recipe} (runs go under {save_dir})", flush=True)
    code, tail = run_streamed(cmd)
    if code != 0:
        raise ReproduceError(f"train.py failed (exit {code}) on {recipe}: {last_error(tail)}")
    new = sorted(d for d in set(save_dir.glob("*/*")) - before if (d / "summary.json").is_file())
    if len(new) != 1:
        raise ReproduceError(f"train.py finished {recipe} but {len(new)} new run folders with a summary.json "
                             f"appeared under {save_dir} ({', '.join(map(str, new)) or 'none'}); expected one "
                             "(is it a pruning + quantization recipe? is another run using this --save-dir?)")
    return new[0]


def evaluate_dcz(dcz: Path, data_dir: Path | None) -> float:
    """Top-1 error (%) of ``dcz`` on the test split, by ``test.py --json`` in a fresh process (the file alone).

    Raises:
        ReproduceError: test.py failed or printed no JSON with ``top1_err``.
    """
    cmd = [sys.executable, str(ROOT / "test.py"), "-r", str(dcz), "--json"]
    if data_dir is None:  # a .dcz names no folder (a file never decides where we read): the run's config does
        config = dcz.parent / "config.json"
        stored = json.loads(config.read_text()).get("data_loader", {}).get("args", {}) if config.is_file() else {}
        data_dir = Path(stored["data_dir"]) if "data_dir" in stored else None
    if data_dir is not None:
        cmd += path_override("data_loader.args.data_dir", data_dir)
    proc = subprocess.run(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ReproduceError(f"test.py failed (exit {proc.returncode}) on {dcz}: "
                             f"{last_error(proc.stderr + proc.stdout)}")
    try:  # with --json, stdout carries one JSON object
        return float(json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])["top1_err"])
    except (IndexError, ValueError, KeyError, TypeError):
        raise ReproduceError(f"test.py printed no JSON object with top1_err for {dcz}") from None
