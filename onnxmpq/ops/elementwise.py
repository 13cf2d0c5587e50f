"""Add, Sub, Mul, Div: binary elementwise ops (with broadcasting).

Two activations: Add and Mul run on onnxruntime's QLinearAdd / QLinearMul with both inputs and the output
quantized (a residual Add); Sub of two activations runs in float between its DQs and Q. One activation
and a constant (a bias, a scale, GELU's 1/sqrt(2)): the constant stays float and the op runs in float
between its DQ and Q, so its tensors carry Q/DQ only where a neighbouring kernel needs them (a MatMul's
bias Add then stays in float after MatMulIntegerToFloat). Div of two activations is not handled.
"""

from __future__ import annotations

from onnxmpq.ops import Handler, NodeQuant, NodeView, register

KERNELS = {"Add": "QLinearAdd", "Mul": "QLinearMul"}


@register("Add", "Sub", "Mul", "Div")
class ElementwiseHandler(Handler):
    def quant(self, view: NodeView) -> NodeQuant | None:
        acts = view.activations()
        inputs = [i for i in range(len(view.node.input)) if view.input(i)]
        if len(inputs) != 2 or not acts:
            return None
        if len(acts) == 2:
            if view.node.op_type == "Div" or view.input(0) == view.input(1):
                return None
            return view.compute(acts, kernel=KERNELS.get(view.node.op_type))
        other = view.input(inputs[1 - acts[0]]) if acts[0] in (0, 1) else None
        if other is None or not view.index.is_const(other) or not view.index.is_float(other):
            return None
        return view.compute(acts)

    def reason(self, view: NodeView) -> str:
        if view.node.op_type == "Div":
            return "Div of two activations (only Div by a constant is quantized)"
        return f"{view.node.op_type} of an activation and a non-float or computed integer tensor"
