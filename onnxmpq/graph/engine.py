"""Run a graph piece by piece over a cached calibration set, so that asking for tensor after tensor in
topological order costs one forward pass in all, not one per tensor.

A `Frontier` holds, for every calibration batch, the values at the current cut of the graph: the
tensors already computed that a node not yet run still reads. `advance(proto, targets)` extracts the
nodes between the cut and `targets` (walking back from the targets until it meets cut tensors or
initializers), runs that segment in onnxruntime batch by batch, returns the targets' values and moves
the cut forward. The proto may change between calls (GPTQ quantizes one more layer each time) as long
as the nodes already run keep their output names; a node whose outputs are all computed counts as run.

Memory: the cut's tensors for every calibration sample (for a ResNet, one or two feature maps).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx

from onnxmpq.errors import InternalError
from onnxmpq.graph import runtime
from onnxmpq.graph.model import node_reads


class Frontier:
    """Cached values at the cut of a graph, one dict of arrays per calibration batch."""

    def __init__(self, batches: Iterable[Mapping[str, np.ndarray]]):
        self.values = [dict(batch) for batch in batches]
        self.computed: set[str] = set(self.values[0]) if self.values else set()

    def advance(self, proto: onnx.ModelProto, targets: Sequence[str]) -> list[list[np.ndarray]]:
        """Values of `targets` for every batch (outer list: batches; inner: targets); moves the cut."""
        return self._run(proto, targets, move=True)

    def peek(self, proto: onnx.ModelProto, targets: Sequence[str],
             extra: Sequence[Mapping[str, np.ndarray]] = ()) -> list[list[np.ndarray]]:
        """Values of `targets` computed from the current cut, which stays where it is (a probe: the
        cut's float values through a graph that differs only downstream of the cut); `extra` adds
        tensors to the cut for this call, one dict per batch (the inputs of nodes the probe added)."""
        return self._run(proto, targets, move=False, extra=extra)

    def _run(self, proto: onnx.ModelProto, targets: Sequence[str], move: bool,
             extra: Sequence[Mapping[str, np.ndarray]] = ()) -> list[list[np.ndarray]]:
        values = [{**vals, **more} for vals, more in zip(self.values, extra, strict=True)] if extra else self.values
        available = set(values[0])
        dtypes = {name: value.dtype for name, value in values[0].items()}
        segment, inputs, produced = _segment(proto, available, targets, self.computed, dtypes, move)
        outputs = list(dict.fromkeys([t for t in targets if t not in available] + produced))
        results = []
        if segment is None:  # every target is already at the cut
            return [[vals[t] for t in targets] for vals in values]
        sess = runtime.session(segment)
        for vals in values:
            got = dict(zip(outputs, runtime.run(sess, {n: vals[n] for n in inputs}, outputs)))
            results.append([got[t] if t in got else vals[t] for t in targets])
            if move:
                vals.update(got)
        if move:
            self.computed.update(o for n in segment.graph.node for o in n.output if o)
            self._drop_dead(proto)
        return results

    def _drop_dead(self, proto: onnx.ModelProto) -> None:
        """Forgets cut tensors that no node still to run reads."""
        pending = [n for n in proto.graph.node if not all(o in self.computed for o in n.output if o)]
        live = {i for n in pending for i in node_reads(n)} | {o.name for o in proto.graph.output}
        for vals in self.values:
            for name in [k for k in vals if k not in live]:
                del vals[name]


def _segment(proto: onnx.ModelProto, available: set[str], targets: Sequence[str], computed: set[str],
             dtypes: Mapping[str, np.dtype],
             keep_cut: bool = True) -> tuple[onnx.ModelProto | None, list[str], list[str]]:
    """The model computing `targets` from `available`; returns (model, its inputs, the tensors it
    computes that later nodes read, which join the cut)."""
    graph = proto.graph
    producer = {o: n for n in graph.node for o in n.output if o}
    inits = {t.name: t for t in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    seen: set[str] = set()
    stack = [t for t in targets if t not in available]
    inputs: list[str] = []
    taken: set[int] = set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in available:
            inputs.append(name)
            continue
        if name in inits:
            continue
        node = producer.get(name)
        if node is None:
            raise InternalError(f"tensor {name!r} is neither computed nor at the cut")
        if id(node) not in taken:
            taken.add(id(node))
            nodes.append(node)
            stack.extend(node_reads(node))
    if not nodes:
        return None, [], []
    order = {id(n): i for i, n in enumerate(graph.node)}
    nodes.sort(key=lambda n: order[id(n)])
    done = computed | {o for n in nodes for o in n.output if o}
    later = {i for n in graph.node if id(n) not in taken and not all(o in done for o in n.output if o)
             for i in node_reads(n)}
    later |= {o.name for o in graph.output}
    produced = [o for n in nodes for o in n.output if o and o in later] if keep_cut else []
    reads = {i for n in nodes for i in node_reads(n)}
    types = _value_types(proto)
    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            nodes, "segment", [_input_value(types, n, dtypes[n]) for n in inputs],
            [_output_value(types, n) for n in dict.fromkeys([t for t in targets if t not in available] + produced)],
            [inits[n] for n in sorted(reads & set(inits))]),
        opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
    return model, inputs, produced


def _value_types(proto: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    graph = proto.graph
    return {v.name: v for v in list(graph.input) + list(graph.value_info) + list(graph.output)}


def _input_value(types: Mapping[str, onnx.ValueInfoProto], name: str, dtype: np.dtype) -> onnx.ValueInfoProto:
    """A segment input typed from the cached array (value_info may be missing). Static dims are kept but
    the first (batches differ in size): onnxruntime's layout optimisations need the channel count."""
    known = types.get(name)
    shape = known.type.tensor_type.shape if known is not None and known.type.tensor_type.HasField("shape") else None
    elem = onnx.helper.np_dtype_to_tensor_dtype(dtype)
    if shape is None:
        return onnx.helper.make_tensor_value_info(name, elem, None)
    dims = [None] + [d.dim_value if d.HasField("dim_value") else None for d in list(shape.dim)[1:]]
    return onnx.helper.make_tensor_value_info(name, elem, dims[: len(shape.dim)])


def _output_value(types: Mapping[str, onnx.ValueInfoProto], name: str) -> onnx.ValueInfoProto:
    """A segment output: its known element type, else left for onnxruntime to infer."""
    known = types.get(name)
    if known is None or not known.type.tensor_type.elem_type:
        return onnx.helper.make_empty_tensor_value_info(name)
    return onnx.helper.make_tensor_value_info(name, known.type.tensor_type.elem_type, None)
