"""The ONNX -> torch interpreter computes what onnxruntime computes (float mode, within 1e-4)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import MODELS
from onnx import TensorProto, helper

from onnxcomp.runtime import ort_session
from tests.real_models import make_inputs, real_model

torch = pytest.importorskip("torch", reason="the train extra (torch) is not installed: pip install 'onnxcomp[train]'")

from onnxcomp.errors import ModelLoadError  # noqa: E402
from onnxcomp.qat.interpreter import GraphModule  # noqa: E402


def _max_error(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
    """Worst output error relative to max(1, |output|), against onnxruntime running the graph as
    written (no fused kernels) on one thread, with torch on one thread: the sums run in a fixed
    order on both sides, so the figure does not change with the machine's load."""
    module = GraphModule(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            got = module(feeds)
    finally:
        torch.set_num_threads(threads)
    ref = ort_session(model, level="disable", threads=1).run(module.output_names, feeds)
    worst = 0.0
    for name, r in zip(module.output_names, ref, strict=True):
        y = got[name].numpy()
        assert y.shape == r.shape and y.dtype == r.dtype, name
        scale = max(1.0, float(np.abs(r).max())) if r.dtype.kind == "f" else 1.0
        worst = max(worst, float(np.abs(y.astype(np.float64) - r).max()) / scale)
    return worst


def test_demo_equals_onnxruntime() -> None:
    x = np.load(MODELS / "digits_heldout.npz")["input"][:32]
    assert _max_error(onnx.load(MODELS / "digits_cnn.onnx"), {"input": x}) < 1e-4


@pytest.mark.parametrize("name", ["ppocr_cls", "minilm_l3"])
def test_real_models_equal_onnxruntime(name: str) -> None:
    model = onnx.load(real_model(name))
    assert _max_error(model, make_inputs(name, 2, 0)) < 1e-4


def _single(op: str, shapes: list[list[int]], **attrs: object) -> onnx.ModelProto:
    names = [f"x{i}" for i in range(len(shapes))]
    node = helper.make_node(op, names, ["y"], name="n", **attrs)
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in zip(names, shapes, strict=True)]
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    ("op", "shapes", "attrs"),
    [
        ("Conv", [[2, 4, 9, 7], [6, 2, 3, 2]], {"pads": [0, 1, 2, 1], "strides": [2, 1], "group": 2}),
        ("Conv", [[1, 3, 8, 8], [4, 3, 3, 3]], {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
        ("MaxPool", [[2, 3, 7, 7]], {"kernel_shape": [3, 3], "pads": [0, 0, 1, 1], "strides": [2, 2]}),
        ("AveragePool", [[2, 3, 8, 8]], {"kernel_shape": [2, 2], "strides": [2, 2]}),
        ("HardSigmoid", [[3, 5]], {"alpha": 0.3, "beta": 0.4}),
        ("HardSwish", [[3, 5]], {}),
        ("Softmax", [[2, 3, 4]], {"axis": 1}),
        ("Gemm", [[3, 4], [5, 4], [5]], {"transB": 1, "alpha": 0.5, "beta": 2.0}),
        (
            "ConvTranspose",
            [[1, 4, 5, 5], [4, 3, 3, 3]],
            {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]},
        ),
    ],
)
def test_single_ops_equal_onnxruntime(op: str, shapes: list[list[int]], attrs: dict[str, object]) -> None:
    rng = np.random.default_rng(0)
    feeds = {f"x{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
    assert _max_error(_single(op, shapes, **attrs), feeds) < 1e-5


def test_unsupported_op_is_one_line_listing_them() -> None:
    model = _single("Det", [[2, 3, 3]])
    with pytest.raises(ModelLoadError, match=r"does not implement: Det \(") as info:
        GraphModule(model)
    assert "\n" not in str(info.value)
