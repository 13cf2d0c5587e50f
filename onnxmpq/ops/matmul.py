"""MatMul: with one constant operand (a weighted layer), or of two activations (attention's Q K^T, P V).

X @ W with W (..., K, N): channel axis rank-1 (the N outputs); W @ X with W (..., M, K): axis rank-2.
MACs per sample = prod(output dims after the batch) * K: every output element costs K products.
onnxruntime runs DQ -> MatMul -> Q as QLinearMatMul and DQ -> MatMul without Q as MatMulIntegerToFloat,
so the output is quantized only where a consumer's kernel reads it. Weights of rank > 2 reach the node
through a Reshape guard (MatMulIntegerToFloat rejects their per-channel zero points).
"""

from __future__ import annotations

import numpy as np

from onnxmpq.ops import Handler, NodeQuant, NodeView, known_prod, register
from onnxmpq.types import LayerSpec


def _macs(view: NodeView, contraction: int, batched: bool, fallback: int) -> int:
    out = view.out_shape()
    return known_prod(out[1:] if batched else out) * contraction if out and len(out) > 1 else fallback


@register("MatMul")
class MatMulHandler(Handler):
    def describe(self, view: NodeView) -> LayerSpec | None:
        right, left = view.float_const(1), view.float_const(0)
        if right is not None and left is None:
            weight, act_index = right, 0
        elif left is not None and right is None:
            weight, act_index = left, 1
        else:
            return None  # no constant operand, or both constant (constant folding's job)
        activation = view.input(act_index)
        if activation is None:
            return None  # a MatMul without its second operand (not a valid graph)
        rank = len(weight.dims)
        if rank < 2:
            return None
        axis = rank - 1 if right is not None else rank - 2
        params = int(np.prod(weight.dims))
        contraction = weight.dims[-2] if right is not None else weight.dims[-1]
        act = view.in_shape(act_index)
        # dim 0 of the output is the batch unless W @ x with a 2-D x, where it is W's rows
        batched = right is not None or (act is not None and len(act) > 2)
        return LayerSpec(view.node.name, "MatMul", weight.name, activation, view.node.output[0],
                         params, _macs(view, contraction, batched, params), axis)

    def quant(self, view: NodeView) -> NodeQuant | None:
        spec = self.describe(view)
        if spec is not None:
            act = 0 if spec.activation == view.input(0) else 1
            return view.compute((act,), kernel="QLinearMatMul", float_output=True) \
                if view.is_activation(act) else None
        if view.activations() != (0, 1):
            return None
        a = view.in_shape(0)
        contraction = a[-1] if a and a[-1] else 1
        return view.compute((0, 1), kernel="QLinearMatMul", float_output=True,
                         macs=_macs(view, contraction, True, 0))

    def reason(self, view: NodeView) -> str:
        return "MatMul of constants, or with a weight of rank < 2"

    def needs_guard(self, layer: LayerSpec, weight_rank: int, weight_container: int,
                    act_container: int | None) -> bool:
        return super().needs_guard(layer, weight_rank, weight_container, act_container) or weight_rank > 2
