"""The pass contract: a registered name, typed options, a run on a graph with a context.

A pass subclasses :class:`Pass`, sets ``name`` (``verb_noun``) and ``Options`` (a frozen
dataclass), documents what it rewrites and when it declines, and returns a :class:`PassResult`
saying whether it modified the graph and what it did. ``@register_pass`` (:mod:`onnxcomp.framework.registry`)
makes it available to recipes, the CLI and the Python API alike.
"""

from __future__ import annotations

import abc
import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from onnxcomp import ir
from onnxcomp.framework.options import NoOptions
from onnxcomp.progress import progress_bar

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
    source_checked: bool = False  # the model passed onnx.checker's full check on load (no shape repair needed)
    source_path: Any = None  # the file source_model was read from unchanged (a Path): sessions read it directly
    #: the graph the running pass gets still computes source_model as it is (no pass changed it,
    #: no opset conversion): a pass may then use source_model as its float model (no export)
    graph_is_source: bool = False

    def record(self, feature: str) -> dict[str, Any]:
        """The run's record of ``feature``, saved beside the output as ``OUT.<feature>_record.json``.

        The one channel for records: passes of one feature in one run share (and extend) it.
        """
        return self.artifacts.setdefault(f"{feature}_record", {})

    def set_record(self, feature: str, data: Any) -> None:
        """Replace the run's record of ``feature`` (any JSON-able value)."""
        self.artifacts[f"{feature}_record"] = data

    def rng(self, salt: str = "") -> np.random.Generator:
        """A generator seeded by the run's seed and a per-use salt (deterministic, independent)."""
        mix = int.from_bytes(hashlib.sha256(salt.encode()).digest()[:8], "little")  # the whole salt counts
        return np.random.default_rng([self.seed, mix])


class Pass(abc.ABC):
    """Base class of every pass: in-place rewrite of an ``ir.Graph``."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    summary: ClassVar[str] = ""
    #: True: the manager also runs the pass on every If/Loop/Scan body (each as its own graph).
    bodies: ClassVar[bool] = False

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    def min_opset(self) -> int | None:
        """The opset this pass's output needs with its options (the manager upgrades to it)."""
        return None

    @abc.abstractmethod
    def run(self, graph: ir.Graph, ctx: PassContext) -> PassResult:
        """Rewrite ``graph`` in place; never call ``ir.finalize`` (the manager does)."""
