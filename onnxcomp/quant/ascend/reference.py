"""A numpy reference interpreter of the Ascend deploy model, plugged into ``onnx.reference``.

``AscendQuant``, ``AscendDequant`` and ``AscendAntiQuant`` follow docs/ascend.md ("Nodes"); the
integer Conv / ConvTranspose / Gemm / MatMul that sit between them are evaluated exactly (the
int8 operands in float64, whose 53-bit mantissa holds every int32 accumulator, then int32), and
INT4-packed weights are unpacked first. This is what tests and ``onnxcomp verify-ascend`` run the
deploy model with: no NPU, no CANN.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from onnx.reference.ops.op_average_pool import AveragePool_19 as _AveragePool
from onnx.reference.ops.op_conv import Conv as _Conv
from onnx.reference.ops.op_conv_transpose import ConvTranspose as _ConvTranspose
from onnx.reference.ops.op_gemm import Gemm_7 as _Gemm
from onnx.reference.ops.op_matmul import numpy_matmul

from onnxcomp.errors import FormatError
from onnxcomp.ir.mapped import materialized, tensor_values
from onnxcomp.quant.ascend.packing import int4_axis, unpack_deq_scale, unpack_int4

_RANGES = {"INT8": (-128, 127), "INT4": (-8, 7), "INT16": (-32768, 32767)}
_STORAGE = {"INT8": np.int8, "INT4": np.int8, "INT16": np.int16}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class AscendQuant(OpRun):
    op_domain = ""

    def _run(self, x, scale=None, offset=None, dst_type=None, sqrt_mode=None, round_mode=None):  # noqa: ANN001, ANN202
        kind = _text(dst_type or "INT8")
        if kind not in _RANGES or _text(round_mode or "Round") != "Round" or sqrt_mode:
            raise FormatError(f"AscendQuant: dst_type {kind!r} / round_mode {round_mode!r} / sqrt_mode not supported")
        lo, hi = _RANGES[kind]
        y = np.round(np.asarray(x, np.float32) * np.float32(scale)) + np.float32(offset)  # ONNX Round: half to even
        return (np.clip(y, lo, hi).astype(_STORAGE[kind]),)


class AscendDequant(OpRun):
    op_domain = ""

    def _run(self, x, param, dtype=None, sqrt_mode=None, relu_flag=None):  # noqa: ANN001, ANN202
        if sqrt_mode:
            raise FormatError("AscendDequant: sqrt_mode is not supported")
        deq = unpack_deq_scale(param)
        x32 = np.asarray(x).astype(np.float32)  # what the NPU does: int32 -> float32, then the multiply
        shape = (1, deq.size) + (1,) * (x32.ndim - 2) if deq.size > 1 and x32.ndim > 2 else (-1,)
        y = x32 * (deq.reshape(shape) if deq.size > 1 else deq.reshape(()))
        if relu_flag:
            y = np.maximum(y, 0)
        return (y.astype(np.float16 if dtype == 1 else np.float32),)


class AscendAntiQuant(OpRun):
    op_domain = ""

    def _run(self, x, scale=None, offset=None, dst_type=None, sqrt_mode=None):  # noqa: ANN001, ANN202
        # ATC negates the offset attribute: y = (x - offset_d) * scale_d (scale not inverted)
        y = (np.asarray(x).astype(np.float32) - np.float32(offset)) * np.float32(scale)
        return (y.astype(np.float32),)


def _exact(run: Any, *args: Any, **kwargs: Any) -> tuple[np.ndarray]:
    """Integer operands through the float64 implementation, the accumulator back as int32."""
    y = run(*[None if a is None else np.asarray(a).astype(np.float64) for a in args], **kwargs)[0]
    return (np.round(y).astype(np.int32),)


def _is_int(x: Any) -> bool:
    return x is not None and np.asarray(x).dtype.kind in "iu"


class Conv(_Conv):
    op_domain = ""

    def _run(self, X, W, B=None, **kwargs):  # noqa: ANN001, ANN202, N803
        if _is_int(X):
            return _exact(super()._run, X, W, B, **kwargs)
        return super()._run(X, W, B, **kwargs)


class ConvTranspose(_ConvTranspose):
    op_domain = ""

    def _run(self, X, W, B=None, **kwargs):  # noqa: ANN001, ANN202, N803
        if _is_int(X):
            return _exact(super()._run, X, W, B, **kwargs)
        return super()._run(X, W, B, **kwargs)


class Gemm(_Gemm):
    op_domain = ""

    def _run(self, a, b, c=None, **kwargs):  # noqa: ANN001, ANN202
        if _is_int(a):
            return _exact(super()._run, a, b, c, **kwargs)
        return super()._run(a, b, c, **kwargs)


class MatMul(OpRun):
    op_domain = ""  # an OpRun of its own: onnx's MatMul rejects mixed int32/int8 operands before _run

    def _run(self, a, b):  # noqa: ANN001, ANN202
        if _is_int(a):
            return _exact(lambda x, y: (numpy_matmul(x, y),), a, b)
        return (numpy_matmul(a, b),)


class AveragePool(_AveragePool):
    op_domain = ""

    def _run(self, x, **kwargs):  # noqa: ANN001, ANN003, ANN202
        # integer codes: their mean in float32, as the fake-quant model's AveragePool computes it (UNVERIFIED)
        return super()._run(np.asarray(x).astype(np.float32) if _is_int(x) else x, **kwargs)


ASCEND_OPS: list[type[OpRun]] = [
    AscendQuant,
    AscendDequant,
    AscendAntiQuant,
    Conv,
    ConvTranspose,
    Gemm,
    MatMul,
    AveragePool,
]


class AscendOffset(OpRun):
    """x_q - offset_d as int32: what ATC's integer op reads (it folds AscendQuant's offset into offset_x)."""

    op_domain = "onnxcomp.ascend.reference"

    def _run(self, x, offset=None):  # noqa: ANN001, ANN202
        return ((np.asarray(x).astype(np.int32) - np.int32(offset)).astype(np.int32),)


def _prepared(model: onnx.ModelProto, int4_layers: set[str] | None) -> onnx.ModelProto:
    """A copy the evaluator runs: INT4-packed weights as plain int8, AscendQuant's offset made explicit.

    INT4 layers are those the record names (``wts_type: "INT4"``), or, without a record, those
    with AMCT's ``bias_quant`` Cast before the bias (a bias-free INT4 layer then needs the record).
    An integer op reads ``x_q - offset_d`` (the padding then is the real zero), which ATC gets by
    folding the AscendQuant offset into the op's ``offset_x``; the evaluator inserts that subtraction.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    producers = {o: n for n in graph.node for o in n.output}
    inits = {t.name: t for t in graph.initializer}
    shifted: dict[str, str] = {}
    for node in list(graph.node):
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul", "AveragePool") or not node.input:
            continue
        quant = producers.get(node.input[0])
        if quant is None or quant.op_type != "AscendQuant":
            continue
        offset = next((a.f for a in quant.attribute if a.name == "offset"), 0.0)
        if offset != 0 and node.input[0] not in shifted:
            name = f"{node.input[0]}.minus_offset"
            graph.node.append(
                onnx.helper.make_node(
                    "AscendOffset", [node.input[0]], [name], domain=AscendOffset.op_domain, offset=int(offset)
                )
            )
            shifted[node.input[0]] = name
        if node.input[0] in shifted:
            node.input[0] = shifted[node.input[0]]
        bias_cast = len(node.input) > 2 and (p := producers.get(node.input[2])) is not None and p.op_type == "Cast"
        int4 = node.name in int4_layers if int4_layers is not None else bias_cast
        if not int4 or len(node.input) < 2 or node.input[1] not in inits:
            continue
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        tensor = inits[node.input[1]]
        codes = unpack_int4(tensor_values(tensor), int4_axis(node.op_type, trans_b))
        tensor.CopyFrom(numpy_helper.from_array(codes, tensor.name))
    if shifted:
        copy.opset_import.append(onnx.helper.make_opsetid(AscendOffset.op_domain, 1))
        _toposort(graph)
    return copy


def _toposort(graph: onnx.GraphProto) -> None:
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise FormatError("deploy model: nodes form a cycle or read an undefined tensor")
        for n in ready:
            known.update(n.output)
        ordered += ready
        pending = [n for n in pending if all(n is not r for r in ready)]
    copies = [onnx.NodeProto() for _ in ordered]
    for c, n in zip(copies, ordered, strict=True):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def deploy_session(model: onnx.ModelProto | str, int4_layers: set[str] | None = None) -> ReferenceEvaluator:
    """A reference evaluator of a deploy model (path or proto); ``int4_layers`` from the record."""
    proto = onnx.load(model) if isinstance(model, str) else materialized(model)
    return ReferenceEvaluator(_prepared(proto, int4_layers), new_ops=[*ASCEND_OPS, AscendOffset])


def run_deploy(
    model: onnx.ModelProto | str, feeds: Mapping[str, np.ndarray], int4_layers: set[str] | None = None
) -> list[np.ndarray]:
    """Run a deploy model on ``feeds``; outputs in graph order."""
    return list(deploy_session(model, int4_layers).run(None, dict(feeds)))
