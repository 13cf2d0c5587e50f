"""Elementwise activations.

- Relu, Clip (constant bounds): applied by the producing kernel. Right after a COMPUTE node that it alone
  reads from, there is no Q/DQ between the two and the Q after the activation clips (onnxruntime removes
  the Relu/Clip in front of a Q whose range it implies); elsewhere it passes its input's scale through.
- LeakyRelu, Sigmoid, Softmax: onnxruntime has QLinearLeakyRelu, QLinearSigmoid and QLinearSoftmax. A
  Softmax declares its input as logits, whose range may stop LOGIT_SPAN below the smallest row maximum.
- HardSigmoid, HardSwish, Tanh, Erf, Gelu: run in float between their DQ and Q.
- GELU written with Erf, y = 0.5 x (1 + erf(x / sqrt(2))) (Div or Mul by the constant, Erf, Add 1, two
  Muls in either order): one unit reading x and writing y, its inner tensors float, so that onnxruntime
  fuses it into its Gelu kernel (a Q/DQ inside would stop that).
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from onnxmpq.graph.index import GraphIndex
from onnxmpq.ops import Handler, Kind, NodeQuant, NodeView, register

KERNELS = {"LeakyRelu": "QLinearLeakyRelu", "Sigmoid": "QLinearSigmoid", "Softmax": "QLinearSoftmax"}


@register("Relu", "Clip")
class ClippingHandler(Handler):
    def quant(self, view: NodeView) -> NodeQuant | None:
        if not view.is_activation(0) or any(view.input(i) and not view.index.is_const(view.input(i)) for i in (1, 2)):
            return None
        return NodeQuant(Kind.ACTIVATION, view.ins(0), view.outs(0))

    def reason(self, view: NodeView) -> str:
        return "Clip with bounds computed at run time"


@register("LeakyRelu", "Sigmoid", "Softmax", "HardSigmoid", "HardSwish", "Tanh", "Gelu")
class UnaryHandler(Handler):
    def quant(self, view: NodeView) -> NodeQuant | None:
        if not view.is_activation(0):
            return None
        if view.node.op_type == "Softmax":
            # the row is the axis (opset >= 13) or axis..last (older: a superset, so a row maximum over
            # this one axis is never above the true one and the floor stays safe); -1 by default
            return view.compute(kernel=KERNELS["Softmax"], logits_axis=int(view.attr("axis", -1)))
        return view.compute(kernel=KERNELS.get(view.node.op_type))

    def reason(self, view: NodeView) -> str:
        return f"{view.node.op_type} of a constant or non-float tensor"


@register("Erf")
class ErfHandler(Handler):
    """Erf alone runs in float between its DQ and Q; Erf inside GELU heads the GELU unit (`claims`)."""

    def quant(self, view: NodeView) -> NodeQuant | None:
        return view.compute() if view.is_activation(0) else None

    def claims(self, view: NodeView) -> NodeQuant | None:
        index = view.index
        scale = view.producer(0)
        if scale is None or len(index.consumers.get(view.node.output[0], [])) != 1:
            return None
        x = _scaled_input(scale, index, 1 / math.sqrt(2))
        add = _only_consumer(index, view.node.output[0])
        if x is None or add is None or add.op_type != "Add" or not _const_operand(add, index, view.node.output[0], 1.0):
            return None
        chain = _gelu_tail(index, add.output[0], x)
        if chain is None:
            return None
        covered = (scale.name, add.name) + tuple(n.name for n in chain)
        return NodeQuant(Kind.COMPUTE, (x,), (chain[-1].output[0],), covers=covered, op_type="Gelu",
                         note="GELU (Erf form) quantized as one unit; onnxruntime fuses it into Gelu")


def _only_consumer(index: GraphIndex, tensor: str) -> onnx.NodeProto | None:
    consumers = index.consumers.get(tensor, [])
    return consumers[0] if len(consumers) == 1 and tensor not in index.outputs else None


def _const_operand(node: onnx.NodeProto, index: GraphIndex, other: str, value: float) -> bool:
    """`node` reads `other` and a scalar constant equal to `value` (to float32 precision)."""
    if len(node.input) != 2 or other not in node.input:
        return False
    const = node.input[1] if node.input[0] == other else node.input[0]
    array = index.value(const)
    return array is not None and array.size == 1 and bool(np.isclose(float(array.ravel()[0]), value, rtol=1e-4))


def _scaled_input(node: onnx.NodeProto, index: GraphIndex, factor: float) -> str | None:
    """x of Div(x, 1/factor) or Mul(x, factor) with a scalar constant."""
    if node.op_type not in ("Div", "Mul") or len(node.input) != 2:
        return None
    wanted = 1 / factor if node.op_type == "Div" else factor
    a: str = node.input[0]  # protobuf's containers have no stubs here
    b: str = node.input[1]
    for x, const in ((a, b), (b, a)):
        array = index.value(const)
        if node.op_type == "Div" and x != node.input[0]:
            continue
        if array is not None and array.size == 1 and np.isclose(float(array.ravel()[0]), wanted, rtol=1e-4) \
                and not index.is_const(x):
            return x
    return None


def _gelu_tail(index: GraphIndex, added: str, x: str) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
    """The two Muls after Add(erf, 1): Mul(x, a) then Mul(., 0.5), or Mul(a, 0.5) then Mul(x, .)."""
    first = _only_consumer(index, added)
    if first is None or first.op_type != "Mul" or len(first.input) != 2:
        return None
    second = _only_consumer(index, first.output[0])
    if second is None or second.op_type != "Mul":
        return None
    if x in first.input and _const_operand(second, index, first.output[0], 0.5):
        return (first, second)
    if _const_operand(first, index, added, 0.5) and x in second.input:
        return (first, second)
    return None
