"""A decoded model as ONNX, the format deployment runtimes load (beyond the paper: the ``.dcz`` stays the smallest
file; ONNX is for running it elsewhere).

Two forms:

- ``dense``: the model as it is, every weight float32: the graph every runtime runs.
- ``compact``: each ``Linear`` / ``Conv2d`` weight with few distinct values (a quantized layer: its codebook and the
  pruned zero) is stored as its distinct values (float32) and one small integer per weight (``uint8`` up to 256
  values, else ``int16`` up to 32,768), and computed in the graph as ``Gather(values, index)`` before the layer's
  own operator: about a quarter of float32's bytes for the layers that dominate a file, and bit-exact, since the
  values are gathered, not recomputed. Distinct values are counted on the float32 bit patterns, so ``-0.0`` and
  ``+0.0`` stay apart.

Both take any batch size (the first input dimension is dynamic).
"""

from __future__ import annotations

import io
import warnings

import torch
import torch.nn.functional as F
from torch import nn

OPSET = 17
FORMS = ("dense", "compact")


class GatheredWeight(nn.Module):
    """A ``Linear`` or ``Conv2d`` whose weight is ``values[index]``, computed at every forward pass.

    Args:
        layer: The layer to replace (its bias and, for a convolution, stride, padding, dilation and groups are kept).
        values: (k,) float32 distinct values of the weight.
        index: Integer tensor shaped like the weight, each entry a position in ``values``.
    """

    def __init__(self, layer: nn.Linear | nn.Conv2d, values: torch.Tensor, index: torch.Tensor) -> None:
        super().__init__()
        self.conv = isinstance(layer, nn.Conv2d)
        self.register_buffer("values", values)
        self.register_buffer("index", index)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        if self.conv:
            self.stride, self.padding, self.dilation, self.groups = (layer.stride, layer.padding, layer.dilation,
                                                                     layer.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.values[self.index.long()]  # Gather: exactly the stored values
        if self.conv:
            return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return F.linear(x, weight, self.bias)


def gathered(layer: nn.Linear | nn.Conv2d) -> GatheredWeight | None:
    """``layer`` as a ``GatheredWeight`` if its weight has at most 32,768 distinct values (else None)."""
    bits = layer.weight.detach().contiguous().view(torch.int32)  # the float32 bit patterns
    distinct, inverse = torch.unique(bits, return_inverse=True)
    if len(distinct) > 1 << 15:
        return None
    dtype = torch.uint8 if len(distinct) <= 256 else torch.int16
    return GatheredWeight(layer, distinct.view(torch.float32).clone(), inverse.to(dtype))


def compact(model: nn.Module) -> nn.Module:
    """``model`` (changed in place) with every ``Linear`` / ``Conv2d`` of few distinct values as a
    ``GatheredWeight``; returns it."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) in (nn.Linear, nn.Conv2d) and child.weight.dtype == torch.float32:
                replacement = gathered(child)
                if replacement is not None:
                    setattr(module, child_name, replacement)
    return model


def fixed_pools(model: nn.Module, input_shape: tuple[int, ...] | list[int]) -> nn.Module:
    """``model`` (changed in place) with each ``AdaptiveAvgPool2d`` that sees a fixed size its output divides as the
    ``AvgPool2d`` it amounts to (AlexNet's on 6x6: a 1x1 pool): the exporter cannot size an adaptive pool behind a
    computed weight."""
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: sizes.__setitem__(n, tuple(i[0].shape[-2:])))
             for n, m in model.named_modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    with torch.no_grad():
        model(torch.zeros(1, *input_shape))
    for hook in hooks:
        hook.remove()
    modules = dict(model.named_modules())
    for name, (h, w) in sizes.items():
        out = modules[name].output_size
        oh, ow = (out, out) if isinstance(out, int) else out
        if oh and ow and h % oh == 0 and w % ow == 0:
            parent, _, child = name.rpartition(".")
            setattr(modules[parent] if parent else model, child, nn.AvgPool2d((h // oh, w // ow)))
    return model


def to_onnx(model: nn.Module, input_shape: tuple[int, ...] | list[int], form: str = "dense") -> bytes:
    """The ONNX bytes of ``model`` (evaluated in ``eval`` mode) for inputs ``(N, *input_shape)``, N dynamic.

    Raises:
        ValueError: an unknown form.
    """
    if form not in FORMS:
        raise ValueError(f"unknown ONNX form {form!r}; choose one of {', '.join(FORMS)}")
    model = (fixed_pools(compact(model), input_shape) if form == "compact" else model).eval()
    out = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript-based exporter: it keeps a Gather of buffers in the graph (torch.export's folds it away).
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # its notices of its own deprecation
        torch.onnx.export(model, (torch.zeros(1, *input_shape),), out, dynamo=False, opset_version=OPSET,
                          do_constant_folding=form == "dense",  # compact: the Gather must stay in the graph
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return out.getvalue()
