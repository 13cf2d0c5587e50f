"""Concat of activations: the inputs and the output share one scale and zero point (the range covering
them all), as NPU toolchains require and so that the output is each input's codes side by side;
onnxruntime runs it as QLinearConcat."""

from __future__ import annotations

from onnxmpq.ops import Handler, NodeQuant, NodeView, register


@register("Concat")
class ConcatHandler(Handler):
    def quant(self, view: NodeView) -> NodeQuant | None:
        inputs = [i for i in range(len(view.node.input)) if view.input(i)]
        if not inputs or view.activations() != tuple(inputs):
            return None
        return view.compute(tuple(inputs), kernel="QLinearConcat", shared=True)

    def reason(self, view: NodeView) -> str:
        return "Concat with a constant or non-float input"
