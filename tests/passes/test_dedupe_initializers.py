"""dedupe_initializers: identical initializers merged, readers rewired, bytes saved reported."""

from __future__ import annotations

import numpy as np
from fusion_models import check_pass, init, model
from onnx import helper

PASS = "dedupe_initializers"


def _adds(values: dict[str, np.ndarray], shape: tuple[int, ...] = (2, 3)):
    """Chain ``x + constant`` over ``values`` in order."""
    nodes, src = [], "x"
    for i, name in enumerate(values):
        out = "y" if i == len(values) - 1 else f"t{i}"
        nodes.append(helper.make_node("Add", [src, name], [out], name=f"add_{name}"))
        src = out
    inits = [init(n, v, v.dtype) for n, v in values.items()]
    return model(nodes, {"x": list(shape)}, {"y": list(shape)}, inits)


def test_identical_initializers_merge() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    m, result = check_pass(_adds({"b_copy": a.copy(), "a_first": a, "c_other": a + 1}), PASS)
    assert sorted(t.name for t in m.graph.initializer) == ["a_first", "c_other"]
    assert result.stats == {"merged": 1, "bytes_saved": 24}
    assert result.data["bytes_saved"] == 24
    assert [n.input[1] for n in m.graph.node] == ["a_first", "a_first", "c_other"]


def test_three_copies_and_two_groups() -> None:
    a, b = np.ones((3,), np.float32), np.full((2, 3), 2.0, np.float32)
    m, result = check_pass(_adds({"a1": a, "a2": a, "a3": a, "b1": b, "b2": b}), PASS)
    assert sorted(t.name for t in m.graph.initializer) == ["a1", "b1"]
    assert result.stats == {"merged": 3, "bytes_saved": 2 * 12 + 24}


def test_near_duplicates_are_kept() -> None:
    zero = np.zeros((2, 3), np.float32)  # -0.0 has other bytes; (1, 3) has another shape
    m, result = check_pass(_adds({"z": zero, "neg_zero": -zero, "row": zero[:1]}), PASS, modified=False)
    assert len(m.graph.initializer) == 3
    assert result.stats["merged"] == 0


def test_large_weights_differing_outside_the_sample_are_kept() -> None:
    """Above 1 MiB weights are told apart by a sample of their bytes, then compared in full: a
    weight differing in one unsampled byte is kept, and its own copy still merges with it."""
    shape = (512, 1024)  # 2 MiB: sampled every 32 bytes beyond the first and last 64 KiB
    a = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    odd = a.copy()
    odd.reshape(-1)[262145] += 1.0  # byte offset 1048580: not in the sample
    values = {"a": a, "a_copy": a.copy(), "odd": odd, "odd_copy": odd.copy()}
    m, result = check_pass(_adds(values, shape), PASS)
    assert sorted(t.name for t in m.graph.initializer) == ["a", "odd"]
    assert result.stats == {"merged": 2, "bytes_saved": 2 * a.nbytes}
    assert [n.input[1] for n in m.graph.node] == ["a", "a", "odd", "odd"]


def test_min_bytes() -> None:
    a = np.ones((2, 3), np.float32)
    _, result = check_pass(_adds({"a": a, "b": a}), PASS, modified=False, min_bytes=25)
    assert result.stats["merged"] == 0
    _, result = check_pass(_adds({"a": a, "b": a}), PASS, min_bytes=24)
    assert result.stats["merged"] == 1


def test_graph_output_initializer_untouched() -> None:
    a = np.ones((2, 3), np.float32)
    src = _adds({"a": a, "b": a})
    src.graph.output.append(helper.make_tensor_value_info("b", 1, [2, 3]))
    m, result = check_pass(src, PASS, modified=False)
    assert {t.name for t in m.graph.initializer} == {"a", "b"}
    assert result.stats["merged"] == 0
