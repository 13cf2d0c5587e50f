"""Gather: on a constant table (an embedding: a weighted layer, weight-only, one scale per row), or on
activations (data movement, sharing its input's scale).

Embedding table (V, D), Gather(axis=0) of run-time indices: the table is stored as integer codes with one
scale per row (channel axis 0) and the rows are dequantized after the lookup,
DequantizeLinear(Gather(codes, idx), Unsqueeze(Gather(scales, idx), -1), axis=-1, block_size=D), so that
only the looked-up rows are ever widened (a DQ of the whole table would run at every inference).
Parameters = V * D; MACs 0. Gather of an activation by indices: its output shares the data's scale.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from onnx import TensorProto, numpy_helper

from onnxmpq.ops import Handler, NodeQuant, NodeView, register
from onnxmpq.types import LayerSpec

if TYPE_CHECKING:
    from onnxmpq.rounding import QuantizedWeight
    from onnxmpq.write.editor import Editor


@register("Gather")
class GatherHandler(Handler):
    weight_zero_points = False  # symmetric rows: the blocked DequantizeLinear takes no zero point
    casts_sub_byte = True       # onnxruntime's Gather takes no INT4/INT2 (the Cast of the table folds at load)
    def describe(self, view: NodeView) -> LayerSpec | None:
        table = view.float_const(0)
        indices = view.input(1)
        if table is None or len(table.dims) != 2 or view.attr("axis", 0) != 0 or indices is None \
                or view.index.is_const(indices):
            return None
        return LayerSpec(view.node.name, "Gather", table.name, indices, view.node.output[0],
                         int(np.prod(table.dims)), 0, 0)

    def quant(self, view: NodeView) -> NodeQuant | None:
        if self.describe(view) is not None:
            return view.compute((), float_output=True,
                             note="embedding rows dequantized after the lookup")
        if view.is_activation(0):
            return view.pass_through()
        return None

    def reason(self, view: NodeView) -> str:
        return "Gather on a constant that is not a 2-D table looked up along axis 0"

    def needs_guard(self, layer: LayerSpec, weight_rank: int, weight_container: int,
                    act_container: int | None) -> bool:
        return False

    def write_weight(self, editor: Editor, layer: LayerSpec, qweight: QuantizedWeight, guard: bool, cast: bool) -> None:
        """Gather(codes) -> DequantizeLinear with the looked-up rows' scales (see the module docstring);
        sub-byte codes are cast to INT8 first (onnxruntime folds the Cast of the constant at load)."""
        codes, scales, _ = editor.weight_codes(f"{layer.weight}_{layer.name}", qweight, layer.weight, cast,
                                               zero_point=False)
        if cast:
            codes = editor.node("Cast", [codes], f"{codes}_int8", to=TensorProto.INT8)
        node = editor.nodes[layer.name]
        node.input[0] = codes
        rows = editor.name(f"{layer.output}_codes")
        node.output[0] = rows
        row_scales = editor.node("Gather", [scales, layer.activation], f"{layer.output}_row_scales", axis=0)
        axes = editor.init(f"{layer.output}_last_axis", numpy_helper.from_array(np.array([-1], np.int64)))
        row_scales = editor.node("Unsqueeze", [row_scales, axes], f"{layer.output}_row_scales_3d")
        editor.node("DequantizeLinear", [rows, row_scales], f"{layer.output}_dq", axis=-1,
                    block_size=int(qweight.codes.shape[1]))
        editor.retarget(editor.added[-1].output[0], layer.output)
        editor.replaced.add(layer.weight)
