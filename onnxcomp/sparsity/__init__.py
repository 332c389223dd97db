"""Pieces shared by the sparsity passes (``sparsify_2to4``, ``prune_channels``).

* :mod:`~onnxcomp.sparsity.masks`: n:m masks along a reduction axis, pattern checks, keep counts;
* :mod:`~onnxcomp.sparsity.stats`: per-weight sparsity (for ``onnxcomp inspect`` and quant records);
* :mod:`~onnxcomp.sparsity.layout` and :mod:`~onnxcomp.sparsity.coupling`: which tensors must lose
  the same channels when a layer's output channels are pruned;
* :mod:`~onnxcomp.sparsity.rewrite`: applying a chosen channel set to a coupled group;
* :mod:`~onnxcomp.sparsity.gram` and :mod:`~onnxcomp.sparsity.reconstruct`: calibration statistics
  of consumer inputs, data-driven channel selection and least-squares reconstruction;
* :mod:`~onnxcomp.sparsity.recipe` and :mod:`~onnxcomp.sparsity.report`: the pass lists behind
  ``onnxcomp sparsify`` and its before/after report.
"""
