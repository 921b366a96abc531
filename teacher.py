"""The teacher of ``Distillation`` (``trainer/callbacks/distillation.py``), from a config: checked, trained, loaded.

``Distillation.teacher`` names another network trained on the same data: a checkpoint (loaded weights-only
before anything trains) or a config, which ``train.py`` trains first, in a process of its own, into
``<run>/teacher/``, copying its ``last.ckpt`` to ``<run>/teacher/teacher.ckpt`` once it has finished (a resumed
run finds it and trains nothing). Either way the teacher must have been trained on this run's dataset with its
number of classes. Config layer: nothing below it imports this module.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from torch import nn

from compression.atomic import atomic_write_bytes
from data import MACHINE_KEYS
from logger import get_logger
from parse_config import Config, ConfigError, instantiate, load_config
from trainer.callbacks import Distillation
from trainer.lit_model import load_weights
from utils import CheckpointError, load_checkpoint

KEY = "trainer.callbacks.Distillation.teacher"
FOLDER = "teacher"  # where a teacher config is trained, inside the run's folder
TRAIN_PY = Path(__file__).resolve().with_name("train.py")


def teacher_config(cfg: Config, path: str | Path) -> Config:
    """The config of the teacher (a .json, or the one stored with a .ckpt), checked against the run: the same
    dataset and number of classes, so that its outputs are soft labels of this run's inputs.

    Raises:
        ConfigError: no such file, a bad config, or another dataset / number of classes.
    """
    if not Path(path).is_file():
        raise ConfigError(f"{KEY}: {path}: no such file (a checkpoint of the teacher, or its config to train it)")
    try:
        teacher = load_config(path, None, []) if str(path).endswith(".json") else load_config(None, path, [])
    except (ConfigError, CheckpointError) as err:
        raise ConfigError(f"{KEY}: {path}: {err}") from None
    mine = (cfg.data_loader.type, int(cfg.arch.args.get("num_classes", 10)))
    theirs = (teacher.data_loader.type, int(teacher.arch.args.get("num_classes", 10)))
    if mine != theirs:
        raise ConfigError(f"{KEY}: {path} is a teacher for {theirs[0]} with {theirs[1]} classes; this run trains "
                          f"on {mine[0]} with {mine[1]} classes: pass a teacher of the same data")
    return teacher


def load_teacher(cfg: Config, path: str | Path) -> nn.Module:
    """The network of a teacher checkpoint, with its weights (checked by ``teacher_config``).

    Raises:
        ConfigError: see ``teacher_config``; or the weights do not fit the network its config names.
    """
    teacher = teacher_config(cfg, path)
    try:
        model = instantiate(teacher.arch, "arch")
        load_weights(model, load_checkpoint(path), path)
    except CheckpointError as err:
        raise ConfigError(f"{KEY}: {err}") from None
    return model


def use_teacher(cfg: Config, callback: Distillation) -> None:
    """Checks the callback's teacher before the run starts and hands it a checkpoint's network now (a config's
    once ``train_teacher`` has trained it).

    Raises:
        ConfigError: see ``teacher_config`` and ``load_teacher``.
    """
    if callback.teacher is None:
        return
    if callback.teacher.endswith(".ckpt"):
        callback.use(load_teacher(cfg, callback.teacher))
    else:
        teacher_config(cfg, callback.teacher)


def teacher_command(config: str | Path, folder: Path, progress_bar: str = "none") -> list[str]:
    """The train.py command that trains the teacher config ``config`` into ``folder``."""
    return [sys.executable, str(TRAIN_PY), "-c", str(config),
            "--set", f"trainer.save_dir={json.dumps(str(folder))}",
            "--set", f"trainer.progress_bar={json.dumps(progress_bar)}"]


def train_teacher(cfg: Config, callback: Distillation, run_dir: Path) -> None:
    """Trains a teacher given as a config (.json) into ``<run>/teacher/``, unless a resumed run has it already,
    and hands its network to the callback.

    Raises:
        ConfigError: the teacher's training failed (its own output says why), or left no single checkpoint.
    """
    if callback.teacher is None or not callback.teacher.endswith(".json"):
        return
    folder = run_dir / FOLDER
    ckpt = folder / "teacher.ckpt"
    if not ckpt.is_file():  # (DDP workers start after this: rank 0 has written it)
        get_logger("train").info(f"Distillation: training the teacher {callback.teacher} first, into {folder}")
        cmd = teacher_command(callback.teacher, folder, cfg.trainer.progress_bar)
        for key in MACHINE_KEYS:  # the run's data, as its command line set it
            if key in cfg.data_loader.args:
                cmd += ["--set", f"data_loader.args.{key}={json.dumps(cfg.data_loader.args[key])}"]
        code = subprocess.run(cmd, check=False, stdin=subprocess.DEVNULL).returncode
        found = sorted(folder.glob("*/*/last.ckpt"))
        if code != 0 or len(found) != 1:
            raise ConfigError(f"{KEY}: training {callback.teacher} failed (exit {code}, {len(found)} checkpoints "
                              f"under {folder}; its output above says why): fix it, or train it yourself and pass "
                              f"its last.ckpt as the teacher")
        atomic_write_bytes(ckpt, found[0].read_bytes())
    callback.use(load_teacher(cfg, ckpt))
