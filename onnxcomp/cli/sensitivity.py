"""``onnxcomp sensitivity``: per-node sensitivity of a quantization, ranked, with an optional plot."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from onnxcomp.analysis.plots import plot_sensitivity
from onnxcomp.api import quantize
from onnxcomp.cli.common import command
from onnxcomp.cli.quantize import add_quantize_flags, add_scoring_flags, quantize_flag_kwargs
from onnxcomp.errors import OnnxCompError
from onnxcomp.model_io import write_text_atomic


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True, help="the report (JSON)")
    p.add_argument("--plot", type=Path, metavar="PNG", help="also draw the per-node bars and the greedy curve")
    p.add_argument("--force", action="store_true", help="overwrite the report / plot if they exist")
    p.add_argument("--calib", type=Path, help="calibration data (.npz named by model input, or a directory)")
    p.add_argument("--calib-samples", type=int, metavar="N", help="use at most N calibration samples")
    p.add_argument("--batch-size", type=int, default=16, help="calibration samples per batch (default 16)")
    p.add_argument("--no-fuse", action="store_true", help="do not run the deployment fusions first")
    p.add_argument(
        "--workers", type=int, default=1, metavar="N", help="build and score N candidates at a time (threads)"
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="calibrate in N local worker processes, and build candidates here and score them there (the "
        "workers receive the evaluation data once; the same figures as one thread)",
    )
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="calibrate and score candidates on the Ray cluster at ADDRESS (auto: the running one), one actor "
        "per CPU or --processes N actors; pip install 'onnxcomp[distributed]'",
    )
    add_scoring_flags(p.add_argument_group("scoring"))
    add_quantize_flags(p)


def format_table(data: dict, limit: int = 20) -> str:
    rows = data["nodes"]
    width = max([len(r["node"]) for r in rows] + [4])
    lines = [
        f"sensitivity ({data['metric']}; {data['trials']} candidate models), most sensitive first:",
        f"  {'node':<{width}}  {'op':<8} {'only quantized':>14} {'only float':>11} {'MACs':>12} {'weight B':>10}",
    ]
    for r in rows[:limit]:
        macs = f"{r['macs']:,}" if r["macs"] is not None else "?"
        only_float = f"{r['only_float']:.6f}" if "only_float" in r else "-"
        lines.append(
            f"  {r['node']:<{width}}  {r['op']:<8} {r['only_quantized']:>14.6f} {only_float:>11} {macs:>12} "
            f"{r['weight_bytes']:>10,}"
        )
    if len(rows) > limit:
        lines.append(f"  ... {len(rows) - limit} more in the report")
    return "\n".join(lines)


@command("sensitivity", "rank the quantizable nodes by how much quantizing each one costs", _args)
def _sensitivity(args: argparse.Namespace) -> int:
    for path in (args.output, args.plot):
        if path is not None and path.exists() and not args.force:
            raise OnnxCompError(f"{path}: already exists; choose another path or pass --force")
    report = quantize(
        args.model,
        None,
        calibration=args.calib,
        calib_samples=args.calib_samples,
        batch_size=args.batch_size,
        fuse=not args.no_fuse,
        progress=not args.quiet,
        evaluator=args.evaluator,
        eval_data=args.eval_data,
        sensitivity=True,
        trial_workers=args.workers,
        workers=args.processes,
        ray=args.ray,
        **{**quantize_flag_kwargs(args), "reports": False},
    )
    data = report.result("quantize").data["sensitivity"]
    write_text_atomic(args.output, json.dumps(data, indent=1, sort_keys=True) + "\n")
    if not args.quiet:
        print(format_table(data))
        print(f"wrote {args.output}")
    if args.plot is not None:
        plot_sensitivity(data["nodes"], data["curve"], args.plot, data["metric"])
        if not args.quiet:
            print(f"wrote {args.plot}")
    return 0
