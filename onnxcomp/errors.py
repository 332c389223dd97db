"""The exception hierarchy of onnxcomp.

Every error a user can cause is an :class:`OnnxCompError` whose message is one line naming the
file, node or tensor at fault and what to do. The CLI prints that line and exits 1; a traceback
appears only with ``--debug``.
"""

from __future__ import annotations


class OnnxCompError(Exception):
    """Base class of every error onnxcomp raises on purpose."""


class ModelLoadError(OnnxCompError):
    """The input model is missing, unreadable, invalid, or uses an unsupported opset."""


class RecipeError(OnnxCompError):
    """A recipe names an unknown pass or option, or gives an option a bad value."""


class PassError(OnnxCompError):
    """A pass failed; the message names the pass."""


class ValidationError(OnnxCompError):
    """A rewritten model fails onnx.checker or cannot be loaded by onnxruntime."""


class FormatError(OnnxCompError):
    """A value cannot be encoded in a numeric format (e.g. NaN/Inf into FP4), or a bad format name."""


class CalibrationError(OnnxCompError):
    """Calibration data is missing, empty, mismatched with the model, or not finite."""


class ConfigError(OnnxCompError):
    """A quantization/sparsity/decomposition configuration is invalid."""
