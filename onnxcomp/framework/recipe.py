"""Pipelines as data: TOML recipes.

A recipe lists passes with their options; a pass is named by its registered name or, for a pass
defined in the user's own code, as ``package.module:ClassName``::

    seed = 0                      # optional: seeds every random choice
    [[passes]]
    pass = "fold_batchnorm"
    [[passes]]
    pass = "quantize"
    weights = "int8"

Unknown top-level keys, pass names and option names are errors that list the valid ones. The
*resolved* recipe (every option with its value, defaults included, plus a ``[meta]`` table saying
what produced it) is written beside each output so a run can be reproduced with ``onnxcomp run``.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxcomp.errors import RecipeError
from onnxcomp.framework.base import Pass
from onnxcomp.framework.options import options_to_dict
from onnxcomp.framework.registry import make_pass, pass_reference

_TOP_KEYS = ("seed", "validate", "passes", "meta")
VALIDATE_MODES = ("each", "locate", "end", "none")


@dataclass
class Recipe:
    """A validated pipeline: pass instances with typed options, plus run settings."""

    passes: list[Pass]
    seed: int = 0
    validate: str = "each"
    meta: dict[str, Any] = field(default_factory=dict)

    def to_data(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "validate": self.validate,
            "passes": [{"pass": pass_reference(type(p)), **options_to_dict(p.options)} for p in self.passes],
        }


def recipe_from_data(data: Mapping[str, Any], source: str = "recipe") -> Recipe:
    """Build a :class:`Recipe` from parsed TOML/JSON data, validating everything."""
    unknown = [k for k in data if k not in _TOP_KEYS]
    if unknown:
        raise RecipeError(f"{source}: unknown top-level key {unknown[0]!r}; valid keys: {', '.join(_TOP_KEYS[:3])}")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise RecipeError(f"{source}: seed must be an integer, got {seed!r}")
    validate = data.get("validate", "each")
    if validate not in VALIDATE_MODES:
        raise RecipeError(f"{source}: validate must be one of {', '.join(VALIDATE_MODES)}, got {validate!r}")
    entries = data.get("passes")
    if not isinstance(entries, list) or not entries:
        raise RecipeError(f'{source}: no passes; add at least one [[passes]] table with pass = "NAME"')
    passes = []
    for i, entry in enumerate(entries):
        where = f"{source}: passes[{i}]"
        if not isinstance(entry, Mapping) or "pass" not in entry:
            raise RecipeError(f'{where}: each [[passes]] table needs pass = "NAME"')
        options = {k: v for k, v in entry.items() if k != "pass"}
        name = entry["pass"]
        try:
            passes.append(make_pass(name, options, where=f"{where} ({name})"))
        except RecipeError as exc:
            msg = str(exc)
            raise RecipeError(msg if msg.startswith(source) else f"{where}: {msg}") from exc
    return Recipe(passes=passes, seed=seed, validate=validate, meta=dict(data.get("meta", {})))


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and validate a TOML recipe file."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: not valid TOML: {exc}") from exc
    return recipe_from_data(data, source=str(path))


# --- writing (a tiny TOML emitter for the value types options can have) ---------------------


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml_value(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dump_options(options: Mapping[str, Any], header: str = "") -> str:
    """Pass options as TOML ``key = value`` lines (None values omitted: they mean the default)."""
    lines = [f"# {line}" for line in header.splitlines()] + ([""] if header else [])
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in options.items() if v is not None]
    return "\n".join(lines) + "\n"


def dump_recipe(recipe: Recipe, meta: Mapping[str, Any] | None = None) -> str:
    """The resolved recipe as TOML text (round-trips through :func:`load_recipe`)."""
    data = recipe.to_data()
    lines = [
        "# Resolved onnxcomp recipe: every option with its value. Re-run with:",
        "#   onnxcomp run THIS_FILE MODEL.onnx -o OUT.onnx",
        "",
    ]
    lines.append(f"seed = {data['seed']}")
    lines.append(f"validate = {_toml_value(data['validate'])}")
    for entry in data["passes"]:
        lines.append("")
        lines.append("[[passes]]")
        for key, value in entry.items():
            if value is None:
                continue  # TOML has no null: an absent key means the default (None)
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    if meta:
        lines.append("")
        lines.append("[meta]")
        for key, value in meta.items():
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
