"""Rounding a whole model, layer after layer: the `gptq` method of `--rounding` (see `rounding.gptq`).

Each layer sees the inputs that the network quantized so far produces: the partial model is written by
the same QDQ writer as the final one (earlier layers at their final codes and activation quantizers,
this layer's own input quantizer included) and run in onnxruntime. Two `engine.Frontier`s, one on the
float model and one on the partial models, carry the calibration set through the graph segment by
segment, so the whole pass costs about two forward passes of the model, not two per layer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from onnxmpq.errors import InternalError
from onnxmpq.graph import model as graph
from onnxmpq.graph.engine import Frontier
from onnxmpq.graph.model import Model
from onnxmpq.rounding import QuantizedWeight, round_nearest
from onnxmpq.rounding.gptq import GptqSettings, RoundingResult, accumulate, column_stride, round_layer, statistics_bytes
from onnxmpq.rounding.linear import LinearView, view_of
from onnxmpq.types import Candidate, QuantOptions, TensorStats
from onnxmpq.write.build import build, layer_formats
from onnxmpq.write.formats import required_opset

if TYPE_CHECKING:
    from onnxmpq.calibrate import DataSource


def round_model(model: Model, assignment: Mapping[str, Candidate], source: DataSource, stats: Mapping[str, TensorStats],
                options: QuantOptions = QuantOptions(), settings: GptqSettings = GptqSettings(),
                batch_size: int = 64, on_layer: Callable[[str], object] | None = None) -> RoundingResult:
    """GPTQ codes for every layer of `assignment` with weight bits (nearest where GPTQ cannot apply).

    Args:
        model: the float model.
        assignment: unit name -> Candidate, as it will be written (units without weights included).
        source: calibration data (a `DataSource`), read once and held in memory with the cut's activations.
        stats: activation statistics from `calibrate.collect` (for the activation quantizers).
        options: the writer's options (ranges, INT2 storage) so partial models match the final one.
        settings: GPTQ parameters.
        on_layer: called with each layer's name when it is done (progress).
    """
    start = time.perf_counter()
    points = model.points(options)
    units = {u.name: u for u in points.units}
    formats = {name: layer_formats(units[name].layer, cand, options) for name, cand in assignment.items()
               if name in units}
    target = required_opset(f for pair in formats.values() for f in pair if f)
    model = graph.at_opset(model, target)
    nodes = {n.name: n for n in model.proto.graph.node}
    batches = [dict(batch.inputs) for batch in source.batches(batch_size)]
    float_front, quant_front = Frontier(batches), Frontier(batches)
    done: dict[str, QuantizedWeight] = {}
    fallbacks = []
    order = [u.name for u in points.units]
    for index, name in enumerate(order):
        cand = assignment.get(name)
        wfmt = formats.get(name, (None, None))[0]
        if cand is None or wfmt is None:
            continue
        spec = units[name].layer
        if spec is None:
            raise InternalError(f"unit {name!r} has a weight format but no weighted layer")
        weight = model.index.weight(spec.weight)
        node = nodes[spec.name]
        view = view_of(node, weight.shape, weight_left=node.input[0] == spec.weight)
        reason = _unsupported(view, weight.shape)  # never None without a view
        if view is not None and reason is None:
            k = view.to_matrices(weight).shape[2]
            if statistics_bytes(view, k) > settings.memory_budget:
                reason = f"its statistics would take {statistics_bytes(view, k) >> 20} MiB, over the memory budget"
        if view is not None and reason is None:
            before = set(order[:index])
            partial = {n: c for n, c in assignment.items() if n in before}
            partial[spec.name] = Candidate(None, cand.act_bits)
            qproto, _ = build(model, partial, stats, options, weights=done)
            quant_input = next(n for n in qproto.graph.node if n.name == spec.name).input[list(node.input).index(spec.activation)]
            x_float = float_front.advance(model.proto, [spec.activation])
            x_quant = quant_front.advance(qproto, [quant_input])
            stride = column_stride(view, x_quant[0][0].shape, sum(len(q[0]) for q in x_quant), settings.columns_per_k)
            acc = accumulate(view, ((f[0], q[0]) for f, q in zip(x_float, x_quant)), stride)
            done[spec.name] = round_layer(weight, view, acc, wfmt, spec.channel_axis, settings)
        else:
            fallbacks.append((spec.name, f"rounded to nearest: {reason}"))
            done[spec.name] = round_nearest(weight, spec.channel_axis, wfmt, options.weight_range, spec.name)
        if on_layer:
            on_layer(spec.name)
    return RoundingResult(done, tuple(fallbacks), time.perf_counter() - start)


def _unsupported(view: LinearView | None, shape: tuple[int, ...]) -> str | None:
    if view is None:
        return "GPTQ does not cover this op's form (batched MatMul weight, auto_pad or output_padding)"
    if view.op_type == "ConvTranspose" and view.groups > 1:
        return "grouped ConvTranspose shares per-channel scales across groups"
    if view.op_type == "ConvTranspose" and any(p > d * (k - 1) for p, d, k in zip(
            view.pads, view.dilations * 2, tuple(shape[2:]) * 2)):
        return "ConvTranspose padding larger than its kernel"
    return None
