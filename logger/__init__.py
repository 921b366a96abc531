"""Python logging for a run: console (stderr) plus ``info.log`` in the run folder.

The handlers come from ``logger/logger_config.json``; every module logs through
``logging.getLogger("deep_compression.<module>")``.
"""

from __future__ import annotations

import json
import logging
import logging.config
import os
from pathlib import Path

CONFIG_FILE = Path(__file__).with_name("logger_config.json")


class StderrHandler(logging.StreamHandler):
    """A console handler that writes to whatever ``sys.stderr`` is *now* (not the one of setup time), so
    a redirected or replaced stderr (a test's capture, a notebook) never receives a write after closing."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        import sys

        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:  # StreamHandler.__init__ assigns it; the property decides
        pass


def is_worker() -> bool:
    """Whether this process is a DDP worker other than the global rank 0, from what the launchers set:
    torchrun ``RANK``, SLURM ``SLURM_PROCID``, LSF ``JSM_NAMESPACE_RANK``; else (Lightning's own launcher)
    ``LOCAL_RANK`` on node ``NODE_RANK`` / ``GROUP_RANK``."""
    for key in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value) > 0
    return any(int(v) > 0 for v in (os.environ.get(k, "") for k in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK"))
               if v.isdigit())


# Lightning's console lines that say nothing about this run: a promotion, repeated at every evaluation, and the
# accelerator banners (train.py logs the device the run uses in its own first line).
_NOISE = ("💡 Tip:", "GPU available:", "TPU available:")


def _not_noise(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_NOISE)


def setup_logging(run_dir: Path | None, level: int = logging.INFO) -> None:
    """Configures the ``deep_compression`` loggers; without ``run_dir``, logs to the console only."""
    config = json.loads(CONFIG_FILE.read_text())
    handlers = config["handlers"]
    if run_dir is None:
        del handlers["info_file_handler"]
        for logger in config["loggers"].values():
            logger["handlers"] = [h for h in logger["handlers"] if h in handlers]
    else:
        handlers["info_file_handler"]["filename"] = str(Path(run_dir) / handlers["info_file_handler"]["filename"])
    if is_worker():  # rank 0 speaks for the run
        level = max(level, logging.WARNING)
    for logger in config["loggers"].values():
        logger["level"] = level
    logging.config.dictConfig(config)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        chatty = logging.getLogger(name)
        if _not_noise not in chatty.filters:
            chatty.addFilter(_not_noise)


def get_logger(name: str) -> logging.Logger:
    """Returns the project logger ``deep_compression.<name>``."""
    return logging.getLogger(f"deep_compression.{name}")
