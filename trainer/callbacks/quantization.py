"""``Quantization``: trained quantization by weight sharing (Deep Compression, arXiv 1510.00149 §3).

At the start of epoch ``epoch`` each selected layer's kept weights are clustered by 1-D k-means
(``compression.kmeans``) into at most ``2**bits`` shared values; from then on the layer's weight is
``codebook[index]`` on its pruning mask. With ``bits: "auto"`` (beyond the paper) the precision is chosen by rate
instead: every selected weight and bias goes on a uniform grid whose step is searched tensor by tensor, with an
entropy-constrained assignment (``compression.ptq``), for the smallest real file whose expected validation top-1
error (mean probability off the true class) stays within ``budget`` points of the model's own at that epoch; the
grid's levels are the codebook. The codebooks are registered in ``setup`` — before Lightning
builds the optimizer — so the optimizer fine-tunes them in the same fit, each centroid receiving the sum
of its weights' gradients; assignments stay fixed. ``LitClassifier`` / ``CompressionState`` enforce this
at every step and save codebooks and indices in every checkpoint.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from pydantic import Field, field_validator, model_validator
from torch import nn
from typing_extensions import override

from compression import ptq
from compression.kmeans import INITS, MAX_ITER, kmeans_1d
from compression.layers import per_layer
from compression.model_file import save_compressed
from compression.quantization import DEFAULT_BITS, MAX_BITS
from logger import get_logger
from strict_args import StrictArgs, validated
from trainer.callbacks.best import reset_best

if TYPE_CHECKING:  # the module this callback works on (its .model, .masks, .compression, .codebook_lr)
    from trainer.lit_model import LitClassifier

log = get_logger("quantization")
# ``bias_bits`` shares a bias only if it has more than this many entries per shared value: a float32 codebook of
# 2**b values costs 32 * 2**b bits and saves 16 - b bits per entry over float16 storage (break-even at 2.7 entries
# per value for 4 bits, 3.2 for 6), so a short bias (LeNet-5's conv1: 20) stays raw.
BIAS_ENTRIES_PER_VALUE = 4
AUTO_BITS = 12  # bits "auto": codebooks of 2**12 entries are registered (a searched grid uses fewer levels)


class QuantizationArgs(StrictArgs):
    """The arguments of ``Quantization`` (``trainer.callbacks.Quantization`` in a config)."""

    # per layer name or type; "auto": searched grids under budget
    bits: int | dict[str, int] | Literal["auto"] = Field(default_factory=lambda: dict(DEFAULT_BITS))

    @field_validator("bits", mode="before")
    @classmethod
    def _null_is_default(cls, bits: Any) -> Any:
        return dict(DEFAULT_BITS) if bits is None else bits  # older configs wrote "bits": null for the default
    init: str = "linear"  # centroid initialisation: linear (the paper's best), density, forgy
    epoch: int = 0  # epoch (0-based) at whose start the layers are clustered
    lr: float | None = None  # learning rate of the codebooks (None: the optimizer's); no weight decay on them
    layers: list[str] | None = None  # layer names or types to quantize (default: those of bits)
    bias_bits: int | None = None  # share the selected layers' biases too (those of > 4 * 2**bias_bits entries)
    seed: int = 0  # seed of forgy (k-means is deterministic, so every DDP rank agrees)
    max_iter: int = MAX_ITER  # Lloyd iterations at most
    budget: float | None = None  # bits "auto": expected validation top-1 error allowed above the model's, in points
    val_batches: int | None = None  # bits "auto": validation batches per search trial (None: the whole split)

    @model_validator(mode="after")
    def _auto_needs_budget(self) -> QuantizationArgs:
        if self.bits == "auto":
            if self.budget is None or not self.budget >= 0:
                raise ValueError(f'bits "auto" needs budget: the expected validation error allowed above the '
                                 f"model's own, in points (>= 0, e.g. 0.1), got {self.budget!r}")
            if self.bias_bits is not None:
                raise ValueError('bias_bits does not apply with bits "auto" (the biases get searched grids too): '
                                 "remove it")
        elif self.budget is not None or self.val_batches is not None:
            raise ValueError('budget and val_batches apply only with bits "auto": remove them or set bits "auto"')
        if self.val_batches is not None and self.val_batches < 1:
            raise ValueError(f"val_batches must be >= 1 or null, got {self.val_batches!r}")
        return self

    @field_validator("bias_bits")
    @classmethod
    def _bias_bits_range(cls, bits: int | None) -> int | None:
        if bits is not None and not 1 <= bits <= MAX_BITS:
            raise ValueError(f"must be an integer in 1..{MAX_BITS} or null, got {bits!r}")
        return bits

    @field_validator("bits")
    @classmethod
    def _bits_range(cls, bits: int | dict[str, int] | str) -> int | dict[str, int] | str:
        if bits == "auto":
            return bits
        for key, value in (bits.items() if isinstance(bits, dict) else [("", bits)]):
            if not 1 <= value <= MAX_BITS:
                raise ValueError(f"{key}{': ' if key else ''}must be an integer in 1..{MAX_BITS}, got {value!r}")
        return bits

    @field_validator("init")
    @classmethod
    def _known_init(cls, init: str) -> str:
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; valid inits: {', '.join(INITS)}")
        return init

    @field_validator("lr")
    @classmethod
    def _lr(cls, lr: float | None) -> float | None:
        if lr is not None and lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        return lr

    @field_validator("max_iter")
    @classmethod
    def _max_iter(cls, max_iter: int) -> int:
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        return max_iter


class Quantization(Callback):
    """Shares weights by k-means at epoch ``epoch`` and fine-tunes the codebooks afterwards.

    Takes the keyword arguments of ``QuantizationArgs``: ``bits`` (one number, or ``{layer name or type:
    bits}``; default conv 8 / fc 5 as in the paper, LeNet-300-100 uses 6; ``2**bits`` clusters at most, a
    layer with fewer distinct kept weights gets fewer), ``init``, ``epoch``, ``lr``, ``layers``, ``seed``,
    ``max_iter``, ``bias_bits`` (beyond the paper, which keeps biases raw: the selected layers' biases of
    more than ``BIAS_ENTRIES_PER_VALUE * 2**bias_bits`` entries share ``2**bias_bits`` values each,
    clustered and fine-tuned like the weights; biases are never pruned). ``bits="auto"`` with ``budget`` (and
    optionally ``val_batches``): searched uniform grids for every selected layer's weight and bias instead of
    k-means (see the module's docstring); a weight the search rounds to 0 joins the pruned ones.

    Raises:
        ValueError: an argument out of range (one message per problem).
    """

    def __init__(self, **kwargs: Any) -> None:
        self.args = args = validated(QuantizationArgs, kwargs, "Quantization")
        self.bits, self.init, self.epoch, self.lr = args.bits, args.init, args.epoch, args.lr
        self.layers, self.seed, self.max_iter = args.layers, args.seed, args.max_iter
        self.bias_bits, self.budget, self.val_batches = args.bias_bits, args.budget, args.val_batches
        self.auto = args.bits == "auto"
        # What the trial files of bits "auto" are written with: the run's export settings (``export_with``).
        self.export: dict[str, Any] = {"codec": "context", "raw_dtype": "float16", "index_bits": "auto",
                                       "arch": None, "metadata": {}}

    def export_with(self, **settings: Any) -> None:
        """The run's export settings (codec, raw_dtype, index_bits, arch, metadata): bits "auto" measures every
        trial as the file the run will write."""
        self.export.update(settings)

    def check(self, model: nn.Module, max_epochs: int) -> dict[str, int]:
        """Validates layer names and the epoch; returns {full layer name: bits}.

        Raises:
            ValueError: unknown layer names (listing the model's layers) or an epoch beyond max_epochs.
        """
        if not 0 <= self.epoch < max_epochs:
            raise ValueError(f"epoch {self.epoch} is outside the run's epochs 0..{max_epochs - 1} "
                             f"(trainer.max_epochs={max_epochs})")
        return per_layer(model, AUTO_BITS if self.auto else self.bits, self.layers, "bits")

    @override
    def setup(self, trainer: pl.Trainer, pl_module: LitClassifier, stage: str) -> None:
        if stage != "fit":
            return
        self.layer_bits = self.check(pl_module.model, trainer.max_epochs)
        for param_name, param, bits in self._targets(pl_module.model):  # before configure_optimizers
            pl_module.compression.add_codebook(param_name, 2 ** bits, param.device)
        pl_module.codebook_lr = self.lr

    def _targets(self, model: nn.Module) -> list[tuple[str, nn.Parameter, int]]:
        """(parameter name, parameter, bits) of every tensor to share: each layer's weight, then its bias
        when ``bias_bits`` is set."""
        modules, out = dict(model.named_modules()), []
        for name, bits in self.layer_bits.items():
            out.append((f"{name}.weight", modules[name].weight, bits))
            bias = getattr(modules[name], "bias", None)
            long_bias = bias is not None and bias.numel() > BIAS_ENTRIES_PER_VALUE * 2 ** (self.bias_bits or 0)
            if bias is not None and (self.auto or self.bias_bits is not None and long_bias):
                out.append((f"{name}.bias", bias, AUTO_BITS if self.auto else self.bias_bits))
        return out

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: LitClassifier) -> None:
        if trainer.current_epoch == self.epoch:
            self.quantize(trainer, pl_module)

    def quantize(self, trainer: pl.Trainer, pl_module: LitClassifier) -> None:
        """Clusters every selected layer's kept weights and installs codebooks and indices."""
        metrics = self._grids(trainer, pl_module) if self.auto else self._kmeans(trainer, pl_module)
        for optimizer in trainer.optimizers:  # fresh momentum for the fresh codebooks
            for codebook in pl_module.compression.codebooks.values():
                optimizer.state.pop(codebook, None)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        reset_best(trainer)  # best.ckpt must be a quantized model

    def _kmeans(self, trainer: pl.Trainer, pl_module: LitClassifier) -> dict[str, float]:
        """The paper's weight sharing: k-means codebooks installed; returns the metrics to log."""
        metrics: dict[str, float] = {}
        for param_name, weight, bits in self._targets(pl_module.model):
            name = param_name.removesuffix(".weight")  # a layer's weight logs as the layer, a bias as "fc1.bias"
            # Zeros of an unpruned weight stay zeros (the paper's layout); an unpruned bias keeps every entry.
            unpruned = weight.detach() != 0 if param_name.endswith(".weight") else torch.ones_like(weight, dtype=bool)
            mask = pl_module.masks.get(param_name, unpruned)
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
        return metrics

    def _grids(self, trainer: pl.Trainer, pl_module: LitClassifier) -> dict[str, float]:
        """bits "auto": searches the grids (every trial measured on the validation split and as a written file),
        installs them as codebooks; returns the metrics to log."""
        model, targets = pl_module.model, self._targets(pl_module.model)
        params = {name: param for name, param, _ in targets}
        masks = {name: mask for name, mask in pl_module.masks.items() if name in params}
        weights = [name for name in params if name.endswith(".weight")]
        evaluate = self._evaluator(trainer, pl_module)
        top1, base = evaluate()
        log.info(f"Quantization (bits auto): validation top-1 error {top1:.2f} %, expected {base:.3f} % at epoch "
                 f"{trainer.current_epoch}; searching grids for the smallest file within +{self.budget:g} points")
        arch = self.export["arch"] or {"type": type(model).__name__, "args": {}}
        export = {k: v for k, v in self.export.items() if k != "arch"}
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "trial.dcz"

            def size_of(state: ptq.State) -> int:
                save_compressed(model, path, arch=arch, **state, **export)
                return path.stat().st_size

            with torch.no_grad():
                setting, error, size, state = ptq.search_grids(params, masks, weights, lambda: evaluate()[1],
                                                               size_of, base + self.budget, log.info)
        if trainer.world_size > 1:  # every rank searched the same data deterministically; rank 0's result rules
            state = trainer.strategy.broadcast(state, src=0)
        metrics: dict[str, float] = {"quant/auto/val_expected_err": error, "quant/auto/file_bytes": size}
        for name in params:
            codebook, index = state["codebooks"][name], state["indices"][name]
            if len(codebook) > 2 ** AUTO_BITS:
                raise ValueError(f"Quantization (bits auto): {name} needs {len(codebook)} levels, more than the "
                                 f"{2 ** AUTO_BITS} registered: raise budget")
            pl_module.set_masks({name: state["masks"][name].to(params[name].device)})
            pl_module.compression.set_quantization(model, name, codebook, index)
            label = name.removesuffix(".weight")
            metrics.update({f"quant/{label}/clusters": len(codebook), f"quant/{label}/step": setting[name]})
            log.info(f"Quantized {label}: {int(state['masks'][name].sum()):,} weights on a grid of step "
                     f"{setting[name]:.4g}, {len(codebook)} levels")
        log.info(f"Quantization (bits auto): {ptq.describe(setting)}: {error:.3f} % expected validation error, "
                 f"{size:,} bytes before fine-tuning")
        return metrics

    def _evaluator(self, trainer: pl.Trainer, pl_module: LitClassifier):
        """The model's (top-1, expected top-1) validation errors in % as it is now (``ptq.errors``), over the whole
        validation split (or ``val_batches``) on this rank, in eval mode."""
        datamodule = trainer.datamodule
        loader = datamodule.val_dataloader() if datamodule is not None else trainer.val_dataloaders
        if loader is None or len(loader) == 0:
            raise ValueError('Quantization (bits auto) needs a validation split (data_loader.args.validation_split)')

        transfer = (lambda batch: datamodule.on_after_batch_transfer(batch, 0)) if datamodule is not None else None
        def evaluate() -> tuple[float, float]:
            was_training = pl_module.training
            pl_module.eval()
            try:
                return ptq.errors(pl_module.model, ptq.on_device(loader, pl_module.device, transfer, self.val_batches))
            finally:
                pl_module.train(was_training)

        return evaluate

    @staticmethod
    def _histogram(trainer: pl.Trainer, tag: str, values: Any) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and len(values):
                logger.experiment.add_histogram(tag, values, global_step=trainer.global_step)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: LitClassifier) -> None:
        if trainer.current_epoch == 0:  # the dense / pre-trained weights, for the paper's Fig. 4 view
            modules = dict(pl_module.model.named_modules())
            for name in self.layer_bits:
                self._histogram(trainer, f"weights/{name}/at_start", modules[name].weight.detach().cpu().numpy())
