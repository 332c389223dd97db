"""The ``onnxcomp`` command line: ``onnxcomp.cli.main`` plus one module per feature command."""
