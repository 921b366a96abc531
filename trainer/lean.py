"""Trims Lightning's fixed cost per training step, which on a small CPU is as large as a LeNet step.

Around each hook call Lightning opens a profiler context and formats its name,
``f"[Callback]{callback.state_key}.{hook_name}"``, even when no profiler is configured. Per training step
of ``train.py``'s Trainer (counted over one LeNet epoch; per-call costs from ``timeit`` on a 2-CPU
machine), the pieces replaced here cost: ~30 generator-based profiler contexts at ~2 us instead of
~0.2 us (~0.06 ms) and ~10 ``ModelCheckpoint.state_key`` dict reprs at ~3 us (~0.03 ms); a third, ~30
``nn.Module.__setattr__`` calls for ``_current_fx_name`` at ~2 us (~0.05 ms), is cut in
``LitClassifier.__setattr__``. The effect on a whole epoch is in BENCHMARKS.md. Behaviour is unchanged:
the profiler did nothing, and the state key is the same string, computed once (the context yields
``None`` where Lightning's yields the action name, which no caller uses).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint
from lightning.pytorch.callbacks import TQDMProgressBar as _LightningTQDMProgressBar
from lightning.pytorch.profilers import PassThroughProfiler
from typing_extensions import override

_NO_OP = contextlib.nullcontext()  # reusable: entering it does nothing
# The attributes Lightning's ModelCheckpoint.state_key is built from.
_KEY_FIELDS = frozenset({"monitor", "mode", "_every_n_train_steps", "_every_n_epochs", "_train_time_interval"})


class NullProfiler(PassThroughProfiler):
    """Lightning's default no-op profiler, minus the generator it builds for every hook call."""

    @override
    def profile(self, action_name: str) -> contextlib.nullcontext:  # type: ignore[override]
        return _NO_OP


class ModelCheckpoint(_LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with its ``state_key`` computed once instead of at every hook call.

    The key is built from arguments fixed in ``__init__`` (monitor, mode, save intervals), so the cached
    string is the one Lightning would build; checkpoints written by either class load in the other.
    """

    @property
    @override
    def state_key(self) -> str:
        key = self.__dict__.get("_state_key")
        if key is None:
            key = self.__dict__["_state_key"] = super().state_key
        return key

    @override
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _KEY_FIELDS:  # e.g. someone setting .monitor after __init__: build the key again
            self.__dict__.pop("_state_key", None)
        super().__setattr__(name, value)


class TQDMProgressBar(_LightningTQDMProgressBar):
    """Lightning's tqdm bar, redrawn at most every ``min_interval`` seconds instead of every
    ``refresh_rate`` batches.

    Lightning forces a full redraw (format, write, flush) on every ``refresh_rate``-th batch, past tqdm's own
    rate limit: at 2 ms a LeNet step that is ~50 redraws a second with ``refresh_rate=10`` (a median of 6 %
    of an epoch's CPU time in one benchmark run, BENCHMARKS.md). Five redraws a second look the same; the
    last batch always redraws.
    """

    def __init__(self, min_interval: float = 0.2, **kwargs: Any) -> None:
        super().__init__(refresh_rate=1, **kwargs)
        self.min_interval = min_interval
        self._next_draw = 0.0  # time.monotonic() of the next allowed redraw

    @override
    def _should_update(self, current: int, total: int) -> bool:
        if not self.is_enabled:
            return False
        now = time.monotonic()
        if current != total and now < self._next_draw:
            return False
        self._next_draw = now + self.min_interval
        return True
