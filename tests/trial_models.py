"""Small models, data and a user evaluator shared by the worker-process / Ray trial tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

W4 = {"weights": "int4", "granularity": "channel", "activations": "none", "fuse": False, "reports": False}


def mlp(seed: int = 0) -> onnx.ModelProto:
    """Four MatMul + Relu layers; layer 2 has a few huge weights that ruin its 4-bit grid."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(4):
        w = rng.normal(0, 0.3, (32, 32)).astype(np.float32)
        if i == 2:
            w[rng.integers(0, 32, 6), rng.integers(0, 32, 6)] = 12.0
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        out = "y" if i == 3 else f"m{i}"
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [out], f"fc{i}"))
        if i < 3:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"], f"relu{i}"))
            x = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def data(n: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(0, 1, (16, 32)).astype(np.float32)} for _ in range(n)]


EVALUATOR = '''
import os
import numpy as np
import onnxruntime as ort

def accuracy(path):
    """Agreement of the candidate's argmax with a fixed labelling; records which process ran it."""
    with open(PIDS, "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    x = np.random.default_rng(5).normal(0, 1, (64, 32)).astype(np.float32)
    y = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return float(np.mean(np.argmax(y, 1) == np.arange(64) % 32)) + float(np.abs(y).mean())

def broken(path):
    raise ValueError("the test evaluator always fails")
'''


def write_evaluator(tmp_path: Path) -> Path:
    """The user's evaluator file (functions ``accuracy`` and ``broken``); it appends its process id to ``pids.txt`` beside it."""
    path = tmp_path / "my_eval.py"
    path.write_text(f"PIDS = {str(tmp_path / 'pids.txt')!r}\n" + EVALUATOR)
    return path
