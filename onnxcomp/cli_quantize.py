"""``onnxcomp quantize``: post-training quantization from the command line.

The flags build the same options as a ``quantize`` pass in a recipe (``--config`` reads those
options from a TOML file; flags override its global defaults).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from onnxcomp.cli import _add_output, command, print_run_report


@command("quantize", "post-training quantization (calibrated static or dynamic activations)")
def _quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path)
    _add_output(p)
    p.add_argument("--calib", type=Path, help="calibration data: .npz named by model input, or a directory")
    p.add_argument("--config", type=Path, help="TOML with the quantize pass options (weights, activations, op_types, nodes, skip)")
    p.add_argument("--weights", help="weight format (int8, int4, fp8_e4m3, ...) or none")
    p.add_argument("--activations", help="activation format (int8, fp8_e4m3, ...) or none (weight-only)")
    p.add_argument("--granularity", help="weight granularity: tensor, channel or group:N")
    p.add_argument("--dynamic", action="store_true", help="per-token activations computed at run time (no calibration)")
    p.add_argument("--observer", help="activation range: minmax, percentile, entropy, mse, histogram")
    p.add_argument("--weight-observer", help="weight range: minmax or mse (clipping search)")
    p.add_argument("--symmetric-activations", action="store_true", help="symmetric activation ranges (int formats)")
    p.add_argument("--skip", action="append", default=[], metavar="GLOB", help="leave nodes matching GLOB in float")
    p.add_argument("--calib-samples", type=int, help="use at most N calibration samples")
    p.add_argument("--batch-size", type=int, default=16, help="calibration batch size (default 16)")
    p.add_argument("--emit", choices=("qdq", "simulate"), default="qdq", help="deployable Q/DQ (default) or fake-quant simulation")
    p.add_argument("--simulation", type=Path, help="also write the simulation (fake-quant) model to this path")
    p.add_argument("--no-fuse", action="store_true", help="do not run the deployment fusions first")
    p.add_argument("--fp4-storage", choices=("int8", "uint4_lut", "float4e2m1"),
                   help="E2M1 weights: exact int8 codes (default, runs and fuses), uint4 codes + table, or FLOAT4E2M1")
    p.add_argument("--group-scale-format", choices=("fp8_e4m3",),
                   help="two-level scales for fp4 weights: per-group scales stored as FP8 under per-channel fp32 scales")
    p.add_argument("--standard-types", action="store_true",
                   help="write FP4 E2M1 as ONNX FLOAT4E2M1 (opset 23; valid ONNX, not runnable on ORT CPU)")


@_quantize_args.bind
def _quantize(args: argparse.Namespace) -> int:
    from onnxcomp.api import quantize
    from onnxcomp.quant.report import format_report

    report = quantize(
        args.model, args.output, calibration=args.calib, config=args.config, weights=args.weights,
        activations=args.activations, granularity=args.granularity, observer=args.observer,
        weight_observer=args.weight_observer, dynamic=args.dynamic,
        symmetric_activations=args.symmetric_activations or None, skip=args.skip, emit=args.emit,
        fp4_storage="float4e2m1" if args.standard_types else args.fp4_storage,
        scale_format=args.group_scale_format,
        fuse=not args.no_fuse, calib_samples=args.calib_samples, batch_size=args.batch_size,
        force=args.force, progress=not args.quiet, external_data=args.external_data or None,
        simulation_output=args.simulation,
    )
    print_run_report(args, report, args.output)
    step = report.result("quantize")
    if not args.quiet and "report" in step.data:
        print(format_report(step.data["report"]))
    return 0
