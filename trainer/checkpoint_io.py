"""Checkpoints written like every other file of ours: atomically, in the checkpoint's own folder.

Lightning's ``TorchCheckpointIO`` serialises to memory and then writes through fsspec, which on a local
disk opens the target for writing: a ``kill -9`` or a full disk during that write leaves a truncated
``last.ckpt`` (and when ``$TMPDIR`` is another filesystem, its temporary-file move is "truncate, then copy").
Here the bytes go to a temporary file beside the target, are fsynced and renamed over it
(``compression.atomic``): the previous checkpoint stays intact until the new one is complete.
"""

from __future__ import annotations

import errno
import os
import shutil
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from typing_extensions import override

from compression.atomic import atomic_open


LOW_SPACE = 64 << 20  # below this, a write torch.save could not finish is taken for a full disk


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic (local paths)."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"storage_options are not supported by {type(self).__name__}")
        folder = os.path.dirname(os.fspath(path)) or "."
        os.makedirs(folder, exist_ok=True)
        try:
            with atomic_open(path) as f:
                torch.save(checkpoint, f)
        except RuntimeError:  # torch's writer reports a failed write as "[enforce fail ...] unexpected pos"
            if shutil.disk_usage(folder).free > LOW_SPACE:
                raise
            raise OSError(errno.ENOSPC, "no space left on the device", os.fspath(path)) from None

