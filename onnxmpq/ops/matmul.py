"""MatMul with one constant operand.

X @ W with W (..., K, N): channel axis rank-1 (the N outputs); W @ X with W (..., M, K): axis rank-2.
MACs per sample = prod(output dims after the batch) * K: every output element costs K products.
"""

from __future__ import annotations

import numpy as np

from onnxmpq.ops import OP_HANDLERS, NodeView, known_prod
from onnxmpq.types import LayerSpec


@OP_HANDLERS.register("MatMul")
class MatMulHandler:
    @staticmethod
    def describe(view: NodeView) -> LayerSpec | None:
        right, left = view.float_const(1), view.float_const(0)
        if (right is None) == (left is None):
            return None  # no constant operand, or both constant (constant folding's job)
        weight, act_index = (right, 0) if right is not None else (left, 1)
        rank = len(weight.dims)
        if rank < 2:
            return None
        axis = rank - 1 if right is not None else rank - 2
        params = int(np.prod(weight.dims))
        contraction = weight.dims[-2] if right is not None else weight.dims[-1]
        out = view.out_shape()
        act = view.in_shape(act_index)
        # dim 0 of the output is the batch unless W @ x with a 2-D x, where it is W's rows
        batched = right is not None or (act is not None and len(act) > 2)
        macs = known_prod(out[1:] if batched else out) * contraction if out and len(out) > 1 else params
        return LayerSpec(view.node.name, "MatMul", weight.name, view.input(act_index), view.node.output[0],
                         params, macs, axis)
