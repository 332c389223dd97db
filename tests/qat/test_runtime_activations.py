"""Activations quantized at run time (issue 17): the module's forward is the emitted subgraph, bit for bit.

Per-tensor dynamic uint8 (DynamicQuantizeLinear -> DequantizeLinear), MXFP8 (32-blocks, E8M0 scale
from the block amax, E4M3 elements) and per-token HiF8 learn nothing: the module only has to compute
exactly what onnxruntime computes on ``quantize``'s subgraph, with a straight-through gradient.
Whole-model export checks are in ``test_export_formats.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from conftest import MODELS
from onnx import TensorProto, helper

from onnxcomp import ir
from onnxcomp.runtime import ort_session

torch = pytest.importorskip("torch", reason="the train extra (torch) is not installed: pip install 'onnxcomp[train]'")

from onnxcomp.qat import prepare  # noqa: E402
from onnxcomp.qat.fakequant import DynamicTensorFakeQuant, MXFakeQuant, TokenFakeQuant  # noqa: E402
from onnxcomp.quant.activation_subgraphs import emit_hif8_activation, emit_mx_activation  # noqa: E402
from onnxcomp.quant.dynamic import emit_dynamic_fake_quant  # noqa: E402


def _ort(x: np.ndarray, emit: Callable[[ir.Graph, ir.Tensor], ir.Tensor]) -> np.ndarray:
    """onnxruntime's output of the subgraph ``emit`` writes on input ``x`` (an Identity's input rewritten)."""
    proto = helper.make_model(
        helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        ),
        opset_imports=[helper.make_opsetid("", 21)],
    )
    graph = ir.import_model(proto)
    node = graph.nodes[0]
    node.inputs[0] = emit(graph, node.inputs[0])
    return ort_session(ir.export_model(graph, proto), level="disable").run(None, {"x": x})[0]


def _activations(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Rows of very different magnitudes (tiny to huge), an all-zero row, exact zeros and negatives."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * np.exp(rng.uniform(-30, 30, shape[:-1] + (1,)))
    x = x.astype(np.float32)
    x.reshape(-1, shape[-1])[0] = 0.0
    x.reshape(-1)[5::7] = 0.0
    return x


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dynamic_per_tensor_is_dynamic_quantize_linear(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # all-positive, all-negative and mixed tensors: the range always contains 0
    x = (rng.standard_normal((8, 40)) * 3 + [0.0, 5.0, -5.0][seed]).astype(np.float32)
    ref = _ort(x, lambda g, t: emit_dynamic_fake_quant(g, t, "x"))
    got = DynamicTensorFakeQuant()(torch.from_numpy(x)).detach().numpy()
    assert np.array_equal(got, ref)
    zeros = np.zeros((2, 3), np.float32)
    assert np.array_equal(
        DynamicTensorFakeQuant()(torch.from_numpy(zeros)).numpy(),
        _ort(zeros, lambda g, t: emit_dynamic_fake_quant(g, t, "x")),
    )


@pytest.mark.parametrize(("shape", "axis"), [((6, 96), -1), ((6, 70), -1), ((6, 20), -1), ((2, 64, 3, 3), 1)])
def test_mxfp8_is_the_emitted_subgraph(shape: tuple[int, ...], axis: int) -> None:
    """Full blocks, a short last block (70 = 2 x 32 + 6), one short block (20), Conv channels (axis 1)."""
    k = shape[axis]
    moved = (*shape[:axis], *shape[axis + 1 :], k) if axis != -1 else shape
    rows = _activations((int(np.prod(moved[:-1])), k), 3)
    rows[1:3] *= 1e-3  # block amaxes on E's thresholds 1.75 * 2^j and one ulp above
    rows[1, 0], rows[2, 0] = 14.0, np.nextafter(np.float32(14.0), np.float32(20.0))
    rows[3] = 0.0
    rows[3, 0] = 1.75 * 2.0**-130  # a float32 subnormal amax: the -127 floor of X
    x = np.ascontiguousarray(np.moveaxis(rows.reshape(moved), -1, axis))
    ref = _ort(x, lambda g, t: emit_mx_activation(g, t, k, "mxfp8", "x_mx", axis, len(shape)))
    got = MXFakeQuant("mxfp8", axis)(torch.from_numpy(x)).detach().numpy()
    assert np.array_equal(got, ref)


@pytest.mark.parametrize("axis", [-1, 1])
def test_per_token_hif8_is_the_emitted_subgraph(axis: int) -> None:
    x = _activations((5, 48, 7), 4) if axis == 1 else _activations((64, 48), 4)
    ref = _ort(x, lambda g, t: emit_hif8_activation(g, t, None, "x_hif8", axis))
    got = TokenFakeQuant("hif8", axis)(torch.from_numpy(x)).detach().numpy()
    assert np.array_equal(got, ref)


@pytest.mark.parametrize(
    "flags",
    [
        {"activations": "uint8", "dynamic": True, "dynamic_granularity": "tensor"},
        {"activations": "mxfp8"},
        {"activations": "hif8", "dynamic": True},
    ],
)
def test_gradients_flow_through_run_time_activations(flags: dict[str, object]) -> None:
    """Straight-through: every weight of a node behind a run-time quantizer gets a finite, non-zero gradient."""
    module = prepare(MODELS / "digits_cnn.onnx", None, MODELS / "digits_calib.npz", weights="int8", **flags)
    assert len(module.token_quant) > 0
    x = np.load(MODELS / "digits_heldout.npz")["input"][:8]
    module({"input": x})["logits"].square().sum().backward()
    for name in ("conv1.weight", "fc1.weight", "fc1.bias", "fc2.weight"):
        grad = module.graph.weight(name).grad
        assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0, name


@pytest.mark.parametrize(
    ("flags", "tolerance"),
    [
        ({"activations": "uint8", "dynamic": True, "dynamic_granularity": "tensor"}, 1e-5),  # MatMulInteger
        ({"activations": "mxfp8"}, 0.02),  # accumulation order can move a value across an E4M3 midpoint
    ],
)
def test_transformer_with_run_time_activations(flags: dict[str, object], tolerance: float) -> None:
    """MiniLM-L3 (node names with '.' and '/'): untrained export == quantize's bytes, module == onnxruntime."""
    from onnxcomp import api
    from tests.real_models import make_inputs, real_model

    path = real_model("minilm_l3")
    calib = [make_inputs("minilm_l3", 8, 2)]
    module = prepare(path, None, calib, weights="int8", **flags)
    assert len(module.token_quant) == 18  # every MatMul with a weight
    ptq = api.quantize(path, calibration=calib, reports=False, weights="int8", **flags).model
    assert module.export_model().SerializeToString() == ptq.SerializeToString()
    feeds = make_inputs("minilm_l3", 4, 5)
    with torch.no_grad():
        got = module(feeds)
    for output, ref in zip(ptq.graph.output, ort_session(ptq, level="disable").run(None, feeds), strict=True):
        assert np.abs(got[output.name].numpy() - ref).max() <= tolerance * np.abs(ref).max(), output.name
