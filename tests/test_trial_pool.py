"""Independent tasks on worker processes and Ray actors (analysis/trial_pool.py): the Scorer shipped
once, results in order, one-line errors; distillation's independent blocks (``--teacher-input``)
learned in parallel, byte-identical to the sequential run.
"""

from __future__ import annotations

import operator
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from onnxcomp import distill, quantize
from onnxcomp.analysis.scoring import Scorer, load_evaluator
from onnxcomp.analysis.trial_pool import PoolResources, TaskError, TaskPool, run_tasks
from onnxcomp.errors import CalibrationError, ConfigError
from tests.trial_models import W4, data, mlp, write_evaluator

MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.fixture
def evaluator(tmp_path: Path) -> Path:
    return write_evaluator(tmp_path)


def test_scorer_ships_to_a_worker_without_its_reference_model(evaluator: Path) -> None:
    model, calib = mlp(), data()
    scorer = Scorer(model, calib, "cos")
    copy = pickle.loads(pickle.dumps(scorer))
    candidate = quantize(model, calibration=calib, **W4).model
    assert copy.measure(candidate.SerializeToString()) == scorer.score(candidate)
    assert copy.trials == 0 and scorer.trials == 1  # only the driver counts
    fn = pickle.loads(pickle.dumps(load_evaluator(f"{evaluator}:accuracy")))  # re-imported by its absolute path
    assert fn.path == evaluator.resolve()


def _square(offset: int, item: int) -> int:
    if item == 3:
        raise ValueError("three is not allowed")
    return item * item + offset


def test_task_pool_keeps_order_and_names_the_failing_item() -> None:
    items = [(f"item {i}", i) for i in (5, 1, 4, 2)]
    resources = PoolResources(processes=2)
    assert (
        run_tasks(_square, 10, items, resources) == run_tasks(_square, 10, items, PoolResources()) == [35, 11, 26, 14]
    )
    with pytest.raises(TaskError, match=r"^item 3: three is not allowed \(worker .* pid \d+\)$"):
        run_tasks(_square, 0, [("item 1", 1), ("item 3", 3)], resources)
    with TaskPool(_square, 1, resources) as pool:  # one pool, two maps: the state shipped once
        assert list(pool.map([("a", 2)])) == [5] and list(pool.map([("b", 4)])) == [17]
    with pytest.raises(ConfigError, match="positive integer"):
        PoolResources(processes=0)
    with pytest.raises(ConfigError, match="ray must be a cluster address"):
        PoolResources(ray=" ")


# --- distillation of independent blocks -------------------------------------------------------------


def _demo_distill(**extra: Any) -> Any:
    calib = {"input": np.load(MODELS / "digits_calib.npz")["input"][:48]}
    kw = {"weights": "int4", "activations": "int8", "placement": "all", "calibration": calib}
    kw.update({"iters": 20, "batch_rows": 256, "reports": False, "learn_ranges": True, **extra})
    return distill(MODELS / "digits_cnn.onnx", **kw)


def test_teacher_input_blocks_in_worker_processes_are_byte_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxcomp.quant.distill import driver

    sequential = _demo_distill(teacher_input=True)

    def not_here(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a block was learned in the driver")

    monkeypatch.setattr(driver, "_learn", not_here)
    parallel = _demo_distill(teacher_input=True, workers=2)
    assert parallel.model.SerializeToString() == sequential.model.SerializeToString()
    record = parallel.result("distill").data["record"]
    assert sum(e.get("distill", {}).get("kept") == "distilled" for e in record) >= 5
    assert any("input_range" in e.get("distill", {}) for e in record)  # learned ranges go through workers too
    assert "distill: 6 independent blocks (--teacher-input) learned on 2 local worker processes" in parallel.notes


def test_student_input_blocks_stay_sequential_and_say_why() -> None:
    report = _demo_distill(workers=2, iters=5)
    assert any("blocks learned one after another" in n and "student's input" in n for n in report.notes)


# --- Ray ---------------------------------------------------------------------------------------------


def test_ray_without_ray_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    hint = r"--ray needs Ray, which is not installed; install it with: pip install 'onnxcomp\[distributed\]'"
    with pytest.raises(CalibrationError, match=hint), TaskPool(_square, 0, PoolResources(ray="auto")):
        pass


def test_task_pool_on_ray_keeps_order_and_names_the_failing_item(ray_cluster: Any) -> None:
    # a Ray worker imports the task by name: a function of an installed module (not of this test file)
    items = [("item 1", 1), ("item 4", 4), ("item 3", 3), ("item 8", 8)]
    assert run_tasks(operator.truediv, 12, items, PoolResources(ray="auto")) == [12.0, 3.0, 4.0, 1.5]
    with pytest.raises(TaskError, match=r"^item 0: division by zero \(worker .* pid \d+\)$"):
        run_tasks(operator.truediv, 1, [("item 2", 2), ("item 0", 0)], PoolResources(ray="auto", processes=2))


def test_teacher_input_blocks_on_ray_are_byte_identical(ray_cluster: Any) -> None:
    sequential = _demo_distill(teacher_input=True, iters=10)
    on_ray = _demo_distill(teacher_input=True, iters=10, ray="auto")
    assert on_ray.model.SerializeToString() == sequential.model.SerializeToString()
    assert any("independent blocks (--teacher-input) learned on the Ray cluster" in n for n in on_ray.notes)
