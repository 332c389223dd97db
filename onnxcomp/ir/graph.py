"""The one module that touches onnx-graphsurgeon.

Passes work on ``ir.Graph`` (an onnx-graphsurgeon graph) through the helpers here, which own
the library's known pitfalls:

* gs export writes tensor names back into the ModelProto it imported from (aliasing), so
  :func:`import_model` always imports a private copy;
* gs cannot export sub-byte (INT4/UINT4/FP4) or FP8 constants built from ml_dtypes arrays, so
  :func:`make_constant` always builds the TensorProto with ``onnx.numpy_helper.from_array`` and
  wraps it in ``LazyValues``;
* reading ``Constant.values`` of a sub-byte initializer breaks its later export, so
  :func:`constant_value` reads the TensorProto without caching the array on the tensor;
* ``cleanup().toposort()`` is whole-graph: the pass manager calls :func:`finalize` once per
  modifying pass, passes never call it per match;
* gs export copies outer-scope constants into every If/Loop/Scan body that reads them, drops
  overridable initializers from the graph inputs and rewrites non-tensor graph I/O types:
  :func:`export_model` undoes each (:mod:`onnxcomp.ir.roundtrip`);
* a body (subgraph) is a gs ``Graph`` of its own whose nodes read outer tensors directly: passes
  that rewrite inside bodies visit them with :func:`iter_graphs`, and a body's new names come
  from the model-wide name set (:func:`unique_name`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon import Constant, Graph, Node, Tensor, Variable
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxcomp.ir.mapped import MappedValues, map_constants, release_mapped
from onnxcomp.ir.roundtrip import ModelFacts, finish_export, prepare_import
from onnxcomp.ir.spill import spill_array

__all__ = [
    "Constant",
    "Graph",
    "Node",
    "Tensor",
    "Variable",
    "bypass_node",
    "constant_value",
    "consumers",
    "default_opset",
    "default_opset_of",
    "export_model",
    "finalize",
    "import_model",
    "infer_shapes",
    "is_constant",
    "is_graph_output",
    "iter_graphs",
    "iter_nodes",
    "owns",
    "make_constant",
    "make_node",
    "make_variable",
    "omitted",
    "only_consumer_is",
    "producer",
    "replace_constant",
    "set_constant",
    "unique_name",
    "upgrade_graph",
    "write_input",
]

# gs logs a warning for every FP8 constant and on many harmless situations; our own logging
# reports what matters.
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
log = logging.getLogger(__name__)


def import_model(model: onnx.ModelProto) -> Graph:
    """Import a private copy of ``model`` (gs export aliases the source's initializers).

    Overridable initializers (graph inputs with a default) come in as graph inputs, not constants.
    """
    private = onnx.ModelProto()
    private.CopyFrom(model)
    facts = prepare_import(private)
    graph = gs.import_onnx(private)
    map_constants(graph)  # weights of a mapped model stay on disk (ir.mapped)
    graph._onnxcomp_facts = facts  # noqa: SLF001 - read back by export_model
    return graph


def export_model(graph: Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """Export ``graph`` keeping ``template``'s model-level metadata (producer, ir_version, docs).

    Outer-scope initializers are written once (never copied into bodies), overridable
    initializers stay graph inputs, non-tensor graph I/O keeps its types, and an IR < 4 output
    lists its initializers as inputs (:mod:`onnxcomp.ir.roundtrip`).
    """
    release_mapped(graph)  # unchanged mapped weights export as their references, not copies
    model = gs.export_onnx(graph, do_type_check=True)
    facts = graph.__dict__.get("_onnxcomp_facts") or ModelFacts()  # not getattr: see _names_cache
    model.ir_version = max(template.ir_version, _min_ir_version(model))
    model.producer_name = "onnxcomp"
    model.ClearField("producer_version")
    for name in ("model_version", "doc_string", "domain"):
        # Unset fields stay unset (an explicit default is serialised and grows the file).
        if template.HasField(name):
            setattr(model, name, getattr(template, name))
        else:
            model.ClearField(name)
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    finish_export(model, facts)
    return model


def _min_ir_version(model: onnx.ModelProto) -> int:
    opset = default_opset_of(model)
    for row in onnx.helper.VERSION_TABLE:
        if row[2] == opset:
            return int(row[1])
    return int(onnx.IR_VERSION)


def default_opset_of(model: onnx.ModelProto) -> int:
    """The default-domain (ai.onnx) opset a ModelProto imports."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 1


def default_opset(graph: Graph) -> int:
    """The default-domain opset of a graph."""
    return int(graph.opset)


def finalize(graph: Graph) -> None:
    """Remove dead nodes/tensors and sort topologically, bodies included (once per modifying pass)."""
    graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True).toposort(recurse_subgraphs=True)


# --- constants -----------------------------------------------------------------------------


def is_constant(tensor: Tensor) -> bool:
    """True for an initializer, or the output of a ``Constant`` node with a tensor value."""
    if isinstance(tensor, Constant):
        return True
    node = producer(tensor)
    return node is not None and node.op == "Constant" and isinstance(node.attrs.get("value"), Constant)


def constant_value(tensor: Tensor) -> np.ndarray | None:
    """The value of a constant tensor, or None if it is not constant.

    Sub-byte and FP8 values come back as ml_dtypes arrays. The tensor's lazy storage is left in
    place (materialising it in gs would break the export of sub-byte types).
    """
    if isinstance(tensor, Constant):
        values = tensor._values  # noqa: SLF001 - reading without caching is the point
        if isinstance(values, MappedValues):
            return values.load()  # a read-only map of the file, closed when the caller drops it
        if isinstance(values, LazyValues):
            return numpy_helper.to_array(values.tensor)
        return np.asarray(values)
    node = producer(tensor)
    if node is not None and node.op == "Constant":
        value = node.attrs.get("value")
        if isinstance(value, Constant):
            return constant_value(value)
    return None


def _lazy(name: str, array: np.ndarray) -> LazyValues:
    # A run writing a mapped model (ir.spill.spilling): a big new weight goes to disk at once
    spilled = spill_array(name, np.asarray(array))
    if spilled is not None:
        return spilled
    proto = numpy_helper.from_array(np.asarray(array), name=name)
    return LazyValues(proto)


def make_constant(name: str, array: np.ndarray | onnx.TensorProto) -> Constant:
    """A new constant tensor; any dtype numpy_helper supports (incl. ml_dtypes int4/fp4/fp8)."""
    if isinstance(array, onnx.TensorProto):
        proto = onnx.TensorProto()
        proto.CopyFrom(array)
        proto.name = name
        return Constant(name, LazyValues(proto))
    return Constant(name, _lazy(name, array))


def set_constant(tensor: Constant, array: np.ndarray) -> None:
    """Replace a constant's value in place (keeps its name and consumers)."""
    tensor.values = _lazy(tensor.name, array)


def replace_constant(graph: Graph, node: Node, index: int, array: np.ndarray, suffix: str) -> Constant:
    """Give ``node`` input ``index`` a fresh constant (others may still use the old one)."""
    old = node.inputs[index]
    new = make_constant(unique_name(graph, f"{old.name}{suffix}"), array)
    node.inputs[index] = new
    return new


def write_input(graph: Graph, node: Node, index: int, array: np.ndarray) -> None:
    """Set ``node`` input ``index`` to ``array``: in place if only this node reads it, else a new constant."""
    tensor = node.inputs[index]
    exclusive = (
        isinstance(tensor, Constant)
        and only_consumer_is(graph, tensor, node)
        and sum(t is tensor for t in node.inputs) == 1
        and not any(t is tensor for t in graph.inputs)
    )
    if exclusive:
        set_constant(tensor, array)
    else:
        replace_constant(graph, node, index, array, "_folded")


def make_variable(
    graph: Graph, base: str, dtype: np.dtype | type[np.generic] | None = None, shape: list | None = None
) -> Variable:
    """A new intermediate tensor with a name unique in ``graph``."""
    return Variable(unique_name(graph, base), dtype=dtype, shape=shape)


def omitted() -> Variable:
    """The empty tensor that stands for an omitted optional input."""
    return Variable.empty()


def make_node(
    graph: Graph,
    op: str,
    inputs: list[Tensor],
    outputs: list[Tensor],
    name: str,
    attrs: dict | None = None,
    domain: str | None = None,
) -> Node:
    """Create a node with a unique name and append it to ``graph`` (finalize sorts it)."""
    node = Node(op=op, name=unique_name(graph, name), attrs=attrs or {}, inputs=inputs, outputs=outputs, domain=domain)
    graph.nodes.append(node)
    _names_cache(graph).add(node.name)
    return node


def make_body(graph: Graph, nodes: list[Node], outputs: list[Variable]) -> Graph:
    """An If/Loop body made of ``nodes``, moved out of ``graph`` (built there by :func:`make_node`, so
    their names are unique model-wide); they may read ``graph``'s tensors directly (outer scope)."""
    moved = {id(n) for n in nodes}
    graph.nodes[:] = [n for n in graph.nodes if id(n) not in moved]
    return Graph(nodes=nodes, inputs=[], outputs=outputs, opset=graph.opset, name=unique_name(graph, "body"))


# --- structure -----------------------------------------------------------------------------


def producer(tensor: Tensor) -> Node | None:
    """The node that produces ``tensor`` (None for graph inputs and initializers)."""
    return tensor.inputs[0] if tensor.inputs else None


def consumers(tensor: Tensor) -> list[Node]:
    """Nodes that read ``tensor`` (a node reading it twice appears once)."""
    seen: dict[int, Node] = {}
    for node in tensor.outputs:
        seen.setdefault(id(node), node)
    return list(seen.values())


def is_graph_output(graph: Graph, tensor: Tensor) -> bool:
    return any(t is tensor for t in graph.outputs)


def only_consumer_is(graph: Graph, tensor: Tensor, node: Node) -> bool:
    """True when ``node`` is the single reader of ``tensor``, it is not a graph output, and the
    tensor is not produced in an enclosing scope (a body must not rewrite its parent's nodes)."""
    users = consumers(tensor)
    source = producer(tensor)
    outer = source is not None and not owns(graph, source)
    return len(users) == 1 and users[0] is node and not is_graph_output(graph, tensor) and not outer


def bypass_node(graph: Graph, node: Node) -> None:
    """Remove a single-input pass-through node, rewiring its readers to its input.

    When the node's output is a graph output, the producer side is renamed instead so the graph
    keeps its output name.
    """
    src, dst = node.inputs[0], node.outputs[0]
    if is_graph_output(graph, dst):
        src_prod = producer(src)
        if src_prod is not None and owns(graph, src_prod) and not is_graph_output(graph, src):
            # Let the producer write the graph output directly.
            for user in list(src.outputs):
                if user is not node:
                    user.inputs[user.inputs.index(src)] = dst
            idx = src_prod.outputs.index(src)
            node.outputs.clear()
            src_prod.outputs[idx] = dst
            node.inputs.clear()
            return
        # An input, a constant or an enclosing scope's value feeds the output: keep the node.
        return
    for user in list(dst.outputs):
        for i, t in enumerate(user.inputs):
            if t is dst:
                user.inputs[i] = src
    node.inputs.clear()
    node.outputs.clear()


def iter_graphs(graph: Graph) -> Iterator[tuple[Graph, str]]:
    """``graph``, then every If/Loop/Scan body inside it (depth first), each with where it is.

    ``where`` is "" for ``graph`` and ``inside If 'name' (then_branch)`` for a body. Bodies share
    ``graph``'s name set, so a name made in one is unique in the whole model.
    """
    names = _names_cache(graph)
    yield graph, ""

    def bodies(parent: Graph) -> Iterator[tuple[Graph, str]]:
        for node in list(parent.nodes):
            for attr, value in node.attrs.items():
                subs = value if isinstance(value, list) else [value]
                for sub in subs:
                    if isinstance(sub, Graph):
                        sub._onnxcomp_names = names  # noqa: SLF001
                        yield sub, f"inside {node.op} {node.name!r} ({attr})"
                        yield from bodies(sub)

    yield from bodies(graph)


def body_nodes(graph: Graph, ops: Iterable[str]) -> list[tuple[Node, str]]:
    """Nodes of ``ops`` inside If/Loop/Scan bodies, each with where it is (for passes that decline them)."""
    wanted = tuple(ops)
    return [(node, where) for body, where in list(iter_graphs(graph))[1:] for node in body.nodes if node.op in wanted]


def iter_nodes(graph: Graph, ops: Iterable[str] | None = None, subgraphs: bool = False) -> Iterator[Node]:
    """Nodes of the graph (a snapshot: safe to mutate while iterating), optionally by op.

    With ``subgraphs=True`` the nodes of every If/Loop/Scan body follow the graph's own. A
    rewrite of a body node needs the body (new nodes go there): use :func:`iter_graphs`.
    """
    wanted = set(ops) if ops is not None else None
    graphs = [g for g, _ in iter_graphs(graph)] if subgraphs else [graph]
    for each in graphs:
        for node in list(each.nodes):
            if wanted is None or node.op in wanted:
                yield node


def owns(graph: Graph, node: Node | None) -> bool:
    """True when ``node`` is one of ``graph``'s own nodes (not an enclosing scope's)."""
    return node is not None and any(n is node for n in graph.nodes)


def _names_cache(graph: Graph) -> set[str]:
    """Tensor and node names in use in the whole model (bodies included), built once."""
    cache = graph.__dict__.get("_onnxcomp_names")  # not getattr: gs routes misses to its function registry
    if cache is None:
        cache = set()
        for each in [graph, *graph.subgraphs(recursive=True)]:
            cache |= set(each.tensors()) | {n.name for n in each.nodes if n.name}
        graph._onnxcomp_names = cache  # noqa: SLF001
    return cache


def unique_name(graph: Graph, base: str) -> str:
    """A tensor/node name not used in ``graph`` (deterministic: base, base_1, base_2, ...)."""
    names = _names_cache(graph)
    if base not in names:
        names.add(base)
        return base
    for i in itertools.count(1):
        cand = f"{base}_{i}"
        if cand not in names:
            names.add(cand)
            return cand
    raise AssertionError("unreachable")


# --- shape information ---------------------------------------------------------------------


#: Initializers above this size are weights, never the shape-like inputs (Reshape shape, Resize
#: scales, Pad pads, Slice starts, axes ...) whose values shape inference reads.
SHAPE_INPUT_MAX_BYTES = 4096


def _without_weight_data(graph: Graph) -> set[str]:
    """Give the weight-sized Constants of ``graph`` (a copy: values are shared, never changed) data-free
    values, dims and element type only: inference and opset conversion need nothing more of them,
    and exporting and serialising every weight for them would cost model-sized copies. Returns
    the names of the Constants it emptied."""
    emptied = set()
    for tensor in graph.tensors().values():
        if not isinstance(tensor, Constant):
            continue
        values = tensor._values  # noqa: SLF001 - replaced, never loaded
        if isinstance(values, LazyValues) and values.nbytes > SHAPE_INPUT_MAX_BYTES:
            dims, data_type = list(values.tensor.dims), values.tensor.data_type
        elif isinstance(values, np.ndarray) and values.nbytes > SHAPE_INPUT_MAX_BYTES:
            if np.dtype(tensor.export_dtype) != values.dtype:
                continue  # exported in another element type: leave it
            try:
                data_type = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
            except (KeyError, TypeError, ValueError):
                continue
            dims = list(values.shape)
        else:
            continue
        bare = onnx.TensorProto(name=tensor.name, data_type=data_type, dims=dims)  # no data
        tensor._values = LazyValues(bare)  # noqa: SLF001
        emptied.add(tensor.name)
    return emptied


def upgrade_graph(
    graph: Graph, template: onnx.ModelProto, convert: Callable[[onnx.ModelProto], onnx.ModelProto]
) -> Graph | None:
    """``graph`` converted by ``convert`` (onnx's opset converter), without a copy of its weights.

    The converter rewrites ops and attributes, never weight values: it gets the model with
    data-free weights, and each weight goes back by name onto the converted graph. Returns None
    (convert the full model instead) when the converter changed a weight's name, shape or type.
    """
    bare = graph.copy()
    bare._onnxcomp_facts = graph.__dict__.get("_onnxcomp_facts")  # noqa: SLF001 - what export_model reads
    emptied = _without_weight_data(bare)
    converted = import_model(convert(export_model(bare, template)))
    originals, found = graph.tensors(), converted.tensors()
    for name in emptied:
        old, new = originals[name], found.get(name)
        if not (isinstance(old, Constant) and isinstance(new, Constant)) or tuple(new.shape) != tuple(old.shape):
            return None
        if not isinstance(new._values, LazyValues) or new._values.tensor.data_type != _onnx_type(old):  # noqa: SLF001
            return None
    for name in emptied:
        new = found[name]
        assert isinstance(new, Constant)
        new._values = originals[name]._values  # noqa: SLF001 - the weight itself, shared, not copied
    return converted


def _onnx_type(tensor: Constant) -> int | None:
    values = tensor._values  # noqa: SLF001
    if isinstance(values, LazyValues):
        return int(values.tensor.data_type)
    try:
        return int(onnx.helper.np_dtype_to_tensor_dtype(np.asarray(values).dtype))
    except (KeyError, TypeError, ValueError):
        return None


def infer_shapes(graph: Graph) -> None:
    """Fill in unknown dtypes/shapes of ``graph``'s Variables with onnx shape inference.

    Exports a tidied copy of the graph (the graph itself is not cleaned or sorted), runs
    ``onnx.shape_inference.infer_shapes`` (non-strict) and copies the results back by tensor
    name onto Variables whose dtype or shape is unknown; known information is never
    overwritten. Graphs too large to serialise, or that inference rejects, are left as they are.
    """
    tidy = graph.copy()
    tidy.cleanup(remove_unused_graph_inputs=False).toposort()
    _without_weight_data(tidy)
    model = gs.export_onnx(tidy, do_type_check=False)
    if model.ByteSize() >= 2**31 - 1:
        log.debug("infer_shapes: model too large to serialise; shapes left unknown")
        return
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as exc:
        log.debug("infer_shapes: inference failed (%s); shapes left unknown", exc)
        return
    found = {name: t for name, t in gs.import_onnx(inferred).tensors().items() if isinstance(t, Variable)}
    for name, tensor in graph.tensors().items():
        info = found.get(name)
        if info is None or not isinstance(tensor, Variable):
            continue
        if tensor.dtype is None and info.dtype is not None:
            tensor.dtype = info.dtype
        if tensor.shape is None and info.shape is not None:
            tensor.shape = info.shape
