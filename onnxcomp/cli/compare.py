"""``onnxcomp compare REFERENCE CANDIDATE --data DATA``: fidelity, per-node local error, latency, sizes."""

from __future__ import annotations

import argparse
from pathlib import Path

from onnxcomp.analysis.comparison import format_comparison
from onnxcomp.api import compare
from onnxcomp.cli.common import batch_axis_arg, command


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", type=Path, help="the original model")
    p.add_argument("candidate", type=Path, help="the rewritten (compressed) model")
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="inputs: .npz with one array per model input (a 'label' array adds accuracy), or a directory of them",
    )
    p.add_argument("--json", type=Path, metavar="OUT.json", help="also write the report as JSON")
    p.add_argument(
        "--runs", type=_positive, default=50, metavar="N", help="timed runs per model (default 50; 0: no latency)"
    )
    p.add_argument("--samples", type=int, metavar="N", help="use at most N samples of the data")
    p.add_argument("--batch-size", type=int, default=32, help="samples per inference batch (default 32)")
    p.add_argument(
        "--batch-axis",
        type=batch_axis_arg,
        action="append",
        default=[],
        metavar="NAME=AXIS",
        help="the sample axis of input NAME's arrays, as for --calib (NAME=none: given once; repeatable)",
    )
    p.add_argument(
        "--node-batches",
        type=_positive,
        default=4,
        metavar="N",
        help="batches for the per-node error (default 4; 0: outputs only)",
    )


@command(
    "compare", "compare a compressed model with the original on data: fidelity, per-node error, latency", _compare_args
)
def _compare(args: argparse.Namespace) -> int:
    report = compare(
        args.reference,
        args.candidate,
        args.data,
        runs=args.runs,
        samples=args.samples,
        batch_size=args.batch_size,
        node_batches=args.node_batches,
        batch_axis=dict(args.batch_axis) or None,
        json_output=args.json,
    )
    if args.quiet:
        return 0
    print(format_comparison(report))
    if args.json is not None:
        print(f"wrote {args.json}")
    return 0
