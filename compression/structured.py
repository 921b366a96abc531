"""Structured sparsity: whole output units (neurons, conv channels) and input features, beyond Deep Compression.

Magnitude pruning (``compression.pruning``) removes single weights; at 2.5-3.5 % density about two thirds of a
LeNet file's bits are then *positions*. Removing whole units makes positions nearly free: a unit whose weights
are all zero is a row the file does not store (``compression.model_codec`` shrinks the stored shape). Here a
*group* is everything one unit owns, so that removing it changes nothing else in the network:

- unit ``j`` of layer ``L``: row ``j`` of ``L.weight`` (a conv: its filter), ``L.bias[j]``, and the inputs of the
  next layer ``S`` that read it: ``S.weight[:, j]`` (a conv: that input channel), or for a conv feeding a Linear
  through a flatten, the ``span = S.in_features / L.out_channels`` columns ``j * span .. (j + 1) * span - 1``;
- input feature ``i`` of the first layer: its column ``first.weight[:, i]`` (a pixel of LeNet-300-100's input).

A zero group leaves the network's function unchanged only if a zero unit feeds zeros onward (ReLU, max-pooling,
dropout and flatten do; a normalisation layer in between would not: ``unit_chain`` refuses such networks).
The groups are ranked by their Euclidean norm. (A group-lasso penalty pushing groups to zero before the ranking was
measured and removed: docs/experiments.md.) Pure tensor functions; the callback is ``trainer.callbacks.structured``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from compression.layers import prunable_layers

NORMALISATION = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


@dataclass(frozen=True)
class Units:
    """The output units of ``layer`` as groups: its rows, its bias, and ``span`` input columns of ``successor``."""

    layer: str
    successor: str
    span: int  # inputs of the successor per unit (1: Linear -> Linear, conv -> conv; h * w: conv -> flatten -> Linear)
    count: int  # output units of the layer

    def params(self) -> tuple[str, str, str]:
        """The parameters a unit's group touches: the layer's weight and bias and the successor's weight."""
        return f"{self.layer}.weight", f"{self.layer}.bias", f"{self.successor}.weight"


def unit_chain(model: nn.Module, layers: list[str]) -> dict[str, Units]:
    """The unit groups of each named layer, its successor being the next prunable layer in registration order.

    Raises:
        ValueError: the network has a normalisation layer, a named layer is the last one (its outputs are the
            classes), has no bias, or its successor's inputs are not a whole number of its outputs.
    """
    norms = [n for n, m in model.named_modules() if isinstance(m, NORMALISATION)]
    if norms:
        raise ValueError(f"units cannot be removed from {type(model).__name__}: a zero unit does not give a zero "
                         f"output through its normalisation layers ({', '.join(norms[:3])}); use IterativePruning")
    modules = prunable_layers(model)
    order = list(modules)
    out = {}
    for name in layers:
        position = order.index(name)
        if position == len(order) - 1:
            raise ValueError(f"units: {name} is the last layer: its outputs are the classes; name the hidden layers "
                             f"({', '.join(order[:-1])})")
        layer, successor = modules[name], modules[order[position + 1]]
        count = layer.weight.shape[0]
        inputs = successor.weight.shape[1]
        if layer.bias is None or inputs % count or (isinstance(successor, nn.Conv2d) and inputs != count):
            raise ValueError(f"units: {name}'s {count} outputs do not feed {order[position + 1]}'s {inputs} inputs "
                             f"one by one (or {name} has no bias); structured pruning needs a plain chain")
        out[name] = Units(name, order[position + 1], inputs // count if isinstance(successor, nn.Linear) else 1, count)
    return out


def _successor_view(weight: torch.Tensor, units: Units) -> torch.Tensor:
    """The successor's weight as ``(units, rest)``: row ``j`` holds every input weight that reads unit ``j``."""
    if weight.dim() == 2:  # Linear: columns j*span .. (j+1)*span-1
        return weight.reshape(weight.shape[0], units.count, units.span).transpose(0, 1).reshape(units.count, -1)
    return weight.transpose(0, 1).reshape(units.count, -1)  # conv (out, in, kh, kw): input channel j


def unit_norms(params: Mapping[str, torch.Tensor], units: Units) -> torch.Tensor:
    """(count,) Euclidean norm of each unit's group."""
    w, b, s = (params[p].detach().float() for p in units.params())
    return (w.flatten(1).square().sum(1) + b.square() + _successor_view(s, units).square().sum(1)).sqrt()


def input_norms(weight: torch.Tensor) -> torch.Tensor:
    """(inputs,) Euclidean norm of each input feature's column (a conv: each input channel) of a first layer."""
    return weight.detach().float().transpose(0, 1).flatten(1).square().sum(1).sqrt()


def unit_masks(params: Mapping[str, torch.Tensor], units: Units, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Masks that remove the units where ``keep`` (bool, (count,)) is False: the layer's rows and biases, the
    successor's columns reading them."""
    w, b, s = (params[p] for p in units.params())
    keep = keep.to(w.device)
    row = keep.view(-1, *([1] * (w.dim() - 1))).expand_as(w)
    if s.dim() == 2:
        cols = keep.repeat_interleave(units.span).view(1, -1).expand_as(s)
    else:
        cols = keep.view(1, -1, *([1] * (s.dim() - 2))).expand_as(s)
    names = units.params()
    return {names[0]: row.clone(), names[1]: keep.clone(), names[2]: cols.clone()}


def input_mask(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The mask removing the input features (columns; a conv: input channels) where ``keep`` is False."""
    return keep.to(weight.device).view(1, -1, *([1] * (weight.dim() - 2))).expand_as(weight).clone()


def top_groups(norms: torch.Tensor, alive: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` groups of largest norm among ``alive`` (bool); ties broken by lower index; at least one kept."""
    k = max(1, min(k, int(alive.sum())))
    scores = torch.where(alive, norms, torch.full_like(norms, -1.0))
    order = torch.sort(-scores, stable=True).indices[:k]  # stable: equal norms keep their index order
    keep = torch.zeros_like(alive)
    keep[order] = True
    return keep & alive
