"""Shared by the benchmarks: prune + quantize a model's layers as the callbacks would (magnitude masks, 1-D
k-means with linear init; conv 8 bits, fc 5 bits), on random weights."""

from __future__ import annotations

import torch

from compression.kmeans import kmeans_1d
from compression.pruning import magnitude_mask


def compress_layers(model: torch.nn.Module, keep: dict[str, float]) -> dict[str, dict[str, torch.Tensor]]:
    """Prunes each layer named (last component) in ``keep`` to its ratio and quantizes it, in place.

    Returns:
        ``{"masks", "codebooks", "indices"}`` by parameter name, as ``save_compressed`` takes them.
    """
    out: dict[str, dict[str, torch.Tensor]] = {"masks": {}, "codebooks": {}, "indices": {}}
    for name, module in model.named_modules():
        ratio = keep.get(name.rsplit(".", 1)[-1])
        if ratio is None or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        w = module.weight
        mask = magnitude_mask(w, ratio)
        bits = 8 if isinstance(module, torch.nn.Conv2d) else 5
        result = kmeans_1d(w.detach()[mask].double().numpy(), 2 ** bits)
        book, index = torch.from_numpy(result.centroids).float(), torch.from_numpy(result.labels)
        with torch.no_grad():
            w.zero_()
            w[mask] = book[index]
        key = f"{name}.weight"
        out["masks"][key], out["codebooks"][key], out["indices"][key] = mask, book, index
    return out
