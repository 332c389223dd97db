"""Distilling the planned layers block by block, in topological order, before they are emitted.

For each block the student's input (the float model with every earlier block's learned weights,
or the teacher's input with ``teacher_input``) and the teacher's tensor at the block's end are
collected with onnxruntime over the calibration data (in memory up to ``memory_mb``, then in a
memory-mapped temporary file), the block is learned (:mod:`onnxcomp.quant.distill.train`), and
the learned weight goes back as a :class:`QuantizedWeight` in the quantizer's own storage, for the
quantizer's emitters. The student is the deployed computation: earlier blocks' learned weights
and every static activation quantizer (:mod:`onnxcomp.quant.distill.student`); the block's own
input quantizer is simulated in numpy with the calibrated range.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcomp import ir
from onnxcomp.analysis.trial_pool import PoolResources
from onnxcomp.calibration.shard import add_note, current_resources
from onnxcomp.formats import ElementFormat, IntegerFormat, get_format
from onnxcomp.framework.base import PassContext
from onnxcomp.quant.distill.block import Block, find_tail
from onnxcomp.quant.distill.clip import InputQuantizer
from onnxcomp.quant.distill.grid import GridWeight, grid_weight
from onnxcomp.quant.distill.parallel import SEQUENTIAL_NOTE, BlockJob, learn_blocks
from onnxcomp.quant.distill.rows import RowSource, layer_of
from onnxcomp.quant.distill.student import student_model
from onnxcomp.quant.distill.train import Learned, Settings, learn_block
from onnxcomp.quant.plan import NodePlan
from onnxcomp.quant.qweight import QuantizedWeight
from onnxcomp.quant.weights import quantize_weight
from onnxcomp.runtime import TensorRunner

Batches = Callable[[], Iterable[Mapping[str, np.ndarray]]]


@dataclass
class Outcome:
    """Learned weights (node name -> weight in its storage) and each planned node's record entry."""

    learned: dict[str, QuantizedWeight] = field(default_factory=dict)
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)  # learned activation ranges


class _Stash:
    """Batches of one tensor stacked on axis 0: in memory while the shared ``budget`` lasts, then a memory-mapped file.

    ``budget`` is a one-element list of the bytes left, shared by every stash of one run.
    """

    def __init__(self, budget: list[int], folder: Path) -> None:
        self.parts: list[np.ndarray] = []
        self.budget, self.folder = budget, folder
        self.file: Any = None
        self.rows = 0

    def add(self, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, np.float32)
        self.rows += a.shape[0]
        self.tail = a.shape[1:]
        if self.file is None:
            self.budget[0] -= a.nbytes
        if self.file is None and self.budget[0] < 0:
            self.file = tempfile.NamedTemporaryFile(dir=self.folder, suffix=".f32", delete=False)  # noqa: SIM115
            for p in self.parts:
                self.file.write(p.tobytes())
            self.parts = []
        if self.file is not None:
            self.file.write(a.tobytes())
        else:
            self.parts.append(a)

    def array(self) -> np.ndarray:
        if self.file is None:
            whole = np.concatenate(self.parts, axis=0)
            self.parts = [whole]
            return whole
        self.file.close()
        return np.memmap(self.file.name, np.float32, "r", shape=(self.rows, *self.tail))


def _collect(
    model: onnx.ModelProto, names: list[str], batches: Batches, limit: int | None, stash: Callable[[], _Stash]
) -> dict[str, np.ndarray]:
    runner = TensorRunner(model, names, truncate=True)
    got = {n: stash() for n in names}
    for i, batch in enumerate(batches()):
        if limit is not None and i >= limit:
            break
        for name, value in runner.run(batch, i).items():
            got[name].add(value)
    return {n: s.array() for n, s in got.items()}


def _input_quantizer(
    plan: NodePlan, ranges: Mapping[str, tuple[float, float]], learn: bool
) -> InputQuantizer | str | None:
    """The block input's static quantizer (None: float activations), or why it is not simulated."""
    a = plan.spec.activations
    if a is None:
        return None
    x = plan.node.inputs[0].name
    if a.granularity.kind != "tensor" or x not in ranges:
        return f"{a.granularity.kind} {a.dtype} activations are not simulated (the block input is float)"
    if not isinstance(get_format(a.dtype), (IntegerFormat, ElementFormat)):
        return f"{a.dtype} activations are not simulated"
    lo, hi = ranges[x]
    return InputQuantizer(a.dtype, float(lo), float(hi), a.symmetric, learn)


def _prepare(
    graph: ir.Graph, plan: NodePlan, fp4_storage: str, energy: np.ndarray | None
) -> tuple[Block, GridWeight, np.ndarray | None] | str:
    """The block of ``plan``, its learnable weight and its bias, or why it keeps round-to-nearest."""
    node, spec = plan.node, plan.spec
    assert spec.weights is not None and plan.weight_index is not None and plan.layout is not None
    if plan.weight_index != 1:
        return "its weight is not input B"
    if ir.is_constant(node.inputs[0]):
        return "its input is a constant"
    w = node.inputs[plan.weight_index]
    value = ir.constant_value(w)
    assert value is not None  # plan_nodes folded it into an initializer
    layer = layer_of(node, tuple(value.shape))
    if isinstance(layer, str):
        return layer
    qw = quantize_weight(value, spec.weights, plan.layout, w.name, fp4_storage, energy)
    gw = grid_weight(value, qw)
    if isinstance(gw, str):
        return gw
    tails, end, matmul_bias = find_tail(graph, node, layer)
    bias_owner, bias = matmul_bias, None
    if node.op != "MatMul" and len(node.inputs) > 2 and node.inputs[2].name:
        value = ir.folded_value(node.inputs[2])
        per_channel = plan.bias_index == 2 or (value is not None and value.shape == (layer.out_channels,))
        if not per_channel or float(node.attrs.get("beta", 1.0)) != 1.0:
            return "its bias is not a per-channel constant"
        ir.fold_constant_input(graph, node, 2)  # a grouped ConvTranspose's bias is not planned as per-channel
        bias_owner = (node, 2)
    if bias_owner is not None:
        found = ir.constant_value(bias_owner[0].inputs[bias_owner[1]])
        assert found is not None  # a folded constant (plan_nodes / find_tail checked)
        bias = found.astype(np.float64).reshape(-1)
    return Block(node, layer, node.inputs[0].name, end, tails, bias_owner), gw, bias


def _set_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> bool:
    for init in model.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(np.asarray(value, np.float32), name))
            return True
    return False


def distill_plans(
    graph: ir.Graph,
    plans: list[NodePlan],
    ranges: Mapping[str, tuple[float, float]],
    float_model: onnx.ModelProto,
    ctx: PassContext,
    settings: Settings,
    *,
    fp4_storage: str = "int8",
    energies: Mapping[str, np.ndarray] | None = None,
    calib_batches: int | None = None,
    teacher_input: bool = False,
    memory_mb: int = 1024,
) -> Outcome:
    """Learn every plan's weight (and bias, written into ``graph``); plans keep their order (topological)."""
    assert ctx.calibration is not None
    outcome = Outcome()
    readers: dict[str, int] = {}
    for p in plans:
        if p.spec.weights is not None and p.weight_index is not None:
            name = p.node.inputs[p.weight_index].name
            readers[name] = readers.get(name, 0) + 1
    # topologically sorted: scale migration appends its Muls, and truncated runners walk the nodes backwards
    teacher = ir.import_model(float_model)
    ir.finalize(teacher)
    float_model = ir.export_model(teacher, float_model)
    # the deployed model's activation quantizers (rebuilt when a block learns its input's range);
    # ``weighted``: the float model with every learned weight and bias so far
    weighted = onnx.ModelProto()
    weighted.CopyFrom(float_model)
    local_ranges = dict(ranges)
    student, float_tensors = (weighted, []) if teacher_input else student_model(weighted, plans, local_ranges)
    stale = False  # a learned range is not in ``student`` yet
    fixed: set[str] = set()  # inputs an earlier block learned on: their range stays
    prepared: list[tuple[NodePlan, tuple[Block, GridWeight, np.ndarray | None] | str]] = []
    for plan in plans:
        if plan.spec.weights is None or plan.weight_index is None:
            continue
        w_name = plan.node.inputs[plan.weight_index].name
        if readers[w_name] > 1:
            prepared.append((plan, f"weight {w_name!r} is read by {readers[w_name]} nodes"))
        else:
            prepared.append((plan, _prepare(graph, plan, fp4_storage, (energies or {}).get(plan.node.name))))
    blocks = [p[1][0] for p in prepared if not isinstance(p[1], str)]
    with tempfile.TemporaryDirectory(prefix="onnxcomp-distill-") as tmp:
        budget = [memory_mb << 20]

        def stash() -> _Stash:
            return _Stash(budget, Path(tmp))

        # every teacher tensor in one run (and the inputs too with teacher_input)
        wanted = [b.output_name for b in blocks] + ([b.input_name for b in blocks] if teacher_input else [])
        teacher_tensors = (
            _collect(float_model, list(dict.fromkeys(wanted)), ctx.calibration, calib_batches, stash) if wanted else {}
        )
        resources = current_resources()
        pool = PoolResources(resources.workers, resources.ray)
        learned_apart: dict[str, tuple[InputQuantizer | None, Learned]] = {}
        if teacher_input and pool.remote and blocks:  # independent blocks (distill/parallel.py)
            jobs = _teacher_jobs(prepared, local_ranges, settings, teacher_tensors, ctx)
            found = learn_blocks(settings, jobs, pool)
            learned_apart = {job.node: (job.quantizer, found[job.node]) for job in jobs}
            add_note(f"distill: {len(jobs)} independent blocks (--teacher-input) learned on {pool.describe()}")
        elif pool.remote and len(blocks) > 1:
            add_note(SEQUENTIAL_NOTE)
        for plan, ready in prepared:
            node = plan.node
            w_name = node.inputs[plan.weight_index or 0].name
            x_name = node.inputs[0].name
            learn_range = settings.learn_ranges and x_name not in fixed and len(ir.consumers(node.inputs[0])) == 1
            quantizer = _input_quantizer(plan, local_ranges, learn_range)
            fixed.add(x_name)
            if isinstance(ready, str):
                outcome.entries[node.name] = {"kept": "rtn", "reason": ready}
                continue
            block, gw, bias0 = ready
            target = teacher_tensors[block.output_name]
            if teacher_input:
                x = teacher_tensors[block.input_name]
            else:
                if stale:
                    student, _ = student_model(weighted, plans, local_ranges)
                    stale = False
                left = [max(budget[0], 0)]  # what the teacher's tensors left; freed with this block's input

                def student_stash(left: list[int] = left) -> _Stash:
                    return _Stash(left, Path(tmp))

                x = _collect(student, [block.input_name], ctx.calibration, calib_batches, student_stash)[
                    block.input_name
                ]
            iq = quantizer if isinstance(quantizer, InputQuantizer) else None
            apart = learned_apart.get(node.name)
            if apart is not None and apart[0] == iq:  # learned by a worker, from the same arguments
                learned = apart[1]
                iq = None if iq is not None and not iq.learn else iq  # a fixed quantizer was applied to x there
            else:
                if iq is not None and not iq.learn:
                    x, iq = iq.fake(np.asarray(x)), None  # once on the tensor (cheaper than on every sampled row)
                learned = _learn(block, gw, bias0, x, target, settings, ctx, iq)
            entry = _entry(block, learned, settings, quantizer if isinstance(quantizer, str) else None)
            if float_tensors:
                entry["float_activations"] = len(float_tensors)  # earlier quantizers the student could not simulate
            outcome.entries[node.name] = entry
            if learned.kept != "distilled":
                continue
            outcome.learned[node.name] = gw.to_quantized(
                learned.codes, learned.log_scale, {"name": "distill", **_summary(entry)}
            )
            if iq is not None and learned.log_gain != 0.0:
                new_range = iq.learned_range(learned.log_gain)
                entry["input_range"] = {
                    "tensor": x_name,
                    "calibrated": list(local_ranges[x_name]),
                    "learned": list(new_range),
                }
                local_ranges[x_name] = outcome.ranges[x_name] = new_range
                stale = True
            for target_model in {id(weighted): weighted, id(student): student}.values():
                if not _set_initializer(target_model, w_name, outcome.learned[node.name].dequantized):
                    entry["student"] = "its weight is no initializer of the float model: later blocks see it in float"
            if block.bias_owner is not None and learned.bias is not None:
                owner, k = block.bias_owner
                bias_name = owner.inputs[k].name
                old = ir.constant_value(owner.inputs[k])
                assert old is not None
                new_bias = learned.bias.astype(np.float32).reshape(old.shape)
                ir.write_input(graph, owner, k, new_bias)
                for target_model in {id(weighted): weighted, id(student): student}.values():
                    _set_initializer(target_model, bias_name, new_bias)
    return outcome


def _teacher_jobs(
    prepared: list[tuple[NodePlan, tuple[Block, GridWeight, np.ndarray | None] | str]],
    ranges: Mapping[str, tuple[float, float]],
    settings: Settings,
    tensors: Mapping[str, np.ndarray],
    ctx: PassContext,
) -> list[BlockJob]:
    """The blocks of ``teacher_input`` mode with the arguments the loop of :func:`distill_plans` gives them."""
    fixed: set[str] = set()
    jobs = []
    for plan, ready in prepared:
        x = plan.node.inputs[0]
        learn_range = settings.learn_ranges and x.name not in fixed and len(ir.consumers(x)) == 1
        quantizer = _input_quantizer(plan, ranges, learn_range)
        fixed.add(x.name)
        if isinstance(ready, str):
            continue
        block, gw, bias0 = ready
        iq = quantizer if isinstance(quantizer, InputQuantizer) else None
        rng = ctx.rng(f"distill:{block.node.name}")
        x_value, target = tensors[block.input_name], tensors[block.output_name]
        jobs.append(BlockJob(block.node.name, block.layer, gw, bias0, block.tails, rng, iq, x_value, target))
    return jobs


def _learn(
    block: Block,
    gw: GridWeight,
    bias0: np.ndarray | None,
    x: np.ndarray,
    target: np.ndarray,
    settings: Settings,
    ctx: PassContext,
    input_quant: InputQuantizer | None,
) -> Learned:
    source = RowSource(block.layer, np.asarray(x))
    with ctx.progress(settings.iters, f"distill {block.node.name}") as bar:

        def report(it: int, loss: float) -> None:
            bar.update(1)
            if it % 20 == 0:
                bar.set_postfix_str(f"loss {loss:.3e}")

        return learn_block(
            source,
            np.asarray(target),
            block.layer,
            gw,
            bias0,
            block.tails,
            settings,
            ctx.rng(f"distill:{block.node.name}"),
            report,
            input_quant,
        )


def _entry(block: Block, learned: Learned, settings: Settings, not_simulated: str | None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "kept": learned.kept,
        "block": [block.node.op, *[t.op for t in block.tails]],
        "output": block.output_name,
        "error_before": learned.error_before,
        "error_after": learned.error_after,
        "iters": settings.iters,
        "learned": [
            k
            for k, on in (
                ("rounding", settings.learn_rounding),
                ("scales", settings.learn_scales),
                ("bias", settings.learn_bias),
                ("input range", settings.learn_ranges),
            )
            if on
        ],
    }
    if learned.soft_left:
        entry["soft_left"] = learned.soft_left
    if not_simulated:
        entry["input"] = not_simulated
    return entry


def _summary(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: entry[k] for k in ("error_before", "error_after", "iters")}


__all__ = ["Outcome", "Settings", "distill_plans"]
