"""Sparse inference for pruned fully-connected layers (Deep Compression §6: pruned fc layers run ~3x faster
than dense at batch 1, MKL's CSRMV against GEMV).

``SparseLinear`` holds a pruned ``Linear`` weight as a CSR matrix (``torch.sparse_csr_tensor``: row offsets,
column indices, values; int32 indices) built straight from the kept positions of a ``.dcz`` tensor, never from
a dense copy, and computes ``y = x @ W.T + b`` as ``W @ x`` (``torch.mv``, CSR x vector) for one sample and
as ``(W @ x.T).T`` (torch's CSR x dense product) for a batch. Chosen by measurement (BENCHMARKS.md): int64
indices and the general product at batch 1 were 1.4-1.8x slower. It is for
inference: it has no trainable parameters and refuses to run in training mode. Convolutions are left dense:
at Deep Compression's conv keep ratios (38-84 % for AlexNet, 22-58 % for VGG-16) a sparse kernel only loses
(see BENCHMARKS.md).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn


def csr_from_positions(positions: np.ndarray, values: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    """A CSR matrix of ``shape`` from the row-major flat ``positions`` (ascending) of its ``values``.

    Entries whose value is exactly 0 (the paper's filler entries, or a weight rounded to 0) are left out.

    Raises:
        ValueError: positions not ascending or outside the matrix, or lengths that disagree.
    """
    rows, cols = shape
    positions, values = np.asarray(positions, np.int64), np.asarray(values, np.float32)
    if positions.shape != values.shape or positions.ndim != 1:
        raise ValueError(f"{len(positions)} positions for {len(values)} values")
    keep = values != 0
    positions, values = positions[keep], values[keep]
    if len(positions) and (positions[0] < 0 or positions[-1] >= rows * cols or np.any(np.diff(positions) <= 0)):
        raise ValueError(f"positions must be strictly ascending within a {rows}x{cols} matrix")
    row_of = positions // cols
    # int32 indices where they fit: half the index bytes a product streams through (batch 1: ~1.4x faster).
    index_type = np.int32 if max(rows, cols, len(positions)) < 2 ** 31 else np.int64
    crow = np.zeros(rows + 1, index_type)
    np.cumsum(np.bincount(row_of, minlength=rows), out=crow[1:])
    with warnings.catch_warnings():  # torch's "CSR support is in beta" note, once per layer
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(torch.from_numpy(crow), torch.from_numpy((positions % cols).astype(index_type)),
                                       torch.from_numpy(values), size=(rows, cols), check_invariants=True)


class SparseLinear(nn.Module):
    """``nn.Linear`` for inference with a CSR weight: same outputs (up to float rounding), fewer operations.

    The CSR parts are buffers (``crow_indices``, ``col_indices``, ``values``), so ``state_dict``, ``.to()``,
    ``deepcopy`` and saving work as for any module; ``weight`` is the CSR tensor assembled from them (no copy).

    Args:
        weight: (out_features, in_features) CSR tensor (``csr_from_positions``).
        bias: (out_features,) or None.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        if weight.layout != torch.sparse_csr or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D sparse CSR tensor, got {weight.layout} with {weight.dim()} dims")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("crow_indices", weight.crow_indices().clone())
        self.register_buffer("col_indices", weight.col_indices().clone())
        self.register_buffer("values", weight.values().clone())
        self.register_buffer("bias", bias)

    @property
    def weight(self) -> torch.Tensor:
        """The (out_features, in_features) CSR weight, over the buffers (checked when they were built)."""
        return torch.sparse_csr_tensor(self.crow_indices, self.col_indices, self.values,
                                       size=(self.out_features, self.in_features), check_invariants=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out), as nn.Linear
        if self.training:
            raise RuntimeError("SparseLinear is for inference: call .eval(), or decode the file dense "
                               "(load_compressed(path), sparse=False) to train")
        if x.shape[-1] != self.in_features:
            raise RuntimeError(f"SparseLinear: input has {x.shape[-1]} features, expected {self.in_features}")
        rows = x.reshape(-1, self.in_features)
        if len(rows) == 1:  # CSR x vector (the paper's CSRMV): faster than the general CSR x dense product
            y = torch.mv(self.weight, rows[0]).unsqueeze(0)
        else:
            y = torch.sparse.mm(self.weight, rows.t()).t()  # (N, out)
        y = y if self.bias is None else y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kept = self.values.numel()
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"kept={kept} ({100.0 * kept / max(self.in_features * self.out_features, 1):.2f}%), csr")
