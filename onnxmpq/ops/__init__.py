"""Op-handler registry: which input of a node is the weight, which the activation, and the channel axis.

Handlers only *describe* a node as a `LayerSpec`; `quantize.build` inserts the Q/DQ nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol

import numpy as np
import onnx
from onnx import TensorProto

from onnxmpq.registry import Registry
from onnxmpq.types import LayerSpec

FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


@dataclass(frozen=True)
class NodeView:
    """A node with what its handler may look up: constant tensors and inferred value shapes."""

    node: onnx.NodeProto
    consts: Mapping[str, TensorProto]
    shapes: Mapping[str, tuple[int | None, ...]]

    def input(self, i: int) -> str | None:
        return self.node.input[i] if i < len(self.node.input) and self.node.input[i] else None

    def float_const(self, i: int) -> TensorProto | None:
        """The i-th input when it is a float initializer (a weight), else None."""
        name = self.input(i)
        tensor = self.consts.get(name) if name else None
        return tensor if tensor is not None and tensor.data_type in FLOAT_TYPES else None

    def attr(self, name: str, default=None):
        for attr in self.node.attribute:
            if attr.name == name:
                return onnx.helper.get_attribute_value(attr)
        return default

    def out_shape(self) -> tuple[int | None, ...] | None:
        return self.shapes.get(self.node.output[0])

    def in_shape(self, i: int) -> tuple[int | None, ...] | None:
        name = self.input(i)
        return self.shapes.get(name) if name else None


def known_prod(dims) -> int:
    """Product of the known dims; dynamic ones count as 1."""
    return int(np.prod([d if d else 1 for d in dims], dtype=np.int64)) if dims else 1


class OpHandler(Protocol):
    def describe(self, view: NodeView) -> LayerSpec | None:
        """Returns the layer if the node is quantizable (constant float weight), else None."""


OP_HANDLERS: Registry[OpHandler] = Registry("op handler")

from onnxmpq.ops import conv, gemm, matmul  # noqa: E402,F401  (registers the handlers)
