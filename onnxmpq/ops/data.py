"""Data movement: ops whose outputs are (a selection or rearrangement of) their input's values.

Reshape, Transpose, Flatten, Squeeze, Unsqueeze, Slice, Split, Identity, Expand, Tile, DepthToSpace,
SpaceToDepth, Pad (constant 0 or edge/reflect), Resize (nearest, or linear: an interpolation within the
input's range). Each output shares its data input's scale, zero point and width, so onnxruntime drops
the DQ/Q pair around it and moves the integers (Pad and Resize in float where it has no integer form).
"""

from __future__ import annotations

from onnxmpq.ops import Handler, NodeQuant, NodeView, register

DATA_OPS = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Split", "Identity", "Expand",
            "Tile", "DepthToSpace", "SpaceToDepth")


@register(*DATA_OPS)
class DataHandler(Handler):
    def quant(self, view: NodeView) -> NodeQuant | None:
        if not view.is_activation(0):
            return None
        return view.pass_through()

    def reason(self, view: NodeView) -> str:
        return f"{view.node.op_type} of a constant or a non-float tensor"


@register("Pad")
class PadHandler(Handler):
    """Padding with a constant other than 0 would need that constant on the shared grid; 0 always is."""

    def quant(self, view: NodeView) -> NodeQuant | None:
        if not view.is_activation(0):
            return None
        mode = view.attr("mode", b"constant")
        value = view.const_value(2) if view.input(2) else None
        if mode in (b"constant", "constant") and value is not None and value.size and float(value.ravel()[0]) != 0:
            return None
        return view.pass_through()

    def reason(self, view: NodeView) -> str:
        return "Pad with a non-zero constant"


@register("Resize")
class ResizeHandler(Handler):
    def quant(self, view: NodeView) -> NodeQuant | None:
        mode = view.attr("mode", b"nearest")
        if not view.is_activation(0) or mode not in (b"nearest", b"linear", "nearest", "linear"):
            return None
        return view.pass_through()

    def reason(self, view: NodeView) -> str:
        return "Resize in cubic mode (it overshoots its input's range)"
