"""``Quantization``: trained quantization by weight sharing (Deep Compression, arXiv 1510.00149 §3).

At the start of epoch ``epoch`` each selected layer's kept weights are clustered by 1-D k-means
(``compression.kmeans``) into at most ``2**bits`` shared values; from then on the layer's weight is
``codebook[index]`` on its pruning mask. The codebooks are registered in ``setup`` — before Lightning
builds the optimizer — so the optimizer fine-tunes them in the same fit, each centroid receiving the sum
of its weights' gradients; assignments stay fixed. ``LitClassifier`` / ``CompressionState`` enforce this
at every step and save codebooks and indices in every checkpoint.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from typing_extensions import override

from compression.kmeans import INITS, kmeans_1d
from logger import get_logger
from trainer.callbacks.best import reset_best
from trainer.callbacks.layers import per_layer

log = get_logger("quantization")
DEFAULT_BITS = {"Conv2d": 8, "Linear": 5}  # the paper's AlexNet/VGG setting


class Quantization(Callback):
    """Shares weights by k-means at epoch ``epoch`` and fine-tunes the codebooks afterwards.

    Args:
        bits: Bits per layer: one number, or ``{layer name or type: bits}`` (default conv 8 / fc 5 as in
            the paper; LeNet-300-100 uses 6). ``2**bits`` clusters at most; a layer with fewer distinct
            kept weights gets fewer.
        init: Centroid initialisation: ``linear`` (the paper's best), ``density``, ``forgy``, ``kmeans++``.
        epoch: Epoch (0-based) at whose start the layers are quantized.
        lr: Learning rate of the codebooks (default: the optimizer's). No weight decay is applied to them.
        layers: Layer names or types to quantize (default: those of ``bits``).
        seed: Seed of ``forgy`` / ``kmeans++`` (k-means is deterministic, so every DDP rank agrees).
        max_iter: Maximum Lloyd iterations.
    """

    def __init__(self, bits: int | dict[str, int] | None = None, init: str = "linear", epoch: int = 0,
                 lr: float | None = None, layers: list[str] | None = None, seed: int = 0,
                 max_iter: int = 1000) -> None:
        bits = dict(DEFAULT_BITS) if bits is None else bits
        for key, value in (bits.items() if isinstance(bits, dict) else [("bits", bits)]):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 16:
                raise ValueError(f"bits {key}: must be an integer in 1..16, got {value!r}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; valid inits: {', '.join(INITS)}")
        if lr is not None and lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        self.bits, self.init, self.epoch, self.lr = bits, init, epoch, lr
        self.layers, self.seed, self.max_iter = layers, seed, max_iter

    def check(self, model: nn.Module, max_epochs: int) -> dict[str, int]:
        """Validates layer names and the epoch; returns {full layer name: bits}.

        Raises:
            ValueError: unknown layer names (listing the model's layers) or an epoch beyond max_epochs.
        """
        if not 0 <= self.epoch < max_epochs:
            raise ValueError(f"epoch {self.epoch} is outside the run's epochs 0..{max_epochs - 1} "
                             f"(trainer.max_epochs={max_epochs})")
        bits = per_layer(model, self.bits, self.layers, "bits")
        return {name: int(b) for name, b in bits.items()}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.layer_bits = self.check(pl_module.model, trainer.max_epochs)
        modules = dict(pl_module.model.named_modules())
        for name, bits in self.layer_bits.items():  # before configure_optimizers: the optimizer sees them
            pl_module.compression.add_codebook(f"{name}.weight", 2 ** bits, modules[name].weight.device)
        pl_module.codebook_lr = self.lr

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            self.quantize(trainer, pl_module)

    def quantize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Clusters every selected layer's kept weights and installs codebooks and indices."""
        modules = dict(pl_module.model.named_modules())
        metrics: dict[str, float] = {}
        for name, bits in self.layer_bits.items():
            param_name, weight = f"{name}.weight", modules[name].weight
            mask = pl_module.masks.get(param_name, weight.detach() != 0)
            values = weight.detach()[mask].double().cpu().numpy()
            if not len(values):  # pruned away entirely: nothing to share, the layer stays all zeros
                log.info(f"Quantization skipped {name}: no weight is kept")
                continue
            self._histogram(trainer, f"weights/{name}/before_quantization", values)
            result = kmeans_1d(values, 2 ** bits, init=self.init, seed=self.seed, max_iter=self.max_iter)
            centroids, index = torch.from_numpy(result.centroids), torch.from_numpy(result.labels)
            if trainer.world_size > 1:  # deterministic already; broadcasting makes it certain
                centroids, index = trainer.strategy.broadcast((centroids, index), src=0)
            if param_name not in pl_module.masks:
                pl_module.set_masks({param_name: mask})
            pl_module.compression.set_quantization(pl_module.model, param_name, centroids, index)
            self._histogram(trainer, f"weights/{name}/quantized", weight.detach()[mask].cpu().numpy())
            metrics.update({f"quant/{name}/bits": bits, f"quant/{name}/clusters": len(result.centroids),
                            f"quant/{name}/inertia": result.inertia, f"quant/{name}/iterations": result.n_iter})
            log.info(f"Quantized {name}: {len(values):,} weights -> {len(result.centroids)} shared values "
                     f"({bits} bits, init {self.init}), k-means inertia {result.inertia:.4g} after "
                     f"{result.n_iter} iterations")
        for optimizer in trainer.optimizers:  # fresh momentum for the fresh codebooks
            for codebook in pl_module.compression.codebooks.values():
                optimizer.state.pop(codebook, None)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        reset_best(trainer)  # best.ckpt must be a quantized model

    @staticmethod
    def _histogram(trainer: pl.Trainer, tag: str, values: Any) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and len(values):
                logger.experiment.add_histogram(tag, values, global_step=trainer.global_step)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 0:  # the dense / pre-trained weights, for the paper's Fig. 4 view
            modules = dict(pl_module.model.named_modules())
            for name in self.layer_bits:
                self._histogram(trainer, f"weights/{name}/at_start", modules[name].weight.detach().cpu().numpy())
