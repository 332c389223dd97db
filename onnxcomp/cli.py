"""The ``onnxcomp`` command line: the same pass manager as the Python API.

Exit codes: 0 success, 1 failure (one-line cause on stderr; traceback with ``--debug``),
2 usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from onnxcomp.errors import OnnxCompError

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Handler, str]] = {}


def command(name: str, help_text: str) -> Callable[[Callable[[argparse.ArgumentParser], None]], Callable]:
    """Register a subcommand: the decorated function adds arguments; ``handler`` runs it."""

    def wrap(add_args: Callable[[argparse.ArgumentParser], None]) -> Callable:
        def bind(handler: Handler) -> Handler:
            _COMMANDS[name] = (add_args, handler, help_text)
            return handler

        add_args.bind = bind  # type: ignore[attr-defined]
        return add_args

    return wrap


def _echo(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text)


def print_run_report(args: argparse.Namespace, report, output: Path | None) -> None:  # noqa: ANN001
    from onnxcomp.summary import human_bytes

    if args.quiet:
        return
    for note in report.notes:
        print(f"note: {note}")
    width = max([len(s.name) for s in report.steps] + [4])
    for step in report.steps:
        flag = "changed" if step.result.modified else "no change"
        print(f"  {step.name:<{width}}  {flag:<9}  {step.result.summary()}  ({step.seconds:.2f}s)")
        if args.verbose:
            for node, reason in step.result.declined:
                print(f"      declined {node}: {reason}")
            for note in step.result.notes:
                print(f"      {note}")
        elif step.result.declined:
            print(f"      {len(step.result.declined)} declined (see --verbose)")
    if output is not None:
        print(f"wrote {output} ({human_bytes(output.stat().st_size)})")


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, type=Path, help="output .onnx path")
    p.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    p.add_argument("--external-data", action="store_true", help="save weights in OUTPUT.data (automatic >= 2 GB)")


@command("run", "run a TOML recipe of passes on a model")
def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", type=Path)
    p.add_argument("model", type=Path)
    _add_output(p)
    p.add_argument("--calib", type=Path, help="calibration data: .npz or a directory of .npz/.npy")


@_run_args.bind
def _run(args: argparse.Namespace) -> int:
    from onnxcomp.api import compress

    report = compress(
        args.model, args.recipe, args.output, calibration=args.calib, force=args.force,
        progress=not args.quiet, external_data=args.external_data or None,
    )
    print_run_report(args, report, args.output)
    return 0


@command("fuse", "deployment fusions: fold BatchNorm, affine ops, MatMul+Add -> Gemm, cleanup")
def _fuse_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path)
    _add_output(p)


@_fuse_args.bind
def _fuse(args: argparse.Namespace) -> int:
    from onnxcomp.api import fuse

    report = fuse(args.model, args.output, force=args.force, progress=not args.quiet,
                  external_data=args.external_data or None)
    print_run_report(args, report, args.output)
    return 0


@command("inspect", "show opset, ops, parameters by dtype, MACs and I/O of a model")
def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


@_inspect_args.bind
def _inspect(args: argparse.Namespace) -> int:
    from onnxcomp.model_io import load_model
    from onnxcomp.summary import format_summary, summarize

    model = load_model(args.model)
    summary = summarize(model, file_bytes=args.model.stat().st_size)
    if args.json:
        print(json.dumps(summary.to_json(), indent=1))
    else:
        print(format_summary(summary, str(args.model)))
    return 0


@command("passes", "list every pass with its options and defaults")
def _passes_args(p: argparse.ArgumentParser) -> None:
    pass


@_passes_args.bind
def _passes(args: argparse.Namespace) -> int:
    from onnxcomp.pipeline import describe_passes

    for name, summary, options in describe_passes():
        print(f"{name}: {summary}")
        for opt, tp, default in options:
            print(f"    {opt} ({tp}) = {default!r}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    _load_extra_commands()
    parser = argparse.ArgumentParser(prog="onnxcomp", description="Compress ONNX models by rewriting their graphs.")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress or report, only errors")
    parser.add_argument("--verbose", "-v", action="store_true", help="say why each candidate was declined")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (add_args, _, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
    return parser


def _load_extra_commands() -> None:
    """Commands defined next to their feature (quantize, sparsify, ...) register on import."""
    import importlib

    for module in ("onnxcomp.cli_quantize", "onnxcomp.cli_decompose", "onnxcomp.cli_sparsify"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _, handler, _ = _COMMANDS[args.command]
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
    except Exception as exc:  # noqa: BLE001 - last-resort: one line, not a traceback
        if args.debug:
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"onnxcomp: internal error: {type(exc).__name__}: {first}; rerun with --debug and report it", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
