"""Built-in passes. Importing this package registers every pass (one module per pass)."""

from __future__ import annotations

from onnxcomp.passes import remove_identity

__all__ = ["remove_identity"]

#: The order ``onnxcomp fuse`` runs the deployment fusions in.
FUSE_PIPELINE: tuple[str, ...] = ("remove_identity",)
