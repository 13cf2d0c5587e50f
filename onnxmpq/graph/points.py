"""Quantization points: which tensors of a graph carry Q/DQ, which share one scale, and the units that
each compute at one activation width. Built from the op handlers' declarations (`onnxmpq.ops`).

Scope `graph` (the default, full-integer QDQ): every node a handler quantizes is a *unit* (COMPUTE: it
reads and writes its quantized tensors at one width, the allocation's activation variable) or moves data
(PASS: its outputs share its input's scale); a Relu or Clip right after a unit it alone reads from is
absorbed into that unit. Tensors joined by PASS nodes, or by a Concat, form a *group* with one range.
A group carries Q/DQ when some unit with an integer kernel reads one of its tensors, or writes one and
cannot write float (QLinearConv can't; QGemm and MatMulIntegerToFloat can): every activation tensor an
integer kernel touches is quantized, and the islands between float-only ops (GELU's inside, a bias Add
after a MatMul) stay float. A profile's `integer_ops` add op types that the target runs on integers.

Scope `layers` (the older form): the weighted layers are the units, each with its activation input as
its only point.

Widths: the unit writing a tensor (through PASS nodes: its `source`) decides the width it is stored at;
a unit reading it at another width reads it through a requantize (DQ at one width, Q at the other).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import onnx

from onnxmpq.errors import OnnxmpqError
from onnxmpq.graph.index import GraphIndex
from onnxmpq.ops import OP_HANDLERS, Kind, NodeQuant, NodeView
from onnxmpq.types import LayerSpec, Scope


@dataclass(frozen=True)
class Unit:
    """One node (or absorbed pair, or pattern) that computes at one activation width.

    Attributes:
        name: the head node's name, the unit's id (a weighted layer's name is its node's).
        op_type: the head node's op type ("Gelu" for the Erf pattern).
        reads: point tensors it reads quantized.
        writes: point tensors it writes quantized.
        inputs: the tensors it needs computed (where a probe's cut must be).
        output: its output tensor (after an absorbed activation).
        layer: the weighted layer, when the unit has a constant weight.
        kernel: onnxruntime's integer kernel at 8 bits (None: runs in float between DQ and Q).
        macs: multiply-accumulates per sample (a layer's, or a MatMul of two activations').
        nodes: the graph nodes it covers.
        note: how it is written, for the report.
    """

    name: str
    op_type: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    inputs: tuple[str, ...]
    output: str
    layer: LayerSpec | None = None
    kernel: str | None = None
    macs: int = 0
    nodes: tuple[str, ...] = ()
    note: str = ""

    @property
    def params(self) -> int:
        return self.layer.params if self.layer else 0


@dataclass(frozen=True)
class Points:
    """The quantization points of one graph (see the module docstring).

    Attributes:
        scope: the scope they were found for.
        units: in graph order.
        group: point tensor -> its group's name (the group's first tensor in graph order).
        source: point tensor -> the unit that writes it (None: a graph input or a float producer).
        readers: point tensor -> the units that read it quantized.
        floats: nodes that stay float, with why.
        elements: point tensor -> elements per sample (for the costs).
        logits: group -> the axis over which its only tensor is a Softmax's logits, for groups whose
            every reader is that Softmax (their range may stop below the rows' maxima, see
            `calibrate.ranges.LOGIT_SPAN`).
    """

    scope: Scope
    units: tuple[Unit, ...]
    group: Mapping[str, str]
    source: Mapping[str, str | None]
    readers: Mapping[str, tuple[str, ...]]
    floats: tuple[tuple[str, str], ...] = ()
    elements: Mapping[str, int] = field(default_factory=dict)
    logits: Mapping[str, int] = field(default_factory=dict)

    def unit(self, name: str) -> Unit:
        for unit in self.units:
            if unit.name == name:
                return unit
        raise OnnxmpqError(f"the model has no quantizable layer or unit named {name!r}.",
                           "list the names with `onnxmpq inspect MODEL`.")

    @property
    def layers(self) -> tuple[Unit, ...]:
        return tuple(u for u in self.units if u.layer is not None)

    def groups(self) -> dict[str, list[str]]:
        """Group name -> its tensors in graph order."""
        out: dict[str, list[str]] = {}
        for tensor, group in self.group.items():
            out.setdefault(group, []).append(tensor)
        return out

    def groups_of(self, names: Iterable[str]) -> dict[str, list[str]]:
        """The groups (name -> all their tensors) that the named units read or write."""
        names = set(names)
        wanted = {self.group[t] for u in self.units if u.name in names for t in (*u.reads, *u.writes)}
        return {g: members for g, members in self.groups().items() if g in wanted}


SHAPE_OPS = ("Shape", "Size")  # read a tensor's shape, not its values: not listed as float


class _Union:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while x != root:
            self.parent[x], x = root, self.parent.get(x, x)
        return root

    def join(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def find(proto: onnx.ModelProto, layers: Iterable[LayerSpec], scope: Scope = Scope.GRAPH,
         integer_ops: frozenset[str] = frozenset(), tie_ops: frozenset[str] = frozenset(),
         index: GraphIndex | None = None) -> Points:
    """The points of `proto`'s top-level graph; `layers` are its weighted layers (from `graph.load`);
    units of `tie_ops` share one scale across their inputs and output (as a Concat always does).
    `index`: the graph's index when the caller holds it (`graph.Model.index`)."""
    index = index or GraphIndex.of(proto.graph)
    by_name = {spec.name: spec for spec in layers}
    if scope == Scope.LAYERS:
        return _layer_points(index, by_name)
    decls, floats = _declarations(index, by_name)
    return _graph_points(index, by_name, decls, floats, integer_ops, tie_ops)


def _layer_points(index: GraphIndex, layers: Mapping[str, LayerSpec]) -> Points:
    units: list[Unit] = []
    readers: dict[str, list[str]] = {}
    for node in index.graph.node:
        spec = layers.get(node.name)
        if spec is None:
            continue
        reads = (spec.activation,) if spec.op_type != "Gather" and index.is_float(spec.activation) else ()
        units.append(Unit(spec.name, spec.op_type, reads, (), (spec.activation,), spec.output, spec,
                          None, spec.macs, (spec.name,)))
        for t in reads:
            readers.setdefault(t, []).append(spec.name)
    return Points(Scope.LAYERS, tuple(units), {t: t for t in readers}, {t: None for t in readers},
                  {t: tuple(r) for t, r in readers.items()}, (), {t: index.elements(t) for t in readers})


def _declarations(index: GraphIndex, layers) -> tuple[dict[str, NodeQuant], list[tuple[str, str]]]:
    """Each quantized node's declaration (patterns first: their inner nodes are taken), and the float ones."""
    decls: dict[str, NodeQuant] = {}
    taken: set[str] = set()
    for node in index.graph.node:
        handler = _handler(node)
        pattern = handler.claims(NodeView(node, index)) if handler else None
        if pattern is not None and not (set(pattern.covers) & taken):
            decls[node.name] = pattern
            taken |= set(pattern.covers)
    floats = []
    for node in index.graph.node:
        if node.name in decls or node.name in taken:
            continue
        handler = _handler(node)
        view = NodeView(node, index)
        decl = handler.quant(view) if handler else None
        if decl is not None:
            decls[node.name] = decl
        elif node.op_type not in SHAPE_OPS and any(index.is_float(i) and not index.is_const(i)
                                                    for i in node.input if i):
            floats.append((node.name, handler.reason(view) if handler else f"no handler for {node.op_type}"))
    return decls, floats


def _handler(node: onnx.NodeProto):
    return OP_HANDLERS.get_or_none(node.op_type) if node.domain in ("", "ai.onnx") else None


def _graph_points(index: GraphIndex, layers, decls: dict[str, NodeQuant], floats: list,
                  integer_ops: frozenset[str], tie_ops: frozenset[str]) -> Points:
    groups = _Union()
    source: dict[str, str | None] = {}
    units: dict[str, dict] = {}
    writer_of: dict[str, str] = {}  # tensor -> unit writing it
    for node in index.graph.node:
        decl = decls.get(node.name)
        if decl is None:
            continue
        kind = decl.kind
        if kind == Kind.ACTIVATION:
            owner = writer_of.get(decl.reads[0])
            if owner is not None and _absorb(units[owner], node, decl, index, groups):
                del source[decl.reads[0]]  # no point between the unit and its activation
                writer_of[decl.writes[0]] = source[decl.writes[0]] = owner
                continue
            kind = Kind.PASS
        if kind == Kind.PASS:
            for out in decl.writes:
                groups.join(decl.reads[0], out)
                source[out] = source.get(decl.reads[0])
            continue
        tied = (decl.shared or node.op_type in tie_ops) and bool(decl.reads) and node.name not in layers
        unit = {"decl": decl, "node": node, "writes": list(decl.writes), "output": decl.writes[0] if decl.writes
                else node.output[0], "nodes": [node.name, *decl.covers], "tied": tied}
        units[node.name] = unit
        for out in decl.writes:
            writer_of[out] = node.name
            source[out] = node.name
        if tied:
            for t in (*decl.reads, *decl.writes):
                groups.join(decl.reads[0], t)
    required = _required(units, groups, integer_ops, set(layers))
    return _assemble(index, layers, units, groups, source, required, floats)


def _absorb(unit: dict, node: onnx.NodeProto, decl: NodeQuant, index: GraphIndex, groups: _Union) -> bool:
    """Takes a Relu/Clip into the unit writing its input when it is that tensor's only reader (and the
    tensor no graph output): the unit then writes the activation's output."""
    t = decl.reads[0]
    if len(index.consumers.get(t, [])) != 1 or t in index.outputs:
        return False
    unit["writes"] = [decl.writes[0] if w == t else w for w in unit["writes"]]
    unit["output"] = decl.writes[0]
    unit["nodes"].append(node.name)
    if unit["tied"]:
        groups.join(t, decl.writes[0])
    return True


def _required(units: dict[str, dict], groups: _Union, integer_ops: frozenset[str], weighted: set[str]) -> set[str]:
    """Group roots that carry Q/DQ: some unit with an integer kernel (or a weighted layer, or an op of
    `integer_ops`) reads one of their tensors, or writes one it cannot write in float. A unit without
    weights writes float where no unit reads the tensor (a final Softmax or Add: little to gain from its
    kernel, and the graph's outputs and float consumers want float values); a weighted layer (a Conv)
    always writes Q, its kernel's only form."""
    roots = set()
    read = {groups.find(t) for unit in units.values() for t in unit["decl"].reads}
    for name, unit in units.items():
        decl, op_type = unit["decl"], unit["node"].op_type
        listed = op_type in integer_ops or "all" in integer_ops
        if not (decl.kernel is not None or name in weighted or listed):
            continue
        roots |= {groups.find(t) for t in decl.reads}
        if not decl.float_output:
            roots |= {groups.find(t) for t in unit["writes"] if groups.find(t) in read or name in weighted or listed}
    return roots


def _assemble(index, layers, units, groups: _Union, source, required: set[str], floats) -> Points:
    tensors = set(source) | {t for u in units.values() for t in u["decl"].reads}
    points = {t for t in tensors if groups.find(t) in required}
    order: dict[str, int] = {}
    for node in index.graph.node:  # graph order: inputs first, then outputs node by node
        for t in (*node.input, *node.output):
            if t in points and t not in order:
                order[t] = len(order)
    group_name: dict[str, str] = {}
    for t in sorted(points, key=order.__getitem__):
        group_name.setdefault(groups.find(t), t)
    out: list[Unit] = []
    readers: dict[str, list[str]] = {}
    for name, unit in units.items():
        decl, node = unit["decl"], unit["node"]
        reads = tuple(t for t in decl.reads if t in points)
        writes = tuple(t for t in unit["writes"] if t in points)
        spec = layers.get(name)
        if not reads and not writes and spec is None:
            floats.append((name, "no integer kernel reads or writes its tensors: it runs in float"))
            continue
        inputs = decl.reads or tuple(i for i in node.input if i and not index.is_const(i))
        out.append(Unit(name, decl.op_type or node.op_type, reads, writes, tuple(inputs), unit["output"], spec,
                        decl.kernel,
                        spec.macs if spec else decl.macs, tuple(unit["nodes"]), decl.note))
        for t in reads:
            readers.setdefault(t, []).append(name)
    group = {t: group_name[groups.find(t)] for t in sorted(points, key=order.__getitem__)}
    return Points(Scope.GRAPH, tuple(out), group, {t: source.get(t) for t in points},
                  {t: tuple(r) for t, r in readers.items()}, tuple(floats), {t: index.elements(t) for t in points},
                  _logits(index, units, group))


def _logits(index: GraphIndex, units: dict[str, dict], group: Mapping[str, str]) -> dict[str, int]:
    """Group -> logits axis, where a Softmax is the only node reading the group's only tensor."""
    sizes: dict[str, int] = {}
    for g in group.values():
        sizes[g] = sizes.get(g, 0) + 1
    out = {}
    for name, unit in units.items():
        axis, reads = unit["decl"].logits_axis, unit["decl"].reads
        if axis is None or not reads or reads[0] not in group:
            continue
        t = reads[0]
        if sizes[group[t]] == 1 and t not in index.outputs and \
                [n.name for n in index.consumers.get(t, [])] == [name]:
            out[group[t]] = axis
    return out
