"""Checkpoints written like every other file of ours: atomically, in the checkpoint's own folder.

Lightning's ``TorchCheckpointIO`` serialises to memory and then writes through fsspec, which on a local
disk opens the target for writing: a ``kill -9`` or a full disk during that write leaves a truncated
``last.ckpt`` (and when ``$TMPDIR`` is another filesystem, its temporary-file move is "truncate, then copy").
Here the bytes go to a temporary file beside the target, are fsynced and renamed over it
(``compression.atomic``): the previous checkpoint stays intact until the new one is complete.
"""

from __future__ import annotations

import os
from typing import Any, BinaryIO

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from typing_extensions import override

from compression.atomic import atomic_open


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic (local paths)."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"storage_options are not supported by {type(self).__name__}")
        os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
        with atomic_open(path) as f:
            writer = _Writer(f)
            try:
                torch.save(checkpoint, writer)
            except RuntimeError:  # torch's writer turns a failed write into "[enforce fail ...] unexpected pos"
                if writer.error is not None:
                    raise writer.error from None  # the OSError itself: a full disk is ENOSPC, said as such
                raise


class _Writer:
    """A binary file as ``torch.save`` writes to it, keeping the ``OSError`` a write raised (torch reports only
    that the stream position is wrong)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()

