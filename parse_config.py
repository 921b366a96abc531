"""JSON configuration -> validated, typed ``Config``; CLI overrides; run folders.

The file keeps the shape of ciodar/deep-compression's configs (``name``, ``arch``, ``data_loader``,
``optimizer``, ``lr_scheduler``, ``loss``, ``metrics``, ``trainer``). Every name is resolved through an
explicit registry and every mistake raises one ``ConfigError`` naming the JSON path, the bad value and
what is allowed, before any data is read or any training starts.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import time
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_serializer, model_validator
from typing_extensions import Self

from compression.atomic import atomic_write_text
from compression.layers import LayerType
from compression.model_codec import CODECS, DEFAULT_CODEC, DEFAULT_RAW_DTYPE, RAW_STORAGE
from compression.sparse_index import DEFAULT_INDEX_BITS, MAX_INDEX_BITS, IndexBits
from data import DATAMODULES
from models import MODELS
from trainer.callbacks import (CALLBACKS, COMPRESSION_ARGS, DistillationArgs, PruningArgs, QuantizationArgs,
                               StructuredArgs)
from strict_args import StrictArgs, format_errors
from trainer.lit_model import METRICS
from trainer.optim import LOSSES, OPTIMIZERS, SCHEDULERS

class ConfigError(ValueError):
    """A configuration mistake: the message names the JSON path, the value and what is allowed."""


_Strict = StrictArgs  # unknown keys are errors, no "3" -> 3 coercion (ints are accepted where floats are)


class RegistrySpec(_Strict):
    """A ``{"type": ..., "args": {...}}`` entry resolved through ``REGISTRY``."""

    REGISTRY: ClassVar[dict[str, Any]] = {}
    SUPPLIED: ClassVar[tuple[str, ...]] = ()  # constructor arguments the framework passes itself
    type: str
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in cls.REGISTRY:
            raise ValueError(f"unknown type; valid types: {', '.join(cls.REGISTRY)}")
        return value

    @property
    def target(self) -> Any:
        return self.REGISTRY[self.type]


class ArchSpec(RegistrySpec):
    REGISTRY = MODELS


class DataSpec(RegistrySpec):
    REGISTRY = DATAMODULES


class OptimizerSpec(RegistrySpec):
    REGISTRY = OPTIMIZERS
    SUPPLIED = ("params",)


class SchedulerSpec(RegistrySpec):
    REGISTRY = SCHEDULERS
    SUPPLIED = ("optimizer",)


class CallbacksConfig(_Strict):
    """``trainer.callbacks``: ``{name: arguments}``; the compression callbacks' arguments are typed."""

    # Declaration order is hook order: the teacher is taken at the start of its epoch before that epoch's
    # pruning step or clustering changes the network.
    Distillation: DistillationArgs | None = None  # the dense network teaches the compressed one (beyond the paper)
    StructuredPruning: StructuredArgs | None = None  # whole units / input features removed (beyond the paper)
    IterativePruning: PruningArgs | None = None  # pruning during (re)training (Han 2015)
    Quantization: QuantizationArgs | None = None  # trained quantization (Han 2016 §3)
    ModelCheckpoint: dict[str, Any] | None = None  # Lightning's, with its own arguments (checked early)
    EarlyStopping: dict[str, Any] | None = None  # Lightning's (trainer.early_stop is the short form)
    LearningRateMonitor: dict[str, Any] | None = None  # Lightning's (one per epoch is added by default)

    @model_serializer(mode="wrap")
    def _used_only(self, handler: Any) -> dict[str, Any]:
        return {name: args for name, args in handler(self).items() if args is not None}

    def items(self) -> list[tuple[str, dict[str, Any]]]:
        """(name, constructor arguments) of each configured callback: distillation, pruning, quantization, the
        rest (the order their hooks run in, whatever the order in the JSON)."""
        return list(self.model_dump().items())

    def __contains__(self, name: str) -> bool:
        return getattr(self, name, None) is not None


class TrainerConfig(_Strict):
    max_epochs: int = Field(10, ge=1)  # epochs to train (resume continues up to this)
    min_epochs: int = Field(0, ge=0)  # early stopping cannot end the run before this
    save_dir: str = "runs/"  # runs go to <save_dir>/<name>/<timestamp>/
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"] = "auto"  # the device kind (Lightning's names)
    devices: int | str | list[int] = "auto"  # "auto", a count, or a list of device ids (per machine)
    num_nodes: int = Field(1, ge=1)  # machines taking part (Lightning's num_nodes); devices is per machine
    strategy: str = "auto"  # "auto", "ddp", "ddp_spawn", "fsdp", ... (Lightning names)
    precision: Literal["32-true", "16-mixed", "bf16-mixed", "64-true"] = "32-true"  # Lightning's precision
    gradient_clip_val: float | None = Field(None, ge=0)  # clip gradient norm to this (None: off)
    monitor: str = "min val/top1_err"  # "<min|max> <metric>" for the best checkpoint and early stopping
    early_stop: int = Field(0, ge=0)  # patience in epochs for early stopping on `monitor` (0: off)
    log_every_n_steps: int = Field(50, ge=1)  # train/loss logged (and the weights checked finite) every n steps
    # auto: tqdm on a terminal, else no bar (the per-epoch log lines remain); tqdm: Lightning's bar, redrawn every 25
    # batches, wherever the output goes; rich; none
    progress_bar: Literal["auto", "tqdm", "rich", "none"] = "auto"
    deterministic: bool = False  # torch deterministic algorithms (bit-exact reruns, slower on GPU)
    limit_train_batches: int | float | None = Field(None, gt=0)  # a count or a fraction (smoke runs)
    limit_val_batches: int | float | None = Field(None, ge=0)  # likewise; 0: no validation
    callbacks: CallbacksConfig = Field(default_factory=CallbacksConfig)  # name -> constructor arguments

    @field_validator("monitor")
    @classmethod
    def _monitor_form(cls, value: str) -> str:
        parts = value.split()
        if len(parts) != 2 or parts[0] not in ("min", "max"):
            raise ValueError("must be '<min|max> <metric>', e.g. 'min val/top1_err'")
        return value

    @model_validator(mode="after")
    def _epochs_in_order(self) -> Self:
        if self.min_epochs > self.max_epochs:
            raise ValueError(f"min_epochs ({self.min_epochs}) must not exceed max_epochs ({self.max_epochs})")
        return self

    @property
    def monitor_mode(self) -> str:
        return self.monitor.split()[0]

    @property
    def monitor_metric(self) -> str:
        return self.monitor.split()[1]


class ExportConfig(_Strict):
    enabled: bool = True  # write model.dcz + compression_report.{md,json} after a compressing fit
    # Relative-index width before Huffman: 1..16, "auto" (smallest file per tensor), or by layer type
    # ({"Conv2d": 8, "Linear": "auto"}; a type not named gets DEFAULT_INDEX_BITS).
    index_bits: IndexBits | dict[LayerType, IndexBits] = DEFAULT_INDEX_BITS  # type: ignore[valid-type]
    # Entropy coder of the pruned / quantized tensors: "huffman" (the paper's), "range" (beyond the paper:
    # adaptive range coding, a smaller file; index_bits then only sets the report's P / P+Q accounting) or
    # "context" (beyond: each weight's significance and value coded with its neighbours as context, the smallest).
    codec: Literal[tuple(CODECS)] = DEFAULT_CODEC  # type: ignore[valid-type]
    # Storage of the tensors left unpruned (biases, BatchNorm statistics): "float32", or "float16" (beyond the
    # paper, half their bytes, lossy for them alone: the error reported is the file's).
    raw_dtype: Literal[tuple(RAW_STORAGE)] = DEFAULT_RAW_DTYPE  # type: ignore[valid-type]

    @field_validator("index_bits")
    @classmethod
    def _bits_range(cls, value: Any) -> Any:
        for bits in (value.values() if isinstance(value, dict) else [value]):
            if bits != "auto" and not 1 <= bits <= MAX_INDEX_BITS:
                raise ValueError(f"index bits must be in 1..{MAX_INDEX_BITS} or 'auto', got {bits}")
        return value


class Config(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # run name, the folder under trainer.save_dir
    seed: int | None = 42  # seeds Python, NumPy and torch (None: unseeded)
    pretrained: str | None = None  # checkpoint whose weights start a *new* run (see --weights)
    arch: ArchSpec
    data_loader: DataSpec
    optimizer: OptimizerSpec
    lr_scheduler: SchedulerSpec | None = None
    loss: Literal[tuple(LOSSES)] = "cross_entropy"  # type: ignore[valid-type]  # the training and evaluation loss
    # the evaluation metrics, in % error
    metrics: list[Literal[METRICS]] = Field(default_factory=lambda: list(METRICS))  # type: ignore[valid-type]
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)


# ------------------------------------------------------------------------------- constructor arguments
def check_args(target: Any, args: dict[str, Any], path: str, supplied: tuple[str, ...] = ()) -> None:
    """Checks ``args`` against ``target``'s constructor: names, required keys and annotated types.

    Raises:
        ConfigError: naming ``path`` and listing the valid argument names.
    """
    params = {n: p for n, p in inspect.signature(target).parameters.items()
              if n not in supplied and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    for name in args:
        if name not in params:
            raise ConfigError(f"{path}.{name}: unknown argument for {target.__name__}; "
                              f"valid arguments: {', '.join(params) or '(none)'}")
    for name, p in params.items():
        if p.default is p.empty and name not in args:
            raise ConfigError(f"{path}.{name}: missing required argument for {target.__name__}")
    try:
        hints = typing.get_type_hints(target.__init__)
    except Exception:  # unresolvable annotations: the constructor will still check values
        return
    for name, value in args.items():
        if name not in hints:
            continue
        try:
            adapter = TypeAdapter(hints[name], config=ConfigDict(arbitrary_types_allowed=True, strict=True))
        except Exception:  # annotation pydantic cannot express
            continue
        try:
            # JSON has no tuples: a list stands for one (e.g. Adam's betas: [0.9, 0.999]).
            adapter.validate_python(tuple(value) if isinstance(value, list) and _wants_tuple(hints[name]) else value)
        except ValidationError:
            expected = getattr(hints[name], "__name__", str(hints[name]))
            raise ConfigError(f"{path}.{name}: expected {expected}, got {value!r}") from None


def _wants_tuple(hint: Any) -> bool:
    """Whether a type hint is, or is a union holding, a tuple type."""
    if hint is tuple or typing.get_origin(hint) is tuple:
        return True
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and any(map(_wants_tuple, typing.get_args(hint)))


def instantiate(spec: RegistrySpec, path: str, **supplied: Any) -> Any:
    """Builds ``spec.target(**supplied, **spec.args)``, turning constructor errors into ``ConfigError``."""
    try:
        return spec.target(**supplied, **spec.args)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path}.args: {spec.type} rejected {spec.args}: {err}") from None


def _check_specs(cfg: Config) -> None:
    logged = ["val/loss", "train/loss"] + [f"val/{m}" for m in cfg.metrics]
    if cfg.trainer.monitor_metric not in logged:
        raise ConfigError(f"trainer.monitor: metric {cfg.trainer.monitor_metric!r} is not logged; "
                          f"choose one of {', '.join(logged)}")
    for path in ("arch", "data_loader", "optimizer", "lr_scheduler"):
        spec = getattr(cfg, path)
        if spec is not None:
            check_args(spec.target, spec.args, f"{path}.args", spec.SUPPLIED)
    for name, args in cfg.trainer.callbacks.items():  # the compression callbacks' are typed in the schema
        if name not in COMPRESSION_ARGS:
            check_args(CALLBACKS[name], args, f"trainer.callbacks.{name}")
    # The data decides the class count: fill it in, or catch a mismatch now rather than at the first batch.
    num_classes = cfg.data_loader.target.num_classes
    given = cfg.arch.args.setdefault("num_classes", num_classes)
    if given != num_classes:
        raise ConfigError(f"arch.args.num_classes: {cfg.data_loader.type} has {num_classes} classes, got {given}")
    # Optimizer and scheduler values are checked by building them on a dummy parameter (cheap, early).
    optimizer = instantiate(cfg.optimizer, "optimizer", params=[torch.nn.Parameter(torch.zeros(1))])
    if cfg.lr_scheduler is not None:
        instantiate(cfg.lr_scheduler, "lr_scheduler", optimizer=optimizer)
        if cfg.lr_scheduler.type == "ReduceLROnPlateau" and cfg.trainer.limit_val_batches == 0:
            raise ConfigError("lr_scheduler.type: ReduceLROnPlateau steps on val/loss, but trainer.limit_val_batches "
                              "is 0 (no validation); allow validation or pick another scheduler")
    instantiate(cfg.data_loader, "data_loader")  # data modules only store their arguments


# Options measured and removed (docs/experiments.md), with the value that meant "off": configs written before
# (every resolved config.json lists every argument) still load when they had them off.
RETIRED = {"IterativePruning": {"reset_weights": False, "splicing": False, "block": 1, "prune_bias": False},
           "Distillation": {"mixup": 0.0, "features": [], "feature_weight": 1.0},
           "StructuredPruning": {"group_lasso": 0.0}}


def _drop_retired(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` without the retired options set to their "off" value.

    Raises:
        ConfigError: a retired option switched on.
    """
    callbacks = raw.get("trainer", {}).get("callbacks") if isinstance(raw.get("trainer"), dict) else None
    if not isinstance(callbacks, dict):
        return raw
    raw = copy.deepcopy(raw)
    for name, retired in RETIRED.items():
        args = raw["trainer"]["callbacks"].get(name)
        for key, off in retired.items() if isinstance(args, dict) else ():
            if key in args and args.pop(key) != off:
                raise ConfigError(f"trainer.callbacks.{name}.{key}: this option was removed (docs/experiments.md says "
                                  f"why); drop the key")
    return raw


def parse_config(raw: dict[str, Any]) -> Config:
    """Validates a configuration dictionary.

    Raises:
        ConfigError: every problem found, one per line, each with its JSON path.
    """
    raw = _drop_retired(raw)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_errors(err, Config)) from None
    _check_specs(cfg)
    return cfg


# ------------------------------------------------------------------------------------- files and CLI
def read_json(path: str | Path) -> dict[str, Any]:
    """Reads a JSON config file; invalid JSON is reported with line and column."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object, got {type(raw).__name__}")
    return raw


def add_override_args(parser: argparse.ArgumentParser) -> None:
    """Adds ``--lr``, ``--wd``, ``--bs`` (ciodar/deep-compression's flags) and the general ``--set``."""
    parser.add_argument("--lr", type=float, default=None, help="override optimizer.args.lr")
    parser.add_argument("--wd", type=float, default=None, help="override optimizer.args.weight_decay")
    parser.add_argument("--bs", type=int, default=None, help="override data_loader.args.batch_size")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key by its dotted path, e.g. --set trainer.max_epochs=3 "
                             "(VALUE is parsed as JSON when it can be, else taken as a string); repeatable")


def overrides_from_args(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """Turns the override flags into (dotted key, value) pairs, in the order they apply."""
    pairs: list[tuple[str, Any]] = []
    for key, value in (("optimizer.args.lr", args.lr), ("optimizer.args.weight_decay", args.wd),
                       ("data_loader.args.batch_size", args.bs)):
        if value is not None:
            pairs.append((key, value))
    for item in args.overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set trainer.max_epochs=3")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        pairs.append((key.strip(), value))
    return pairs


def apply_overrides(raw: dict[str, Any], pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Returns a copy of ``raw`` with each dotted key set (validation happens in ``parse_config``)."""
    raw = json.loads(json.dumps(raw))
    for key, value in pairs:
        node, parts = raw, key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[:i + 1])} is not an object")
            node = child
        node[parts[-1]] = value
    return raw


def make_run_dir(cfg: Config) -> Path:
    """Creates ``<save_dir>/<name>/<timestamp>/`` (never reusing one) and writes ``config.json`` first.

    A DDP worker re-running the script inherits ``DC_RUN_DIR`` (set by ``train.py`` around the fit)
    and reuses its parent's folder instead of making a new one.
    """
    if os.environ.get("DC_RUN_DIR"):
        return Path(os.environ["DC_RUN_DIR"])
    base = Path(cfg.trainer.save_dir).expanduser() / cfg.name
    try:
        base.mkdir(parents=True, exist_ok=True)
        run_dir = _fresh_folder(base)
    except OSError as err:  # save_dir is a file, read-only, on a full disk...
        raise ConfigError(f"trainer.save_dir: cannot create a run folder under {base}: {err.strerror or err}; "
                          f"choose a writable folder, e.g. --set trainer.save_dir=runs/") from None
    try:
        write_config(cfg, run_dir / "config.json")
    except OSError as err:
        run_dir.rmdir()  # the temporary file is gone already (atomic write): the folder is empty
        raise ConfigError(f"trainer.save_dir: cannot write {run_dir / 'config.json'}: {err.strerror or err}; "
                          f"free some space or choose another folder with --set trainer.save_dir=DIR") from None
    return run_dir


def _fresh_folder(base: Path) -> Path:
    """``base/<timestamp>``, never an existing one: two runs in the same second get -1, -2, ..."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        run_dir = base / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            run_dir.mkdir()  # atomic: only one process creates it
            return run_dir
        except FileExistsError:
            continue
    raise OSError(f"could not create a fresh run folder under {base}")


def write_config(cfg: Config, path: Path) -> None:
    """Writes the resolved config atomically (temp file in the same folder, fsync, rename)."""
    atomic_write_text(path, json.dumps(cfg.model_dump(), indent=2) + "\n")


def load_config(config_path: str | Path | None, resume_path: str | Path | None,
                overrides: list[tuple[str, Any]], training: bool = True) -> Config:
    """The configuration of a script call: ``-c`` file, else the one stored with the ``-r`` checkpoint.

    A checkpoint's config is the ``config.json`` of its run folder, or else the copy inside the
    checkpoint. Overrides apply last and are validated like the file. ``training=False`` (a stored config read to
    evaluate or encode the checkpoint, never to train) leaves out ``trainer.callbacks``, which such a call never
    builds: a run trained with an option removed since still evaluates.
    """
    if config_path is not None:
        raw = read_json(config_path)
    elif resume_path is not None:
        raw = stored_config(Path(resume_path))
        raw = raw if training else without_callbacks(raw)
    else:
        raise ConfigError("no configuration: pass -c CONFIG.json or -r CHECKPOINT")
    return parse_config(apply_overrides(raw, overrides))


def without_callbacks(raw: dict[str, Any]) -> dict[str, Any]:
    """A stored config as evaluating or encoding its checkpoint reads it: ``trainer.callbacks`` left out, since
    neither builds one (a run trained with an option removed since still evaluates)."""
    if not isinstance(raw.get("trainer"), dict):
        return raw
    return {**raw, "trainer": {k: v for k, v in raw["trainer"].items() if k != "callbacks"}}


def stored_config(ckpt_path: Path) -> dict[str, Any]:
    """The raw config stored with a checkpoint (run folder's config.json, else inside the checkpoint)."""
    from utils import load_checkpoint  # local: only needed when resuming

    beside = ckpt_path.parent / "config.json"
    if beside.is_file():
        return read_json(beside)
    ckpt = load_checkpoint(ckpt_path)
    if not isinstance(ckpt.get("config"), dict):
        raise ConfigError(f"{ckpt_path} holds no config and there is no {beside}: pass -c CONFIG.json")
    return ckpt["config"]
