"""Typed pass options: dataclasses built from untrusted mappings (recipes, CLI) with strict checks.

An unknown key, a value of the wrong type or outside a ``Literal`` is a :class:`RecipeError` that
names the pass and lists what is valid, never a silent skip. An options class may list renamed
options in a ``RENAMED: ClassVar[dict[str, str]]`` (old name -> new name): the old spelling is
accepted for one release with a ``DeprecationWarning``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import warnings
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from onnxcomp.errors import RecipeError


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """Options of a pass that takes none."""


def option_fields(cls: type) -> list[tuple[str, Any, Any]]:
    """(name, type, default) of every field of an options dataclass, in declaration order."""
    hints = get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        out.append((f.name, hints[f.name], default))
    return out


def describe_type(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(describe_type(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return f"list of {describe_type(args[0])}" if args else "list"
    if origin is dict:
        return "table"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise RecipeError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(f"{where}: expected {describe_type(tp)}, got {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        item_args = [a for a in get_args(tp) if a is not Ellipsis]
        items = [_coerce(v, item_args[0], f"{where}[{i}]") for i, v in enumerate(value)] if item_args else list(value)
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise RecipeError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # a type hint is a class, never an instance
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise RecipeError(f"{where}: expected a table, got {value!r}")
        return build_options(tp, value, where)
    raise RecipeError(f"{where}: unsupported option type {tp!r}")


def build_options(cls: type, values: Mapping[str, Any] | None, where: str) -> Any:
    """Build ``cls`` from ``values``, validating keys and types; ``where`` prefixes errors."""
    values = dict(values or {})
    for old, new in getattr(cls, "RENAMED", {}).items():
        if old in values:
            warnings.warn(
                f"{where}: option {old!r} is deprecated and will be removed in the next release; use {new!r}",
                DeprecationWarning,
                stacklevel=2,
            )
            if new in values:
                raise RecipeError(f"{where}: both {old!r} (deprecated) and {new!r} given; use {new!r} only")
            values[new] = values.pop(old)
    fields = option_fields(cls)
    known = [name for name, _, _ in fields]
    unknown = [k for k in values if k not in known]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        valid = ", ".join(known) if known else "none"
        raise RecipeError(f"{where}: unknown option {key!r}{hint}; valid options: {valid}")
    kwargs = {}
    for name, tp, default in fields:
        if name in values:
            kwargs[name] = _coerce(values[name], tp, f"{where}.{name}")
        elif default is dataclasses.MISSING:
            raise RecipeError(f"{where}: missing required option {name!r}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"{where}: {exc}") from exc


def options_to_dict(options: Any) -> dict[str, Any]:
    """Plain data (for the resolved recipe): every field, defaults included."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if dataclasses.is_dataclass(value):
            value = options_to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out
