"""Writing the deploy model: one file, or (2 GB and more) one external file per initializer, as AMCT does.

docs/ascend.md ("Models of 2 GB and more"): AMCT's ``save_model`` puts each initializer of a
model that does not fit one protobuf in its own file beside the model. onnx's own writer names
such files by tensor name but falls back to a random UUID for a name that is no valid file name,
which would make two runs differ; here every file name is derived from the tensor name
deterministically (``<model file>.<tensor name, unsafe characters as _>``, ``.<n>`` added on a
clash), and all files are staged in a temporary directory and moved in data first, model last.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import onnx
from onnx import external_data_helper, numpy_helper

from onnxcomp.errors import OnnxCompError
from onnxcomp.ir.mapped import materialized, tensor_values
from onnxcomp.runtime import PROTOBUF_LIMIT

#: The deploy model is split into one file per initializer from this many bytes (a protobuf's limit).
PER_INITIALIZER_FROM = PROTOBUF_LIMIT

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def initializer_files(model: onnx.ModelProto, model_file: str) -> dict[str, str]:
    """Initializer name -> its file name beside ``model_file`` (deterministic, unique, case-insensitively too)."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for tensor in model.graph.initializer:
        base = f"{model_file}.{_UNSAFE.sub('_', tensor.name) or 'tensor'}"
        name, n = base, 1
        while name.lower() in taken:
            name, n = f"{base}.{n}", n + 1
        taken.add(name.lower())
        names[tensor.name] = name
    return names


def save_deploy(
    model: onnx.ModelProto, path: Path, external_data: bool | None = None, overwrite: bool = False
) -> list[Path]:
    """Write the deploy model to ``path``; returns the files written (model first).

    ``external_data=None``: one file per initializer from :data:`PER_INITIALIZER_FROM` bytes on,
    else one file; True / False force either layout.
    """
    model = materialized(model)  # this layout's own files: weights mapped from the source are read in
    external = model.ByteSize() >= PER_INITIALIZER_FROM if external_data is None else external_data
    files = initializer_files(model, path.name) if external else {}
    targets = [path, *(path.with_name(f) for f in files.values())]
    if not overwrite:
        for target in targets:
            if target.exists():
                raise OnnxCompError(f"{target}: already exists; choose another output path or pass --force")
    if not path.parent.exists():
        raise OnnxCompError(f"{path.parent}: output directory does not exist; create it first")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # setting external data locations changes the tensors: the caller's model stays as it is
    for tensor in copy.graph.initializer:
        if tensor.name in files:
            if not tensor.HasField("raw_data"):  # typed fields (float_data, ...) -> raw bytes, which go to the file
                tensor.CopyFrom(numpy_helper.from_array(tensor_values(tensor), tensor.name))
            external_data_helper.set_external_data(tensor, files[tensor.name])
    staging = Path(tempfile.mkdtemp(prefix=".onnxcomp-", dir=path.parent))
    try:
        if external:
            external_data_helper.write_external_data_tensors(copy, str(staging))  # moves raw data into the files
        (staging / path.name).write_bytes(copy.SerializeToString(deterministic=True))
        for target in [*targets[1:], targets[0]]:  # data before model: no model whose data is missing
            os.replace(staging / target.name, target)
        return targets
    finally:
        shutil.rmtree(staging, ignore_errors=True)
