"""What every ``onnxcomp`` subcommand shares: registration, the run-option group, global flags, reports.

One argument group (:func:`add_run_options`) builds the run options every front end takes
(output, ``--force``, ``--external-data``, calibration data and its bounds, ``--no-fuse``), and
:func:`run_kwargs` turns them into the keywords of :mod:`onnxcomp.api`. Renamed flags keep their
old spelling for one release (:class:`DeprecatedFlag`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from onnxcomp.analysis.compare import disk_bytes
from onnxcomp.analysis.inspect import human_bytes
from onnxcomp.analysis.verdict import measure_latency, run_verdict
from onnxcomp.errors import OnnxCompError
from onnxcomp.flags import FUSE_PIPELINE
from onnxcomp.framework import RunReport
from onnxcomp.framework.recipe import VALIDATE_MODES
from onnxcomp.model_io import load_model

Handler = Callable[[argparse.Namespace], int]
AddArgs = Callable[[argparse.ArgumentParser], None]
COMMANDS: dict[str, tuple[AddArgs, Handler, str]] = {}


def command(name: str, help_text: str, add_args: AddArgs) -> Callable[[Handler], Handler]:
    """Register the decorated handler as subcommand ``name``; ``add_args`` adds its arguments."""

    def bind(handler: Handler) -> Handler:
        COMMANDS[name] = (add_args, handler, help_text)
        return handler

    return bind


def global_flags(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """``--quiet``, ``--verbose``, ``--debug``: before the subcommand, or (``suppress``) after it."""
    default: Any = argparse.SUPPRESS if suppress else False
    parser.add_argument(
        "--quiet", "-q", action="store_true", default=default, help="no progress or report, only errors"
    )
    parser.add_argument(
        "--verbose", "-v", action="store_true", default=default, help="say why each candidate was declined"
    )
    parser.add_argument("--debug", action="store_true", default=default, help="show tracebacks and debug logs")


class DeprecatedFlag(argparse.Action):
    """An old flag spelling: warns once on stderr and stores into the new flag's destination."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str = "", **kwargs: Any) -> None:
        self.new = new
        kwargs.setdefault("help", argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(
            f"onnxcomp: warning: {option_string} is deprecated and will be removed in the next release; use {self.new}",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def add_run_options(p: argparse.ArgumentParser, calibration: str | None = None, fuse: bool = True) -> None:
    """The run options every front end shares; ``calibration`` is the help text of ``--calib`` (None: no data)."""
    group = p.add_argument_group("run options")
    group.add_argument("-o", "--output", required=True, type=Path, help="output .onnx path")
    group.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    group.add_argument("--external-data", action="store_true", help="save weights in OUTPUT.data (automatic >= 2 GB)")
    if calibration is not None:
        group.add_argument("--calib", type=Path, help=calibration)
        group.add_argument("--calib-samples", type=int, metavar="N", help="use at most N calibration samples")
        group.add_argument("--batch-size", type=int, default=16, help="calibration samples per batch (default 16)")
        group.add_argument(
            "--batch-axis",
            type=batch_axis_arg,
            action="append",
            default=[],
            metavar="NAME=AXIS",
            help="the axis along which input NAME's calibration arrays stack samples (found from the "
            "model's symbolic dims by default, e.g. 1 for an RNN state [2, B, H]); NAME=none: the input "
            "has no sample axis, its array is given once and reused for every batch (repeatable)",
        )
        group.add_argument(
            "--workers",
            type=int,
            default=1,
            metavar="N",
            help="calibrate in N local worker processes (batches split, statistics merged: the same model)",
        )
        group.add_argument(
            "--ray",
            metavar="ADDRESS",
            help="calibrate on the Ray cluster at ADDRESS (auto: the running one; pip install 'onnxcomp[distributed]')",
        )
        group.add_argument(
            "--calib-memory",
            type=float,
            metavar="GB",
            help="memory the tensors calibration exposes per batch may take; above it, calibrate in groups "
            "of tensors, one pass over the data each (default: a quarter of the machine's memory)",
        )
        group.add_argument(
            "--calib-partitions",
            type=positive_int_arg,
            default=1,
            metavar="N",
            help="run the graph in N consecutive partitions during calibration, one onnxruntime session "
            "each, so a batch's live tensors are about one partition's (the same model; default 1: all at once)",
        )
    if fuse:
        group.add_argument("--no-fuse", action="store_true", help="do not run the deployment fusions first")
    group.add_argument(
        "--validate",
        choices=VALIDATE_MODES,
        help="how the result is checked (onnx.checker, then one onnxruntime run compared with the input's "
        "outputs): locate (default; the recipe's mode for run) checks the result and, if it is broken, "
        "names the pass that broke it; each checks after every pass; end checks the result only; none "
        "writes it unchecked (faster on big models: no reference run, no session over the output)",
    )
    group.add_argument(
        "--measure",
        action="store_true",
        help="also time the input and the output on onnxruntime CPU (1 thread, interleaved, on the first "
        "calibration sample or one generated from the input shapes) and add the latency ratio to the verdict",
    )


def positive_int_arg(text: str) -> int:
    """A positive integer argument (``--calib-partitions``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def batch_axis_arg(text: str) -> tuple[str, int | None]:
    """``NAME=AXIS`` (an integer, or ``none``) of ``--batch-axis``."""
    name, sep, axis = text.rpartition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=AXIS, e.g. state=1 or sr=none")
    if axis.strip().lower() == "none":
        return name, None
    try:
        return name, int(axis)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: AXIS must be an integer or none") from None


def run_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The :mod:`onnxcomp.api` keywords of the run options a command declared."""
    out: dict[str, Any] = {"force": args.force, "progress": not args.quiet, "external_data": args.external_data or None}
    out["validate"] = args.validate
    if hasattr(args, "calib"):
        out.update(calibration=args.calib, calib_samples=args.calib_samples, batch_size=args.batch_size)
        out["batch_axis"] = dict(args.batch_axis) or None
        out.update(workers=args.workers, ray=args.ray, calib_memory=args.calib_memory)
        out["calib_partitions"] = args.calib_partitions
    if hasattr(args, "no_fuse"):
        out["fuse"] = not args.no_fuse
    return out


def print_run_report(args: argparse.Namespace, report: RunReport, output: Path | None) -> None:
    """What each pass did (declines with ``--verbose``), then the output's size."""
    if args.quiet:
        return
    for note in report.notes:
        print(f"note: {note}")
    width = max([len(s.name) for s in report.steps] + [4])
    for step in report.steps:
        flag = "changed" if step.result.modified else "no change"
        detail = step.result.summary()
        detail = "" if detail in ("no change", "modified") else f"{detail}  "  # the flag says it already
        print(f"  {step.name:<{width}}  {flag:<9}  {detail}({step.seconds:.2f}s)")
        if args.verbose:
            for node, reason in step.result.declined:
                print(f"      declined {node}: {reason}")
            for note in step.result.notes:
                print(f"      {note}")
        elif step.result.declined:
            print(f"      {len(step.result.declined)} declined (see --verbose)")
    if output is not None:
        print(f"wrote {output} ({human_bytes(output.stat().st_size)})")
        print_verdict(args, report, output)


def print_verdict(args: argparse.Namespace, report: RunReport, output: Path) -> None:
    """The run's one-line verdict (size ratio; latency ratio with ``--measure``) and its warnings on stderr."""
    latency, failed = None, ""
    if getattr(args, "measure", False):
        try:
            axes = dict(getattr(args, "batch_axis", None) or []) or None
            latency = measure_latency(
                load_model(args.model), report.model, getattr(args, "calib", None), batch_axis=axes
            )
        except OnnxCompError as exc:
            failed = f"could not time the models: {exc}"
    # the fusions only prepare quantize/sparsify/decompose; for `fuse` and `run` every pass is the command's own
    fusions = FUSE_PIPELINE if getattr(args, "command", "") in ("quantize", "sparsify", "decompose") else ()
    verdict = run_verdict(report, disk_bytes(args.model), disk_bytes(output), latency, preparatory=fusions)
    print(verdict.line, flush=True)  # before the warnings on stderr, in a terminal too
    for warning in [*verdict.warnings, *([failed] if failed else [])]:
        print(f"onnxcomp: warning: {warning}", file=sys.stderr)
