"""LayerNormalization: input and output quantized, scale and bias float; onnxruntime runs it in float
between its DQ and Q (an A16 region where the allocator chooses 16 bits)."""

from __future__ import annotations

from onnxmpq.ops import Handler, NodeQuant, NodeView, register


@register("LayerNormalization")
class LayerNormHandler(Handler):
    def quant(self, view: NodeView) -> NodeQuant | None:
        return view.compute() if view.is_activation(0) else None
