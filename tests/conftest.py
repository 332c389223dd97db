"""Shared fixtures: small seeded models built with onnx.helper."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"


def conv_bn_model(opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(8,3x3) -> BN -> Relu -> Identity -> GlobalAveragePool -> Flatten -> Gemm(4)."""
    rng = np.random.default_rng(seed)

    def init(name: str, arr: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(arr.astype(np.float32), name)

    inits = [
        init("w", rng.standard_normal((8, 3, 3, 3)) * 0.3),
        init("b", rng.standard_normal(8) * 0.1),
        init("gamma", rng.uniform(0.5, 1.5, 8)),
        init("beta", rng.standard_normal(8) * 0.1),
        init("mean", rng.standard_normal(8) * 0.1),
        init("var", rng.uniform(0.5, 1.5, 8)),
        init("fc_w", rng.standard_normal((4, 8)) * 0.3),
        init("fc_b", rng.standard_normal(4) * 0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["n"], name="bn", epsilon=1e-5),
        helper.make_node("Relu", ["n"], ["r"], name="relu"),
        helper.make_node("Identity", ["r"], ["i"], name="ident"),
        helper.make_node("GlobalAveragePool", ["i"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture
def conv_bn() -> onnx.ModelProto:
    return conv_bn_model()


@pytest.fixture
def conv_bn_path(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(conv_bn_model(), str(path))
    return path


@pytest.fixture(scope="session")
def fused_real_model(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """``get(name) -> (source, fused)``: real model ``name`` (see tests/real_models.py; skips
    when offline) and its ``onnxcomp -q fuse SOURCE -o FUSED`` output, fused once per session
    and shared by the tests that need a fused real model (fuse, sparsify, ...)."""
    from real_models import real_model

    from onnxcomp.cli.main import main

    done: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in done:
            src = real_model(name)
            out = tmp_path_factory.mktemp(f"fused_{name}") / "fused.onnx"
            assert main(["-q", "fuse", str(src), "-o", str(out)]) == 0
            done[name] = (src, out)
        return done[name]

    return get


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    """A local Ray cluster for the module's tests (what `--ray auto` then joins); skipped without Ray."""
    ray = pytest.importorskip("ray", reason="Ray is the optional extra onnxcomp[distributed] (make test installs it)")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
