"""Load an ONNX model and find its quantizable layers.

`load(path)` reads the protobuf (external data only from inside the model's folder), turns weights held
in `Constant` nodes into initializers, upgrades opsets older than 13 (per-channel DequantizeLinear needs
13), runs shape inference, folds BatchNormalization and bias Adds into their layers (`folding`) and
returns a `Model`: the proto plus the `LayerSpec` of every weighted layer (Conv, ConvTranspose, Gemm,
MatMul with a constant weight, Gather on a constant table) and, on request, its quantization points
(`Model.points`). Layers inside If/Loop/Scan bodies stay float and are listed in
`Model.skipped` with the reason.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Container, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, numpy_helper, shape_inference, version_converter

from onnxmpq import paths
from onnxmpq.errors import OnnxmpqError
from onnxmpq.graph import integrity, points
from onnxmpq.graph.folding import fold_all
from onnxmpq.graph.index import GraphIndex
from onnxmpq.graph.points import Points
from onnxmpq.ops import OP_HANDLERS, NodeView
from onnxmpq.types import InputSpec, LayerSpec, QuantOptions

if TYPE_CHECKING:
    from onnxmpq.types import Scope

MIN_OPSET = 13
_PROTO_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class Model:
    """A loaded float model.

    Attributes:
        proto: the model with Constant weights folded and opset >= 13; treat as read-only.
        path: where it was read from (None for in-memory models).
        layers: quantizable layers in topological order.
        skipped: names of quantizable-looking nodes left in float, each with the reason.
        inputs: the graph inputs that must be fed (initializers excluded).
    """

    proto: onnx.ModelProto
    path: Path | None
    layers: tuple[LayerSpec, ...]
    skipped: tuple[tuple[str, str], ...]
    inputs: tuple[InputSpec, ...]
    metadata: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # what the loader repaired (a declared output shape the graph contradicts)
    data_files: tuple[Path, ...] = ()  # the external data files read with it
    memo: dict[tuple[Scope, frozenset[str], frozenset[str]], Points] = field(
        default_factory=dict, compare=False, repr=False)  # points per rule set

    def points(self, options: QuantOptions | None = None) -> Points:
        """The quantization points of the model (`onnxmpq.graph.points`) under the writer options' scope,
        integer ops and tied ops (`QuantOptions`), found once per rule set."""
        options = options or QuantOptions()
        key = (options.scope, options.integer_ops, options.tie_ops)
        if key not in self.memo:
            self.memo[key] = points.find(self.proto, self.layers, options.scope, options.integer_ops, options.tie_ops,
                                         self.index)
        return self.memo[key]

    def layer(self, name: str) -> LayerSpec:
        for spec in self.layers:
            if spec.name == name:
                return spec
        raise OnnxmpqError(f"the model has no quantizable layer named {name!r}.",
                           "run `onnxmpq inspect MODEL` to list the layer names.")

    @property
    def opset(self) -> int:
        return default_opset(self.proto)

    @functools.cached_property
    def index(self) -> GraphIndex:
        """Producers, consumers, constants and shapes of the top-level graph, built once per model."""
        return GraphIndex.of(self.proto.graph)


def default_opset(proto: onnx.ModelProto) -> int:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            version: int = imp.version  # protobuf's containers have no stubs here
            return version
    return 1


def load(path: str | os.PathLike[str]) -> Model:
    """Read, check and prepare a model from disk (see the module docstring)."""
    path = paths.regular_file(path, "model file", "check the path to the .onnx file.")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise OnnxmpqError(f"{str(path)!r} is not a readable ONNX model ({type(exc).__name__}).",
                           "pass an .onnx file exported by a framework; it may be truncated or corrupt.") from None
    if not proto.HasField("graph"):
        raise OnnxmpqError(f"{str(path)!r} holds no ONNX graph.", "pass an .onnx model file.")
    files = _load_external_data(proto, path.parent)
    return dataclasses.replace(from_proto(proto, path, copy=False), data_files=files)


def _load_external_data(proto: onnx.ModelProto, base: Path) -> tuple[Path, ...]:
    """Loads external tensors, refusing any location outside the model's folder; returns the files read."""
    base = base.resolve()
    files: dict[Path, None] = {}
    for tensor in _all_tensors(proto):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = (base / location).resolve()
        if os.path.isabs(location) or base not in target.parents:
            raise OnnxmpqError(f"tensor {tensor.name!r} points to external data {location!r} outside the model's folder.",
                               "refusing to read it; keep external data files next to the model.")
        if not target.is_file():
            raise OnnxmpqError(f"external data file {location!r} of tensor {tensor.name!r} is missing.",
                               "copy the .data file next to the .onnx file.")
        files[target] = None
    try:
        onnx.external_data_helper.load_external_data_for_model(proto, str(base))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise OnnxmpqError(f"cannot read the model's external data: {exc}.", "check the .data files.") from None
    return tuple(files)


def _all_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Initializers and tensor attributes of the graph and of every subgraph."""
    stack = [proto.graph]
    while stack:
        graph = stack.pop()
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
            stack.extend(_subgraphs(node))


def from_proto(proto: onnx.ModelProto, path: Path | None = None, copy: bool = True) -> Model:
    """Prepares an in-memory model: fold Constant weights, upgrade the opset, infer shapes, find layers.
    `copy=False` edits `proto` itself (the loader's own copy: one less copy of every weight)."""
    if copy:
        proto = _copy(proto)
    if len(proto.graph.node) == 0:
        raise OnnxmpqError("the model's graph has no nodes.", "export the model again; there is nothing to quantize.")
    _name_nodes(proto.graph)
    _shorten_tensor_names(proto.graph)
    integrity.check_single_writers(proto.graph)
    integrity.check_required_inputs(proto.graph, default_opset(proto))
    integrity.check_tensor_sizes(_all_tensors(proto))
    if default_opset(proto) < MIN_OPSET:
        proto = convert_opset(proto, MIN_OPSET)
        _name_nodes(proto.graph)  # the converter's own new nodes
    _fold_constants(proto.graph)
    _drop_initializer_inputs(proto.graph)
    proto.ir_version = max(proto.ir_version, 7)  # IR >= 4 lets initializers stay out of the inputs
    _fold_weight_chains(proto)
    repaired: list[str] = []
    proto = infer_shapes(proto, repaired)  # the folds below need shapes
    if fold_all(proto.graph):
        keep_initializers(proto.graph, names_read(proto.graph))
        proto = infer_shapes(proto, repaired)
    layers, skipped = find_layers(proto)
    metadata = {p.key: p.value for p in proto.metadata_props}
    return Model(proto, path, tuple(layers), tuple(skipped), tuple(graph_inputs(proto)), metadata,
                 notes=tuple(dict.fromkeys(repaired)))


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy


def convert_opset(proto: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """Upgrades the default-domain opset with onnx's version converter."""
    if default_opset(proto) >= target:
        return proto
    try:
        converted = version_converter.convert_version(proto, target)
    except Exception as exc:  # the converter raises bare RuntimeErrors of many kinds
        raise OnnxmpqError(f"cannot upgrade the model from opset {default_opset(proto)} to {target}: "
                           f"{str(exc).splitlines()[0][:200]}.",
                           f"re-export the model at opset {target} or newer.") from None
    return converted


def at_opset(model: Model, opset: int) -> Model:
    """`model` with its proto upgraded to `opset` (the same object when it already is)."""
    converted = convert_opset(model.proto, opset)
    return model if converted is model.proto else dataclasses.replace(model, proto=converted, memo={})


def keep_initializers(graph: onnx.GraphProto, names: Container[str]) -> None:
    """Deletes the initializers not in `names`, in place (rebuilding the list would copy every tensor)."""
    for i in reversed([i for i, t in enumerate(graph.initializer) if t.name not in names]):
        del graph.initializer[i]


SKELETON_BYTES = 1024  # initializers above this size lose their data in the shape-inference skeleton


def infer_shapes(proto: onnx.ModelProto, repaired: list[str] | None = None) -> onnx.ModelProto:
    """Runs onnx shape inference on a skeleton of the model whose large initializers keep only their type
    and dims (shapes need no weight values; small ones, which may hold shapes, keep theirs), then copies
    the inferred value_info back: memory stays near one copy of the weights, and models over 2 GB work.

    The graph outputs' declared shapes are not fed to inference: a declared shape that what the graph
    computes contradicts (rank, or a static dim) is replaced by the computed one and said in `repaired`.
    Merged in, such a conflict would be dropped silently here (non-strict) while the value_info found by
    data propagation would make the written model fail `check_model(full_check=True)`."""
    skeleton = onnx.ModelProto()
    for attr in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(skeleton, attr, getattr(proto, attr))
    skeleton.opset_import.extend(proto.opset_import)
    skeleton.functions.extend(proto.functions)
    graph = skeleton.graph
    graph.name = proto.graph.name
    graph.node.extend(proto.graph.node)
    graph.input.extend(proto.graph.input)
    graph.output.extend(proto.graph.output)
    for out in graph.output:
        out.type.tensor_type.ClearField("shape")
    graph.value_info.extend(proto.graph.value_info)
    for tensor in proto.graph.initializer:
        if tensor.ByteSize() <= SKELETON_BYTES:
            graph.initializer.append(tensor)
        else:
            graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    try:
        inferred = shape_inference.infer_shapes(skeleton, data_prop=True)
    except Exception as exc:  # onnx raises InferenceError and bare RuntimeErrors
        raise OnnxmpqError(f"the model is not a valid ONNX graph: {str(exc).splitlines()[0][:200]}.",
                           "run `python -m onnx.checker MODEL` to see what is wrong.") from None
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(inferred.graph.value_info)
    for mine, theirs in zip(proto.graph.output, inferred.graph.output):
        declared = onnx.TensorShapeProto()
        if mine.type.tensor_type.HasField("shape"):
            declared.CopyFrom(mine.type.tensor_type.shape)
        had_shape = mine.type.tensor_type.HasField("shape")
        mine.CopyFrom(theirs)
        if had_shape:
            shape, conflict = _merge_declared(declared, theirs.type.tensor_type)
            mine.type.tensor_type.shape.CopyFrom(shape)
            if conflict and repaired is not None:
                repaired.append(f"output {mine.name!r} is declared {_dims(declared)} but the graph computes "
                                f"{_dims(shape)}; the quantized model declares the computed shape")
    return proto


def _dims(shape: onnx.TensorShapeProto) -> str:
    return "[" + ", ".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
                           for d in shape.dim) + "]"


def _merge_declared(declared: onnx.TensorShapeProto, inferred: onnx.TypeProto.Tensor) -> tuple[onnx.TensorShapeProto, bool]:
    """The declared shape refined by the inferred one, or the inferred one where they conflict (another
    rank, or two different static sizes); (shape, conflict)."""
    if not inferred.HasField("shape"):
        return declared, False
    computed = inferred.shape
    if len(computed.dim) != len(declared.dim):
        return computed, True
    merged, conflict = onnx.TensorShapeProto(), False
    merged.CopyFrom(declared)
    for mine, theirs in zip(merged.dim, computed.dim):
        if theirs.HasField("dim_value"):  # a static size refines a symbolic one, as onnx's merge does
            conflict |= mine.HasField("dim_value") and mine.dim_value != theirs.dim_value
            mine.dim_value = theirs.dim_value
    return merged, conflict


MAX_TENSOR_NAME = 48  # characters; longer internal tensor names are shortened at load


def short_name(name: str) -> str:
    """head.hash.tail of a long name: 16 + 1 + 8 + 1 + 16 characters, stable across runs."""
    return f"{name[:16]}.{hashlib.sha256(name.encode()).hexdigest()[:8]}.{name[-16:]}"


def _shorten_tensor_names(graph: onnx.GraphProto) -> None:
    """Internal tensor names longer than MAX_TENSOR_NAME become `short_name`s, everywhere they occur
    (nodes of every subgraph, initializers, value infos). Exporters such as tf2onnx join the names of
    all the ops they fused into one, and every Q/DQ pair would repeat such a name: on Basic Pitch's
    nmp.onnx they were most of the quantized file. Graph inputs and outputs and node names (the
    layer names users pass) keep theirs."""
    keep = {i.name for i in graph.input} | {o.name for o in graph.output}
    names = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    rename = {n: short_name(n) for n in names if len(n) > MAX_TENSOR_NAME and n not in keep}
    new = set(rename.values())
    if not rename or len(new) < len(rename) or new & (names | keep):  # a clash: leave the names alone
        return
    for tensor in graph.initializer:
        tensor.name = rename.get(tensor.name, tensor.name)
    for info in graph.value_info:
        info.name = rename.get(info.name, info.name)
    stack = [graph]
    while stack:
        g = stack.pop()
        for node in g.node:
            node.input[:] = [rename.get(i, i) for i in node.input]
            node.output[:] = [rename.get(o, o) for o in node.output]
            stack.extend(_subgraphs(node))


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Gives unnamed nodes a name and makes duplicate names unique, so layer names are stable ids."""
    explicit = {node.name for node in graph.node if node.name}
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        base = node.name or f"{node.op_type}_{i}"
        name, k = base, 1
        while name in seen or (not node.name and name in explicit):
            name, k = f"{base}_{k}", k + 1
        node.name = name
        seen.add(name)


def _fold_constants(graph: onnx.GraphProto) -> None:
    """Moves `Constant` nodes of the top-level graph into initializers."""
    keep = []
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            tensor = _constant_value(node)
            if tensor is not None:
                tensor.name = node.output[0]
                graph.initializer.append(tensor)
                continue
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # ops listed as float inside subgraph bodies
_FOLDABLE = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Cast", "Flatten"}


def _widens_codes(node: onnx.NodeProto, consts: Mapping[str, onnx.TensorProto]) -> bool:
    """A Cast of packed INT4/INT2 codes is a storage layout (see `write.build`), kept so readers see the width."""
    sub_byte = {TensorProto.INT4, TensorProto.UINT4, TensorProto.INT2, TensorProto.UINT2}
    return node.op_type == "Cast" and consts[node.input[0]].data_type in sub_byte


def _fold_weight_chains(proto: onnx.ModelProto) -> None:
    """Evaluates shape-only ops whose inputs are all initializers (mnist-8 reshapes its MatMul weight),
    so the weight behind them is seen as a constant; the op-by-op oracle is onnx's reference evaluator."""
    from onnx.reference import ReferenceEvaluator

    graph = proto.graph
    consts = {t.name: t for t in graph.initializer}
    keep = []
    for node in graph.node:
        inputs = [i for i in node.input if i]
        if node.op_type in _FOLDABLE and node.domain in ("", "ai.onnx") and inputs \
                and all(i in consts for i in inputs) and len(node.output) == 1 and not _widens_codes(node, consts):
            single = onnx.helper.make_model(
                onnx.helper.make_graph([node], "fold", [], [onnx.helper.make_tensor_value_info(node.output[0], 0, None)],
                                       [consts[i] for i in dict.fromkeys(inputs)]),
                opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
            try:
                outputs = ReferenceEvaluator(single).run(None, {})
            except Exception:  # leave anything the oracle cannot evaluate to onnxruntime
                keep.append(node)
                continue
            assert isinstance(outputs, list), "run() without intermediate=True returns the outputs as a list"
            value = outputs[0]
            tensor = numpy_helper.from_array(np.asarray(value), node.output[0])
            graph.initializer.append(tensor)
            consts[tensor.name] = tensor
            continue
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    keep_initializers(graph, names_read(graph))


def names_read(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name read by a node (subgraphs included, they may read outer initializers) or output."""
    names = {o.name for o in graph.output}
    stack = [graph]
    while stack:
        g = stack.pop()
        for node in g.node:
            names.update(i for i in node.input if i)  # '' is an omitted optional input, not a tensor
            for sub in _subgraphs(node):
                stack.append(sub)
    return names


def node_reads(node: onnx.NodeProto) -> list[str]:
    """The tensors `node` needs from its graph: its inputs and what its subgraphs (If/Loop/Scan bodies)
    read from the enclosing scope."""
    reads = [i for i in node.input if i]
    for sub in _subgraphs(node):
        local, stack = set(), [sub]
        while stack:  # everything defined inside the body, nested bodies included
            g = stack.pop()
            local |= {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                local.update(n.output)
                stack.extend(_subgraphs(n))
        reads += sorted(names_read(sub) - local)
    return reads


def specialize(model: Model, shapes: Mapping[str, Sequence[int]]) -> Model:
    """`model` with its layers' MACs computed for concrete input shapes (batch counted as 1).

    The proto keeps its dynamic dims; only the `LayerSpec`s change (an OCR model's width, say, is
    dynamic, and its MACs per sample are only defined for a given width).
    """
    dynamic = any(d is None for spec in model.inputs for d in spec.shape[1:])
    if not dynamic:
        return model
    fixed = _copy(model.proto)
    del fixed.graph.value_info[:]
    for value in fixed.graph.input:
        if value.name in shapes:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, [1, *list(shapes[value.name])[1:]]):
                dim.Clear()
                dim.dim_value = int(size)
    layers, _ = find_layers(infer_shapes(fixed))
    return dataclasses.replace(model, layers=tuple(layers), memo={})


def _constant_value(node: onnx.NodeProto) -> TensorProto | None:
    for attr in node.attribute:
        if attr.name == "value":
            tensor = TensorProto()
            tensor.CopyFrom(attr.t)
            return tensor
        if attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
            value = onnx.helper.get_attribute_value(attr)
            dtype = np.float32 if "float" in attr.name else np.int64
            return numpy_helper.from_array(np.array(value, dtype=dtype))
    return None  # sparse or string constants stay as nodes


def _drop_initializer_inputs(graph: onnx.GraphProto) -> None:
    """Old exporters list initializers among the graph inputs; those are not fed by the user."""
    names = {t.name for t in graph.initializer}
    keep = [i for i in graph.input if i.name not in names]
    del graph.input[:]
    graph.input.extend(keep)


def graph_inputs(proto: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a user must feed, with numpy dtype and static dims (None where dynamic)."""
    specs = []
    for value in proto.graph.input:
        ttype = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise OnnxmpqError(f"model input {value.name!r} is not a tensor.", "only tensor inputs are supported.")
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim)
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type))
        specs.append(InputSpec(value.name, dtype, dims))
    return specs


def find_layers(proto: onnx.ModelProto) -> tuple[list[LayerSpec], list[tuple[str, str]]]:
    """Lists the quantizable layers of the top-level graph and the ones left in float, with reasons."""
    graph = proto.graph
    index = GraphIndex.of(graph)
    layers, skipped = [], []
    for node in graph.node:
        handler = OP_HANDLERS.get_or_none(node.op_type) if node.domain in ("", "ai.onnx") else None
        if handler is not None:
            spec = handler.describe(NodeView(node, index))
            if spec is not None and spec.params == 0:
                skipped.append((spec.name, "its weight has a zero-size dimension: stays float"))
            elif spec is not None:
                layers.append(spec)
        elif node.domain in ("", "ai.onnx") and (params := _constant_params(node, index)) >= WEIGHTY:
            skipped.append((node.name, f"{node.op_type} with {params:,d} constant parameters has no quantization "
                                       "handler: stays float"))
        for sub in _subgraphs(node):
            skipped += [(n.name or n.op_type, f"inside the {node.op_type} subgraph of {node.name!r}: stays float")
                        for n in _walk(sub) if n.op_type in WEIGHTED_OPS]
    return layers, skipped


WEIGHTY = 1024  # constant float parameters from which an op without a handler is listed as left float


def _constant_params(node: onnx.NodeProto, index: GraphIndex) -> int:
    """Elements of the float constants `node` reads (an LSTM's W, R and B; an Einsum's weight)."""
    return sum(int(np.prod(index.consts[name].dims)) for name in node.input
               if name and index.float_const(name) is not None)


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _walk(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for sub in _subgraphs(node):
            yield from _walk(sub)
