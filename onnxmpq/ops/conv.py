"""Conv (plain, grouped, depthwise) and ConvTranspose.

Conv weight (C_out, C_in/g, k...): channel axis 0; MACs = prod(out spatial) * |W|.
ConvTranspose weight (C_in, C_out/g, k...): channel axis 1; MACs = prod(in spatial) * |W|.
"""

from __future__ import annotations

import numpy as np

from onnxmpq.ops import OP_HANDLERS, NodeView, known_prod
from onnxmpq.types import LayerSpec


def _conv_spec(view: NodeView, channel_axis: int, spatial_from) -> LayerSpec | None:
    weight = view.float_const(1)
    if weight is None or view.input(0) is None or len(weight.dims) < 3:
        return None
    params = int(np.prod(weight.dims))
    shape = spatial_from()
    spatial = known_prod(shape[2:]) if shape else 1
    bias = view.input(2) if view.float_const(2) is not None else None
    return LayerSpec(view.node.name, view.node.op_type, weight.name, view.input(0), view.node.output[0],
                     params, spatial * params, channel_axis, bias)


@OP_HANDLERS.register("Conv")
class ConvHandler:
    @staticmethod
    def describe(view: NodeView) -> LayerSpec | None:
        return _conv_spec(view, 0, view.out_shape)


@OP_HANDLERS.register("ConvTranspose")
class ConvTransposeHandler:
    @staticmethod
    def describe(view: NodeView) -> LayerSpec | None:
        return _conv_spec(view, 1, lambda: view.in_shape(0))
