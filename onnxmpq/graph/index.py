"""One read-only index of a graph: who produces and who consumes each tensor, the constants, the shapes.

Built once per graph and handed to the op handlers, the quantization-points stage, the QDQ reader and
the checker, so none of them rebuilds its own maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnxmpq.errors import InternalError

FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


@dataclass(frozen=True)
class GraphIndex:
    """Producers, consumers, constants, shapes and element types of one (top-level) graph.

    Attributes:
        graph: the indexed graph (read-only).
        producer: tensor -> the node writing it (graph inputs and initializers have none).
        consumers: tensor -> the nodes reading it, in graph order (a node reading it twice appears once).
        consts: initializers by name.
        shapes: tensor -> dims (int when static, None when dynamic), from inputs, value_info, outputs and
            initializers.
        types: tensor -> ONNX element type, where known.
        outputs: names of the graph outputs.
        inputs: names of the graph inputs that are fed (not initializers).
    """

    graph: onnx.GraphProto
    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]
    consts: dict[str, TensorProto]
    shapes: dict[str, tuple[int | None, ...]]
    types: dict[str, int]
    outputs: frozenset[str]
    inputs: tuple[str, ...]

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> GraphIndex:
        producer: dict[str, onnx.NodeProto] = {}
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.output:
                if name:
                    producer[name] = node
            for name in dict.fromkeys(i for i in node.input if i):
                consumers.setdefault(name, []).append(node)
        consts = {t.name: t for t in graph.initializer}
        shapes, types = {}, {}
        for value in list(graph.input) + list(graph.value_info) + list(graph.output):
            ttype = value.type.tensor_type
            if ttype.elem_type:
                types[value.name] = ttype.elem_type
            if ttype.HasField("shape"):
                shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim)
        for tensor in graph.initializer:
            shapes[tensor.name] = tuple(tensor.dims)
            types[tensor.name] = tensor.data_type
        return cls(graph, producer, consumers, consts, shapes, types, frozenset(o.name for o in graph.output),
                   tuple(i.name for i in graph.input if i.name not in consts))

    def is_const(self, name: str | None) -> bool:
        return bool(name) and name in self.consts

    def float_const(self, name: str | None) -> TensorProto | None:
        """The initializer `name` when it holds floats (a weight), else None."""
        tensor = self.consts.get(name) if name else None
        return tensor if tensor is not None and tensor.data_type in FLOAT_TYPES else None

    def value(self, name: str) -> np.ndarray | None:
        """The constant's values (None when `name` is not an initializer)."""
        tensor = self.consts.get(name)
        return numpy_helper.to_array(tensor) if tensor is not None else None

    def weight(self, name: str) -> np.ndarray:
        """A float initializer's values as float32 (a layer's weight; an InternalError when it is none)."""
        return self.const_array(name).astype(np.float32)

    def literal(self, name: str) -> np.ndarray | None:
        """The values of an initializer or of a Constant node's output (None for a computed tensor)."""
        if name in self.consts:
            return numpy_helper.to_array(self.consts[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            attr = next((a for a in node.attribute if a.name == "value"), None)
            return numpy_helper.to_array(attr.t) if attr is not None else None
        return None

    def descendants(self, start: str) -> set[str]:
        """Every tensor computed from `start` (itself included)."""
        seen, stack = set(), [start]
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            for node in self.consumers.get(name, []):
                stack.extend(o for o in node.output if o)
        return seen

    def const_array(self, name: str) -> np.ndarray:
        """The values of a tensor the caller knows is an initializer (an InternalError when it is not)."""
        array = self.value(name)
        if array is None:
            raise InternalError(f"{name!r} was expected to be an initializer")
        return array

    def is_float(self, name: str) -> bool:
        """Whether a tensor holds floats (unknown types count as float: most activations are)."""
        return self.types.get(name, TensorProto.FLOAT) in FLOAT_TYPES

    def elements(self, name: str) -> int:
        """Elements per sample: the product of the dims after the first (dynamic dims count as 1)."""
        dims = self.shapes.get(name)
        if not dims:
            return 1
        return int(np.prod([d if d else 1 for d in dims[1:]], dtype=np.int64)) if len(dims) > 1 else 1
