"""The sparsity record: which layers each sparsity pass changed, saved as ``OUT.sparsity_record.json``.

Both passes append to ``ctx.record("sparsity")["layers"]``; entries have ``kind``
``"n:m"`` (``sparsify_2to4``) or ``"channels"`` (``prune_channels``). The passes read it to keep
one kind of sparsity per layer within a run (across runs they detect n:m weights by their values).
"""

from __future__ import annotations

from typing import Any

from onnxcomp.framework.base import PassContext


def add_layers(ctx: PassContext, entries: list[dict[str, Any]]) -> None:
    """Append layer entries (each with ``node`` and ``kind``) to the run's sparsity record."""
    ctx.record("sparsity").setdefault("layers", []).extend(entries)


def layers_of_kind(ctx: PassContext, kind: str) -> set[str]:
    """Names of the layers recorded with ``kind`` earlier in this run."""
    return {e["node"] for e in ctx.record("sparsity").get("layers", []) if e.get("kind") == kind}
