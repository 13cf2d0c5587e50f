"""Conv (plain, grouped, depthwise) and ConvTranspose.

Conv weight (C_out, C_in/g, k...): channel axis 0; MACs = prod(out spatial) * |W|.
ConvTranspose weight (C_in, C_out/g, k...): channel axis 1; MACs = prod(in spatial) * |W|.
A Conv computing at 4 bits writes through a guard (`guards_output`): onnxruntime has no 4-bit kernel.

Quantized: the input and the output (QLinearConv needs both at 8 bits; a following Relu or Clip is
applied by the output's Q), the weight per output channel, the bias as INT32 at s_x * s_w. onnxruntime
1.32 has no integer ConvTranspose kernel on the CPU: it runs DQ -> ConvTranspose -> Q in float.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from onnxmpq.ops import Handler, NodeQuant, NodeView, known_prod, register
from onnxmpq.types import LayerSpec


def _conv_spec(view: NodeView, channel_axis: int,
               spatial_from: Callable[[], tuple[int | None, ...] | None]) -> LayerSpec | None:
    weight, activation = view.float_const(1), view.input(0)
    if weight is None or activation is None or len(weight.dims) < 3:
        return None
    params = int(np.prod(weight.dims))
    shape = spatial_from()
    spatial = known_prod(shape[2:]) if shape else 1
    bias = view.input(2) if view.float_const(2) is not None else None
    return LayerSpec(view.node.name, view.node.op_type, weight.name, activation, view.node.output[0],
                     params, spatial * params, channel_axis, bias)


@register("Conv")
class ConvHandler(Handler):
    def describe(self, view: NodeView) -> LayerSpec | None:
        return _conv_spec(view, 0, view.out_shape)

    def quant(self, view: NodeView) -> NodeQuant | None:
        if self.describe(view) is None or not view.is_activation(0):
            return None
        return view.compute(kernel="QLinearConv")

    def reason(self, view: NodeView) -> str:
        return "Conv whose weight is not a constant: onnxruntime has no integer kernel for it"

    def guards_output(self, act_container: int) -> bool:
        """onnxruntime 1.32 fuses DQ(UINT4) + Conv + Q(UINT4) into a QLinearConv that rejects 4-bit types
        (its selector checks 4-bit weights, not activations)."""
        return act_container == 4


@register("ConvTranspose")
class ConvTransposeHandler(Handler):
    def describe(self, view: NodeView) -> LayerSpec | None:
        return _conv_spec(view, 1, lambda: view.in_shape(0))

    def quant(self, view: NodeView) -> NodeQuant | None:
        if self.describe(view) is None or not view.is_activation(0):
            return None
        return view.compute(note="onnxruntime has no integer ConvTranspose on the CPU: it runs "
                                            "dequantize + float ConvTranspose + quantize")

    def reason(self, view: NodeView) -> str:
        return "ConvTranspose whose weight is not a constant"
