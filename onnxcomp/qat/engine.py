"""The optional training engine: torch is imported here, and only by the modules that need it.

Importing this module without torch raises :class:`~onnxcomp.qat.hint.MissingEngine` with the
one-line install hint; ``onnxcomp.qat`` itself imports nothing heavy, so the base install never
loads torch.
"""

from __future__ import annotations

from onnxcomp.qat.hint import INSTALL_HINT, MissingEngine

try:
    import torch
except ImportError as exc:  # the base install: say how to get the engine
    raise MissingEngine(INSTALL_HINT) from exc

__all__ = ["torch"]
