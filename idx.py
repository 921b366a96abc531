"""The idx file format (MNIST, Fashion-MNIST): reading one file safely and checking a split's two files.

Every size is checked against the file before anything is allocated, a ``.gz`` is never inflated past what
its header declares (at most ``MAX_IDX_BYTES``), and a split is refused unless it is uint8 ``(N, 28, 28)``
images with one label in the class range per image. Errors are ``DataError``: one message naming the file.

idx layout (big-endian), as read by ``read_idx``:

    bytes 0-1   0x0000
    byte  2     element type: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64
    byte  3     ndim (3 for images (N, 28, 28), 1 for labels (N,))
    4 * ndim    the dimensions, int32 each
    rest        prod(dims) elements, row-major
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path
from typing import IO

import numpy as np
import torch

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# The most data bytes one idx file may declare (MNIST's largest is 47 MB): a corrupt header, or a tiny .gz
# that would inflate to gigabytes, is refused before that much is allocated or decompressed.
MAX_IDX_BYTES = 2 * 1024**3
IMAGE_SIZE = (28, 28)  # what LeNet300 / LeNet5 take from MNIST-style data

class DataNotFoundError(FileNotFoundError):
    """The dataset is not on disk (and could not be downloaded)."""


class DataError(DataNotFoundError, ValueError):
    """A data file is there but unusable (corrupt, truncated, wrong shape, type or labels).

    A ``DataNotFoundError`` too, so every script that reports missing data (exit code 2) reports bad data
    the same way; a ``ValueError`` because the file exists and its content is what is wrong.
    """


def _read_at_most(f: IO[bytes], n: int) -> bytes:
    """Reads up to ``n`` bytes in 1 MiB chunks: memory follows what the file holds, not what ``n`` claims."""
    chunks, left = [], n
    while left > 0 and (chunk := f.read(min(left, 1 << 20))):
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_header(f: IO[bytes], path: Path) -> tuple[np.dtype, tuple[int, ...]]:
    """Reads the magic number and dimensions (see the layout in the module docstring)."""
    magic = f.read(4)
    if not magic:
        raise DataError(f"{path} is empty: expected an idx file (magic 0x0000, type byte, ndim, dimensions)")
    if len(magic) < 4 or magic[0] or magic[1] or magic[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an idx file (bad magic number {magic.hex()}): expected 0000 followed "
                        f"by a type byte ({', '.join(f'{t:02x}' for t in _IDX_DTYPES)}) and ndim")
    ndim = magic[3]
    dims = f.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise DataError(f"{path} is truncated or corrupt: its header ends before its {ndim} dimensions")
    shape = struct.unpack(f">{ndim}i", dims)
    if any(d < 0 for d in shape):
        raise DataError(f"{path} has a corrupt header: negative dimension in shape {shape}")
    return np.dtype(_IDX_DTYPES[magic[2]]), shape


def _size_error(path: Path, shape: tuple[int, ...], size: int, found: int) -> DataError:
    follows = f"more than {size:,}" if found > size else f"only {found:,}"
    return DataError(f"{path} is truncated or corrupt: header says shape {shape} ({size:,} data bytes), "
                     f"but {follows} data bytes follow")


def read_idx(path: Path, max_bytes: int = MAX_IDX_BYTES) -> torch.Tensor:
    """Reads one idx file (gzipped if its name ends in ``.gz``) into a tensor of the header's shape and type.

    The size the header declares is checked against ``max_bytes`` and, for a plain file, against its length
    before anything is read; a ``.gz`` is decompressed no further than that size plus one byte.

    Raises:
        DataError: The file is empty, not an idx file, shorter or longer than its header says, declares more
            than ``max_bytes`` data bytes, or is not a valid gzip file.
    """
    gz = path.suffix == ".gz"
    try:
        with gzip.open(path, "rb") if gz else path.open("rb") as f:
            dtype, shape = _read_header(f, path)
            size = math.prod(shape) * dtype.itemsize  # Python ints: no overflow for absurd dimensions
            if size > max_bytes:
                raise DataError(f"{path} has a corrupt header: shape {shape} would be {size:,} bytes, more than "
                                f"the {max_bytes:,} an idx file may hold")
            if not gz and (on_disk := path.stat().st_size - f.tell()) != size:
                raise _size_error(path, shape, size, on_disk)
            data = _read_at_most(f, size + 1)  # one byte more tells a longer file from an exact one
    except (gzip.BadGzipFile, zlib.error, EOFError) as err:  # not gzip, bad CRC, stream cut short
        raise DataError(f"{path} is not a valid gzip file ({err}): download it again, or unpack it "
                        f"(gunzip) and check the idx file it holds") from None
    if len(data) != size:
        raise _size_error(path, shape, size, len(data))
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def check_images_and_labels(images: torch.Tensor, labels: torch.Tensor, image_path: Path, label_path: Path,
                            num_classes: int = 10) -> None:
    """Checks one split of MNIST-style data: (N, 28, 28) uint8 images, N uint8 labels in 0..num_classes-1.

    Raises:
        DataError: Naming the file and what was expected, for the first check that fails.
    """
    for t, path, ndim, want in ((images, image_path, 3, "images of shape (N, 28, 28)"),
                                (labels, label_path, 1, "labels of shape (N,)")):
        if t.ndim != ndim:
            raise DataError(f"{path} holds a {t.ndim}-d array of shape {tuple(t.shape)}: expected {want}; "
                            f"are the images and labels files swapped?")
        if t.dtype != torch.uint8:
            bad = t.is_floating_point() and not bool(torch.isfinite(t).all())
            raise DataError(f"{path} holds {t.dtype} values{' (some non-finite: NaN/inf)' if bad else ''}: "
                            f"expected uint8 {want} (idx type 0x08)")
    if tuple(images.shape[1:]) != IMAGE_SIZE:
        raise DataError(f"{image_path} holds {images.shape[1]}x{images.shape[2]} images: the models expect "
                        f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} (MNIST-style) images")
    if len(images) == 0:
        raise DataError(f"{image_path} holds 0 images: expected at least one (nothing to train or test on)")
    if len(labels) != len(images):
        raise DataError(f"{label_path} holds {len(labels):,} labels but {image_path} holds {len(images):,} "
                        f"images: expected one label per image")
    if int(labels.max()) >= num_classes:
        at = int((labels >= num_classes).nonzero()[0])
        raise DataError(f"{label_path} holds label {int(labels[at])} (sample {at}): expected labels in "
                        f"0..{num_classes - 1}")
