"""Weight sharing primitives of Deep Compression (arXiv 1510.00149 §3).

A quantized layer is a codebook of shared values and, for each kept (non-zero) weight, the index of its
centroid; the dense weight is ``codebook[index]`` on the pruning mask and exactly zero elsewhere.
Training updates the codebook only: the gradient of a centroid is the sum of the gradients of the
weights that share it (paper eq. 3), and the assignments stay fixed.
"""

from __future__ import annotations

import torch

MAX_BITS = 16  # bits per shared weight: 1..16 (at most 2**16 centroids; the Huffman alphabet's limit too)
DEFAULT_BITS = {"Conv2d": 8, "Linear": 5}  # the paper's AlexNet / VGG-16 setting (LeNet-300-100: 6)


def dequantize(codebook: torch.Tensor, index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The dense weight: ``codebook[index]`` at the True entries of ``mask`` (row-major order), 0 elsewhere.

    Args:
        codebook: (k,) shared values.
        index: (n_kept,) int64 centroid index of each kept weight, in the flattened order of ``mask``.
        mask: bool tensor shaped like the weight with ``n_kept`` True entries.
    """
    weight = torch.zeros(mask.shape, dtype=codebook.dtype, device=codebook.device)
    weight[mask] = codebook[index]
    return weight


def centroid_grad(weight_grad: torch.Tensor, index: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Paper eq. 3: ∂L/∂C_k = Σ_{i,j} ∂L/∂W_ij · 1(I_ij = k), over the kept weights only.

    Returns:
        (k,) gradient of the codebook, in ``weight_grad``'s dtype.
    """
    grad = torch.zeros(k, dtype=weight_grad.dtype, device=weight_grad.device)
    return grad.index_add_(0, index, weight_grad[mask])
