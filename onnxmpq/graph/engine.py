"""Run a graph piece by piece over a cached calibration set, so that asking for tensor after tensor in
topological order costs one forward pass in all, not one per tensor.

A `Frontier` holds, for every calibration batch, the values at the current cut of the graph: the
tensors already computed that a node not yet run still reads. `advance(proto, targets)` extracts the
nodes between the cut and `targets` (walking back from the targets until it meets cut tensors or
initializers), runs that segment in onnxruntime batch by batch, returns the targets' values and moves
the cut forward. The proto may change between calls (GPTQ quantizes one more layer each time) as long
as the nodes already run keep their output names; a node whose outputs are all computed counts as run.

Memory: the cut's tensors for every calibration sample (for a ResNet, one or two feature maps) up to
SPILL_BUDGET bytes in RAM, the batches beyond it on disk (`store.CutStore`) and read back one at a time,
so that a large set or a wide cut costs disk, not RAM; `advance` returns the targets as a `Values` view
that reads them batch by batch. onnxruntime runs one batch at a time, without its CPU arena
(`runtime.session(arena=False)`), so a run's tensors are freed when it ends; what a run needs grows with
the batch size (a 224x224 CNN at batch 32: about a gigabyte), not with the set.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx

from onnxmpq.errors import InternalError
from onnxmpq.graph import runtime
from onnxmpq.graph.model import node_reads
from onnxmpq.graph.store import CutStore

SPILL_BUDGET = 512 << 20  # bytes of a frontier's cut held in RAM; the batches beyond go to disk (`store`)


class Values(Sequence[list[np.ndarray]]):
    """What `Frontier.advance` returns: per batch, the targets' values. While the cut is all in RAM they
    are the arrays themselves; once it has spilled they are read from the cut's store when asked for
    (one batch back from disk at a time), and valid until the frontier moves again."""

    def __init__(self, front: Frontier, targets: Sequence[str], aside: Sequence[Mapping[str, np.ndarray]]):
        self._front, self._targets, self._aside, self._moves = front, list(targets), aside, front.moves
        self._rows = None if front.values.spilled else [self._row(i) for i in range(len(aside))]

    def __len__(self) -> int:
        return len(self._aside)

    def __getitem__(self, i: int) -> list[np.ndarray]:  # type: ignore[override]  # indexed, never sliced
        if self._rows is not None:
            return self._rows[i]
        if self._front.moves != self._moves:
            raise InternalError("the spilled values of an earlier cut were read after the frontier moved on")
        return self._row(i)

    def _row(self, i: int) -> list[np.ndarray]:
        aside, vals = self._aside[i], self._front.values[i]
        return [aside[t] if t in aside else vals[t] for t in self._targets]

    def __iter__(self) -> Iterator[list[np.ndarray]]:
        return (self[i] for i in range(len(self)))

    def column(self, k: int) -> Sequence[np.ndarray]:
        """Target k of every batch, read batch by batch."""
        return _Column(self, k)


class _Column(Sequence[np.ndarray]):
    def __init__(self, values: Values, k: int):
        self._values, self._k = values, k

    def __len__(self) -> int:
        return len(self._values)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]  # indexed, never sliced
        return self._values[i][self._k]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))


class Frontier:
    """Cached values at the cut of a graph, one dict of arrays per calibration batch, in a `CutStore`
    that keeps `budget` bytes (default SPILL_BUDGET) in RAM and spills the rest to disk."""

    def __init__(self, batches: Iterable[Mapping[str, np.ndarray]], budget: int | None = None):
        self.values = CutStore(batches, SPILL_BUDGET if budget is None else budget)
        self.computed: set[str] = self.values.names()
        self.moves = 0

    def advance(self, proto: onnx.ModelProto, targets: Sequence[str]) -> Values:
        """Values of `targets` for every batch (outer: batches; inner: targets); moves the cut."""
        front = self.values
        available, dtypes = front.names(), {n: v.dtype for n, v in front[0].items()} if len(front) else {}
        segment, inputs, produced = _segment(proto, available, targets, self.computed, dtypes, True)
        if segment is None:  # every target is already at the cut
            return Values(self, targets, [{}] * len(front))
        outputs = list(dict.fromkeys([t for t in targets if t not in available] + produced))
        self.computed.update(o for n in segment.graph.node for o in n.output if o)
        self.moves += 1
        live = _live(proto, self.computed)
        sess = runtime.session(segment, arena=False)
        aside = []
        for i in range(len(front)):
            vals = front[i]
            got = dict(zip(outputs, runtime.run(sess, {n: vals[n] for n in inputs}, outputs)))
            aside.append({t: got[t] if t in got else vals[t] for t in targets if t not in live})
            front.put(i, {n: v for n, v in got.items() if n in live}, forget=available - live)
        return Values(self, targets, aside)

    def peek(self, proto: onnx.ModelProto, targets: Sequence[str],
             extra: Sequence[Mapping[str, np.ndarray]] = ()) -> list[list[np.ndarray]]:
        """Values of `targets` computed from the current cut, which stays where it is (a probe: the
        cut's float values through a graph that differs only downstream of the cut); `extra` adds
        tensors to the cut for this call, one dict per batch (the inputs of nodes the probe added)."""
        front = self.values
        first = {**front[0], **extra[0]} if extra else front[0]
        available = set(first)
        dtypes = {name: value.dtype for name, value in first.items()}
        segment, inputs, _ = _segment(proto, available, targets, self.computed, dtypes, False)
        batches = ({**vals, **more} for vals, more in zip(front, extra, strict=True)) if extra else iter(front)
        if segment is None:  # every target is already at the cut
            return [[vals[t] for t in targets] for vals in batches]
        outputs = list(dict.fromkeys(t for t in targets if t not in available))
        sess = runtime.session(segment, arena=False)
        results = []
        for vals in batches:
            got = dict(zip(outputs, runtime.run(sess, {n: vals[n] for n in inputs}, outputs)))
            results.append([got[t] if t in got else vals[t] for t in targets])
        return results

    def close(self) -> None:
        """Lets go of the cut (and its spill folder) now rather than when the frontier is dropped."""
        self.values.close()


def _live(proto: onnx.ModelProto, computed: set[str]) -> set[str]:
    """The tensors a node still to run reads, and the graph outputs."""
    pending = [n for n in proto.graph.node if not all(o in computed for o in n.output if o)]
    return {i for n in pending for i in node_reads(n)} | {o.name for o in proto.graph.output}


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
