"""Damaged and inconsistent checkpoints: every entry point refuses them with one message (exit 2), never loads
other weights silently. torch's zip reader checks no CRC, so ``utils.load_checkpoint`` verifies the archive and
``trainer.lit_model.check_checkpoint`` the compression state, wherever a checkpoint is loaded."""

from __future__ import annotations

import json
import random
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import compress_like_the_paper, load_script, tiny_config
from models import LeNet300
from parse_config import parse_config
from trainer.compression_state import INDEX_KEY, MASKS_KEY, codebook_key
from trainer.lit_model import check_checkpoint
from utils import CheckpointError, load_checkpoint


def good_checkpoint(path: Path, idx_dir: Path) -> dict[str, Any]:
    """What train.py writes after a pruned + quantized fit (config, weights, masks, codebooks, indices), small."""
    torch.manual_seed(0)
    model = LeNet300()
    state = compress_like_the_paper(model, 0.1, 3)
    ckpt = {"config": parse_config(tiny_config(idx_dir, path.parent / "runs")).model_dump(), "epoch": 1,
            "global_step": 8,
            "state_dict": {**{f"model.{k}": v for k, v in model.state_dict().items()},
                           **{codebook_key(k): v.float() for k, v in state["codebooks"].items()}},
            MASKS_KEY: state["masks"], INDEX_KEY: state["indices"]}
    torch.save(ckpt, path)
    return ckpt


def load_checked(path: Path) -> dict[str, Any]:
    """What every entry point runs on a checkpoint before using a tensor of it."""
    ckpt = load_checkpoint(path)
    check_checkpoint(ckpt, path)
    return ckpt


def data_span(data: bytes, info: zipfile.ZipInfo) -> tuple[int, int]:
    """Where a stored member's bytes are in the file."""
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    return start, start + info.compress_size


def test_byte_flips_and_member_edits_are_refused_or_load_identically(tmp_path: Path, idx_dir: Path) -> None:
    original = good_checkpoint(tmp_path / "good.ckpt", idx_dir)
    data = (tmp_path / "good.ckpt").read_bytes()
    members = zipfile.ZipFile(tmp_path / "good.ckpt").infolist()
    central = data.rindex(b"PK\x01\x02", 0, data.rindex(b"PK\x05\x06"))  # (the last central-directory record)
    rng, outcomes = random.Random(0), {"refused": 0, "identical": 0}
    for case in range(400):
        bad = bytearray(data)
        kind = case % 4
        if kind == 0:  # bytes flipped anywhere
            for _ in range(rng.randint(1, 3)):
                bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
        elif kind == 1:  # a member's bytes changed, its CRC not (what torch alone would load)
            start, stop = data_span(data, rng.choice(members))
            if stop > start:
                bad[rng.randrange(start, stop)] ^= 0xFF
        elif kind == 2:  # truncated
            bad = bad[:rng.randrange(len(bad))]
        else:  # a directory that lies about a member's size (the last one's, in the central directory)
            struct.pack_into("<I", bad, central + 20 + 4 * rng.randrange(2), rng.randrange(1 << 20))
        path = tmp_path / "bad.ckpt"
        path.write_bytes(bytes(bad))
        try:
            loaded = load_checked(path)
        except CheckpointError:
            outcomes["refused"] += 1
            continue
        for key, value in original["state_dict"].items():  # loaded: then exactly what was saved
            assert torch.equal(loaded["state_dict"][key], value), (case, key)
        outcomes["identical"] += 1
    assert outcomes["refused"] >= 350, outcomes


@pytest.mark.parametrize(("edit", "match"), [
    (lambda c: c["masks"].update({"fc1.weight": c["masks"]["fc1.weight"][:, :10]}),
     r"the mask of fc1\.weight is torch\.bool \(300, 10\): the weight's \(300, 784\)"),
    (lambda c: c["quant_index"]["fc2.weight"].add_(100),
     r"the quantization index of fc2\.weight runs outside its codebook of \d+ values"),
    (lambda c: c["quant_index"].update({"fc3.weight": c["quant_index"]["fc3.weight"][1:]}),
     r"the quantization index of fc3\.weight \(\(\d+,\), torch\.int64\) does not match its mask"),
    (lambda c: c["state_dict"]["model.fc1.bias"].__setitem__(0, float("nan")), r"fc1\.bias holds NaN"),
    (lambda c: c["state_dict"]["model.fc2.weight"].__setitem__((0, 0), float("-inf")), r"fc2\.weight holds NaN or inf"),
])
def test_inconsistent_compression_state_is_refused_naming_the_tensor(tmp_path: Path, idx_dir: Path, edit: Any,
                                                                     match: str) -> None:
    ckpt = good_checkpoint(tmp_path / "good.ckpt", idx_dir)
    edit(ckpt)
    torch.save(ckpt, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match=f"bad.ckpt is inconsistent: {match}"):
        load_checked(tmp_path / "bad.ckpt")


def test_every_entry_point_refuses_a_damaged_checkpoint(tmp_path: Path, idx_dir: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    good_checkpoint(tmp_path / "good.ckpt", idx_dir)
    data = bytearray((tmp_path / "good.ckpt").read_bytes())
    info = next(i for i in zipfile.ZipFile(tmp_path / "good.ckpt").infolist() if i.file_size > 10_000)
    start, _ = data_span(bytes(data), info)
    data[start + 100] ^= 0x40  # one bit of a weight: torch alone loads it as another number
    bad = tmp_path / "run" / "bad.ckpt"
    bad.parent.mkdir()
    bad.write_bytes(bytes(data))
    inconsistent = good_checkpoint(tmp_path / "run" / "inconsistent.ckpt", idx_dir)
    inconsistent["quant_index"]["fc1.weight"].add_(64)
    torch.save(inconsistent, tmp_path / "run" / "inconsistent.ckpt")
    teacher = tiny_config(idx_dir, tmp_path / "runs")
    teacher["trainer"]["callbacks"] = {"Distillation": {"teacher": str(bad)}}
    (tmp_path / "taught.json").write_text(json.dumps(teacher))
    (tmp_path / "plain.json").write_text(json.dumps(tiny_config(idx_dir, tmp_path / "runs")))
    scripts = {name: load_script(name) for name in ("train", "test", "sensitivity", "dcz")}
    for path, word in ((bad, "corrupt"), (tmp_path / "run" / "inconsistent.ckpt", "inconsistent")):
        calls = [("test", ["-r", str(path)]), ("train", ["-r", str(path)]),
                 ("train", ["-c", str(tmp_path / "plain.json"), "--weights", str(path)]),
                 ("sensitivity", ["-r", str(path)]), ("dcz", ["encode", str(path)])]
        if path == bad:
            calls.append(("train", ["-c", str(tmp_path / "taught.json")]))
        for script, argv in calls:
            capsys.readouterr()
            assert scripts[script].main(argv) == 2, (script, argv)
            err = capsys.readouterr().err
            last = err.strip().splitlines()[-1]  # (after the log lines, e.g. where the data is read from)
            assert last.startswith("error: ") and word in last and "Traceback" not in err, (script, argv, err)
    assert not (tmp_path / "run" / "model.dcz").exists()  # nothing written from a refused checkpoint


def test_a_compressed_member_is_refused_whatever_its_directory_declares(tmp_path: Path, idx_dir: Path) -> None:
    # torch writes every member stored; a deflated one can declare any size and inflate to another.
    good_checkpoint(tmp_path / "good.ckpt", idx_dir)
    source = zipfile.ZipFile(tmp_path / "good.ckpt")
    with zipfile.ZipFile(tmp_path / "deflated.ckpt", "w") as out:
        for info in source.infolist():
            out.writestr(info.filename, source.read(info), compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError, match=r"member good/data\.pkl is compressed or declares [\d,]+ bytes stored"):
        load_checkpoint(tmp_path / "deflated.ckpt")


def test_what_only_a_run_would_find_is_refused_before_its_folder_exists(tmp_path: Path, idx_dir: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    train = load_script("train")
    for override, message in (("trainer.devices=99", "trainer.devices: 99 processes on the CPU, but this machine"),
                              ("arch.args.in_features=5", "arch.args: LeNet300 {'in_features': 5, 'num_classes': 10} "
                                                          "does not take FashionMNIST's inputs of shape (1, 28, 28)")):
        if override.startswith("trainer.devices") and torch.cuda.is_available():
            continue  # (on a machine with GPUs Lightning itself refuses devices it does not have)
        (tmp_path / "c.json").write_text(json.dumps(tiny_config(idx_dir, tmp_path / "runs")))
        assert train.main(["-c", str(tmp_path / "c.json"), "--set", override]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "runs").exists()  # no run folder left behind


def test_a_full_disk_inside_torch_save_is_one_message_naming_what_to_do(tmp_path: Path, idx_dir: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import errno

    import trainer.checkpoint_io as checkpoint_io

    class FullDisk:  # a file on a disk that fills after 4 KiB: torch.save sees a failed write in the middle
        def __init__(self, f: Any) -> None:
            self.f, self.written = f, 0

        def write(self, data: bytes) -> int:
            self.written += len(data)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def flush(self) -> None:
            self.f.flush()

    original, saves = checkpoint_io._Writer.__init__, []

    def writer(self: Any, f: Any) -> None:
        saves.append(1)
        original(self, FullDisk(f) if len(saves) > allowed else f)

    monkeypatch.setattr(checkpoint_io._Writer, "__init__", writer)
    train = load_script("train")
    (tmp_path / "c.json").write_text(json.dumps(tiny_config(idx_dir, tmp_path / "runs", max_epochs=2)))
    for allowed, then in ((0, "start the run again (it has no checkpoint yet)"), (2, "resume with -r ")):
        saves.clear()
        assert train.main(["-c", str(tmp_path / "c.json")]) == 2
        err = capsys.readouterr().err
        assert "No space left on device" in err and then in err and "Traceback" not in err, err
    (last,) = (tmp_path / "runs").rglob("last.ckpt")
    assert f"resume with -r {last}" in err and load_checkpoint(last)["epoch"] >= 0  # what is there is complete
    assert not list((tmp_path / "runs").rglob("*.tmp"))


def test_resuming_removes_the_temporaries_a_killed_write_left(tmp_path: Path, idx_dir: Path) -> None:
    train = load_script("train")
    (tmp_path / "c.json").write_text(json.dumps(tiny_config(idx_dir, tmp_path / "runs", max_epochs=1)))
    assert train.main(["-c", str(tmp_path / "c.json")]) == 0
    (run,) = (tmp_path / "runs").glob("*/*")
    stale = run / f".last.ckpt.{'ab' * 16}.tmp"  # what atomic_open names them; a kill -9 leaves one
    stale.write_bytes(b"half a checkpoint")
    (run / ".notes.tmp").write_text("not ours")
    assert train.main(["-r", str(run / "last.ckpt"), "--set", "trainer.max_epochs=2"]) == 0
    assert not stale.exists() and (run / ".notes.tmp").exists()


def test_dcz_info_on_a_header_count_no_float_can_hold_is_one_error(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from helpers import rewrite_header
    from trainer.export import save_compressed

    dcz = load_script("dcz")
    torch.manual_seed(0)
    model = LeNet300()
    save_compressed(model, tmp_path / "m.dcz", arch={"type": "LeNet300", "args": {}},
                    **compress_like_the_paper(model, 0.1, 4))
    rewrite_header(tmp_path / "m.dcz", lambda h: h["tensors"][0].update(kept=10 ** 400))
    assert dcz.main(["info", str(tmp_path / "m.dcz")]) == 2
    assert "malformed tensor entry in the header" in capsys.readouterr().err


def test_a_member_marked_encrypted_is_refused_not_a_traceback(tmp_path: Path, idx_dir: Path) -> None:
    good_checkpoint(tmp_path / "good.ckpt", idx_dir)
    data = bytearray((tmp_path / "good.ckpt").read_bytes())
    central = data.rindex(b"PK\x01\x02", 0, data.rindex(b"PK\x05\x06"))
    data[central + 8] |= 0x1  # the general-purpose flag of the last directory record: "encrypted"
    (tmp_path / "bad.ckpt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"is marked encrypted: not a checkpoint torch wrote"):
        load_checkpoint(tmp_path / "bad.ckpt")


def test_a_saved_module_is_refused_naming_its_class(tmp_path: Path) -> None:
    torch.save({"state_dict": {}, "model": torch.nn.Linear(2, 2)}, tmp_path / "module.ckpt")
    with pytest.raises(CheckpointError, match=r"asks to load the Python object torch\.nn\.modules\.linear\.Linear"):
        load_checkpoint(tmp_path / "module.ckpt")


def test_dcz_info_on_a_tensor_entry_that_is_no_object_is_one_error(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from helpers import rewrite_header
    from trainer.export import save_compressed

    dcz = load_script("dcz")
    model = LeNet300()
    save_compressed(model, tmp_path / "m.dcz", arch={"type": "LeNet300", "args": {}},
                    **compress_like_the_paper(model, 0.1, 4))
    rewrite_header(tmp_path / "m.dcz", lambda h: h.update(tensors=[5]))
    assert dcz.main(["info", str(tmp_path / "m.dcz")]) == 2
    assert "malformed tensor entry in the header: 5" in capsys.readouterr().err


def test_a_run_trained_with_a_removed_option_still_evaluates_and_encodes(tmp_path: Path, idx_dir: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = good_checkpoint(tmp_path / "old.ckpt", idx_dir)
    ckpt["config"]["trainer"]["callbacks"] = {"IterativePruning": {"keep_ratio": 0.1, "splicing": True}}
    torch.save(ckpt, tmp_path / "old.ckpt")
    test, dcz, train = (load_script(name) for name in ("test", "dcz", "train"))
    assert test.main(["-r", str(tmp_path / "old.ckpt"), "--json"]) == 0  # evaluation builds no callback
    assert dcz.main(["encode", str(tmp_path / "old.ckpt"), "--out", str(tmp_path / "old.dcz")]) == 0
    capsys.readouterr()
    assert train.main(["-r", str(tmp_path / "old.ckpt")]) == 2  # training would: refused, with the pointer
    assert "IterativePruning.splicing: this option was removed (docs/experiments.md" in capsys.readouterr().err


def test_lightning_callbacks_that_would_save_the_same_state_are_one_config_error(
        tmp_path: Path, idx_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config(idx_dir, tmp_path / "runs")
    cfg["trainer"]["early_stop"] = 5  # ours, on trainer.monitor: the same state as the one named below
    cfg["trainer"]["callbacks"] = {"EarlyStopping": {"monitor": "val/top1_err", "mode": "min"}}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert load_script("train").main(["-c", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err
    assert "error: trainer.callbacks: " in err and "Traceback" not in err
    assert not list((tmp_path / "runs").rglob("config.json"))
