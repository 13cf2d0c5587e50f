"""Gemm with a constant B: Y = alpha * A' B' + beta * C.

B (K, N), or (N, K) with transB=1: the channel axis is the one of length N (1, or 0 with transB).
MACs per sample = |B| (one row of A per sample). Quantized: A, B per output channel, C as INT32;
onnxruntime's QGemm writes float or 8-bit, so Y is quantized only where a consumer's kernel reads it.
"""

from __future__ import annotations

import numpy as np

from onnxmpq.ops import Handler, NodeQuant, NodeView, register
from onnxmpq.types import LayerSpec


@register("Gemm")
class GemmHandler(Handler):
    def describe(self, view: NodeView) -> LayerSpec | None:
        weight, activation = view.float_const(1), view.input(0)
        if weight is None or activation is None or len(weight.dims) != 2 or view.float_const(0) is not None:
            return None
        axis = 0 if view.attr("transB", 0) else 1
        params = int(np.prod(weight.dims))
        bias = view.input(2) if view.float_const(2) is not None else None
        return LayerSpec(view.node.name, "Gemm", weight.name, activation, view.node.output[0],
                         params, params, axis, bias)

    def quant(self, view: NodeView) -> NodeQuant | None:
        if self.describe(view) is None or not view.is_activation(0):
            return None
        return view.compute(kernel="QGemm", float_output=True)

    def reason(self, view: NodeView) -> str:
        return "Gemm without a constant 2-D B"
