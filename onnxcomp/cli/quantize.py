"""``onnxcomp quantize``: post-training quantization from the command line.

The flags build the same options as a ``quantize`` pass in a recipe (``--config`` reads those
options from a TOML file; flags override its global defaults).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from onnxcomp.analysis.kernels import format_kernel_report
from onnxcomp.api import quantize
from onnxcomp.cli.common import (
    DeprecatedFlag,
    add_run_options,
    command,
    print_run_report,
    run_kwargs,
)
from onnxcomp.formats import available_formats
from onnxcomp.quant.report import format_report
from onnxcomp.quant.spec import ACTIVATION_FORMATS, ACTIVATION_OBSERVERS, GROUP_SIZES, WEIGHT_OBSERVERS
from onnxcomp.quant.tuning import format_search

WEIGHT_FORMATS = ", ".join(available_formats()) + ", or none / float"
GROUPS = "/".join(map(str, GROUP_SIZES))


def _alpha(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or auto, got {text!r}")
    return value


def _quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path)
    add_run_options(p, calibration="calibration data: .npz named by model input, or a directory")
    add_quantize_flags(p)
    p.add_argument("--simulation", type=Path, help="also write the simulation (fake-quant) model to this path")
    add_target_flags(p)
    target = p.add_argument_group("accuracy target (docs/accuracy.md)")
    target.add_argument(
        "--accuracy-target",
        metavar="METRIC:VALUE",
        help="the most compression meeting it: cos:0.995, agree:0.995, sqnr:30, drop:0.01 (below the float "
        "model's score), score:V (the evaluator's value); nodes fall back int4 -> int8 -> int16 -> float",
    )
    add_scoring_flags(target)
    target.add_argument(
        "--trial-workers",
        type=int,
        metavar="N",
        help="build and score N candidate models at a time (threads); without it, candidates are built here and "
        "scored where calibration runs (--workers N processes, --ray actors), with the same scores",
    )


def add_scoring_flags(group: Any) -> None:
    """``--eval-data`` and ``--evaluator`` (quantize --accuracy-target, sensitivity)."""
    group.add_argument("--eval-data", type=Path, help="data the metric runs on (default: the calibration data)")
    group.add_argument(
        "--evaluator",
        metavar="FILE.py:FUNCTION",
        help="a Python function f(model_path) -> float (higher is better) scoring each candidate model",
    )


def add_target_flags(p: argparse.ArgumentParser) -> None:
    """``--target`` and ``--ascend-int4`` (quantize, distill)."""
    p.add_argument(
        "--target",
        choices=("ort", "ascend", "ascend-qdq"),
        help="ort (default): Q/DQ for onnxruntime; ascend: ATC's deploy model, OUT.fake_quant.onnx and "
        "OUT.record.txt; ascend-qdq: QDQ for AMCT's convert_qat_model (docs/ascend.md)",
    )
    p.add_argument(
        "--ascend-int4", action="store_true", help="--target ascend: allow INT4 weights (UNVERIFIED packing)"
    )


def add_quantize_flags(p: argparse.ArgumentParser) -> None:
    """The format, placement and algorithm flags of ``quantize`` (also taken by ``sensitivity``)."""
    p.add_argument(
        "--config", type=Path, help="TOML with the quantize pass options (weights, activations, op_types, nodes, skip)"
    )
    p.add_argument(
        "--weights",
        type=str.lower,
        choices=(*available_formats(), "none", "float"),
        metavar="FORMAT",
        help=f"weight format: {WEIGHT_FORMATS}",
    )
    p.add_argument(
        "--activations",
        type=str.lower,
        choices=(*ACTIVATION_FORMATS, "none", "float"),
        metavar="FORMAT",
        help=f"activation format: {', '.join(ACTIVATION_FORMATS)}, or none / float (weight-only)",
    )
    p.add_argument("--granularity", help=f"weight granularity: tensor, channel or group:N (N in {GROUPS})")
    p.add_argument(
        "--dynamic",
        action="store_true",
        help="activations quantized at run time (no calibration); a token is one row of a MatMul/Gemm input, "
        "or the channel vector at one position of a Conv input",
    )
    p.add_argument(
        "--dynamic-granularity",
        choices=("token", "tensor"),
        default="token",
        help="--dynamic: one scale per token (accurate, emulated) or per tensor (onnxruntime's fused integer kernels)",
    )
    p.add_argument(
        "--observer",
        choices=ACTIVATION_OBSERVERS,
        metavar="OBSERVER",
        help="activation range: histogram (error search, default), minmax, percentile, entropy or mse",
    )
    p.add_argument(
        "--weight-observer",
        choices=WEIGHT_OBSERVERS,
        metavar="OBSERVER",
        help="weight range: minmax (default), mse (clipping search) or output_mse (weighted by input energy; needs --calib)",
    )
    p.add_argument("--symmetric-activations", action="store_true", help="symmetric activation ranges (int formats)")
    p.add_argument("--skip", action="append", default=[], metavar="GLOB", help="leave nodes matching GLOB in float")
    p.add_argument(
        "--emit", choices=("qdq", "simulate"), default="qdq", help="deployable Q/DQ (default) or fake-quant simulation"
    )
    p.add_argument(
        "--fp4-storage",
        choices=("int8", "uint4_lut", "float4e2m1"),
        help="E2M1 weights: exact int8 codes (default, runs and fuses), uint4 codes + table, or FLOAT4E2M1",
    )
    p.add_argument(
        "--scale-format",
        choices=("fp8_e4m3",),
        help="two-level scales for fp4 weights: per-group scales stored as FP8 under per-channel fp32 scales",
    )
    p.add_argument("--group-scale-format", dest="scale_format", action=DeprecatedFlag, new="--scale-format")
    p.add_argument(
        "--weight-only-format",
        choices=("matmulnbits", "dq"),
        help="weight-only MatMul/Gemm: onnxruntime's MatMulNBits kernel (default) or DequantizeLinear (any runtime)",
    )
    p.add_argument(
        "--float-weight-format",
        choices=("cast", "dq"),
        help="FP8/MXFP8 weights: Cast(codes) * scale, decoded once by onnxruntime at load (default), "
        "or DequantizeLinear (runtimes that read FP8 Q/DQ)",
    )
    p.add_argument(
        "--quantize-embeddings",
        metavar="FORMAT",
        choices=("int8", "int4"),
        help="also store embedding tables (Gather on a constant table): int8 per row, or int4 per group of 32",
    )
    p.add_argument(
        "--placement",
        choices=("speed", "all"),
        help="speed (default): leave convs that run faster in float on onnxruntime CPU unquantized; all: quantize every one",
    )
    algo = p.add_argument_group("accuracy algorithms (docs/algorithms.md)")
    algo.add_argument(
        "--bias-correction",
        nargs="?",
        const="full",
        choices=("full", "fast"),
        help="subtract each layer's mean output error through its bias: full (layer by layer, default) or fast (one pass)",
    )
    algo.add_argument(
        "--weight-algorithm",
        choices=("rtn", "gptq", "awq"),
        help="weight rounding: rtn (nearest, default), gptq (error feedback on calibration data), "
        "awq (activation-aware per-channel scales)",
    )
    algo.add_argument(
        "--smoothquant",
        metavar="ALPHA",
        type=_alpha,
        help="move activation outliers into the weights: ALPHA in [0, 1] (0.5 typical) or auto (searched per layer)",
    )
    algo.add_argument(
        "--equalize", action="store_true", help="cross-layer equalization of Conv/Gemm pairs (exact in float)"
    )
    algo.add_argument("--act-order", action="store_true", help="GPTQ: quantize input columns by decreasing energy")
    algo.add_argument("--gptq-damp", type=float, metavar="D", help="GPTQ: relative diagonal damping (default 0.01)")
    p.add_argument("--no-report", action="store_true", help="skip the SQNR and fused-kernel reports (faster)")
    p.add_argument(
        "--standard-types",
        action="store_true",
        help="write FP4 E2M1 as ONNX FLOAT4E2M1 (opset 23; valid ONNX, not runnable on ORT CPU)",
    )


def quantize_flag_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The :func:`onnxcomp.api.quantize` keywords of :func:`add_quantize_flags`."""
    return dict(
        config=args.config,
        weights=args.weights,
        activations=args.activations,
        granularity=args.granularity,
        observer=args.observer,
        weight_observer=args.weight_observer,
        dynamic=args.dynamic,
        dynamic_granularity=args.dynamic_granularity,
        symmetric_activations=args.symmetric_activations or None,
        skip=args.skip,
        emit=args.emit,
        fp4_storage="float4e2m1" if args.standard_types else args.fp4_storage,
        scale_format=args.scale_format,
        weight_only_format=args.weight_only_format,
        float_weight_format=args.float_weight_format,
        embeddings=args.quantize_embeddings,
        placement=args.placement,
        reports=not args.no_report,
        bias_correction=args.bias_correction,
        weight_algorithm=args.weight_algorithm,
        act_order=args.act_order or None,
        gptq_damp=args.gptq_damp,
        smoothquant=args.smoothquant,
        equalize=args.equalize or None,
    )


@command("quantize", "post-training quantization (calibrated static or dynamic activations)", _quantize_args)
def _quantize(args: argparse.Namespace) -> int:
    report = quantize(
        args.model,
        args.output,
        simulation_output=args.simulation,
        accuracy_target=args.accuracy_target,
        evaluator=args.evaluator,
        eval_data=args.eval_data,
        trial_workers=args.trial_workers,
        target=args.target,
        ascend_int4=args.ascend_int4 or None,
        **quantize_flag_kwargs(args),
        **run_kwargs(args),
    )
    print_run_report(args, report, args.output)
    step = report.result("quantize")
    if not args.quiet and "report" in step.data:
        print(format_report(step.data["report"]))
    if not args.quiet and "kernels" in step.data:
        print(format_kernel_report(step.data["kernels"]))
    if not args.quiet and "search" in step.data:
        print(format_search(step.data["search"]))
    return 0
