"""Sensitivity and accuracy-search trials scored in worker processes and by Ray actors (quant/trials.py).

Every parallel run is compared with the one-thread run: the same ranking and metric values
(bit-equal floats), the same search record, the same model bytes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from onnxcomp import quantize
from onnxcomp.cli.main import main
from onnxcomp.errors import OnnxCompError
from tests.trial_models import W4, data, mlp, write_evaluator


@pytest.fixture
def evaluator(tmp_path: Path) -> Path:
    return write_evaluator(tmp_path)


def _sensitivity(report: Any) -> dict[str, Any]:
    data: dict[str, Any] = report.result("quantize").data["sensitivity"]
    return data


def _same_run(a: Any, b: Any) -> None:
    """Bit-equal figures (== on floats) and identical model bytes."""
    assert json.dumps(_sensitivity(a), sort_keys=True) == json.dumps(_sensitivity(b), sort_keys=True)
    assert a.model.SerializeToString() == b.model.SerializeToString()


# --- local worker processes -----------------------------------------------------------------------


def test_sensitivity_in_worker_processes_equals_one_thread() -> None:
    model, calib = mlp(), data()
    one = quantize(model, calibration=calib, sensitivity=True, **W4)
    two = quantize(model, calibration=calib, sensitivity=True, workers=2, **W4)
    _same_run(one, two)
    rows = _sensitivity(two)["nodes"]
    assert rows[0]["node"] == "fc2" and len({r["only_quantized"] for r in rows}) == 4  # a real ranking
    assert _sensitivity(one)["trials"] == _sensitivity(two)["trials"] == 2 * 4 + 5  # counted in the driver
    assert "candidates built here, scored on 2 local worker processes" in two.result("quantize").notes
    w4a8 = {**W4, "activations": "int8"}  # static activations: calibrated in the workers too
    _same_run(
        quantize(model, calibration=calib, sensitivity=True, **w4a8),
        quantize(model, calibration=calib, sensitivity=True, workers=2, **w4a8),
    )


def test_accuracy_search_in_worker_processes_equals_one_thread() -> None:
    model, calib = mlp(), data()
    one = quantize(model, calibration=calib, accuracy_target="cos:0.999", **W4)
    two = quantize(model, calibration=calib, accuracy_target="cos:0.999", workers=2, **W4)
    a, b = (r.result("quantize").data["search"] for r in (one, two))
    assert a["met"] and a["fallback"] and json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert one.model.SerializeToString() == two.model.SerializeToString()


def test_user_evaluator_is_imported_by_path_in_the_workers(evaluator: Path, tmp_path: Path) -> None:
    model, calib = mlp(), data()
    pids = evaluator.with_name("pids.txt")
    spec = f"{evaluator}:accuracy"
    one = quantize(model, calibration=calib, sensitivity=True, evaluator=spec, **W4)
    pids.unlink()
    two = quantize(model, calibration=calib, sensitivity=True, evaluator=spec, workers=2, **W4)
    _same_run(one, two)
    assert _sensitivity(two)["metric"] == "score"
    ran = {int(line) for line in pids.read_text().split()}
    assert ran and os.getpid() not in ran  # every candidate was scored in a worker


def test_cli_sensitivity_with_processes_writes_the_same_report(tmp_path: Path) -> None:
    path, npz = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(mlp(), str(path))
    np.savez(npz, x=np.concatenate([b["x"] for b in data()]))
    base = ["sensitivity", str(path), "--calib", str(npz), "--no-fuse", "--weights", "int4", "-q"]
    base += ["--granularity", "channel", "--activations", "none"]
    assert main([*base, "-o", str(tmp_path / "one.json")]) == 0
    assert main([*base, "-o", str(tmp_path / "two.json"), "--processes", "2"]) == 0
    assert (tmp_path / "one.json").read_bytes() == (tmp_path / "two.json").read_bytes()


def test_worker_errors_are_one_line_naming_the_candidate_and_worker(evaluator: Path) -> None:
    model, calib = mlp(), data()
    with pytest.raises(OnnxCompError) as caught:
        quantize(model, calibration=calib, sensitivity=True, evaluator=f"{evaluator}:broken", workers=2, **W4)
    text = str(caught.value)
    assert "\n" not in text
    assert "sensitivity of node 'fc0' (only it quantized)" in text
    assert "the test evaluator always fails" in text and "pid" in text


def test_trial_workers_choose_threads_and_are_checked() -> None:
    model, calib = mlp(), data()
    threads = quantize(model, calibration=calib, sensitivity=True, trial_workers=2, workers=2, **W4)
    assert not any("scored on" in n for n in threads.result("quantize").notes)  # threads asked for: no pool
    _same_run(threads, quantize(model, calibration=calib, sensitivity=True, **W4))
    with pytest.raises(OnnxCompError, match="trial_workers must be a positive integer"):
        quantize(model, calibration=calib, sensitivity=True, trial_workers=0, **W4)


# --- Ray ---------------------------------------------------------------------------------------------


def test_ray_options_without_ray_say_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    hint = r"--ray needs Ray, which is not installed; install it with: pip install 'onnxcomp\[distributed\]'"
    with pytest.raises(OnnxCompError, match=hint):
        quantize(mlp(), calibration=data(), sensitivity=True, ray="auto", **W4)


def test_sensitivity_and_search_on_ray_equal_one_thread(ray_cluster: Any, evaluator: Path) -> None:
    model, calib = mlp(), data()
    one = quantize(model, calibration=calib, sensitivity=True, **W4)
    on_ray = quantize(model, calibration=calib, sensitivity=True, ray="auto", **W4)
    _same_run(one, on_ray)
    assert "scored on the Ray cluster 'auto' (one actor per CPU)" in " ".join(on_ray.result("quantize").notes)
    # static activations: the statistics are calibrated on the cluster before the trial actors take its CPUs
    w4a8 = {**W4, "activations": "int8"}
    one = quantize(model, calibration=calib, sensitivity=True, **w4a8)
    on_ray = quantize(model, calibration=calib, sensitivity=True, ray="auto", **w4a8)
    _same_run(one, on_ray)
    assert "calibration sharded over" in " ".join(on_ray.notes)
    spec = f"{evaluator}:accuracy"  # the user's evaluator, imported by path in each actor
    one = quantize(model, calibration=calib, accuracy_target="drop:0.05", evaluator=spec, **W4)
    two = quantize(model, calibration=calib, accuracy_target="drop:0.05", evaluator=spec, ray="auto", **W4)
    a, b = (r.result("quantize").data["search"] for r in (one, two))
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert one.model.SerializeToString() == two.model.SerializeToString()
    with pytest.raises(OnnxCompError, match=r"sensitivity of node 'fc0' \(only it quantized\): .*always fails"):
        quantize(model, calibration=calib, sensitivity=True, evaluator=f"{evaluator}:broken", ray="auto", **W4)
