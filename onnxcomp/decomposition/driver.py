"""The flow shared by the decomposition passes: match, choose a rank, factor, refit, rewrite, record.

A pass supplies a :class:`Decomposer` (which nodes, how their weight becomes a matrix, what the
two factor nodes look like, what the refit needs) and calls :func:`run_decomposition`.
Structural problems (grouped conv, non-constant weight, ...) always decline; *policy* rules
(too small, kernel side, stride, dilation, no MAC saving) are skipped when a record is replayed,
because the record already decided.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from onnxcomp import ir
from onnxcomp.decomposition.factor import Svd, svd
from onnxcomp.decomposition.rank import Band, RankChoice, choose_rank, parse_rank_rule
from onnxcomp.decomposition.record import add_to_artifacts, load_replay
from onnxcomp.decomposition.refit import Probe, RefitResult, refit
from onnxcomp.errors import ConfigError
from onnxcomp.framework.base import PassContext, PassResult
from onnxcomp.ir import match_glob, node_key


@dataclass(frozen=True)
class DecomposeOptions:
    """Options shared by ``decompose_conv`` and ``decompose_matmul``."""

    RENAMED: ClassVar[dict[str, str]] = {"batch_num": "calib_batches"}

    rank_rule: str = "auto"  # auto | energy:E | ratio:R | rank:N
    align: int = 16  # round ranks to a multiple of this (1: no rounding)
    band_divisor: int = 6  # auto: clamp to [L//(d+1), L//d], L = min(k)*min(Cin,Cout); 0: no clamp
    band_divisor_wide: int = 4  # d when min(Cin, Cout) >= wide_channels
    wide_channels: int = 256
    min_kernel_channels: int = 16  # too small: min(k) * min(Cin, Cout) < this
    small_kernel: int = 7  # too small: min(k) < small_kernel and min(Cin, Cout) < min_channels
    min_channels: int = 64
    require_saving: bool = True  # decline when the pair would not need fewer MACs
    refit: bool = True  # refit the second factor by least squares when calibration data is given
    refit_damping: float = 1e-4  # ridge towards the SVD factor, relative to mean(diag(A^T A))
    calib_batches: int | None = None  # calibration batches for the refit (None: all)
    skip: tuple[str, ...] = ()  # node-name globs to leave alone
    record: str = ""  # replay this decomposition record: exactly its ranks, its nodes only

    def __post_init__(self) -> None:
        try:
            parse_rank_rule(self.rank_rule)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        for name in ("align", "band_divisor_wide", "wide_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if (
            self.band_divisor < 0
            or self.refit_damping < 0
            or (self.calib_batches is not None and self.calib_batches < 1)
        ):
            raise ValueError("band_divisor and refit_damping must be >= 0 and calib_batches >= 1")


@dataclass
class Target:
    """A node that can be decomposed: its weight as a matrix ``(rows, cols)`` and its costs."""

    node: ir.Node
    weight: np.ndarray  # the original weight (its dtype is kept for the factors)
    matrix: np.ndarray  # float64; first factor (rows, r), second factor (r, cols)
    kernel: int  # min(kh, kw); 1 for a matrix
    channels: int  # min(Cin, Cout); min(K, N) for a matrix
    macs_before: int
    macs_per_rank: int
    macs_exact: bool  # False: per-output-pixel / per-row estimates (unknown shapes)
    geometry: Any = None  # decomposer-specific
    info: dict[str, Any] = field(default_factory=dict)  # extra record fields


class Decomposer(abc.ABC):
    """What a decomposition pass specialises (see the module docstring)."""

    pass_name: str
    ops: tuple[str, ...]

    def __init__(self, options: Any) -> None:
        self.options = options
        self._inferred = False

    def known_shape(self, graph: ir.Graph, tensor: ir.Tensor) -> Any:
        """``tensor.shape``, running shape inference on the graph once if it is unknown."""
        if tensor.shape is None and not self._inferred:
            self._inferred = True
            ir.infer_shapes(graph)
        return tensor.shape

    @abc.abstractmethod
    def match(self, graph: ir.Graph, node: ir.Node) -> Target | str:
        """The target, or why the node cannot be decomposed at all (structural)."""

    @abc.abstractmethod
    def policy(self, target: Target) -> str | None:
        """Why the default policy declines the target (skipped on replay), or None."""

    @abc.abstractmethod
    def factor_shapes(self, target: Target, rank: int) -> list[list[int]]:
        """Shapes of the two factor weights at ``rank``."""

    @abc.abstractmethod
    def probe(self, target: Target, first: np.ndarray, second: np.ndarray, index: int) -> Probe:
        """The refit probe for ``target`` with matrix factors ``first``, ``second``."""

    @abc.abstractmethod
    def from_solution(self, target: Target, solution: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(second matrix factor, new bias or None) from a refit solution."""

    @abc.abstractmethod
    def emit(
        self, graph: ir.Graph, target: Target, first: np.ndarray, second: np.ndarray, bias: np.ndarray | None
    ) -> list[str]:
        """Replace the node by its two factors; the names of the new nodes (first, second)."""


def too_small(options: DecomposeOptions, kernel: int, channels: int) -> str | None:
    """The reference toolkit's "too small" rule with configurable thresholds."""
    if kernel * channels < options.min_kernel_channels:
        return f"too small: min(kernel) * min(channels) = {kernel} * {channels} < {options.min_kernel_channels}"
    if kernel < options.small_kernel and channels < options.min_channels:
        return (
            f"too small: min(kernel) {kernel} < {options.small_kernel} and "
            f"min(channels) {channels} < {options.min_channels}"
        )
    return None


@dataclass
class _Plan:
    target: Target
    choice: RankChoice
    svd: Svd
    first: np.ndarray
    second: np.ndarray
    fit: RefitResult | None = None


def _choose(
    target: Target, options: DecomposeOptions, replay: dict[str, dict[str, Any]] | None, factors: Svd
) -> RankChoice | str:
    cap = len(factors.s)
    if replay is not None:
        key = node_key(target.node)
        rank = int(replay[key]["rank"])
        if rank > cap:
            raise ConfigError(f"record: rank {rank} of node {key!r} exceeds its maximum {cap}")
        return RankChoice(rank, "replay", {"max_rank": cap})
    band = Band(options.band_divisor, options.band_divisor_wide, options.wide_channels)
    choice = choose_rank(
        factors.s,
        target.matrix.shape,
        parse_rank_rule(options.rank_rule),
        target.kernel,
        target.channels,
        options.align,
        band,
    )
    after = choice.rank * target.macs_per_rank
    if options.require_saving and after >= target.macs_before:
        return (
            f"rank {choice.rank} (rule {choice.rule}) would not save MACs: the pair needs {after} "
            f"vs {target.macs_before}{'' if target.macs_exact else ' per output position'}"
        )
    return choice


def _replay_check(target: Target, entry: dict[str, Any]) -> None:
    recorded = entry.get("weight_shape")
    if recorded is not None and list(recorded) != list(target.weight.shape):
        raise ConfigError(
            f"record: node {node_key(target.node)!r} had weight shape {recorded}, "
            f"the model has {list(target.weight.shape)}"
        )


def _entry(decomposer: Decomposer, plan: _Plan) -> dict[str, Any]:
    t, rank = plan.target, plan.choice.rank
    after = rank * t.macs_per_rank
    approx = plan.first @ plan.second
    err = float(np.linalg.norm(t.matrix - approx) / max(float(np.linalg.norm(t.matrix)), 1e-300))
    entry: dict[str, Any] = {
        "pass": decomposer.pass_name,
        "node": node_key(t.node),
        "op": t.node.op,
        "factors": [],
        "weight": t.node.inputs[1].name,
        "weight_shape": list(t.weight.shape),
        "factor_shapes": decomposer.factor_shapes(t, rank),
        "rank": rank,
        "max_rank": len(plan.svd.s),
        "rule": plan.choice.rule,
        "detail": plan.choice.detail,
        "weight_rel_error": err,
        "macs_before": t.macs_before if t.macs_exact else None,
        "macs_after": after if t.macs_exact else None,
        "macs_exact": t.macs_exact,
        "macs_saved": 1.0 - after / t.macs_before,
        **t.info,
    }
    fit = plan.fit
    entry["refit"] = (
        None if fit is None else {"rows": fit.rows, "error_svd": fit.error_svd, "error_refit": fit.error_refit}
    )
    return entry


def _settings(options: DecomposeOptions, refitted: bool, ctx: PassContext) -> dict[str, Any]:
    out = {
        k: getattr(options, k)
        for k in (
            "rank_rule",
            "align",
            "band_divisor",
            "band_divisor_wide",
            "wide_channels",
            "min_kernel_channels",
            "small_kernel",
            "min_channels",
            "require_saving",
            "record",
        )
    }
    out["refit"] = refitted
    if refitted:
        out["calibration"] = ctx.calibration_name
    return out


def run_decomposition(graph: ir.Graph, ctx: PassContext, decomposer: Decomposer) -> PassResult:
    """Decompose every matching node of ``graph`` (the body of a decomposition pass)."""
    options: DecomposeOptions = decomposer.options
    result = PassResult(modified=False, stats={"decomposed": 0})
    replay, recorded = load_replay(options.record, decomposer.pass_name) if options.record else (None, {})
    plans: list[_Plan] = []
    seen: set[str] = set()
    # Without a refit (which needs every plan's statistics at once) each plan is emitted as soon as
    # it is made: one weight's SVD in memory at a time, not every layer's (docs/scale.md).
    at_once = not (options.refit and ctx.calibration is not None and ctx.source_model is not None)
    entries, planned = [], 0
    for node in ir.iter_nodes(graph, decomposer.ops):
        seen.add(node_key(node))
        reason = _plan(graph, node, decomposer, options, replay, plans)
        if reason:
            result.declined.append((node_key(node), reason))
        elif at_once:
            entries.append(_emit(graph, decomposer, plans.pop(), result))
            planned += 1
    if replay is not None:
        missing = sorted(set(replay) - seen)
        if missing:
            raise ConfigError(
                f"record names {', '.join(map(repr, missing))}, not a {'/'.join(decomposer.ops)} node of this model"
            )
    planned += len(plans)
    refitted = _refit(graph, ctx, decomposer, plans, result) if planned else False
    if planned and recorded.get("refit") and not refitted:
        result.notes.append(
            "the record was made with a refit on calibration data; without one this replay "
            "keeps the SVD factors and differs from the recorded model"
        )
    entries += [_emit(graph, decomposer, plan, result) for plan in plans]
    result.modified = bool(planned)
    result.stats["decomposed"] = planned
    exact = [e for e in entries if e["macs_exact"]]
    if exact:
        before, after = sum(e["macs_before"] for e in exact), sum(e["macs_after"] for e in exact)
        result.notes.append(f"MACs of the decomposed nodes: {before} -> {after} (-{(1 - after / before) * 100:.1f}%)")
    record = add_to_artifacts(
        ctx.artifacts, decomposer.pass_name, _settings(options, refitted, ctx), entries, result.declined
    )
    result.data["record"] = record
    return result


def _emit(graph: ir.Graph, decomposer: Decomposer, plan: _Plan, result: PassResult) -> dict[str, Any]:
    """Write ``plan``'s factors into ``graph``; its record entry."""
    second, bias = plan.second, None
    if plan.fit is not None:
        second, bias = decomposer.from_solution(plan.target, plan.fit.solution)
    entry = _entry(decomposer, plan)  # before emit, which disconnects the node
    entry["factors"] = names = decomposer.emit(graph, plan.target, plan.first, second, bias)
    result.changed.append(f"{entry['node']} -> {', '.join(names)} (rank {plan.choice.rank})")
    return entry


def _plan(
    graph: ir.Graph,
    node: ir.Node,
    decomposer: Decomposer,
    options: DecomposeOptions,
    replay: dict[str, dict[str, Any]] | None,
    plans: list[_Plan],
) -> str | None:
    """Add a plan for ``node`` to ``plans``, or say why it is declined."""
    key = node_key(node)
    if match_glob(node.name, options.skip):
        return "matches a skip pattern"
    if replay is not None and key not in replay:
        return "not in the replayed record"
    target = decomposer.match(graph, node)
    if isinstance(target, str):
        if replay is not None:
            raise ConfigError(f"record: node {key!r} cannot be decomposed: {target}")
        return target
    if replay is not None:
        _replay_check(target, replay[key])
    else:
        reason = decomposer.policy(target)
        if reason:
            return reason
    factors = svd(target.matrix)
    if factors.s[0] <= 0:
        return "its weight is all zeros"
    choice = _choose(target, options, replay, factors)
    if isinstance(choice, str):
        return choice
    first, second = factors.factors(choice.rank)
    kept = Svd(np.empty((0, 0)), factors.s, np.empty((0, 0)))  # the record needs the singular values only
    plans.append(_Plan(target, choice, kept, first, second))
    return None


def _refit(graph: ir.Graph, ctx: PassContext, decomposer: Decomposer, plans: list[_Plan], result: PassResult) -> bool:
    options: DecomposeOptions = decomposer.options
    if not options.refit:
        return False
    if ctx.calibration is None:
        result.notes.append("no calibration data: second factors not refit (SVD only)")
        return False
    if ctx.source_model is None:
        result.notes.append("no source model in the context: second factors not refit")
        return False
    model = ir.export_model(graph, ctx.source_model)
    probes = [decomposer.probe(p.target, p.first, p.second, i) for i, p in enumerate(plans)]
    fits = refit(model, probes, ctx.calibration(), options.refit_damping, options.calib_batches, ctx.progress.enabled)
    for plan, fit in zip(plans, fits, strict=True):
        plan.fit = fit
    return True
