"""onnxcomp: compress exported ONNX models by rewriting their graphs."""

from __future__ import annotations

__version__ = "0.1.0"

from onnxcomp.api import compress, decompose, fuse, quantize, sparsify
from onnxcomp.errors import OnnxCompError
from onnxcomp.manager import PassManager, RunReport
from onnxcomp.model_io import load_model, save_model
from onnxcomp.pipeline import Pass, PassContext, PassResult, available_passes, make_pass, register_pass
from onnxcomp.recipe import Recipe, load_recipe

__all__ = [
    "OnnxCompError",
    "Pass",
    "PassContext",
    "PassManager",
    "PassResult",
    "Recipe",
    "RunReport",
    "__version__",
    "available_passes",
    "compress",
    "decompose",
    "fuse",
    "load_model",
    "load_recipe",
    "make_pass",
    "quantize",
    "register_pass",
    "save_model",
    "sparsify",
]
