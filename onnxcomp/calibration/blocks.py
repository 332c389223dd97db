"""Calibration running the graph in consecutive partitions (blocks of nodes), one session each.

Exposing a tensor as a graph output keeps it alive until the run returns, so the all-at-once
session holds every calibrated tensor of a batch at the same time. With ``partitions=N``
(``CalibrationResources``) the node list (topologically sorted, as ONNX requires) is cut into N
blocks of about equal size; block k's session takes the graph inputs and the tensors earlier
blocks produced that it reads, and outputs its calibrated tensors plus what later blocks read.
A batch runs block after block; each observer is updated as soon as its block returns and a
boundary tensor is dropped after the last block that reads it, so the live tensors of a batch
are about one block's inputs and outputs. Each node computes from the same inputs with the same
kernels (``ORT_DISABLE_ALL``, no fusion across a cut), so the observers get the all-at-once values
(tested bit for bit).

Graphs with If/Loop/Scan bodies (outer-scope reads are implicit) and graphs whose boundary tensor
types shape inference cannot give run all at once, with the reason in the run's notes.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper

from onnxcomp.calibration.session import FeedPlan, check_and_observe_inputs, update
from onnxcomp.errors import CalibrationError
from onnxcomp.runtime import ALL_CORES, first_line, ort_session, release_freed_memory


def _has_subgraphs(graph: onnx.GraphProto) -> bool:
    kinds = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    return any(a.type in kinds for n in graph.node for a in n.attribute)


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value shape inference knows (weights' data left out of its copy)."""
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    for init in skeleton.graph.initializer:
        if len(init.raw_data) > 1024 or init.data_location == onnx.TensorProto.EXTERNAL:
            init.ClearField("raw_data")
            del init.external_data[:]
            init.data_location = onnx.TensorProto.DEFAULT
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton).graph
    except Exception:  # noqa: BLE001 - inference fails on some custom ops
        inferred = skeleton.graph
    values = [*inferred.input, *inferred.value_info, *inferred.output]
    return {v.name: v.type.tensor_type.elem_type for v in values if v.type.tensor_type.elem_type}


def why_not_partitioned(model: onnx.ModelProto, parts: int) -> str | None:
    """Why ``model`` runs all at once instead of in ``parts`` partitions, or None."""
    if parts < 2:
        return "one partition asked"
    if _has_subgraphs(model.graph):
        return "the graph has If/Loop/Scan bodies (their outer-scope reads cannot cross a partition)"
    if len(model.graph.node) < parts:
        return f"{len(model.graph.node)} nodes cannot make {parts} partitions"
    return None


class PartitionedFeeder:
    """``BatchFeeder``'s interface (``plan``, ``observe``) over consecutive partitions of the graph."""

    def __init__(self, model: onnx.ModelProto, plan: FeedPlan, parts: int, threads: int = ALL_CORES) -> None:
        reason = why_not_partitioned(model, parts)
        if reason is not None:
            raise CalibrationError(f"cannot calibrate in {parts} partitions: {reason}")
        self.plan = plan
        graph = model.graph
        constants = {t.name for t in graph.initializer}
        inputs = [i.name for i in graph.input if i.name not in constants]
        nodes = list(graph.node)
        bounds = [round(k * len(nodes) / parts) for k in range(parts + 1)]
        blocks = [nodes[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
        wanted = set(plan.fetch) | {o.name for o in graph.output}
        reads_after: list[set[str]] = [set() for _ in blocks]  # tensors read by blocks after block k
        later: set[str] = set()
        for k in range(len(blocks) - 1, -1, -1):
            reads_after[k] = set(later)
            later |= {name for node in blocks[k] for name in node.input if name}
        types = _element_types(model)
        produced: set[str] = set(inputs)
        self._steps: list[tuple[Any, list[str], list[str], list[str]]] = []
        for k, block in enumerate(blocks):
            made = [o for node in block for o in node.output if o]
            read = list(dict.fromkeys(n for node in block for n in node.input if n and n not in constants))
            block_inputs = [n for n in read if n in produced and n not in made]
            outputs = [o for o in made if o in wanted or o in reads_after[k]]
            missing = [n for n in block_inputs if n not in types]
            if missing:
                raise CalibrationError(f"cannot calibrate in partitions: the type of tensor {missing[0]!r} is unknown")
            sub = self._block_model(model, block, block_inputs, outputs, types)
            try:
                # no arena: each of the N sessions would keep its own peak-sized buffer between
                # runs, and N of them cost more than the one all-at-once session (bench/README.md)
                session = ort_session(sub, level="disable", threads=threads, arena=False)
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
                raise CalibrationError(
                    f"onnxruntime cannot load calibration partition {k + 1}: {first_line(exc)}"
                ) from exc
            drop = [n for n in [*block_inputs, *outputs] if n not in reads_after[k]]
            self._steps.append((session, block_inputs, outputs, drop))
            produced |= set(made)

    @staticmethod
    def _block_model(
        model: onnx.ModelProto,
        block: Sequence[onnx.NodeProto],
        inputs: list[str],
        outputs: list[str],
        types: Mapping[str, int],
    ) -> onnx.ModelProto:
        used = {n for node in block for n in node.input}
        graph = helper.make_graph(
            list(block),
            f"{model.graph.name}_partition",
            [helper.make_tensor_value_info(n, types[n], None) for n in inputs],
            [helper.make_empty_tensor_value_info(n) for n in outputs],
            [t for t in model.graph.initializer if t.name in used],
        )
        sub = helper.make_model(graph, opset_imports=list(model.opset_import))
        sub.ir_version = model.ir_version
        sub.functions.extend(model.functions)
        return sub

    def observe(self, index: int, batch: Any, observers: MutableMapping[str, Any]) -> None:
        """Feed batch ``index`` through the partitions, updating each fetched tensor's observer."""
        batch = check_and_observe_inputs(self.plan, index, batch, observers)
        live: dict[str, np.ndarray] = {n: batch[n] for n in self.plan.required}
        fetch = set(self.plan.fetch)
        for session, block_inputs, outputs, drop in self._steps:
            try:
                values = session.run(outputs, {n: live[n] for n in block_inputs}) if outputs else []
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
                raise CalibrationError(f"calibration batch {index}: onnxruntime failed: {first_line(exc)}") from exc
            for name, value in zip(outputs, values, strict=True):
                if name in fetch:
                    update(observers[name], name, value, index)
                live[name] = value
            for name in drop:
                live.pop(name, None)
            # glibc keeps the freed buffers of this block (onnxruntime's, without an arena, and the
            # dropped tensors) in its heap: without giving them back, the process's peak is about
            # the all-at-once one however small the blocks (bench/README.md)
            release_freed_memory()
