"""Pooling. MaxPool and GlobalMaxPool select input values: their output shares the input's scale (onnxruntime
runs them on the integers). AveragePool and GlobalAveragePool average: their output gets a range of its
own (QLinearAveragePool, QLinearGlobalAveragePool)."""

from __future__ import annotations

from onnxmpq.ops import Handler, NodeQuant, NodeView, register

KERNELS = {"AveragePool": "QLinearAveragePool", "GlobalAveragePool": "QLinearGlobalAveragePool"}


@register("MaxPool", "GlobalMaxPool")
class MaxPoolHandler(Handler):
    def quant(self, view: NodeView) -> NodeQuant | None:
        if not view.is_activation(0) or len([o for o in view.node.output if o]) != 1:
            return None  # MaxPool's optional Indices output is not data
        return view.pass_through()

    def reason(self, view: NodeView) -> str:
        return "MaxPool with its Indices output"


@register("AveragePool", "GlobalAveragePool")
class AveragePoolHandler(Handler):
    def quant(self, view: NodeView) -> NodeQuant | None:
        return view.compute(kernel=KERNELS[view.node.op_type]) if view.is_activation(0) else None
