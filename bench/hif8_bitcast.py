"""Would ONNX BitCast (opset 26) bring emulated HiF8 activations under 3x fp32 on ORT CPU?

onnxcomp emits opset <= 25, so its static HiF8 subgraph (``onnxcomp/quant/hif8_subgraph.py``)
finds each value's binade with ``Log``, an affine ``HardSigmoid`` and a ``QuantizeLinear`` to a
table index. This experiment builds the same rounding with the binade read from the bits instead
(``BitCast`` to int32, an integer ``Div`` by 2^23: the biased exponent indexes the same step
table), checks both against the codec on a hard-swish-like tensor, and times one ``session.run``
of each, in CPU time (``time.thread_time``, 1 intra-op thread) per element, interleaved.

The BitCast form is a measurement only: it covers finite inputs (no NaN / Inf / saturation
handling beyond what the shared table gives) and is not emitted anywhere.

    .venv/bin/python bench/hif8_bitcast.py            # prints a markdown table
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
for entry in (str(REPO), str(REPO / "bench")):
    if entry not in sys.path:
        sys.path.insert(0, entry)

from _common import environment_line, load_average, markdown_table  # noqa: E402

from onnxcomp import ir  # noqa: E402
from onnxcomp.formats import get_format  # noqa: E402
from onnxcomp.quant.hif8_subgraph import _HIF8_ZP, _hif8_reciprocal_step_table, emit_hif8_activation  # noqa: E402

SHAPES = ([4, 64, 24, 80], [16, 96, 24, 160])  # a mid-size and the largest ppocr_rec activation
SCALE = 0.05
ROUNDS = 15


def _io(shape: list[int]) -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto]:
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, shape), helper.make_tensor_value_info(
        "y", TensorProto.FLOAT, shape
    )


def identity_model(shape: list[int]) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", *map(lambda t: [t], _io(shape)))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def emitted_model(shape: list[int]) -> onnx.ModelProto:
    """onnxcomp's static HiF8 subgraph (opset 21) on the input."""
    model = identity_model(shape)
    graph = ir.import_model(model)
    graph.nodes[0].inputs[0] = emit_hif8_activation(graph, graph.inputs[0], SCALE, "hif8")
    ir.finalize(graph)
    return ir.export_model(graph, model)


def bitcast_model(shape: list[int]) -> onnx.ModelProto:
    """The same rounding with the binade from the float's bits (opset 26)."""
    steps = _hif8_reciprocal_step_table()
    table = np.array([steps[min(max(e - 127 + _HIF8_ZP, 0), 255)] for e in range(256)], np.float32)
    s = np.float32(SCALE)
    constants = {
        "table": table,
        "inv_s": np.array(1 / s, np.float32),
        "two23": np.array(2**23, np.int32),
        "max": np.array(2.0**15, np.float32),
        "half": np.array(np.nextafter(np.float32(0.5), np.float32(0)), np.float32),
        "signs": np.array([1.0, -1.0], np.float32) * s,
        "below": np.array(-(2.0**-23), np.float32),
        "flat": np.array([-1], np.int64),
    }
    n = helper.make_node
    nodes = [
        n("Reshape", ["x", "flat"], ["xf"]),
        n("Mul", ["xf", "inv_s"], ["v"]),
        n("Abs", ["v"], ["a"]),
        n("BitCast", ["a"], ["bits"], to=TensorProto.INT32),
        n("Div", ["bits", "two23"], ["exponent"]),
        n("GatherElements", ["table", "exponent"], ["r"], axis=0),
        n("Min", ["a", "max"], ["clamped"]),
        n("Mul", ["clamped", "r"], ["steps"]),
        n("Add", ["steps", "half"], ["shifted"]),
        n("Floor", ["shifted"], ["whole"]),
        n("Div", ["whole", "r"], ["q"]),
        n("Less", ["v", "below"], ["negative"]),
        n("Cast", ["negative"], ["index"], to=TensorProto.INT32),
        n("GatherElements", ["signs", "index"], ["sign"], axis=0),
        n("Mul", ["q", "sign"], ["out"]),
        n("Shape", ["x"], ["shape"]),
        n("Reshape", ["out", "shape"], ["y"]),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in constants.items()]
    graph = helper.make_graph(nodes, "hif8_bitcast", *map(lambda t: [t], _io(shape)), initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 26)])
    model.ir_version = 13
    return model


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    load = load_average()
    rows = []
    for shape in SHAPES:
        rng = np.random.default_rng(0)
        x = rng.standard_normal(shape).astype(np.float32) * 2
        x = x * np.clip(x + 3, 0, 6) / 6  # hard-swish-like: what ppocr_rec's convs read
        want = get_format("hif8").quantize_dequantize(np.divide(x, np.float32(SCALE), dtype=np.float32)) * np.float32(
            SCALE
        )
        sessions = {
            "fp32 (Identity)": session(identity_model(shape)),
            "onnxcomp, Log binade (opset 21)": session(emitted_model(shape)),
            "BitCast binade (opset 26)": session(bitcast_model(shape)),
        }
        times: dict[str, list[float]] = {k: [] for k in sessions}
        wrong = {}
        for name, s in sessions.items():
            got = s.run(None, {"x": x})[0]
            wrong[name] = int(np.count_nonzero(got.view(np.uint32) != want.view(np.uint32)))
        for _ in range(ROUNDS):
            for name, s in sessions.items():
                start = time.thread_time()
                s.run(None, {"x": x})
                times[name].append(time.thread_time() - start)
        emitted = float(np.median(times["onnxcomp, Log binade (opset 21)"]))
        for name in sessions:
            median = float(np.median(times[name]))
            exact = "-" if name.startswith("fp32") else f"{x.size - wrong[name]} / {x.size}"
            rows.append(
                ["x".join(map(str, shape)), name, f"{median * 1e9 / x.size:.2f}", f"{median / emitted:.2f}", exact]
            )
    headers = ["tensor", "subgraph", "CPU ns / element", "x onnxcomp's", "bit-exact with the codec"]
    print(markdown_table(headers, rows, "llrrr"))
    print(f"\n{ROUNDS} interleaved rounds, medians; 1-minute load average {load}. " + environment_line(["onnxruntime"]))


if __name__ == "__main__":
    main()
