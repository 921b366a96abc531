"""Two-process DDP on CPU (gloo): one run folder, masks and codebooks agreed, the file written once; the
multi-machine keys (``trainer.devices``, ``num_nodes``, ``strategy``) from the config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import builders
from compression.pruning import keep_ratio_at
from helpers import ROOT, load_ckpt, load_script, tiny_config
from parse_config import ConfigError, apply_overrides, parse_config

# train.py run with a RankDump after the compression callbacks and every checkpoint / .dcz write logged with
# the writing rank. Lightning's DDP launcher starts the other rank by re-running this same script.
PROBE = """
import os, sys
sys.path[:0] = [{root!r}, {tests!r}]
from pathlib import Path
from helpers import RankDump, load_script
from trainer.checkpoint_io import AtomicCheckpointIO

out = Path({out!r})
train = load_script("train")


def record(what):
    with open(out / f"writes_rank{{os.environ.get('LOCAL_RANK', '0')}}.txt", "a") as f:
        f.write(what + chr(10))


build_config_callbacks, save, encode = train.build_config_callbacks, AtomicCheckpointIO.save_checkpoint, \\
    train.encode_run_checkpoint
train.build_config_callbacks = lambda *a, **k: build_config_callbacks(*a, **k) + [RankDump(out)]
AtomicCheckpointIO.save_checkpoint = lambda self, c, path, storage_options=None: (
    record(f"ckpt {{Path(path).name}}"), save(self, c, path, storage_options))[1]
train.encode_run_checkpoint = lambda ckpt, path, *args, **kwargs: (record(f"dcz {{Path(path).name}}"),
                                                                    encode(ckpt, path, *args, **kwargs))[1]
sys.exit(train.main(sys.argv[1:]))
"""


def run_script(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def gathered(dumps: Path, tag: str) -> list[Any]:
    """What every rank gathered at ``tag``; both ranks' files must hold the same gathered list."""
    files = [torch.load(dumps / f"{tag}_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [f["rank"] for f in files] == [0, 1]
    return [f["gathered"] for f in files]


def assert_same_state(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]], tag: str) -> None:
    for kind in ("masks", "codebooks", "index", "weights"):
        assert a[kind].keys() == b[kind].keys(), (tag, kind)
        for name in a[kind]:
            assert torch.equal(a[kind][name], b[kind][name]), (tag, kind, name)


def test_num_nodes_is_validated_and_reaches_the_trainer(tmp_path: Path) -> None:
    raw = tiny_config(tmp_path / "data", tmp_path / "runs", devices=1, strategy="ddp", num_nodes=2)
    for bad, match in ((0, r"trainer\.num_nodes: must be >= 1 \(got 0\)"),
                       ("2", r"trainer\.num_nodes: expected an integer")):
        with pytest.raises(ConfigError, match=match):
            parse_config(apply_overrides(raw, [("trainer.num_nodes", bad)]))
    cfg = parse_config(raw)
    trainer = builders.build_trainer(cfg, run_dir=None)  # built, not launched: no process group yet
    assert (trainer.num_nodes, trainer.num_devices, trainer.world_size) == (2, 1, 2)
    assert type(trainer.strategy).__name__ == "DDPStrategy"
    assert parse_config(tiny_config(tmp_path, tmp_path)).trainer.num_nodes == 1  # the default: one machine


@pytest.mark.slow
def test_prune_and_quantize_under_ddp_with_two_processes(tmp_path: Path, idx_dir: Path) -> None:
    # strategy "auto" with 2 devices: Lightning picks DDP itself (the codebooks must work under any DDP name)
    cfg = tiny_config(idx_dir, tmp_path / "runs", max_epochs=2, devices=2, strategy="auto")
    cfg["trainer"]["callbacks"] = {"IterativePruning": {"keep_ratio": 0.1}, "Quantization": {"bits": 4, "epoch": 1}}
    (tmp_path / "ddp.json").write_text(json.dumps(cfg))
    run_script([str(ROOT / "train.py"), "-c", str(tmp_path / "ddp.json")], tmp_path)
    (run,) = sorted((tmp_path / "runs" / "tiny").iterdir())  # the second rank joined the first's folder
    ckpt = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    for name, mask in ckpt["masks"].items():
        w = ckpt["state_dict"][f"model.{name}"]
        assert int(mask.sum()) == round(0.1 * mask.numel()) and torch.count_nonzero(w[~mask]) == 0
        assert len(torch.unique(w[mask])) <= 16
    assert (run / "model.dcz").is_file()


@pytest.mark.slow
def test_ddp_ranks_agree_at_every_step_and_the_checkpoint_resumes_in_one_process(
        tmp_path: Path, idx_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Two pruning steps (epochs 0 and 1), clustering at epoch 2, on 2 CPU processes of one machine.
    cfg = tiny_config(idx_dir, tmp_path / "runs", max_epochs=3, devices=2, num_nodes=1, strategy="ddp")
    cfg["trainer"]["callbacks"] = {
        "IterativePruning": {"keep_ratio": {"fc1": 0.1, "fc2": 0.2, "fc3": 0.5}, "schedule": "every",
                             "start_epoch": 0, "end_epoch": 1},
        "Quantization": {"bits": 4, "epoch": 2}}
    (tmp_path / "ddp.json").write_text(json.dumps(cfg))
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE.format(root=str(ROOT), tests=str(ROOT / "tests"), out=str(dumps)))
    run_script([str(probe), "-c", str(tmp_path / "ddp.json")], tmp_path)
    (run,) = sorted((tmp_path / "runs" / "tiny").iterdir())

    # Masks, codebooks, assignments (and the weights) are identical on both ranks after every step.
    for epoch in range(3):
        for when in ("start", "end"):
            by_rank0, by_rank1 = gathered(dumps, f"epoch{epoch}_{when}")
            assert len(by_rank0) == 2
            assert_same_state(by_rank0[0], by_rank0[1], f"epoch{epoch}_{when}")
            assert_same_state(by_rank0[0], by_rank1[0], f"epoch{epoch}_{when}")  # every rank gathered the same
        state = gathered(dumps, f"epoch{epoch}_start")[0][0]
        kept = int(state["masks"]["fc1.weight"].sum())
        assert kept == round(keep_ratio_at(min(epoch, 1), 2, 0.1) * 784 * 300)  # step 1 of 2, step 2, unchanged
        assert bool(state["index"]) == (epoch == 2)
    quantized = gathered(dumps, "epoch2_end")[0][0]
    for name, index in quantized["index"].items():  # still codebook[index] on the mask after DDP updates
        book = quantized["codebooks"][name.replace(".", "__")]
        expected = torch.zeros_like(quantized["weights"][name])
        expected[quantized["masks"][name]] = book[index]
        assert torch.equal(quantized["weights"][name], expected), name

    # Validation metrics are reduced across ranks: each rank saw its own half, both logged the same figures.
    for epoch in range(3):
        (rank0, rank1), _ = gathered(dumps, f"epoch{epoch}_val")
        assert rank0["metrics"] == rank1["metrics"] and {"val/loss", "val/top1_err"} <= rank0["metrics"].keys()
        assert not set(rank0["samples"]) & set(rank1["samples"]) and len(rank0["samples"]) == len(rank1["samples"])
    # One process evaluating the whole split gets the figures the two ranks logged.
    assert load_script("test").main(["-r", str(run / "last.ckpt"), "--split", "val", "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert single["top1_err"] == pytest.approx(rank0["metrics"]["val/top1_err"], abs=1e-4)
    assert single["loss"] == pytest.approx(rank0["metrics"]["val/loss"], rel=1e-4)

    # Checkpoints and the .dcz are written by rank 0 alone, the file once.
    assert not (dumps / "writes_rank1.txt").exists()
    writes = (dumps / "writes_rank0.txt").read_text().splitlines()
    assert writes.count("ckpt last.ckpt") == 3 and writes.count("ckpt pruned.ckpt") == 1
    assert writes.count("dcz model.dcz") == 1 and writes[-1] == "dcz model.dcz"

    # The DDP checkpoint resumes in a single process and keeps its masks and assignments.
    before = load_ckpt(run / "last.ckpt")
    run_script([str(ROOT / "train.py"), "-r", str(run / "last.ckpt"), "--set", "trainer.devices=1",
                "--set", "trainer.strategy=auto", "--set", "trainer.max_epochs=4"], tmp_path)
    after = load_ckpt(run / "last.ckpt")
    assert (before["epoch"], after["epoch"]) == (2, 3) and after["global_step"] > before["global_step"]
    assert json.loads((run / "config.json").read_text())["trainer"]["devices"] == 1
    for name in before["masks"]:
        assert torch.equal(before["masks"][name], after["masks"][name])
        assert torch.equal(before["quant_index"][name], after["quant_index"][name])
    books = [k for k in before["state_dict"] if k.startswith("compression.codebooks.")]
    assert books and any(not torch.equal(before["state_dict"][k], after["state_dict"][k]) for k in books)
    from trainer.export import read_compressed

    decoded, _ = read_compressed(run / "model.dcz")  # rewritten from the resumed run's best checkpoint
    best = load_ckpt(run / "best.ckpt")
    for key, value in decoded.state_dict().items():
        assert torch.equal(value, best["state_dict"][f"model.{key}"]), key
