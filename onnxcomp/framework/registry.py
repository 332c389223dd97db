"""The pass registry: built-in passes, passes of installed packages, and ``module:Class`` names.

A pass is found by its registered ``name`` (``fold_batchnorm``), by an import path
``package.module:ClassName`` (a recipe may name any importable :class:`~onnxcomp.framework.base.Pass`
subclass this way), or through the ``onnxcomp.passes`` entry-point group of installed packages::

    [project.entry-points."onnxcomp.passes"]
    my_pass = "my_package.passes:MyPass"
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
import logging
from collections.abc import Mapping
from typing import Any

from onnxcomp.errors import RecipeError
from onnxcomp.framework.base import Pass
from onnxcomp.framework.options import build_options, describe_type, option_fields

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "onnxcomp.passes"

_REGISTRY: dict[str, type[Pass]] = {}
#: where each registered pass came from: "built-in", "entry point NAME (VALUE)" or "module:Class"
_SOURCES: dict[str, str] = {}
#: entry points that failed to load: name -> one-line reason (shown by ``onnxcomp passes``)
_BROKEN: dict[str, str] = {}
_loaded = False


def _check_pass_class(cls: Any, where: str) -> type[Pass]:
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise RecipeError(f"{where}: {cls!r} is not a subclass of onnxcomp.Pass")
    if not isinstance(getattr(cls, "name", None), str) or not cls.name:
        raise RecipeError(f"{where}: {cls.__name__} has no `name` (a verb_noun string)")
    if not dataclasses.is_dataclass(cls.Options):
        raise RecipeError(f"{where}: {cls.__name__}.Options must be a dataclass")
    return cls


def _add(cls: type[Pass], source: str) -> None:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise RecipeError(
            f"pass name {cls.name!r} of {source} is already taken by {_SOURCES.get(cls.name, 'another pass')}; "
            f"rename one of them"
        )
    if not cls.summary:
        cls.summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
    _REGISTRY[cls.name] = cls
    _SOURCES.setdefault(cls.name, source)


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its ``name``."""
    try:
        _check_pass_class(cls, "register_pass")
        _add(cls, "built-in" if cls.__module__.startswith("onnxcomp.") else f"{cls.__module__}:{cls.__qualname__}")
    except RecipeError as exc:
        raise TypeError(str(exc)) from exc
    return cls


def _load_builtin_passes() -> None:
    """Import the built-in passes and the entry points of installed packages, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module("onnxcomp.passes")  # registers the built-in passes (lazy: passes sit above us)
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        where = f"entry point {ep.name} ({ep.value})"
        try:
            cls = _check_pass_class(ep.load(), where)
            _add(cls, where)
            _SOURCES[cls.name] = where  # a module that also used @register_pass is still found by name
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break every command
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200].removeprefix(f"{where}: ")
            _BROKEN[ep.name] = f"{where}: {reason}"
            log.warning("cannot load pass %s: %s", where, reason)


def _import_pass(spec: str) -> type[Pass]:
    """The Pass class named ``package.module:ClassName``."""
    _load_builtin_passes()  # a user class may not take a built-in's name: load those first
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise RecipeError(f"pass {spec!r}: write an importable pass as 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RecipeError(
            f"pass {spec!r}: cannot import module {module_name!r} ({exc}); is it installed or on PYTHONPATH?"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise RecipeError(
            f"pass {spec!r}: importing {module_name!r} failed with {type(exc).__name__}: {first}"
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RecipeError(f"pass {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    cls = _check_pass_class(obj, f"pass {spec!r}")
    _add(cls, spec)
    return cls


def available_passes() -> dict[str, type[Pass]]:
    """Every registered pass by name: built-ins, entry points, and ``module:Class`` passes used so far."""
    _load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


def pass_source(name: str) -> str:
    """Where the pass ``name`` comes from: ``built-in``, ``entry point ...`` or ``module:Class``."""
    return _SOURCES.get(name, "unknown")


def pass_reference(cls: type[Pass]) -> str:
    """How a recipe names ``cls`` so that another process finds it: its name, or ``module:Class``."""
    source = _SOURCES.get(cls.name, "")
    if _REGISTRY.get(cls.name) is cls and (source == "built-in" or source.startswith("entry point")):
        return cls.name
    return f"{cls.__module__}:{cls.__qualname__}"


def broken_passes() -> dict[str, str]:
    """Entry points that failed to load, with the reason."""
    _load_builtin_passes()
    return dict(_BROKEN)


def get_pass(name: str) -> type[Pass]:
    """The pass class for a registered name or a ``module:Class`` import path."""
    if ":" in name:
        return _import_pass(name)
    passes = available_passes()
    if name in _BROKEN:
        raise RecipeError(f"pass {name!r} is installed but could not be loaded: {_BROKEN[name]}")
    if name not in passes:
        close = difflib.get_close_matches(name, list(passes), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(
            f"unknown pass {name!r}{hint}; valid passes: {', '.join(passes)} (or 'package.module:ClassName')"
        )
    return passes[name]


def make_pass(name: str, options: Mapping[str, Any] | None = None, where: str | None = None) -> Pass:
    """Instantiate a pass (registered name or ``module:Class``) from plain option data, validating every key."""
    cls = get_pass(name)
    return cls(build_options(cls.Options, options, where or name))


def describe_passes() -> list[tuple[str, str, str, list[tuple[str, str, Any]]]]:
    """(name, source, summary, [(option, type, default)]) of every pass, for ``onnxcomp passes``."""
    out = []
    for name, cls in available_passes().items():
        opts = [(n, describe_type(tp), d) for n, tp, d in option_fields(cls.Options)]
        out.append((name, pass_source(name), cls.summary, opts))
    return out
