"""Resolving the layer names and type names a compression config uses against a model.

Pure ``torch.nn`` walking, no Lightning: the callbacks, the sensitivity sweep and the file writer all
designate layers the same way (a full name, a unique last component, or a type name).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, TypeVar

from torch import nn

# The layer types Deep Compression prunes and quantizes, by the names configs use: the one definition.
PRUNABLE_TYPES: dict[str, type[nn.Module]] = {"Linear": nn.Linear, "Conv2d": nn.Conv2d}
LayerType = Literal[tuple(PRUNABLE_TYPES)]  # type: ignore[valid-type]  # the same names, for config schemas


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``Linear`` / ``Conv2d`` of ``model`` by its full module name (``classifier.fc6``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, tuple(PRUNABLE_TYPES.values()))}


def resolve(model: nn.Module, key: str, what: str) -> list[str]:
    """Full names of the layers a config key designates: a type name (``Linear``), a full module name,
    or a unique last component (``fc6`` for ``classifier.fc6``).

    Raises:
        ValueError: the key matches no prunable layer (the message lists them), or is ambiguous.
    """
    layers = prunable_layers(model)
    if key in PRUNABLE_TYPES:
        return [n for n, m in layers.items() if isinstance(m, PRUNABLE_TYPES[key])]
    if key in layers:
        return [key]
    matches = [n for n in layers if n.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches
    if len(matches) > 1:
        raise ValueError(f"{what}: layer name {key!r} is ambiguous ({', '.join(matches)}); use the full name")
    raise ValueError(f"{what}: {key!r} is not a prunable layer of {type(model).__name__}; prunable layers: "
                     f"{', '.join(layers)} (or a type: {', '.join(PRUNABLE_TYPES)})")


Number = TypeVar("Number", int, float)


def layer_type(model: nn.Module, param_name: str) -> str | None:
    """The config type name (``Linear``, ``Conv2d``) of the layer owning ``param_name``, else None."""
    owner = dict(model.named_modules()).get(param_name.rpartition(".")[0])
    return next((k for k, t in PRUNABLE_TYPES.items() if isinstance(owner, t)), None)


def per_layer(model: nn.Module, value: Number | dict[str, Number], selection: Iterable[str] | None,
              what: str) -> dict[str, Number]:
    """Expands a global value or a {name-or-type: value} dict to {full layer name: value}.

    Names win over types. With a dict and no explicit ``selection``, the dict's keys select the layers;
    otherwise ``selection`` (default: every Linear and Conv2d) does.
    """
    selected: list[str] = []
    for key in (selection if selection is not None else (PRUNABLE_TYPES if not isinstance(value, dict) else [])):
        selected += [n for n in resolve(model, key, f"{what} layers") if n not in selected]
    if not isinstance(value, dict):
        return {name: value for name in selected}
    out: dict[str, Number] = {}
    for key in sorted(value, key=lambda k: k not in PRUNABLE_TYPES):  # types first, names override them
        for name in resolve(model, key, what):
            out[name] = value[key]
    if selection is not None:
        missing = [n for n in selected if n not in out]
        if missing:
            raise ValueError(f"{what}: no value for selected layers {', '.join(missing)}")
        out = {n: v for n, v in out.items() if n in selected}
    return out
