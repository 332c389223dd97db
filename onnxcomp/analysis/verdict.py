"""The one-line verdict a run ends with: size ratio, latency ratio (when measured), and warnings.

A compression run that makes a model larger or slower, or changes nothing, must say so: the step
table alone reads as success ("changed", exit 0) in all three cases.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import onnx

from onnxcomp.analysis.compare import comparison_data, first_batch, interleaved_latency, sample_feeds
from onnxcomp.analysis.comparison import Latency
from onnxcomp.analysis.inspect import human_bytes
from onnxcomp.calibration.layouts import BatchAxis
from onnxcomp.framework import RunReport
from onnxcomp.framework.manager import StepReport

#: Slower than the input by more than this ratio is reported (below it, timer noise on a busy machine).
SLOWER_THAN = 1.05
#: Timed runs per model for ``--measure``.
MEASURE_RUNS = 50


@dataclass
class Verdict:
    line: str
    warnings: list[str] = field(default_factory=list)


def measure_latency(
    input_model: onnx.ModelProto,
    output_model: onnx.ModelProto,
    data: Any = None,
    runs: int = MEASURE_RUNS,
    batch_axis: BatchAxis | None = None,
) -> Latency:
    """Both models timed interleaved on one sample: the first calibration sample, else one generated from the shapes."""
    feeds = (
        first_batch(comparison_data(data, input_model, 1, 1, batch_axis)[0])
        if data is not None
        else sample_feeds(input_model)
    )
    return interleaved_latency(input_model, output_model, feeds, runs=runs)


def _why_unchanged(step: StepReport) -> str:
    """The declined reasons (most frequent first) or the notes of a step that changed nothing."""
    result = step.result
    if result.declined:
        counts = Counter(reason for _, reason in result.declined)
        shown = "; ".join(f"{reason} ({n}x)" if n > 1 else reason for reason, n in counts.most_common(3))
        more = f"; {len(counts) - 3} other reasons (see --verbose)" if len(counts) > 3 else ""
        return f"it declined {len(result.declined)} candidate{'s' if len(result.declined) != 1 else ''}: {shown}{more}"
    if result.notes:
        return "; ".join(result.notes[:2])
    return "it found no node it rewrites"


def run_verdict(
    report: RunReport,
    input_bytes: int,
    output_bytes: int,
    latency: Latency | None = None,
    preparatory: Collection[str] = (),
) -> Verdict:
    """The verdict line of a run (output vs input file), and a warning per bad news.

    ``preparatory`` names the passes that only prepare the command's own (the deployment fusions
    before ``quantize``): when they changed the model but the command's passes did not, the
    run did not do what was asked, and the warning says so.
    """
    ratio = output_bytes / input_bytes if input_bytes else float("inf")
    line = f"verdict: output {ratio:.2f}x the input's size ({human_bytes(input_bytes)} -> {human_bytes(output_bytes)})"
    warnings = []
    if latency is not None:
        line += (
            f", latency {latency.ratio:.2f}x ({latency.reference_ms:.3f} ms -> {latency.candidate_ms:.3f} ms; "
            f"onnxruntime CPU, 1 thread, median of {latency.runs} interleaved runs)"
        )
        if latency.ratio > SLOWER_THAN:
            warnings.append(
                f"the output runs {latency.ratio:.2f}x slower than the input on onnxruntime CPU; "
                "`onnxcomp compare INPUT OUTPUT --data DATA` times both and shows the per-node error"
            )
    if output_bytes > input_bytes:
        warnings.append(
            f"the output is larger than the input (+{human_bytes(output_bytes - input_bytes)}, {ratio:.2f}x)"
        )
    modified = [s.name for s in report.steps if s.result.modified]
    own = [s for s in report.steps if s.name not in preparatory]
    if report.steps and not modified:
        last = own[-1] if own else report.steps[-1]
        warnings.append(f"nothing changed: no pass modified the model; {last.name}: {_why_unchanged(last)}")
    elif own and not any(s.result.modified for s in own):
        names = ", ".join(s.name for s in own)
        warnings.append(f"{names} changed nothing (only {', '.join(modified)} did); {_why_unchanged(own[-1])}")
    return Verdict(line, warnings)
