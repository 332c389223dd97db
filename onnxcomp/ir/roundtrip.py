"""What onnx-graphsurgeon's import loses and the export must put back (ModelProto level).

gs import + export is not an identity on real exports; :func:`prepare_import` notes what gs
would drop and :func:`finish_export` restores it:

* **Subgraph scopes.** gs gives an If/Loop/Scan body the outer-scope Constants it reads and the
  export writes them as initializers *of the body*: a weight read by both branches is stored
  twice (a 41% larger file on a real model). Each initializer is written once, in the scope that
  declared it when that scope still sees every reader, else in the innermost graph enclosing
  all its readers. Body ``value_info`` entries naming outer-scope values are dropped.
* **Overridable initializers** (IR >= 4: an initializer also listed as a graph input, a default
  the caller may replace). gs would make them Constants and drop the input, so passes would fold
  a value the caller can change. They are imported as plain graph inputs and their default is
  written back.
* **IR < 4 models** list every initializer as a graph input (there a weight, not an override):
  they stay weights, and the inputs are listed again when the output keeps IR < 4.
* **Non-tensor graph inputs/outputs** (ZipMap's sequence of maps): gs writes them back as a
  sequence of untyped tensors; their declared types are restored.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import onnx
from onnx import helper

#: A graph's place in the model: (node key, attribute name[, index]) steps from the main graph.
ScopePath = tuple[str, ...]

#: The first IR version where initializers need not be graph inputs.
IR_INITIALIZERS_NOT_INPUTS = 4


@dataclass
class ModelFacts:
    """What the source model said that gs import forgets (kept on the imported graph)."""

    overridable: dict[str, onnx.TensorProto] = field(default_factory=dict)
    io_types: dict[str, onnx.TypeProto] = field(default_factory=dict)
    scopes: dict[str, ScopePath] = field(default_factory=dict)


def _node_key(node: onnx.NodeProto, index: int) -> str:
    return node.name or (node.output[0] if node.output else f"#{index}")


def iter_graph_protos(graph: onnx.GraphProto, path: ScopePath = ()) -> Iterator[tuple[ScopePath, onnx.GraphProto]]:
    """``graph`` and every If/Loop/Scan body inside it (depth first), with their scope paths."""
    yield path, graph
    for index, node in enumerate(graph.node):
        key = _node_key(node, index)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graph_protos(attr.g, (*path, f"{key}/{attr.name}"))
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for i, sub in enumerate(attr.graphs):
                    yield from iter_graph_protos(sub, (*path, f"{key}/{attr.name}[{i}]"))


def _is_tensor_type(value: onnx.ValueInfoProto) -> bool:
    return value.type.WhichOneof("value") in ("tensor_type", None)


def prepare_import(model: onnx.ModelProto) -> ModelFacts:
    """Record what gs import loses; moves overridable initializers out of ``model`` (a private copy)."""
    facts = ModelFacts()
    for path, graph in iter_graph_protos(model.graph):
        for init in graph.initializer:
            facts.scopes.setdefault(init.name, path)
    main = model.graph
    facts.io_types = {v.name: v.type for v in [*main.input, *main.output] if not _is_tensor_type(v)}
    if model.ir_version >= IR_INITIALIZERS_NOT_INPUTS:
        inputs = {v.name for v in main.input}
        kept = []
        for init in main.initializer:
            if init.name in inputs:
                facts.overridable[init.name] = onnx.TensorProto()
                facts.overridable[init.name].CopyFrom(init)
            else:
                kept.append(init)
        if facts.overridable:
            del main.initializer[:]
            main.initializer.extend(kept)
    else:
        # IR < 4: every initializer is listed as an input; they are weights, not overrides.
        names = {t.name for t in main.initializer}
        kept_inputs = [v for v in main.input if v.name not in names]
        del main.input[:]
        main.input.extend(kept_inputs)
    return facts


def finish_export(model: onnx.ModelProto, facts: ModelFacts) -> None:
    """Put back in ``model`` (a fresh gs export) what :func:`prepare_import` recorded."""
    _place_initializers(model, facts.scopes)
    _source_order(model, list(facts.scopes))
    _drop_outer_value_info(model.graph, set())
    main = model.graph
    inputs = {v.name for v in main.input}
    present = {t.name for t in main.initializer}
    for name, tensor in facts.overridable.items():
        if name in inputs and name not in present:
            main.initializer.append(tensor)
    for value in [*main.input, *main.output]:
        if value.name in facts.io_types:
            value.type.CopyFrom(facts.io_types[value.name])
    if model.ir_version < IR_INITIALIZERS_NOT_INPUTS:
        inputs = {v.name for v in main.input}
        for init in main.initializer:
            if init.name not in inputs:
                main.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))


def _place_initializers(model: onnx.ModelProto, scopes: dict[str, ScopePath]) -> None:
    """Write each initializer once, in its declaring scope if that sees all readers, else their LCA."""
    graphs = dict(iter_graph_protos(model.graph))
    found: dict[str, list[ScopePath]] = {}
    for path, graph in graphs.items():
        for init in graph.initializer:
            found.setdefault(init.name, []).append(path)
    for name, paths in found.items():
        protos = [next(t for t in graphs[p].initializer if t.name == name) for p in paths]
        if len(protos) > 1 and len({t.SerializeToString() for t in protos}) > 1:  # one scope: nothing to compare
            continue  # sibling scopes with their own local tensors of one name: not copies
        target = _common_prefix(paths)
        declared = scopes.get(name)
        if declared is not None and declared in graphs and declared == target[: len(declared)]:
            target = declared
        if paths == [target]:
            continue
        tensor = protos[0]
        for path in paths:
            if path != target:
                _remove_initializer(graphs[path], name)
        if target not in paths:
            graphs[target].initializer.append(tensor)


def _source_order(model: onnx.ModelProto, names: list[str]) -> None:
    """Initializers the source had keep its order (deterministic, diff-friendly); new ones follow."""
    rank = {name: i for i, name in enumerate(names)}
    for _, graph in iter_graph_protos(model.graph):
        # In place (stable for new ones): rebuilding the list would copy every weight.
        graph.initializer.sort(key=lambda t: rank.get(t.name, len(rank)))


def _common_prefix(paths: list[ScopePath]) -> ScopePath:
    first = paths[0]
    size = 0
    while size < len(first) and all(len(p) > size and p[size] == first[size] for p in paths):
        size += 1
    return first[:size]


def _remove_initializer(graph: onnx.GraphProto, name: str) -> None:
    kept = [t for t in graph.initializer if t.name != name]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _drop_outer_value_info(graph: onnx.GraphProto, outer: set[str]) -> None:
    """Remove body ``value_info`` about values an enclosing scope defines (gs writes them there)."""
    if outer:
        kept = [v for v in graph.value_info if v.name not in outer]
        if len(kept) != len(graph.value_info):
            del graph.value_info[:]
            graph.value_info.extend(kept)
    visible = outer | {v.name for v in graph.input} | {t.name for t in graph.initializer}
    visible |= {o for n in graph.node for o in n.output if o}
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _drop_outer_value_info(attr.g, visible)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _drop_outer_value_info(sub, visible)
