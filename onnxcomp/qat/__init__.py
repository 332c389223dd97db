"""Quantization-aware training and sparse retraining, with torch as an optional engine (docs/qat.md).

This package imports no torch: :func:`prepare` and :func:`train` load the engine when called and
raise :class:`~onnxcomp.qat.hint.MissingEngine` with the install hint when torch is missing.
"""

from __future__ import annotations

import importlib
from typing import Any

from onnxcomp.qat.hint import INSTALL_HINT, MissingEngine


def _engine(module: str) -> Any:
    """A torch-backed submodule, imported on first use (the base install never imports torch)."""
    return importlib.import_module(f"onnxcomp.qat.{module}")


def prepare(*args: Any, **kwargs: Any) -> Any:
    """:func:`onnxcomp.qat.build.prepare`: an ONNX model -> a trainable ``QATModule``."""
    return _engine("build").prepare(*args, **kwargs)


def train(*args: Any, **kwargs: Any) -> Any:
    """:func:`onnxcomp.qat.recipe.train`: prepare, train (distillation or labels) and export."""
    return _engine("recipe").train(*args, **kwargs)


__all__ = ["INSTALL_HINT", "MissingEngine", "prepare", "train"]
