"""Accuracy-driven mixed precision: precision ladders, the target, and the fallback search.

The search is generic: it knows nodes, their ladders (successively higher precisions ending in
float), a sensitivity order, and a ``trial(steps) -> score`` callable that builds and evaluates the
deployable model for one assignment of ladder steps. The quantize pass supplies ``trial``.

Strategy (AMCT's accuracy-based automatic calibration, with ladders instead of straight to float):

1. Rank nodes by sensitivity (the score with only that node quantized; lowest first).
2. For level ``L = 1, 2, ...``: if raising *every* searchable node ``L`` steps meets the target,
   binary-search the smallest ``k`` such that the ``k`` most sensitive nodes at step ``L`` (the
   rest at ``L - 1``) meet it.
3. Greedy pass: for each raised node, least sensitive first, try one step lower; keep it when the
   target still holds.

Every configuration returned was evaluated. If nothing meets the target (everything searchable
in float), the best configuration found is returned with ``met=False``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from onnxcomp.errors import ConfigError
from onnxcomp.formats import available_formats
from onnxcomp.quant.spec import Granularity, NodeSpec, TensorSpec

METRICS = ("cos", "sqnr", "agree", "drop", "score")


@dataclass(frozen=True)
class AccuracyTarget:
    """``metric:value``: cos (min output cosine), sqnr (min output SQNR dB), agree (top-1 agreement),
    score (the user evaluator's value), drop (at most ``value`` below the float model's score)."""

    metric: str
    value: float

    def __str__(self) -> str:
        return f"{self.metric}:{self.value:g}"


def parse_target(text: str) -> AccuracyTarget:
    """``cos:0.995``, ``agree:0.99``, ``sqnr:30``, ``drop:0.01``, ``score:0.8``; ConfigError otherwise."""
    metric, sep, value = str(text).partition(":")
    metric = metric.strip().lower()
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not sep or metric not in METRICS or number != number:
        raise ConfigError(
            f"accuracy target {text!r}: expected METRIC:VALUE with METRIC in {', '.join(METRICS)}, e.g. cos:0.995"
        )
    if metric in ("cos", "agree") and not 0.0 <= number <= 1.0:
        raise ConfigError(f"accuracy target {text!r}: {metric} is between 0 and 1")
    if metric == "drop" and number < 0:
        raise ConfigError(f"accuracy target {text!r}: drop is a non-negative amount")
    return AccuracyTarget(metric, number)


# --- ladders -------------------------------------------------------------------------------------

#: The next weight format up a node's ladder (None: float is next).
_WEIGHT_UP = {
    "int4": "int8",
    "uint4": "int8",
    "fp4_e2m1": "mxfp8",
    "fp4_e1m2": "mxfp8",
    "mxfp4": "mxfp8",
    "int8": None,
    "uint8": None,
    "fp8_e4m3": None,
    "fp8_e5m2": None,
    "mxfp8": None,
    "hif8": None,
}
#: The next activation format up (int16 when the codecs have it).
_ACT_UP = {"int4": "uint8", "uint4": "uint8", "int8": "int16", "uint8": "int16"}


def _weight_up(spec: TensorSpec) -> TensorSpec | None:
    nxt = _WEIGHT_UP.get(spec.dtype)
    if nxt is None:
        return None
    if nxt == "mxfp8":
        return TensorSpec("mxfp8", Granularity("group", 32), True, "minmax")
    g = spec.granularity if spec.granularity.kind in ("tensor", "channel") else Granularity("channel")
    return dataclasses.replace(spec, dtype=nxt, granularity=g, scale_format=None)


def _act_up(spec: TensorSpec) -> TensorSpec | None:
    nxt = _ACT_UP.get(spec.dtype)
    if nxt is None or nxt not in available_formats():
        return None
    symmetric = spec.symmetric if nxt != "uint8" else False
    return dataclasses.replace(spec, dtype=nxt, symmetric=symmetric)


def ladder(spec: NodeSpec) -> list[NodeSpec | None]:
    """The precisions a node may fall back through: its own spec first, float (None) last.

    Weights are raised before activations at each rung (4-bit weights cost most accuracy per
    byte saved); a format with no integer kernel above it goes straight to float.
    """
    rungs: list[NodeSpec | None] = [spec]
    w, a = spec.weights, spec.activations
    while True:
        w_next = _weight_up(w) if w is not None else None
        if w_next is not None:
            w = w_next
            rungs.append(NodeSpec(w, a))
            continue
        a_next = _act_up(a) if a is not None and a.granularity.kind == "tensor" else None
        if a_next is not None:
            a = a_next
            rungs.append(NodeSpec(w, a))
            continue
        break
    rungs.append(None)
    return rungs


def spec_table(spec: NodeSpec | None) -> dict[str, Any]:
    """A node override (``nodes`` table entry of the quantize config) for ``spec`` (None: float)."""
    if spec is None:
        return {"weights": "none", "activations": "none"}

    def one(t: TensorSpec | None) -> Any:
        if t is None:
            return "none"
        table: dict[str, Any] = {
            "dtype": t.dtype,
            "granularity": str(t.granularity),
            "symmetric": t.symmetric,
            "observer": t.observer,
        }
        table.update(dict(t.observer_options))
        if t.scale_format is not None:
            table["scale_format"] = t.scale_format
        return table

    return {"weights": one(spec.weights), "activations": one(spec.activations)}


# --- the search ----------------------------------------------------------------------------------


@dataclass
class Trial:
    steps: dict[str, int]  # node -> ladder step (0 = its own spec); nodes absent are at 0
    score: float
    met: bool
    phase: str


@dataclass
class SearchResult:
    steps: dict[str, int]
    score: float
    met: bool
    history: list[Trial] = field(default_factory=list)


def search(
    nodes: Sequence[str],
    ladders: Mapping[str, int],
    sensitivity: Mapping[str, float],
    trial: Callable[[dict[str, int]], float],
    meets: Callable[[float], bool],
    progress: Callable[[str], None] | None = None,
) -> SearchResult:
    """The least fallback meeting the target (module docstring). ``ladders[n]`` is the number of
    rungs of node ``n`` (its own spec included), ``sensitivity[n]`` the score with only ``n``
    quantized (lower = more sensitive)."""
    history: list[Trial] = []
    cache: dict[tuple[tuple[str, int], ...], float] = {}
    order = sorted(nodes, key=lambda n: (sensitivity.get(n, 0.0), n))  # most sensitive first

    def run(steps: dict[str, int], phase: str) -> float:
        key = tuple(sorted((n, s) for n, s in steps.items() if s))
        if key not in cache:
            cache[key] = trial(dict(key))
            ok = meets(cache[key])
            history.append(Trial(dict(key), cache[key], ok, phase))
            if progress is not None:
                progress(f"{phase}: {len(key)} node(s) raised, score {cache[key]:.6g}{' (meets)' if ok else ''}")
        return cache[key]

    def at_level(level: int, k: int) -> dict[str, int]:
        top = set(order[:k])
        return {n: min(level if n in top else level - 1, ladders[n] - 1) for n in order}

    if meets(run({}, "start")):
        return SearchResult({}, cache[()], True, history)
    max_level = max((ladders[n] - 1 for n in order), default=0)
    chosen: dict[str, int] | None = None
    for level in range(1, max_level + 1):
        everything = at_level(level, len(order))
        if not meets(run(everything, f"level {level}, all")):
            continue
        lo, hi = 0, len(order)  # invariant: hi meets
        while lo < hi:
            mid = (lo + hi) // 2
            if meets(run(at_level(level, mid), f"level {level}, binary search")):
                hi = mid
            else:
                lo = mid + 1
        chosen = at_level(level, hi)
        break
    if chosen is None:  # not even everything searchable in float: the best configuration tried
        top = max(history, key=lambda t: t.score)
        return SearchResult(top.steps, top.score, False, history)
    for n in reversed(order):  # least sensitive first: give back what is not needed
        while chosen.get(n, 0) > 0:
            lower = {**chosen, n: chosen[n] - 1}
            if meets(run(lower, "greedy")):
                chosen = lower
            else:
                break
    final = {n: s for n, s in chosen.items() if s}
    return SearchResult(final, run(final, "final"), True, history)
