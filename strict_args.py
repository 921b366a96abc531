"""Typed arguments: the one definition of every compression callback's keys, and readable errors.

Each callback's arguments are a pydantic model here (built on the constants of ``compression/``). The
config layer composes them into the config schema, so a config file, a ``--set`` override and a Python
call ``Quantization(bits=4)`` are checked by the same code and fail with the same message.
"""

from __future__ import annotations

import json
import re
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class StrictArgs(BaseModel):
    # Unknown keys are errors; no silent "3" -> 3 coercion (ints are still accepted where floats are).
    model_config = ConfigDict(extra="forbid", strict=True)


def _loc(loc: tuple[Any, ...]) -> str:
    """('trainer', 'max_epochs') -> 'trainer.max_epochs'; list positions as [i]."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _fields_at(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Names of the keys allowed at ``loc`` under ``root`` (for 'unknown key' messages)."""
    model: Any = root
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        candidates = [a for a in (typing.get_args(field.annotation) or (field.annotation,))
                      if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return []
        model = candidates[0]
    return list(model.model_fields)


# Our wording for pydantic's error types (its own messages change between releases).
_MESSAGES = {
    "int_type": "expected an integer", "float_type": "expected a number", "bool_type": "expected true or false",
    "string_type": "expected a string", "list_type": "expected a list", "dict_type": "expected an object",
    "greater_than_equal": "must be >= {ge}", "greater_than": "must be > {gt}", "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}", "literal_error": "must be one of {expected}",
    "string_pattern_mismatch": "must match the pattern {pattern}", "model_type": "expected an object",
    "model_attributes_type": "expected an object",
}


# The location parts pydantic adds for the members of a union ("int", "dict[str,int]", ...): not keys.
_UNION_TAG = re.compile(r"^(int|float|str|bool|none|(list|dict|tuple|literal|function-\w+|constrained-\w+)\[.*)$")


def format_errors(err: ValidationError, root: type[BaseModel], prefix: tuple[Any, ...] = ()) -> str:
    """One line per path: the dotted path (under ``prefix``), what is wrong, the value given.

    A value that fits no member of a union gets one line naming what each member expected.
    """
    problems: dict[str, list[str]] = {}
    given: dict[str, str] = {}
    for e in err.errors():
        keys = tuple(p for p in e["loc"] if not (isinstance(p, str) and _UNION_TAG.match(p)))
        path = _loc(prefix + keys)
        if e["type"] == "extra_forbidden":
            msg = f"unknown key; valid keys here: {', '.join(_fields_at(root, keys[:-1]))}"
        elif e["type"] == "missing":
            msg = "missing required key"
        else:
            template = _MESSAGES.get(e["type"])
            msg = template.format(**e.get("ctx", {})) if template else e["msg"].removeprefix("Value error, ")
            # The value, unless the message quotes it already or it is the whole object a check looked at.
            if "got" not in msg and not isinstance(e["input"], dict):
                given[path] = f" (got {json.dumps(e['input'], default=str)})"
        if msg not in problems.setdefault(path, []):
            problems[path].append(msg)
    return "\n".join(f"{path}: {' or '.join(msgs)}{given.get(path, '')}" for path, msgs in problems.items())


def validated(model: type[M], args: Mapping[str, Any], owner: str) -> M:
    """``model`` built from ``args``; a mistake raises ``ValueError`` in ``format_errors``'s words.

    Raises:
        ValueError: every problem, one per line, each path starting with ``owner``.
    """
    try:
        return model.model_validate(dict(args))
    except ValidationError as err:
        raise ValueError(format_errors(err, model, (owner,))) from None
