"""ir.infer_shapes: fills unknown shapes/dtypes from onnx shape inference, never overwrites."""

from __future__ import annotations

import numpy as np
from fusion_models import model, randn, rng
from onnx import helper

from onnxcomp import ir


def _graph() -> ir.Graph:
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("MatMul", ["r", "W"], ["y"])]
    return ir.import_model(model(nodes, {"x": [3, 4]}, {"y": [3, 5]}, [randn(rng(0), "W", [4, 5])]))


def test_fills_unknown_shapes() -> None:
    graph = _graph()
    r = graph.tensors()["r"]
    assert r.shape is None and r.dtype is None
    ir.infer_shapes(graph)
    assert list(r.shape) == [3, 4]
    assert np.dtype(r.dtype) == np.float32
    assert [n.op for n in graph.nodes] == ["Relu", "MatMul"]


def test_keeps_known_information_and_tolerates_dead_nodes() -> None:
    graph = _graph()
    y = graph.tensors()["y"]
    y.shape = ["m", 5]
    dead = ir.Node(op="Relu", name="dead")  # a disconnected node, as passes leave before finalize
    graph.nodes.append(dead)
    ir.infer_shapes(graph)
    assert y.shape == ["m", 5]
    assert dead in graph.nodes
    assert list(graph.tensors()["r"].shape) == [3, 4]
