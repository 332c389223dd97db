"""Calibration time per activation observer policy, before and after the vectorized searches.

For each model the quantize pass is run once (``observer="minmax"``, not timed) to learn which
activation tensors it calibrates, with which format; then each policy (minmax, percentile,
entropy, mse, histogram) calibrates exactly those tensors the way
the quantize pass does: one ``Calibrator`` session streaming the
same batches into the policy's observers ("stream"), then ``compute_range`` per tensor with the
tensor's ``range_qdq`` ("ranges"). "before" runs the same with the observers module of a git
revision (default HEAD, i.e. without uncommitted changes), loaded from ``git show`` into
temporary modules (``observers.py`` and the modules split out of it). Runs are interleaved
(every repeat cycles through all implementation x policy
pairs, in a rotated order) and the table shows medians; "x minmax" divides by the same
implementation's minmax median. "same ranges" compares every tensor's range bit for bit.

Usage::

    python bench/observers.py                        # ppocr_rec, minilm_l3, digits; 3 repeats
    python bench/observers.py --repeats 5 --models ppocr_rec --samples 32
    python bench/observers.py --before-rev HEAD~1    # once the change is committed
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import REPO, environment_line, markdown_table  # noqa: E402

POLICIES = ("minmax", "percentile", "entropy", "mse", "histogram")
#: The observer modules of onnxcomp/calibration, each importing only those before it (a revision
#: before they were split out of observers.py has observers.py alone).
OBSERVER_MODULES = ("histogram", "kl_search", "error_search", "observers")


def load_revision(rev: str) -> ModuleType | None:
    """The observers module as of git ``rev``, over that revision's sibling modules (None if they
    are the working copy's), each loaded from ``git show`` into a temporary module."""
    sources: dict[str, str] = {}
    for name in OBSERVER_MODULES:
        shown = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{rev}:onnxcomp/calibration/{name}.py"], capture_output=True, text=True
        )
        if shown.returncode == 0:
            sources[name] = shown.stdout
    current = {n: (REPO / f"onnxcomp/calibration/{n}.py").read_text() for n in OBSERVER_MODULES}
    if sources == current:
        return None
    directory = Path(tempfile.mkdtemp(prefix="observers_before_"))
    for name, source in sources.items():
        for sibling in sources:  # the revision's siblings, not the working copy's
            source = source.replace(
                f"from onnxcomp.calibration.{sibling} import", f"from observers_before_{sibling} import"
            )
        path = directory / f"observers_before_{name}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module  # dataclasses look their module up; siblings import it
        spec.loader.exec_module(module)
    return sys.modules["observers_before_observers"]


def model_and_data(name: str, samples: int | None) -> tuple[str, Any, str]:
    """(model path, calibration data, description)."""
    if name == "digits":
        return str(REPO / "models/digits_cnn.onnx"), str(REPO / "models/digits_calib.npz"), "digits_calib.npz (128)"
    sys.path.insert(0, str(REPO / "models"))
    from fetch import fetch, make_inputs  # type: ignore[import-not-found]

    n = samples or {"ppocr_rec": 16, "minilm_l3": 32}.get(name, 16)
    return str(fetch(name)), make_inputs(name, n=n, seed=0), f"make_inputs({name!r}, {n}, seed=0)"


def capture_calibration(model: str, data: Any) -> tuple[Any, dict[str, Any], Callable[[], Any], int | None]:
    """(float model, static tensor specs, batch factory, batch limit) of the quantize pass."""
    import onnxcomp
    import onnxcomp.passes.quantize as quantize_pass

    seen: dict[str, Any] = {}
    collect, ranges = quantize_pass.collect_many, quantize_pass.ranges_from

    def spy_collect(model, wanted, batches, max_batches=None, progress=False):  # noqa: ANN001, ANN202
        kept = list(batches)
        seen.update(float_model=model, factory=lambda: iter(kept), batch_num=max_batches)
        return collect(model, wanted, kept, max_batches, progress)

    def spy_ranges(static, observers):  # noqa: ANN001, ANN202
        seen.update(static=dict(static))
        return ranges(static, observers)

    quantize_pass.collect_many, quantize_pass.ranges_from = spy_collect, spy_ranges
    try:
        with tempfile.TemporaryDirectory() as tmp:
            onnxcomp.quantize(model, str(Path(tmp) / "q.onnx"), calibration=data, observer="minmax", reports=False)
    finally:
        quantize_pass.collect_many, quantize_pass.ranges_from = collect, ranges
    return seen["float_model"], seen["static"], seen["factory"], seen["batch_num"]


def calibrate(module: ModuleType, policy: str, captured: tuple[Any, ...]) -> tuple[float, float, dict[str, Any]]:
    """(stream seconds, ranges seconds, ranges) of one calibration with ``module``'s observers."""
    from onnxcomp.calibration.collect import Calibrator
    from onnxcomp.quant.qparams import range_qdq

    float_model, static, factory, batch_num = captured
    start = time.perf_counter()
    observers = Calibrator(float_model, dict.fromkeys(static, partial(module.make_observer, policy))).run(
        factory(), max_batches=batch_num
    )
    mid = time.perf_counter()
    ranges = {
        name: module.compute_range(
            policy, obs, range_qdq(static[name].dtype, static[name].symmetric), static[name].symmetric
        )
        for name, obs in observers.items()
    }
    return mid - start, time.perf_counter() - mid, ranges


def same_ranges(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import numpy as np

    return a.keys() == b.keys() and all(
        np.float64(a[k].lo).tobytes() == np.float64(b[k].lo).tobytes()
        and np.float64(a[k].hi).tobytes() == np.float64(b[k].hi).tobytes()
        for k in a
    )


def bench_model(name: str, impls: dict[str, ModuleType], repeats: int, samples: int | None) -> list[list[str]]:
    model, data, described = model_and_data(name, samples)
    captured = capture_calibration(model, data)
    print(f"{name}: {len(captured[1])} activation tensors, {described}", file=sys.stderr)
    pairs = [(impl, policy) for policy in POLICIES for impl in impls]
    calibrate(impls["after"], "minmax", captured)  # warm-up: ORT, numpy, page cache
    times: dict[tuple[str, str], list[tuple[float, float]]] = {p: [] for p in pairs}
    ranges: dict[tuple[str, str], dict[str, Any]] = {}
    for rep in range(repeats):
        shift = rep * 3 % len(pairs)
        for impl, policy in pairs[shift:] + pairs[:shift]:
            stream, search, ranges[impl, policy] = calibrate(impls[impl], policy, captured)
            times[impl, policy].append((stream, search))
            print(f"  {rep} {impl:6s} {policy:10s} {stream + search:7.2f} s", file=sys.stderr)

    def med(impl: str, policy: str, part: int | None = None) -> float:
        return statistics.median(sum(t) if part is None else t[part] for t in times[impl, policy])

    rows = []
    for policy in POLICIES:
        after = med("after", policy)
        row = [name, policy]
        if "before" in impls:
            before = med("before", policy)
            row += [f"{before:.2f}", f"{before / med('before', 'minmax'):.2f}"]
        row += [f"{after:.2f}", f"{after / med('after', 'minmax'):.2f}"]
        row += [f"{med('after', policy, 0):.2f}", f"{med('after', policy, 1):.3f}"]
        if "before" in impls:
            row += [f"{med('before', policy, 1):.3f}", f"{before / after:.1f}x"]
            row.append("yes" if same_ranges(ranges["before", policy], ranges["after", policy]) else "NO")
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="ppocr_rec,minilm_l3,digits")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=None, help="calibration samples (default 16 / 32 / 128)")
    parser.add_argument("--before-rev", default="HEAD", help="git revision of the 'before' observers module")
    args = parser.parse_args()

    import onnxcomp.calibration.observers as current

    impls: dict[str, ModuleType] = {"after": current}
    before = load_revision(args.before_rev)
    if before is not None:
        impls = {"before": before, "after": current}
    else:
        print(f"the observer modules are unchanged since {args.before_rev}: no 'before' column", file=sys.stderr)
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name, impls, args.repeats, args.samples)
    headers = ["model", "policy"]
    align = "ll"
    if "before" in impls:
        headers += ["before s", "before x minmax"]
        align += "rr"
    headers += ["after s", "after x minmax", "after: stream s", "after: ranges s"]
    align += "rrrr"
    if "before" in impls:
        headers += ["before: ranges s", "speed-up", "same ranges"]
        align += "rrl"
    print(markdown_table(headers, rows, align))
    print()
    print(
        f"Calibration of the quantize pass's activation tensors (default uint8 per-tensor), median of "
        f"{args.repeats} interleaved runs; 'before' = onnxcomp/calibration's observer modules at {args.before_rev}. "
        + environment_line(["numpy", "onnxruntime"])
    )


if __name__ == "__main__":
    main()
