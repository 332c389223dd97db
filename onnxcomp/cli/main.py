"""The ``onnxcomp`` command line: the same pass manager as the Python API.

Exit codes: 0 success, 1 failure (one-line cause on stderr; traceback with ``--debug``),
2 usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from onnxcomp.analysis.inspect import format_summary, summarize
from onnxcomp.analysis.macs import with_input_shapes
from onnxcomp.api import compress, fuse
from onnxcomp.cli import compare as _compare_command  # noqa: F401 - registers ``compare``
from onnxcomp.cli import decompose as _decompose_command  # noqa: F401 - registers ``decompose``
from onnxcomp.cli import distill as _distill_command  # noqa: F401 - registers ``distill``
from onnxcomp.cli import qat as _qat_command  # noqa: F401 - registers ``qat``
from onnxcomp.cli import quantize as _quantize_command  # noqa: F401 - registers ``quantize``
from onnxcomp.cli import sensitivity as _sensitivity_command  # noqa: F401 - registers ``sensitivity``
from onnxcomp.cli import sparsify as _sparsify_command  # noqa: F401 - registers ``sparsify``
from onnxcomp.cli import verify_ascend as _verify_ascend_command  # noqa: F401 - registers ``verify-ascend``
from onnxcomp.cli.common import (
    COMMANDS,
    add_run_options,
    command,
    global_flags,
    print_run_report,
    run_kwargs,
)
from onnxcomp.cli.shapes import add_input_shape
from onnxcomp.errors import OnnxCompError
from onnxcomp.framework.registry import broken_passes, describe_passes
from onnxcomp.model_io import load_model

CALIB_HELP = "calibration data: .npz or a directory of .npz/.npy"


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", type=Path)
    p.add_argument("model", type=Path)
    add_run_options(p, calibration=CALIB_HELP, fuse=False)


@command("run", "run a TOML recipe of passes on a model", _run_args)
def _run(args: argparse.Namespace) -> int:
    report = compress(args.model, args.recipe, args.output, **run_kwargs(args))
    print_run_report(args, report, args.output)
    return 0


def _fuse_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path)
    add_run_options(p, calibration=None, fuse=False)


@command("fuse", "deployment fusions: fold BatchNorm, affine ops, MatMul+Add -> Gemm, cleanup", _fuse_args)
def _fuse(args: argparse.Namespace) -> int:
    report = fuse(args.model, args.output, **run_kwargs(args))
    print_run_report(args, report, args.output)
    return 0


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_input_shape(p)


@command("inspect", "show opset, ops, parameters by dtype, MACs and I/O of a model", _inspect_args)
def _inspect(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    shapes = dict(args.input_shape)
    unknown = sorted(set(shapes) - {i.name for i in model.graph.input})
    if unknown:
        raise OnnxCompError(f"--input-shape: {args.model} has no input {unknown[0]!r}")
    summary = summarize(with_input_shapes(model, shapes) if shapes else model, file_bytes=args.model.stat().st_size)
    if args.json:
        print(json.dumps(summary.to_json(), indent=1))
    else:
        print(format_summary(summary, str(args.model)))
    return 0


def _passes_args(p: argparse.ArgumentParser) -> None:
    pass


@command("passes", "list every pass (built-in and installed) with its options and defaults", _passes_args)
def _passes(args: argparse.Namespace) -> int:
    for name, source, summary, options in describe_passes():
        origin = "" if source == "built-in" else f" [{source}]"
        print(f"{name}{origin}: {summary}")
        for opt, tp, default in options:
            print(f"    {opt} ({tp}) = {default!r}")
    for name, reason in broken_passes().items():
        print(f"{name} [not loaded]: {reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxcomp", description="Compress ONNX models by rewriting their graphs.")
    global_flags(parser, suppress=False)
    after = argparse.ArgumentParser(add_help=False)
    global_flags(after, suppress=True)  # also accepted after the subcommand
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (add_args, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[after])
        add_args(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    _, handler, _ = COMMANDS[args.command]
    try:
        return handler(args)
    except OnnxCompError as exc:
        if args.debug:
            raise
        print(f"onnxcomp: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("onnxcomp: interrupted", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `onnxcomp passes | head`: the reader left, nothing is wrong
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - replaces the closed pipe until exit
        return 0
    except Exception as exc:  # noqa: BLE001 - last-resort: one line, not a traceback
        if args.debug:
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(
            f"onnxcomp: internal error: {type(exc).__name__}: {first}; rerun with --debug and report it",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
