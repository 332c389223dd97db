"""decompose_matmul: W ~= A @ B for MatMul and Gemm (transA/transB/alpha/beta/C), refit, declines."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from decomp_models import FULL_RANK, PERMISSIVE, make_model, run_pass, smooth_batches
from onnx import helper, numpy_helper

from onnxcomp.analysis.macs import model_macs
from onnxcomp.testing import (
    assert_numerically_equal,
    op_counts,
    random_feeds,
    run_model,
)

PASS = "decompose_matmul"


def _w(name: str, shape: tuple[int, ...], seed: int = 0) -> Any:
    return numpy_helper.from_array((np.random.default_rng(seed).standard_normal(shape) * 0.2).astype(np.float32), name)


def matmul_model(k: int = 12, n: int = 20) -> Any:
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    return make_model([node], {"x": ["N", 5, k]}, [_w("w", (k, n))])


def gemm_model(k: int = 12, n: int = 20, trans_a: int = 0, trans_b: int = 1, bias: bool = True, opset: int = 17) -> Any:
    inits = [_w("w", (n, k) if trans_b else (k, n))]
    ins = ["x", "w"]
    if bias:
        inits.append(_w("c", (n,), seed=1))
        ins.append("c")
    node = helper.make_node("Gemm", ins, ["y"], name="fc", transA=trans_a, transB=trans_b, alpha=0.5, beta=2.0)
    return make_model([node], {"x": [k, 3] if trans_a else [3, k]}, inits, opset=opset)


CASES = {
    "matmul_3d_input": matmul_model,
    "gemm_transB_alpha_beta_C": gemm_model,
    "gemm_transA": lambda: gemm_model(trans_a=1, trans_b=0),
    "gemm_no_C": lambda: gemm_model(bias=False),
    "gemm_opset9": lambda: gemm_model(opset=9),  # C is required before opset 11
}


@pytest.mark.parametrize("case", list(CASES))
def test_full_rank_reproduces_the_product(case: str) -> None:
    model = CASES[case]()
    report, result = run_pass(model, PASS, rank_rule=FULL_RANK, **PERMISSIVE)
    assert result.stats["decomposed"] == 1, result.declined
    entry = result.data["record"]["nodes"][0]
    assert entry["rank"] == 12 and entry["factor_shapes"] == [[12, 12], [12, 20]]
    assert sum(op_counts(report.model).values()) == 2
    assert_numerically_equal(model, report.model, random_feeds(model, seed=1, batch=2), rtol=1e-4, atol=1e-5)


def test_low_rank_macs_and_names() -> None:
    model = matmul_model(k=96, n=128)
    report, result = run_pass(model, PASS, rank_rule="rank:32")
    assert [n.name for n in report.model.graph.node] == ["mm_down", "mm_up"]
    before = [m.macs for m in model_macs(model)][0]
    after = sum(m.macs for m in model_macs(report.model))
    assert (before, after) == (5 * 96 * 128, 5 * 32 * (96 + 128))
    entry = result.data["record"]["nodes"][0]
    assert (entry["macs_before"], entry["macs_after"]) == (before, after)


def test_auto_rule_uses_the_band_of_min_features() -> None:
    _, result = run_pass(matmul_model(k=256, n=320), PASS)
    detail = result.data["record"]["nodes"][0]["detail"]
    assert detail["band"] == [51, 64]  # min(K, N) = 256 >= 256 -> d = 4
    assert detail["evbmf_rank"] == 0  # a random matrix is all noise
    assert result.data["record"]["nodes"][0]["rank"] == 48  # 51 rounded to a multiple of 16


def test_refit_reduces_error_on_correlated_inputs() -> None:
    model = matmul_model(k=64, n=96)
    calib = smooth_batches((8, 5, 64), 16, seed=0)
    held_out = smooth_batches((8, 5, 64), 2, seed=7)
    plain, _ = run_pass(model, PASS, rank_rule="rank:16")
    refit, result = run_pass(model, PASS, calibration=calib, rank_rule="rank:16")
    fit = result.data["record"]["nodes"][0]["refit"]
    assert fit["rows"] == 16 * 8 * 5 and fit["error_refit"] < 0.7 * fit["error_svd"]
    ref = [run_model(model, b)[0] for b in held_out]

    def error(m: Any) -> float:
        errs = [np.linalg.norm(run_model(m, b)[0] - r) / np.linalg.norm(r) for b, r in zip(held_out, ref, strict=True)]
        return float(np.mean(errs))

    assert error(refit.model) < 0.85 * error(plain.model)


def test_declines() -> None:
    attention = helper.make_node("MatMul", ["x", "k"], ["y"], name="qk")
    dynamic = make_model([attention], {"x": ["N", 4, 64], "k": ["N", 64, 4]}, [])
    assert "'k' of MatMul 'qk' is not a constant" in run_pass(dynamic, PASS)[1].declined[0][1]
    batched = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="bmm")], {"x": [2, 4, 64]}, [_w("w", (2, 64, 64))]
    )
    assert "B operand is 3-D, not 2-D" in run_pass(batched, PASS)[1].declined[0][1]
    small = run_pass(matmul_model(k=48, n=256), PASS)[1]
    assert "min(channels) 48 < 64" in small.declined[0][1]
    no_saving = run_pass(matmul_model(k=64, n=64), PASS, rank_rule="rank:48")[1]
    assert "would not save MACs" in no_saving.declined[0][1]
