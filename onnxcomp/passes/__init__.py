"""Built-in passes. Importing this package registers every pass (one module per pass)."""

from __future__ import annotations

from onnxcomp.passes import (
    dedupe_initializers,
    fold_affine,
    fold_batchnorm,
    fuse_matmul_add,
    lower_batchnorm,
    quantize,
    remove_identity,
)

__all__ = [
    "FUSE_PIPELINE",
    "dedupe_initializers",
    "fold_affine",
    "fold_batchnorm",
    "fuse_matmul_add",
    "lower_batchnorm",
    "quantize",
    "remove_identity",
]

#: The order ``onnxcomp fuse`` runs the deployment fusions in.
FUSE_PIPELINE: tuple[str, ...] = (
    "remove_identity",
    "fold_batchnorm",
    "fuse_matmul_add",
    "fold_affine",
    "lower_batchnorm",
    "dedupe_initializers",
)
