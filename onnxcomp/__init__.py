"""onnxcomp: compress exported ONNX models by rewriting their graphs.

The Python API (:mod:`onnxcomp.api`) and the ``onnxcomp`` command line drive the same pass manager.
Passes written outside the package use :class:`Pass`, :class:`PassResult`, :class:`PassContext`,
:func:`register_pass` and the graph helpers of :mod:`onnxcomp.ir` (``docs/writing-a-pass.md``).
"""

from __future__ import annotations

from onnxcomp import ir
from onnxcomp._version import __version__
from onnxcomp.api import compare, compress, decompose, distill, fuse, quantize, sparsify
from onnxcomp.errors import OnnxCompError
from onnxcomp.framework import (
    NoOptions,
    Pass,
    PassContext,
    PassManager,
    PassResult,
    Recipe,
    RunReport,
    available_passes,
    load_recipe,
    make_pass,
    register_pass,
)
from onnxcomp.model_io import load_model, save_model

__all__ = [
    "NoOptions",
    "OnnxCompError",
    "Pass",
    "PassContext",
    "PassManager",
    "PassResult",
    "Recipe",
    "RunReport",
    "__version__",
    "available_passes",
    "compare",
    "compress",
    "decompose",
    "distill",
    "fuse",
    "ir",
    "load_model",
    "load_recipe",
    "make_pass",
    "quantize",
    "register_pass",
    "save_model",
    "sparsify",
]
