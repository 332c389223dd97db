"""Sensitivity analysis and the accuracy-target search over deployable candidates.

The quantize pass supplies ``build(fallback) -> onnx.ModelProto``: the deployable model with
``fallback`` (node -> override table, :func:`onnxcomp.quant.fallback.spec_table`) applied on top
of its config, statistics reused between candidates. Candidates are scored by
:class:`onnxcomp.analysis.scoring.Scorer`. Everything returned here is JSON-able for the record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import onnx

from onnxcomp import ir
from onnxcomp.analysis.macs import model_macs
from onnxcomp.analysis.scoring import Scorer, load_evaluator
from onnxcomp.analysis.trial_pool import TaskPool
from onnxcomp.calibration.data import calibration_source
from onnxcomp.calibration.shard import calibration_resources, current_resources
from onnxcomp.errors import CalibrationError
from onnxcomp.formats import get_format
from onnxcomp.framework.base import PassContext, PassResult
from onnxcomp.framework.options import options_to_dict
from onnxcomp.framework.recipe import dump_options
from onnxcomp.ir import match_glob
from onnxcomp.quant.fallback import AccuracyTarget, SearchResult, ladder, search, spec_table
from onnxcomp.quant.plan import plan_nodes
from onnxcomp.quant.record import attach_migrated
from onnxcomp.quant.spec import NodeSpec
from onnxcomp.quant.trials import Trials, score_task, trial_resources
from onnxcomp.quant.weights import min_opset_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """A quantizable node: its name, op, resolved spec, MACs (None: unknown) and weight elements."""

    name: str
    op: str
    spec: NodeSpec
    macs: int | None
    weight_elements: int


def _bits(spec: NodeSpec | None) -> float:
    """Stored bits per weight element at a rung (32 for float)."""
    return 32.0 if spec is None or spec.weights is None else float(get_format(spec.weights.dtype).bits)


def _low(spec: NodeSpec | None) -> bool:
    """True when weights and activations (if quantized) are 8 bits or fewer at this rung."""
    if spec is None or spec.weights is None:
        return False
    acts = spec.activations
    return _bits(spec) <= 8 and (acts is None or get_format(acts.dtype).bits <= 8)


class Ladders:
    """The rungs of every searchable node and the compression figures of an assignment."""

    def __init__(self, candidates: Sequence[Candidate], allowed: Callable[[NodeSpec], bool]) -> None:
        self.candidates = {c.name: c for c in candidates}
        self.rungs: dict[str, list[NodeSpec | None]] = {}
        for c in candidates:
            rungs = [r for r in ladder(c.spec) if r is None or r is c.spec or allowed(r)]
            self.rungs[c.name] = rungs

    def fallback(self, steps: Mapping[str, int]) -> dict[str, Any]:
        """Node overrides of an assignment (steps above 0 only)."""
        return {n: spec_table(self.rungs[n][s]) for n, s in sorted(steps.items()) if s}

    def describe(self, steps: Mapping[str, int]) -> dict[str, Any]:
        """Weight bytes and the fraction of known MACs at 8 bits or fewer."""
        weight_bits = 0.0
        macs_low = macs_all = 0
        for name, c in self.candidates.items():
            rung = self.rungs[name][steps.get(name, 0)]
            weight_bits += c.weight_elements * _bits(rung)
            if c.macs:
                macs_all += c.macs
                macs_low += c.macs if _low(rung) else 0
        return {"weight_bytes": int(weight_bits // 8), "low_precision_macs": macs_low / macs_all if macs_all else None}

    def label(self, name: str, step: int) -> str:
        rung = self.rungs[name][step]
        if rung is None:
            return "float"
        w = rung.weights.dtype if rung.weights is not None else "float"
        a = rung.activations.dtype if rung.activations is not None else "float"
        return f"w {w} / a {a}"


def sensitivity(
    ladders: Ladders,
    names: Sequence[str],
    trials: Trials,
    both: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Per node: the score with only it quantized and (``both``) with only it left in float; ranked.

    "Only quantized": every other searched node in float; the cheap, independent figure the search
    ranks by. "Only in float": every other node quantized; what leaving it out recovers. Trials
    are independent: ``trials`` may run them in parallel, with the same results.
    """
    all_float = {n: len(ladders.rungs[n]) - 1 for n in names}
    jobs = []
    for name in names:
        jobs.append((f"sensitivity of node {name!r} (only it quantized)", ladders.fallback({**all_float, name: 0})))
        if both:
            top = len(ladders.rungs[name]) - 1
            jobs.append((f"sensitivity of node {name!r} (only it in float)", ladders.fallback({name: top})))
    scores = trials.scores(jobs)
    rows = []
    for i, name in enumerate(names):
        alone = next(scores)
        row: dict[str, Any] = {"node": name, "op": ladders.candidates[name].op, "only_quantized": alone}
        if both:
            row["only_float"] = next(scores)
        c = ladders.candidates[name]
        row.update(macs=c.macs, weight_bytes=int(c.weight_elements * _bits(c.spec) // 8), index=i)
        if progress is not None:
            progress(f"sensitivity {i + 1}/{len(names)}: {name} {alone:.6g}")
        rows.append(row)
    rows.sort(key=lambda r: (r["only_quantized"], r["index"]))
    for rank, row in enumerate(rows):
        row["rank"] = rank
    return rows


def greedy_curve(
    ladders: Ladders,
    ranked: Sequence[Mapping[str, Any]],
    trials: Trials,
    points: int = 12,
) -> list[dict[str, Any]]:
    """The metric as nodes are quantized least sensitive first (the rest in float): at most ``points`` + 1."""
    order = [r["node"] for r in sorted(ranked, key=lambda r: -r["only_quantized"])]
    total = sum(ladders.candidates[n].weight_elements for n in order) or 1
    cuts = sorted({round(i * len(order) / max(1, points)) for i in range(points + 1)})
    jobs = []
    for k in cuts:
        steps = {n: len(ladders.rungs[n]) - 1 for n in order[k:]}
        jobs.append((f"greedy curve point with {k} node(s) quantized", ladders.fallback(steps)))
    return [
        {"nodes": k, "fraction": sum(ladders.candidates[n].weight_elements for n in order[:k]) / total, "score": score}
        for k, score in zip(cuts, trials.scores(jobs), strict=True)
    ]


@dataclass
class Outcome:
    fallback: dict[str, Any]
    result: SearchResult
    threshold: float
    float_score: float
    record: dict[str, Any]


def accuracy_search(
    ladders: Ladders,
    pinned: set[str],
    target: AccuracyTarget,
    trials: Trials,
    progress: Callable[[str], None] | None = None,
) -> Outcome:
    """Rank by sensitivity, then :func:`onnxcomp.quant.fallback.search`; the record of every trial.

    The ranking's trials are independent (run as ``trials`` allows); the search's each depend on
    the previous one's outcome, so they run one at a time, here.
    """
    scorer = trials.scorer
    names = [n for n in ladders.rungs if n not in pinned and len(ladders.rungs[n]) > 1]
    float_score = scorer.reference_score()
    threshold = float_score - target.value if target.metric == "drop" else target.value
    ranked = sensitivity(ladders, names, trials, both=False, progress=progress)
    sens = {r["node"]: r["only_quantized"] for r in ranked}

    def trial(steps: dict[str, int]) -> float:
        return trials.score(ladders.fallback(steps))

    result = search(
        names,
        {n: len(ladders.rungs[n]) for n in names},
        sens,
        trial,
        lambda s: s >= threshold,
        progress,
    )
    history = [
        {
            "phase": t.phase,
            "score": t.score,
            "meets": t.met,
            "nodes": {n: ladders.label(n, s) for n, s in sorted(t.steps.items())},
            **ladders.describe(t.steps),
        }
        for t in result.history
    ]
    record = {
        "target": str(target),
        "threshold": threshold,
        "float_score": float_score,
        "met": result.met,
        "score": result.score,
        "trials": scorer.trials,
        "pinned": sorted(pinned),
        "fallback": {n: ladders.label(n, s) for n, s in sorted(result.steps.items())},
        **ladders.describe(result.steps),
        "sensitivity": ranked,
        "history": history,
    }
    return Outcome(ladders.fallback(result.steps), result, threshold, float_score, record)


# --- the quantize pass's tuned run ---------------------------------------------------------------


def _eval_batches(pass_: Any, ctx: PassContext, model: onnx.ModelProto) -> list[dict[str, Any]]:
    o = pass_.options
    factory: Callable[[], Any]
    if o.eval_data is not None:
        factory, _ = calibration_source(o.eval_data, model)
    elif ctx.calibration is not None:
        factory = ctx.calibration
    else:
        if o.evaluator is not None:
            return []
        raise CalibrationError("the accuracy search needs data to score candidates on: pass --calib or --eval-data")
    return [dict(b) for b in itertools.islice(factory(), max(1, o.eval_batches))]


def _candidates(pass_: Any, graph: ir.Graph, base: onnx.ModelProto) -> list[Candidate]:
    plans, _ = plan_nodes(graph, pass_.config, pass_.options.output_quant, pass_.options.placement)
    macs = {m.name: m.macs for m in model_macs(base)}
    found = []
    for plan in plans:
        value = ir.constant_value(plan.node.inputs[plan.weight_index]) if plan.weight_index is not None else None
        size = int(value.size) if value is not None else 0
        found.append(Candidate(plan.node.name, plan.node.op, plan.spec, macs.get(plan.node.name), size))
    return found


def tuned_quantize(pass_: Any, graph: ir.Graph, ctx: PassContext) -> PassResult:
    """The quantize pass with ``accuracy_target`` and/or ``sensitivity``.

    Scale migration runs once on ``graph``; every candidate is a fresh quantization of that float
    graph by a pass of the same class with the candidate's ``fallback``, statistics shared; the
    final quantization is one more such pass on ``graph`` itself. The resolved options (the
    fallback included, the target not) are saved as ``OUT.quant_config.toml``: ``onnxcomp quantize
    MODEL --config OUT.quant_config.toml`` reproduces the model byte for byte.
    """
    o = pass_.options
    assert ctx.source_model is not None  # the manager sets it
    head = PassResult(modified=False)
    migrated = pass_._migrate_scales(graph, ctx, head)  # noqa: SLF001 - the same pass, split in phases
    ir.finalize(graph)
    base = ir.export_model(graph, ctx.source_model)
    plain = dataclasses.replace(
        o,
        accuracy_target=None,
        sensitivity=False,
        smoothquant=None,
        equalize=False,
        weight_algorithm="rtn" if o.weight_algorithm == "awq" else o.weight_algorithm,
    )
    trial_options = dataclasses.replace(plain, bias_correction="none", report_batches=0, kernel_report=False)
    cache: dict[tuple[str, str, str], Any] = {}
    say = (lambda text: log.info("%s", text)) if not ctx.progress.enabled else (lambda text: print(text, flush=True))

    def build(fallback: dict[str, Any]) -> onnx.ModelProto:
        trial = type(pass_)(dataclasses.replace(trial_options, fallback={**o.fallback, **fallback}))
        trial.stats_cache = cache
        g = ir.import_model(base)
        trial.run(g, PassContext(seed=ctx.seed, calibration=ctx.calibration, source_model=ctx.source_model))
        ir.finalize(g)
        return ir.export_model(g, base)

    evaluator = load_evaluator(o.evaluator) if o.evaluator is not None else None
    metric = pass_.target.metric if pass_.target is not None else ("score" if evaluator is not None else "cos")
    if metric == "drop":
        metric = "score" if evaluator is not None else "agree"
    scorer = Scorer(base, _eval_batches(pass_, ctx, base), metric, evaluator)
    opset = ir.default_opset(graph)
    ladders = Ladders(_candidates(pass_, graph, base), lambda spec: _opset_need(spec) <= opset)
    pinned = {n for n in ladders.rungs if match_glob(n, [*o.nodes, *o.fallback])}
    data: dict[str, Any] = {}
    fallback: dict[str, Any] = {}
    run_resources = current_resources()
    resources = trial_resources(o.trial_workers, run_resources)
    with contextlib.ExitStack() as stack:
        if resources.ray is not None:
            # The trial actors hold the cluster's CPUs while they live, so a calibration sharded on
            # the same cluster would wait for them forever: calibrate the statistics every candidate
            # shares now (every node at its own spec), and whatever a later rung still needs here.
            build({})
            stack.enter_context(calibration_resources(dataclasses.replace(run_resources, workers=1, ray=None)))
        pool = stack.enter_context(TaskPool(score_task, scorer, resources)) if resources.remote else None
        trials = Trials(scorer, build, o.trial_workers, pool)
        if o.sensitivity:
            names = [n for n in ladders.rungs if n not in pinned and len(ladders.rungs[n]) > 1]
            rows = sensitivity(ladders, names, trials, True, say)
            data["sensitivity"] = {
                "metric": metric,
                "nodes": rows,
                "curve": greedy_curve(ladders, rows, trials),
                "trials": scorer.trials,
            }
        if pass_.target is not None:
            outcome = accuracy_search(ladders, pinned, pass_.target, trials, say)
            fallback = outcome.fallback
            data["search"] = outcome.record
    final = type(pass_)(dataclasses.replace(plain, fallback={**o.fallback, **fallback}))
    final.stats_cache = cache
    result = final.run(graph, ctx)
    if resources.remote:
        result.notes.append(f"candidates built here, scored on {resources.describe()}")
    result.modified = result.modified or head.modified
    result.stats = {**head.stats, **result.stats}
    if "record" in result.data:
        attach_migrated(result.data["record"], migrated)
    for key, value in data.items():
        result.data[key] = value
        ctx.artifacts[f"quant_{key}"] = value
    if pass_.target is not None:
        resolved = {
            **options_to_dict(o),
            "accuracy_target": None,
            "sensitivity": False,
            "fallback": {**o.fallback, **fallback},
        }
        resolved.pop("evaluator", None)
        resolved.pop("eval_data", None)
        ctx.artifacts["quant_config.toml"] = dump_options(
            resolved,
            f"quantize options found by --accuracy-target {pass_.target}; reproduce with\n"
            "  onnxcomp quantize MODEL.onnx -o OUT.onnx --calib DATA --config THIS_FILE",
        )
        search = data["search"]
        if not search["met"]:
            result.notes.append(
                f"accuracy target {pass_.target} not met even with every searchable node in float "
                f"(best {search['score']:.6g}); wrote the best configuration found"
            )
        else:
            result.notes.append(
                f"accuracy target {pass_.target} met: {search['score']:.6g} with {len(fallback)} node(s) raised, "
                f"{scorer.trials} trials"
            )
    return result


def _opset_need(spec: NodeSpec) -> int:
    return max([13] + [min_opset_for(t) for t in (spec.weights, spec.activations) if t is not None])


def format_search(record: Mapping[str, Any]) -> str:
    """The search's outcome in a few lines: target, score, what fell back, compression kept."""
    verdict = "met" if record["met"] else "NOT met"
    low = record.get("low_precision_macs")
    lines = [
        f"accuracy target {record['target']} {verdict}: score {record['score']:.6g} "
        f"(float {record['float_score']:.6g}), {record['trials']} trials",
        f"  weights {record['weight_bytes']} bytes"
        + (f", {low:.1%} of the MACs at 8 bits or fewer" if low is not None else ""),
    ]
    for node, label in record["fallback"].items():
        lines.append(f"  raised {node}: {label}")
    return "\n".join(lines)
