"""Op handlers: everything op-specific about quantizing a node lives in that op's handler file.

A handler answers two questions about a node, and never edits the graph (`quantize` does that):

- `describe(view) -> LayerSpec | None`: is the node a *weighted layer* (a constant float weight that gets
  integer codes: Conv, ConvTranspose, Gemm, MatMul with a constant operand, Gather on a constant table)?
- `quant(view) -> NodeQuant | None`: which of its tensors carry Q/DQ, as what (`Kind`), whether
  onnxruntime has an integer kernel for it, which tensors must share one scale. None: the node stays
  float (an op this handler cannot quantize in this form); `reason(view)` says why.

Handlers may also keep their kernel guards (`needs_guard`: patterns onnxruntime would fuse into a kernel
that rejects them) and claim a whole pattern of nodes (`claims`: the Erf form of GELU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, TypeVar, Unpack

import numpy as np
import onnx
from onnx import TensorProto

from onnxmpq.graph.index import FLOAT_TYPES, GraphIndex
from onnxmpq.registry import Registry
from onnxmpq.types import LayerSpec

if TYPE_CHECKING:
    from onnxmpq.rounding import QuantizedWeight
    from onnxmpq.write.editor import Editor

__all__ = ["FLOAT_TYPES", "OP_HANDLERS", "Handler", "Kind", "NodeQuant", "NodeView", "known_prod"]


@dataclass(frozen=True)
class NodeView:
    """A node with what its handler may look up in the graph's index."""

    node: onnx.NodeProto
    index: GraphIndex

    @property
    def consts(self) -> dict[str, TensorProto]:
        return self.index.consts

    @property
    def shapes(self) -> dict[str, tuple[int | None, ...]]:
        return self.index.shapes

    def input(self, i: int) -> str | None:
        return self.node.input[i] if i < len(self.node.input) and self.node.input[i] else None

    def float_const(self, i: int) -> TensorProto | None:
        """The i-th input when it is a float initializer (a weight), else None."""
        return self.index.float_const(self.input(i))

    def const_value(self, i: int) -> np.ndarray | None:
        name = self.input(i)
        return self.index.value(name) if name else None

    def is_activation(self, i: int) -> bool:
        """The i-th input is a float tensor computed at run time (not a constant, not an index)."""
        name = self.input(i)
        return name is not None and not self.index.is_const(name) and self.index.is_float(name)

    def activations(self) -> tuple[int, ...]:
        return tuple(i for i in range(len(self.node.input)) if self.is_activation(i))

    def ins(self, *indices: int) -> tuple[str, ...]:
        return tuple(self.node.input[i] for i in indices)

    def outs(self, *indices: int) -> tuple[str, ...]:
        return tuple(self.node.output[i] for i in (indices or (0,)))

    def pass_through(self) -> NodeQuant:
        """Input 0 to every output, one shared scale."""
        return NodeQuant(Kind.PASS, self.ins(0), tuple(o for o in self.node.output if o))

    def compute(self, reads: tuple[int, ...] = (0,), **kw: Unpack[QuantFields]) -> NodeQuant:
        """A COMPUTE unit reading the inputs `reads` and writing output 0."""
        return NodeQuant(Kind.COMPUTE, self.ins(*reads), self.outs(0), **kw)

    def attr(self, name: str, default: Any = None) -> Any:  # an attribute's value: int, float, str, list, ...
        for attr in self.node.attribute:
            if attr.name == name:
                return onnx.helper.get_attribute_value(attr)
        return default

    def out_shape(self) -> tuple[int | None, ...] | None:
        return self.shapes.get(self.node.output[0])

    def in_shape(self, i: int) -> tuple[int | None, ...] | None:
        name = self.input(i)
        return self.shapes.get(name) if name else None

    def producer(self, i: int) -> onnx.NodeProto | None:
        name = self.input(i)
        return self.index.producer.get(name) if name else None

    def consumers(self, k: int = 0) -> list[onnx.NodeProto]:
        return self.index.consumers.get(self.node.output[k], []) if k < len(self.node.output) else []


def known_prod(dims: Sequence[int | None] | None) -> int:
    """Product of the known dims; dynamic ones count as 1."""
    return int(np.prod([d if d else 1 for d in dims], dtype=np.int64)) if dims else 1


class Kind(StrEnum):
    """How a node takes part in the integer graph.

    COMPUTE: computes at one activation width of its own (an allocation unit): the tensors it reads and
        writes carry Q/DQ at that width.
    PASS: moves data (Reshape, MaxPool, ...): its outputs share its input's scale, zero point and width,
        so onnxruntime drops the DQ/Q around it and runs it on the integers.
    ACTIVATION: an elementwise activation (Relu, Clip) that the producing kernel applies: between a
        COMPUTE node and it there is no Q/DQ (the Q after it clips); elsewhere it is PASS.
    """

    COMPUTE = "compute"
    PASS = "pass"
    ACTIVATION = "activation"


@dataclass(frozen=True)
class NodeQuant:
    """What a handler declares for one node.

    Attributes:
        kind: see `Kind`.
        reads: the activation tensors it reads quantized.
        writes: the tensors it writes quantized.
        kernel: onnxruntime's integer kernel for the node at 8 bits (QLinearConv, ...); None when it runs in
            float between its DQ and Q.
        float_output: the kernel can also write float (QGemm, MatMulIntegerToFloat), so the output needs
            no Q unless a consumer's kernel reads it.
        shared: the tensors read and written share one scale and zero point (Concat).
        macs: multiply-accumulates per sample of a node without weights (a MatMul of two activations).
        covers: further nodes the unit takes in (the Erf form of GELU: Div, Erf, Add, Mul, Mul); their
            tensors stay float inside, the unit writes the last one's output.
        op_type: the unit's op type when it is a pattern ("Gelu"), else the node's.
        note: a line for the report on how the node is written.
        logits_axis: the node reads reads[0] as logits over this axis (Softmax): a value more than
            `calibrate.ranges.LOGIT_SPAN` below its row's maximum leaves the output unchanged, so the
            tensor's range may stop there (an attention mask's -10000 would otherwise take the range).
    """

    kind: Kind
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    kernel: str | None = None
    float_output: bool = False
    shared: bool = False
    macs: int = 0
    covers: tuple[str, ...] = ()
    op_type: str | None = None
    note: str = ""
    logits_axis: int | None = None


class QuantFields(TypedDict, total=False):
    """The optional fields of `NodeQuant`, as `NodeView.compute` takes them."""

    kernel: str | None
    float_output: bool
    shared: bool
    macs: int
    covers: tuple[str, ...]
    op_type: str | None
    note: str
    logits_axis: int | None


class Handler:
    """Base of the op handlers: no weight, no quantization, no guard."""

    weight_zero_points = True  # the weight's DequantizeLinear reads stored zero points
    casts_sub_byte = False     # sub-byte codes always reach the op through a Cast to INT8

    def describe(self, view: NodeView) -> LayerSpec | None:
        return None

    def quant(self, view: NodeView) -> NodeQuant | None:
        return None

    def reason(self, view: NodeView) -> str:
        return f"{view.node.op_type} in this form is not quantized"

    def claims(self, view: NodeView) -> NodeQuant | None:
        """A pattern of several nodes this node heads, quantized as one unit (None: no pattern)."""
        return None

    def needs_guard(self, layer: LayerSpec, weight_rank: int, weight_container: int,
                    act_container: int | None) -> bool:
        """Whether the weight must reach the node through a shape-preserving Reshape so that onnxruntime
        1.32 does not fuse the pattern into a kernel that rejects it: INT2 weights (its integer kernels have
        no INT2). 4-bit activations get a guard of their own (`writer.Editor.guard`)."""
        return weight_container == 2

    def guards_output(self, act_container: int) -> bool:
        """Whether the Q of the node's output must be kept apart from it (`writer.Editor.guard`)."""
        return False

    def write_weight(self, editor: Editor, layer: LayerSpec, qweight: QuantizedWeight, guard: bool, cast: bool) -> None:
        """Feeds the layer its dequantized codes in place of the float weight (`writer.Editor`)."""
        out = editor.dequantized_weight(layer.weight, layer.name, qweight, guard, cast)
        editor.replace_input(layer.name, layer.weight, out)


class OpHandler(Protocol):
    weight_zero_points: bool
    casts_sub_byte: bool

    def describe(self, view: NodeView) -> LayerSpec | None: ...
    def quant(self, view: NodeView) -> NodeQuant | None: ...
    def reason(self, view: NodeView) -> str: ...
    def claims(self, view: NodeView) -> NodeQuant | None: ...
    def needs_guard(self, layer: LayerSpec, weight_rank: int, weight_container: int,
                    act_container: int | None) -> bool: ...
    def guards_output(self, act_container: int) -> bool: ...
    def write_weight(self, editor: Editor, layer: LayerSpec, qweight: QuantizedWeight, guard: bool,
                     cast: bool) -> None: ...


OP_HANDLERS: Registry[OpHandler] = Registry("op handler")


_H = TypeVar("_H", bound=Handler)


def register(*op_types: str) -> Callable[[type[_H]], type[_H]]:
    """Registers one handler instance for each of `op_types`."""
    def decorator(cls: type[_H]) -> type[_H]:
        instance = cls()
        for op_type in op_types:
            OP_HANDLERS.register(op_type)(instance)
        return cls
    return decorator


from onnxmpq.ops import activations, concat, conv, data, elementwise, gather, gemm, matmul, normalization, pooling  # noqa: E402,F401
