"""Pruning masks and shared-weight codebooks of a model, enforced during training.

``CompressionState`` lives inside ``LitClassifier``. The callbacks decide when to prune or quantize and
install the result here; this module keeps it true at every step:

- pruned weights are zero after every optimizer step and receive no gradient (Han 2015 §3);
- a quantized weight is ``codebook[index]`` on its mask: after backward, the weight's gradient is
  summed per centroid into the codebook's gradient (Han 2016 eq. 3) and the weight itself gets none, so
  the optimizer updates only the codebooks, which are ordinary parameters it sees from the start.

The weights stay plain tensors (``model.fc1.weight``): a compressed checkpoint loads into a fresh model.
Masks and indices travel in the checkpoint's ``"masks"`` / ``"quant_index"`` entries, the codebooks in
its state dict under ``compression.codebooks.<name with __>``: this class owns those keys
(``codebook_key``, ``tensors_of``); nothing else spells them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from compression.quantization import centroid_grad, dequantize


STATE_ATTR = "compression"  # the attribute LitClassifier holds its CompressionState in
MASKS_KEY, INDEX_KEY = "masks", "quant_index"  # the checkpoint entries of the masks and indices
_CODEBOOKS = f"{STATE_ATTR}.codebooks."  # prefix of the codebooks in a checkpoint's state_dict


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys cannot contain dots


def codebook_key(name: str) -> str:
    """The ``state_dict`` key of parameter ``name``'s codebook in a LitClassifier checkpoint."""
    return _CODEBOOKS + _key(name)


class CompressionState(nn.Module):
    """Masks, codebooks and indices of the parameters of ``model`` (by parameter name)."""

    def __init__(self) -> None:
        super().__init__()
        self.masks: dict[str, torch.Tensor] = {}  # bool, shaped like the parameter, True = kept
        self.codebooks = nn.ParameterDict()  # _key(name) -> (k,) shared values, trained by the optimizer
        self.index: dict[str, torch.Tensor] = {}  # name -> (n_kept,) int64 centroid of each kept weight

    # ------------------------------------------------------------------------------- installing
    def set_masks(self, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
        """Installs pruning masks and zeroes the pruned weights.

        Raises:
            ValueError: unknown parameter name or shape mismatch.
        """
        params = dict(model.named_parameters())
        for name, mask in masks.items():
            if name not in params:
                raise ValueError(f"mask for unknown parameter {name!r}; parameters: {', '.join(params)}")
            if mask.shape != params[name].shape:
                raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, weight {tuple(params[name].shape)}")
            if name in self.index and not torch.equal(mask.to(self.masks[name].device), self.masks[name]):
                raise ValueError(f"{name} is quantized: its mask can no longer change")
            self.masks[name] = mask.to(params[name].device, torch.bool)
        self.apply_(model)

    def add_codebook(self, name: str, size: int, device: torch.device | None = None) -> nn.Parameter:
        """Registers a (size,) codebook for parameter ``name`` (before the optimizer is built)."""
        return self._codebook(_key(name), size, device)

    def _codebook(self, key: str, size: int, device: torch.device | None) -> nn.Parameter:
        if key not in self.codebooks:
            self.codebooks[key] = nn.Parameter(torch.zeros(size, device=device))
        return self.codebooks[key]

    def set_quantization(self, model: nn.Module, name: str, centroids: torch.Tensor, index: torch.Tensor) -> None:
        """Quantizes parameter ``name``: its kept weights become ``centroids[index]`` (codebook padded with 0).

        The mask is the installed one, else the parameter's non-zero entries (zeros stay zeros).
        """
        param = dict(model.named_parameters())[name]
        if name not in self.masks:
            self.masks[name] = param.detach() != 0
        codebook = self.add_codebook(name, len(centroids), param.device)
        if len(centroids) > len(codebook) or len(index) != int(self.masks[name].sum()):
            raise ValueError(f"{name}: {len(centroids)} centroids for a codebook of {len(codebook)}, "
                             f"{len(index)} indices for {int(self.masks[name].sum())} kept weights")
        with torch.no_grad():
            codebook.zero_()
            codebook[: len(centroids)] = centroids.to(codebook)
        self.index[name] = index.to(param.device, torch.int64)
        self.apply_(model)

    # ------------------------------------------------------------------------------- enforcing
    def _on_device_(self, name: str, device: torch.device) -> torch.Tensor:
        """The mask of ``name`` (and its index) moved to ``device`` once: they are plain tensors, not buffers,
        so they stay where a checkpoint put them (the CPU) until the weights are seen on the GPU."""
        mask = self.masks[name]
        if mask.device != device:
            mask = self.masks[name] = mask.to(device)
        if name in self.index and self.index[name].device != device:
            self.index[name] = self.index[name].to(device)
        return mask

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> None:
        """Makes every parameter match its mask and codebook (called after every optimizer step)."""
        if not self.masks:
            return
        params = dict(model.named_parameters())
        for name in self.masks:
            param = params[name]
            mask = self._on_device_(name, param.device)
            if name in self.index:
                param.copy_(dequantize(self.codebooks[_key(name)], self.index[name], mask))
            else:
                # masked_fill_, not mul_: a pruned negative weight times 0 would be -0.0, and the decoded
                # file (which writes +0.0) would then differ from the model in its bits.
                param.masked_fill_(~mask, 0.0)

    def route_gradients_(self, model: nn.Module) -> None:
        """After backward: masks gradients; moves quantized weights' gradients onto their codebooks."""
        if not self.masks:
            return
        params = dict(model.named_parameters())
        for name in self.masks:
            grad = params[name].grad
            if grad is None:
                continue
            mask = self._on_device_(name, grad.device)  # the first step after a resume on the GPU comes here
            if name in self.index:
                codebook = self.codebooks[_key(name)]
                g = centroid_grad(grad, self.index[name], mask, len(codebook))
                codebook.grad = g if codebook.grad is None else codebook.grad + g
                params[name].grad = None  # the optimizer must not move the weight itself
            else:
                grad.mul_(mask)

    def clear_optimizer_state_(self, model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
        """Zeroes momentum / Adam moments at pruned positions so old momentum cannot move pruned weights."""
        params = dict(model.named_parameters())
        for optimizer in optimizers:
            for name, mask in self.masks.items():
                for value in optimizer.state.get(params[name], {}).values():
                    if torch.is_tensor(value) and value.shape == mask.shape:
                        value.mul_(mask.to(value.device))

    # ------------------------------------------------------------------------------- checkpoints
    def codebook_keys(self) -> list[str]:
        """The ``state_dict`` keys of the registered codebooks (e.g. for DDP to leave them alone)."""
        return [_CODEBOOKS + key for key in self.codebooks]

    def checkpoint_entries(self) -> dict[str, Any]:
        return {MASKS_KEY: {n: m.cpu() for n, m in self.masks.items()},
                INDEX_KEY: {n: i.cpu() for n, i in self.index.items()}}

    @staticmethod
    def tensors_of(checkpoint: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                           dict[str, torch.Tensor]]:
        """The compressed tensors of a loaded checkpoint, by parameter name of the network.

        Returns:
            (masks, codebooks, indices): what the ``.dcz`` encoder stores for each compressed parameter.
        """
        state = checkpoint.get("state_dict", {})
        indices = dict(checkpoint.get(INDEX_KEY, {}))
        missing = [name for name in indices if codebook_key(name) not in state]
        if missing:
            raise ValueError(f"quantization indices for {', '.join(missing)} but no codebook for them")
        codebooks = {name: state[codebook_key(name)] for name in indices}
        return dict(checkpoint.get(MASKS_KEY, {})), codebooks, indices

    @staticmethod
    def check(checkpoint: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> None:
        """Checks a loaded checkpoint's compression state against its network ``weights`` (by parameter name), so
        that a damaged or edited one fails with one message where it is loaded, never later in an encoder: every
        floating weight finite; a mask per pruned weight, shaped like it; the indices of a quantized weight, one per
        kept weight, inside its codebook. Linear in the checkpoint's size (VGG-16: BENCHMARKS.md); that the weights
        are their codebooks' values at their indices is the encoder's check (``compression.model_codec``).

        Raises:
            ValueError: naming the tensor and what is wrong with it.
        """
        tensors = {**weights, **{k: v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith(_CODEBOOKS)}}
        for name, tensor in tensors.items():  # min and max are NaN or infinite if any entry is: one pass, no copy
            if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(
                    torch.stack(torch.aminmax(tensor.detach()))).all()):
                raise ValueError(f"{name} holds NaN or infinite values")
        masks, codebooks, indices = CompressionState.tensors_of(checkpoint)
        for name, mask in masks.items():
            weight = weights.get(name)
            if weight is None or tuple(mask.shape) != tuple(weight.shape) or mask.dtype != torch.bool:
                found = "no such weight" if weight is None else f"the weight's {tuple(weight.shape)}"
                raise ValueError(f"the mask of {name} is {mask.dtype} {tuple(mask.shape)}: {found}")
        for name, index in indices.items():
            book, mask = codebooks[name], masks.get(name)
            kept = None if mask is None else int(torch.count_nonzero(mask))  # (a bool sum would widen to int64)
            integer = not index.is_floating_point() and index.dtype != torch.bool and not index.is_complex()
            if kept is None or index.ndim != 1 or not integer or len(index) != kept:
                raise ValueError(f"the quantization index of {name} ({tuple(index.shape)}, {index.dtype}) does not "
                                 f"match its mask ({'none' if kept is None else kept} kept weights)")
            if len(index) and not (0 <= int(index.min()) and int(index.max()) < len(book)):
                raise ValueError(f"the quantization index of {name} runs outside its codebook of {len(book)} values "
                                 f"({int(index.min())}..{int(index.max())})")

    def load_entries(self, model: nn.Module, checkpoint: Mapping[str, Any], resume: bool = True) -> None:
        """Restores masks, indices and codebooks (shapes and values) from a checkpoint.

        Runs before the optimizer is built, so the codebooks it registers are trained from the first step.

        Args:
            resume: The same run continues (``train.py -r``): every codebook is restored, in its order, those
                not in use yet included (the optimizer's state is restored by position). A new run from the
                checkpoint's weights (``--weights``) takes only the codebooks in use, so its own recipe's
                ``Quantization`` sizes the others.

        Raises:
            ValueError: an entry that does not fit ``model`` (unknown parameter, shape, index range).
        """
        params = dict(model.named_parameters())
        for name, mask in checkpoint.get(MASKS_KEY, {}).items():
            if name not in params or tuple(mask.shape) != tuple(params[name].shape):
                shape = tuple(params[name].shape) if name in params else "no such parameter"
                raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, the model's: {shape}")
            self.masks[name] = mask.to(params[name].device, torch.bool)
        state = checkpoint.get("state_dict", {})
        sizes = {k: v.shape[0] for k, v in state.items() if k.startswith(_CODEBOOKS)}
        # Every codebook of the checkpoint, in its order (a layer pruned away entirely has a codebook but no
        # index): the optimizer's state is restored by position, so the order must be the saved one.
        device = next(iter(params.values())).device if params else None
        in_use = {codebook_key(name) for name in checkpoint.get(INDEX_KEY, {})}
        for key, size in sizes.items():
            if not resume and key not in in_use:
                continue
            with torch.no_grad():
                self._codebook(key.removeprefix(_CODEBOOKS), size, device).copy_(state[key])
        for name, index in checkpoint.get(INDEX_KEY, {}).items():
            key = codebook_key(name)
            if key not in sizes or name not in self.masks:
                raise ValueError(f"checkpoint has quantization indices for {name} but no codebook {key} or mask")
            kept = int(self.masks[name].sum())
            in_range = kept == 0 or 0 <= int(index.min()) <= int(index.max()) < sizes[key]
            if index.ndim != 1 or len(index) != kept or not in_range:
                raise ValueError(f"quantization index of {name} does not fit: {tuple(index.shape)} entries for "
                                 f"{kept} kept weights and a codebook of {sizes[key]}")
            self.index[name] = index.to(params[name].device, torch.int64)
