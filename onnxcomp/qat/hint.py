"""What a command that needs the training engine says when torch is missing (no torch import here)."""

from __future__ import annotations

from onnxcomp.errors import OnnxCompError

INSTALL_HINT = "quantization-aware training needs torch: pip install 'onnxcomp[train]'"


class MissingEngine(OnnxCompError):
    """torch is not installed (the ``train`` extra)."""
