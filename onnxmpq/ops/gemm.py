"""Gemm with a constant B: Y = alpha * A' B' + beta * C.

B (K, N), or (N, K) with transB=1: the channel axis is the one of length N (1, or 0 with transB).
MACs per sample = |B| (one row of A per sample).
"""

from __future__ import annotations

import numpy as np

from onnxmpq.ops import OP_HANDLERS, NodeView
from onnxmpq.types import LayerSpec


@OP_HANDLERS.register("Gemm")
class GemmHandler:
    @staticmethod
    def describe(view: NodeView) -> LayerSpec | None:
        weight = view.float_const(1)
        if weight is None or len(weight.dims) != 2 or view.float_const(0) is not None:
            return None
        axis = 0 if view.attr("transB", 0) else 1
        params = int(np.prod(weight.dims))
        bias = view.input(2) if view.float_const(2) is not None else None
        return LayerSpec(view.node.name, "Gemm", weight.name, view.input(0), view.node.output[0],
                         params, params, axis, bias)
