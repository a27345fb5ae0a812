"""Field checks shared by the typed sections: each value has its declared type and lies in its range.

A TOML file or ``--set`` can give any value to any field (``steps = 2.5``, ``steps = true``,
``save_every = "x"``); the sections call these on construction so that such a value is refused by name,
with the rule, before any process starts, instead of failing inside the loop.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from ..errors import TrainerError

_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def check_types(obj: Any, section: str) -> None:
    """Raise naming ``section.field``, its value and the expected type for the first field of the dataclass
    ``obj`` whose value does not have its annotated type (``bool`` is not an integer; an integer is a number)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        expected = hints.get(f.name)
        if expected is not None and not _matches(value, expected):
            raise TrainerError(f"{section}.{f.name}={value!r}: must be {_describe(expected)}")


def check_number(
    section: str,
    name: str,
    value: float,
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
) -> None:
    """Raise naming ``section.name`` unless ``value`` is a finite number within the given bounds."""
    rules = [(above, ">", lambda b: value > b), (at_least, ">=", lambda b: value >= b),
             (below, "<", lambda b: value < b), (at_most, "<=", lambda b: value <= b)]  # fmt: skip
    bounds = [(op, bound) for bound, op, _ in rules if bound is not None]
    finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not finite or not all(test(bound) for bound, _, test in rules if bound is not None):
        rule = "a finite number" + "".join(f"{' and' if i else ''} {op} {b:g}" for i, (op, b) in enumerate(bounds))
        raise TrainerError(f"{section}.{name}={value!r}: must be {rule}")


def _matches(value: Any, expected: Any) -> bool:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if expected is Any:
        return True
    if origin in (tuple, list):
        args = [a for a in typing.get_args(expected) if a is not Ellipsis]
        return isinstance(value, (tuple, list)) and all(_matches(v, args[0]) for v in value) if args else True
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected) if isinstance(expected, type) else True


def _describe(expected: Any) -> str:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(expected)
        named = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(named) + (" (or left out)" if type(None) in args else "")
    if origin in (tuple, list):
        args = [a for a in typing.get_args(expected) if a is not Ellipsis]
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    return _NAMES.get(expected, getattr(expected, "__name__", str(expected)))
