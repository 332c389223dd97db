"""prune_channels on synthetic graphs: every coupling case prunes consistently or declines.

The channels chosen for removal are dead (all-zero weights and bias in every coupled source, BN
mapping 0 to 0), so a correct rewrite leaves the outputs unchanged; the pass manager validates each
result (onnx.checker + onnxruntime).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from sparse_models import Net, assert_same_outputs, declined, feeds, prune, weight

DEAD = [1, 4]  # of 8 channels: ratio 0.25 removes exactly these


def _assert_pruned(model: onnx.ModelProto, out: onnx.ModelProto, changes: dict[str, tuple[int, int, int]]) -> None:
    """``changes``: node -> (weight axis, before, after)."""
    for node, (axis, before, after) in changes.items():
        assert weight(model, node).shape[axis] == before, node
        assert weight(out, node).shape[axis] == after, node
    assert_same_outputs(model, out)


def test_conv_bn_relu_pool_conv_chain() -> None:
    net = Net()
    h = net.op("Relu", [net.bn(net.conv("x", 4, 8, "conv1", zero=DEAD, bias=False), 8, "bn1", zero=DEAD)])
    h = net.conv(net.op("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2]), 8, 6, "conv2")
    model = net.build([h])
    out, result = prune(model, ratio=0.25)
    _assert_pruned(model, out, {"conv1": (0, 8, 6), "conv2": (1, 8, 6), "bn1": (0, 8, 6)})
    assert result.stats == {"groups": 1, "layers": 1, "channels_before": 8, "channels_after": 6, "refit": 0}
    assert "graph output" in declined(result, "conv2")
    entry = result.data["layers"][0]
    summary = (entry["node"], entry["channels_before"], entry["channels_after"], entry["kind"])
    assert summary == ("conv1", 8, 6, "channels")


@pytest.mark.parametrize(
    "reshape", [None, [0, -1], [-1, 72], [0, 72]], ids=["flatten", "reshape0-1", "reshape-1K", "reshape0K"]
)
def test_flatten_to_gemm_expands_channels(reshape: list[int] | None) -> None:
    net = Net(shape=("N", 4, 3, 3) if reshape != [-1, 72] else (2, 4, 3, 3))
    h = net.op("Relu", [net.conv("x", 4, 8, "conv1", zero=DEAD)])
    h = net.op("Flatten", [h]) if reshape is None else net.op("Reshape", [h, net.const(reshape, dtype=np.int64)])
    model = net.build([net.gemm(h, 72, 5, "fc")])
    out, _ = prune(model, ratio=0.25)
    _assert_pruned(model, out, {"conv1": (0, 8, 6), "fc": (1, 72, 54)})
    kept = [c for c in range(8) if c not in DEAD]
    np.testing.assert_array_equal(weight(out, "fc"), weight(model, "fc").reshape(5, 8, 9)[:, kept].reshape(5, 54))


def test_residual_add_prunes_both_branches_in_lock_step() -> None:
    net = Net()
    a = net.conv(net.op("Relu", [net.conv("x", 4, 6, "stem")]), 6, 8, "branch_a", zero=DEAD)
    b = net.conv("x", 4, 8, "branch_b", k=1, zero=DEAD)
    s = net.op("Relu", [net.op("Add", [a, b])])
    s2 = net.op("Add", [s, net.conv(s, 8, 8, "inner", zero=DEAD)])  # a second residual on the same stream
    model = net.build([net.conv(s2, 8, 3, "head")])
    out, result = prune(model, ratio=0.25, skip=["stem"])
    _assert_pruned(model, out, {"branch_a": (0, 8, 6), "branch_b": (0, 8, 6), "inner": (0, 8, 6), "head": (1, 8, 6)})
    assert weight(out, "inner").shape == (6, 6, 3, 3)  # a sink and a source of the same group
    coupled = next(e for e in result.data["layers"] if e["node"] == "branch_a")["coupled"]
    assert sorted(coupled) == ["branch_b", "inner"]
    assert weight(out, "stem").shape[0] == 6 and "skipped ('stem' matches 'stem')" in declined(result, "stem")
    assert prune(model, ratio=0.25)[0].graph.initializer[0].dims[0] == 4  # stem alone: 6 -> 4


def test_residual_with_the_graph_input_is_declined() -> None:
    net = Net(shape=("N", 8, 6, 6))
    s = net.op("Add", ["x", net.conv("x", 8, 8, "conv1", zero=DEAD)])
    model = net.build([net.conv(s, 8, 3, "head")])
    out, result = prune(model, ratio=0.25)
    assert "graph input 'x'" in declined(result, "conv1") and not result.modified
    assert weight(out, "conv1").shape == (8, 8, 3, 3)


def test_se_block_couples_the_excitation_with_the_trunk() -> None:
    net = Net()
    t = net.op("Relu", [net.conv("x", 4, 8, "trunk", zero=DEAD)])
    e = net.op("Relu", [net.conv(net.op("GlobalAveragePool", [t]), 8, 4, "squeeze", k=1)])
    e = net.op("Sigmoid", [net.conv(e, 4, 8, "excite", k=1, zero=DEAD)])
    model = net.build([net.conv(net.op("Mul", [t, e]), 8, 3, "proj", k=1)])
    out, result = prune(model, ratio=0.25, skip=["squeeze"])
    _assert_pruned(model, out, {"trunk": (0, 8, 6), "excite": (0, 8, 6), "squeeze": (1, 8, 6), "proj": (1, 8, 6)})
    assert "skipped" in declined(result, "squeeze")


def test_depthwise_is_pruned_in_lock_step() -> None:
    net = Net()
    h = net.op("Relu", [net.conv("x", 4, 8, "expand", k=1, zero=DEAD)])
    h = net.op("Relu", [net.conv(h, 8, 8, "dw", group=8, zero=DEAD)])  # dead: dw bias 0 on the dead channels
    model = net.build([net.conv(h, 8, 4, "project", k=1)])
    out, _ = prune(model, ratio=0.25)
    _assert_pruned(model, out, {"expand": (0, 8, 6), "dw": (0, 8, 6), "project": (1, 8, 6)})
    assert next(n for n in out.graph.node if n.name == "dw").attribute[0].i == 6  # group


def test_channel_constants_are_sliced() -> None:
    net = Net()
    c = net.conv("x", 4, 8, "conv1", zero=DEAD, bias=False)
    scale = np.random.default_rng(3).uniform(0.5, 2.0, (1, 8, 1, 1))
    h = net.op("Add", [net.op("Mul", [c, net.const(scale)]), net.const(np.zeros((8, 1, 1)))])
    h = net.op("Clip", [h, net.const(0.0), net.const(6.0)])
    h = net.op("PRelu", [h, net.const(np.full((8, 1, 1), 0.1))])
    model = net.build([net.conv(net.op("Pad", [h, net.const([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64)]), 8, 2, "out")])
    out, _ = prune(model, ratio=0.25)
    _assert_pruned(model, out, {"conv1": (0, 8, 6), "out": (1, 8, 6)})


def test_matmul_chain_with_bias_add() -> None:
    net = Net(shape=("N", 5, 8))
    bias = np.where(np.isin(np.arange(8), DEAD), 0.0, 0.3)
    h = net.op("Add", [net.matmul("x", 8, 8, "mm1", zero=DEAD), net.const(bias)])
    h = net.op("Relu", [h])
    model = net.build([net.matmul(h, 8, 4, "mm2")])
    out, _ = prune(model, ratio=0.25)
    _assert_pruned(model, out, {"mm1": (1, 8, 6), "mm2": (0, 8, 6)})


def test_gemm_chain_transposed_and_not() -> None:
    net = Net(shape=("N", 6))
    h = net.op("Relu", [net.gemm("x", 6, 8, "fc1", zero=DEAD, trans_b=0)])
    model = net.build([net.gemm(h, 8, 3, "fc2", trans_b=1)], {"x": ["N", 6]})
    out, _ = prune(model, ratio=0.25)
    _assert_pruned(model, out, {"fc1": (1, 8, 6), "fc2": (1, 8, 6)})


def test_concat_on_another_axis_couples_its_inputs() -> None:
    net = Net()
    a = net.conv("x", 4, 8, "a", zero=DEAD)
    b = net.conv("x", 4, 8, "b", zero=DEAD)
    model = net.build([net.conv(net.op("Concat", [a, b], axis=2), 8, 2, "out")])
    out, result = prune(model, ratio=0.25)
    _assert_pruned(model, out, {"a": (0, 8, 6), "b": (0, 8, 6), "out": (1, 8, 6)})
    assert result.stats["groups"] == 1 and result.stats["layers"] == 2


DECLINES = {
    "concat_channels": ("Concat", "acts on the channel axis"),
    "grouped_conv": ("grouped Conv", "not depthwise"),
    "depthwise_multiplier": ("depthwise", "channel multiplier 2"),
    "reshape_split": ("Reshape", "not a flatten"),
    "reshape_runtime": ("Reshape", "computed at run time"),
    "graph_output": ("graph output", "'r'"),
    "transpose_matmul_weight": ("MatMul", "other than its data input"),
    "conv_transpose": ("ConvTranspose", "cannot follow"),
    "softmax": ("Softmax", "cannot follow"),
}


def _declined_model(case: str) -> onnx.ModelProto:
    net = Net()
    c = net.op("Relu", [net.conv("x", 4, 8, "c1", zero=DEAD)], name="r")
    if case == "graph_output":
        return net.build([c, net.conv(c, 8, 2, "out")])
    if case == "concat_channels":
        y = net.op("Concat", [c, net.conv("x", 4, 8, "c2")], axis=1)
    elif case == "grouped_conv":
        y = net.conv(c, 8, 8, "g", group=2)
    elif case == "depthwise_multiplier":
        y = net.conv(c, 8, 16, "dw", group=8)
    elif case == "reshape_split":
        y = net.op("Reshape", [c, net.const([0, 2, 4, 36], dtype=np.int64)])
    elif case == "reshape_runtime":
        shape = net.op("Concat", [net.op("Shape", ["x"], start=0, end=1), net.const([-1], dtype=np.int64)], axis=0)
        y = net.op("Reshape", [c, shape])
    elif case == "transpose_matmul_weight":
        y = net.op("MatMul", [c, c])
    elif case == "conv_transpose":
        y = net.op("ConvTranspose", [c, net.const(np.ones((8, 2, 2, 2)))], strides=[2, 2])
    else:
        y = net.op("Softmax", [c], axis=1)
    return net.build([y])


@pytest.mark.parametrize("case", list(DECLINES))
def test_declines_where_it_must(case: str) -> None:
    model = _declined_model(case)
    out, result = prune(model, ratio=0.25)
    first, second = DECLINES[case]
    reason = declined(result, "c1")
    assert first in reason and second in reason, reason
    assert weight(out, "c1").shape == (8, 4, 3, 3)
    assert_same_outputs(model, out)


def test_a_broadcast_operand_is_not_coupled() -> None:
    net = Net()
    h = net.op("Mul", [net.conv("x", 4, 8, "c1", zero=DEAD), net.conv("x", 4, 1, "gate", k=1)])  # [N,1,H,W] gate
    model = net.build([net.conv(h, 8, 2, "out")])
    out, result = prune(model, ratio=0.25)
    _assert_pruned(model, out, {"c1": (0, 8, 6), "out": (1, 8, 6), "gate": (0, 1, 1)})
    assert "has 8 entries on axis 1, expected 1" in declined(result, "gate")


def test_consumer_with_a_non_constant_bias_is_pruned_and_refit_declined() -> None:
    """A Conv consumer whose bias is computed (not a constant) has no matrix form for the refit: no crash."""
    net = Net()
    h = net.op("Relu", [net.conv("x", 4, 8, "conv1", zero=DEAD)])
    w = net.const(net.rng.standard_normal((6, 8, 3, 3)) * 0.4, "conv2.w")
    b = net.op("Add", [net.const(np.ones(6)), net.const(np.full(6, 0.5))])
    h = net.op("Conv", [h, w, b], name="conv2", pads=[1, 1, 1, 1])
    model = net.build([h])
    for calibration in (None, [feeds(model, seed=s) for s in range(3)]):
        out, result = prune(model, calibration, ratio=0.25)
        assert weight(out, "conv1").shape[0] == 6 and weight(out, "conv2").shape[1] == 6
        assert_same_outputs(model, out)  # the pruned channels were dead: same outputs
        if calibration is not None:
            assert "the bias of Conv 'conv2' is not constant" in str(result.declined + result.notes), result
