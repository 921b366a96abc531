"""Atomic file writes: the one way this project writes a file (DESIGN: "nothing lost").

The data goes to a temporary file *in the target's folder* (so the final ``os.replace`` is a rename on
one filesystem, never "truncate the target, then copy"), is fsynced, and is renamed over the target;
the folder is fsynced so the rename itself survives a crash. Any failure (a full disk, a kill between
two writes) leaves the previous file intact and removes the temporary file.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterator
from typing import BinaryIO


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Opens a temporary file beside ``path`` for binary writing; on a clean exit it replaces ``path``.

    Raises:
        OSError: the folder is missing or not writable, or the disk is full (``path`` is untouched).
    """
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_folder(folder)


_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")  # the names atomic_open gives its temporary files


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Removes the temporary files a killed ``atomic_open`` left in ``folder`` (a ``kill -9`` runs no cleanup);
    call it only where no write of ours is under way.

    Args:
        folder: A run folder (not searched below).

    Returns:
        The names removed.
    """
    removed = []
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False) and _TEMPORARY.match(entry.name):
            with contextlib.suppress(OSError):
                os.remove(entry.path)
                removed.append(entry.name)
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (see ``atomic_open``)."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically (see ``atomic_open``)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_folder(folder: str | os.PathLike) -> None:
    """Makes a rename in ``folder`` durable where the OS allows it (POSIX); best effort elsewhere."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
