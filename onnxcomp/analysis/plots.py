"""Sensitivity plots (matplotlib, the optional ``plot`` extra: ``pip install 'onnxcomp[plot]'``)."""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from onnxcomp.errors import OnnxCompError

INSTALL_HINT = "the plot needs matplotlib: pip install 'onnxcomp[plot]'"


def _pyplot() -> Any:
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        raise OnnxCompError(INSTALL_HINT) from None
    matplotlib.use("Agg")  # files only, no display
    return importlib.import_module("matplotlib.pyplot")


def plot_sensitivity(
    rows: Sequence[Mapping[str, Any]], curve: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], metric: str
) -> Path:
    """Per-node bars in graph order (only-quantized and only-float scores) and the greedy curve.

    ``curve``: points ``{"fraction": quantized share of the weights, "score": metric}`` of the
    greedy order (least sensitive node quantized first). Written atomically as PNG, 1400x900 px.
    """
    plt = _pyplot()
    ordered = sorted(rows, key=lambda r: r["index"])
    loss = metric in ("cos", "agree")  # near 1: plot what is lost, on a log axis, to make it readable

    def y(value: float) -> float:
        return max(1.0 - value, 1e-9) if loss else value

    label = f"1 - {metric} (lower is better)" if loss else metric
    fig, (bars, line) = plt.subplots(2, 1, figsize=(14, 9), dpi=100, gridspec_kw={"height_ratios": [3, 2]})
    x = list(range(len(ordered)))
    bars.bar(
        [i - 0.2 for i in x], [y(r["only_quantized"]) for r in ordered], width=0.4, label="only this node quantized"
    )
    if all("only_float" in r for r in ordered):
        bars.bar(
            [i + 0.2 for i in x], [y(r["only_float"]) for r in ordered], width=0.4, label="only this node in float"
        )
    bars.set_xticks(x, [r["node"] for r in ordered], rotation=90, fontsize=max(4, min(9, 400 // max(1, len(x)))))
    bars.set_ylabel(label)
    bars.set_title("per-node sensitivity (graph order)")
    bars.legend(loc="lower right")
    line.plot([p["fraction"] for p in curve], [y(p["score"]) for p in curve], marker="o")
    line.set_xlabel("fraction of weights quantized (least sensitive first)")
    line.set_ylabel(label)
    if loss:
        bars.set_yscale("log")
        line.set_yscale("log")
    line.grid(True, alpha=0.3)
    fig.tight_layout()
    target = Path(path)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, target)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return target
