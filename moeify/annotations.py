"""Whether a value fits a dataclass field's type annotation: one check for `MoEConfig`'s fields and for
the JSON a saved report is read back from (`ConversionReport.from_dict`)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any


def union_options(hint: Any) -> tuple:
    """The alternatives of a union annotation (`X | None` -> (X, None)); (hint,) otherwise."""
    return typing.get_args(hint) if typing.get_origin(hint) in (types.UnionType, typing.Union) else (hint,)


def is_finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def fits(value: Any, hint: Any, *, finite: bool = False) -> bool:
    """Whether `value` has the type `hint`. A bool is no int, an int is a float (finite ones only with
    `finite`), a tuple may come as a JSON list (`tuple[X, ...]` of any length, `tuple[X, Y]` of two),
    and a dict or dataclass annotation takes an object (the dataclass checks its own fields)."""
    options = union_options(hint)
    if len(options) > 1:
        return any(fits(value, option, finite=finite) for option in options)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return isinstance(value, list | tuple) and all(fits(item, args[0], finite=finite) for item in value)
    if origin is tuple:
        return (isinstance(value, list | tuple) and len(value) == len(args)
                and all(fits(item, arg, finite=finite) for item, arg in zip(value, args, strict=True)))
    if origin is list:
        return isinstance(value, list) and all(fits(item, args[0], finite=finite) for item in value)
    if origin is dict or dataclasses.is_dataclass(hint):
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        number = isinstance(value, int | float) if hint is float else isinstance(value, int)
        return number and not isinstance(value, bool) and (not finite or hint is int or is_finite(value))
    return isinstance(value, hint)
