"""The pass contract: a registered name, typed options, a run on a graph with a context.

A pass subclasses :class:`Pass`, sets ``name`` (``verb_noun``) and ``Options`` (a frozen
dataclass), documents what it rewrites and when it declines, and returns a :class:`PassResult`
saying whether it modified the graph and what it did. ``@register_pass`` makes it available to
recipes, the CLI and the Python API alike.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from onnxcomp import ir
from onnxcomp.errors import RecipeError
from onnxcomp.options import NoOptions, build_options, option_fields

log = logging.getLogger(__name__)


@dataclass
class PassResult:
    """What a pass did.

    ``stats`` holds counts (``{"folded": 3}``), ``changed`` names what was rewritten and
    ``declined`` says, per node, why a candidate was left alone.
    """

    modified: bool
    stats: dict[str, int] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)
    declined: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{k}={v}" for k, v in self.stats.items()]
        if self.declined:
            parts.append(f"declined={len(self.declined)}")
        return ", ".join(parts) if parts else ("modified" if self.modified else "no change")


class Progress:
    """A progress callback factory: ``with ctx.progress(total, desc) as bar: bar.update(n)``."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, total: int | None, desc: str) -> Any:
        from onnxcomp.progress import progress_bar

        return progress_bar(total=total, desc=desc, enabled=self.enabled)


@dataclass
class PassContext:
    """State shared by the passes of one run.

    ``calibration`` is a zero-argument callable returning a fresh iterator of
    ``{input name: batch}`` dicts (so several passes can stream the data), or None.
    ``artifacts`` collects JSON-able records passes want saved beside the output.
    """

    seed: int = 0
    calibration: Callable[[], Iterable[Mapping[str, np.ndarray]]] | None = None
    calibration_name: str = ""
    progress: Progress = field(default_factory=lambda: Progress(False))
    artifacts: dict[str, Any] = field(default_factory=dict)
    source_model: Any = None  # the original onnx.ModelProto (read-only), for passes that need it

    def rng(self, salt: str = "") -> np.random.Generator:
        """A generator seeded by the run's seed and a per-use salt (deterministic, independent)."""
        mix = int.from_bytes(salt.encode()[:8].ljust(8, b"\0"), "little")
        return np.random.default_rng([self.seed, mix])


class Pass(abc.ABC):
    """Base class of every pass: in-place rewrite of an ``ir.Graph``."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    summary: ClassVar[str] = ""

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    def min_opset(self) -> int | None:
        """The opset this pass's output needs with its options (the manager upgrades to it)."""
        return None

    @abc.abstractmethod
    def run(self, graph: ir.Graph, ctx: PassContext) -> PassResult:
        """Rewrite ``graph`` in place; never call ``ir.finalize`` (the manager does)."""


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its ``name``."""
    if not dataclasses.is_dataclass(cls.Options):
        raise TypeError(f"{cls.__name__}.Options must be a dataclass")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"pass name {cls.name!r} registered twice")
    if not cls.summary:
        cls.summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
    _REGISTRY[cls.name] = cls
    return cls


def available_passes() -> dict[str, type[Pass]]:
    """Every registered pass by name (importing ``onnxcomp.passes`` registers the built-ins)."""
    import onnxcomp.passes  # noqa: F401 - registers the built-in passes

    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    passes = available_passes()
    if name not in passes:
        import difflib

        close = difflib.get_close_matches(name, list(passes), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(f"unknown pass {name!r}{hint}; valid passes: {', '.join(passes)}")
    return passes[name]


def make_pass(name: str, options: Mapping[str, Any] | None = None, where: str | None = None) -> Pass:
    """Instantiate a registered pass from plain option data, validating every key."""
    cls = get_pass(name)
    return cls(build_options(cls.Options, options, where or name))


def describe_passes() -> list[tuple[str, str, list[tuple[str, str, Any]]]]:
    """(name, summary, [(option, type, default)]) of every pass, for ``onnxcomp passes``."""
    from onnxcomp.options import describe_type

    out = []
    for name, cls in available_passes().items():
        opts = [(n, describe_type(tp), d) for n, tp, d in option_fields(cls.Options)]
        out.append((name, cls.summary, opts))
    return out
