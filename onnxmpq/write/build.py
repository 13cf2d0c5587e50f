"""The QDQ writer: a float `Model`, its quantization points and a precision per unit -> a QDQ ModelProto.
Pure: no onnxruntime.

Precisions are given per unit (`points.Unit`: a weighted layer, or an op without weights such as a residual
Add): `Candidate(weight_bits, act_bits)`, `act_bits` the width the unit computes at; units not named stay
float. Then, for the points of `Model.points(options)`:

- weights: W becomes DequantizeLinear(codes, scale, 0, axis=channel) with codes in the ONNX type of the
  width (`formats`), through a Cast to INT8 where the layout asks (below) and a Reshape guard where the
  op's handler says onnxruntime would fuse a kernel that rejects the pattern; an embedding table's rows are
  dequantized after the lookup (`ops.gather`). Biases: INT32 at s_x * s_w (`bias="int32"`, or `auto`:
  wherever the input is quantized and the weight has at most 8 bits), else float.
- activations: every point tensor is stored at the width of the unit that writes it (its `source`): one
  QuantizeLinear + DequantizeLinear after the producer, read by every consumer; a unit reading it at
  another width reads it through a requantize (DQ at one width, then Q/DQ at its own); a tensor whose
  producer is float gets one Q/DQ pair per width its readers want. A quantized graph output keeps its
  name on the final DQ. Scales and zero points come from the statistics of the tensor's group
  (`stats[points.group[t]]`): s = (hi - lo) / (2^b - 1), z = round(-lo / s) on the chosen range.

Weight layout: onnxruntime has integer kernels for 8-bit weights only; with `weight_layout="int8-cast"`
INT4/INT2 codes stay in the file and a Cast to INT8 in front of their DQ is folded at load, so the layer
runs on the INT8 kernel (the file of W4, the speed of W8); `auto` does so where the unit computes at 8
bits. BitOps of a requantize of n elements from b1 to b2 bits: n * b1 * b2.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from onnxmpq.calibrate.ranges import ActParams, act_params, choose_range
from onnxmpq.errors import InternalError, OnnxmpqError
from onnxmpq.graph.model import Model, convert_opset, default_opset
from onnxmpq.graph.points import Points, Unit
from onnxmpq.graph.qdq import METADATA_KEY
from onnxmpq.ops import OP_HANDLERS
from onnxmpq.rounding import QuantizedWeight, round_nearest
from onnxmpq.types import Candidate, LayerSpec, QuantOptions, Scope, TensorStats
from onnxmpq.write.editor import Editor
from onnxmpq.write.formats import IntFormat, act_format, required_opset, weight_format

GUARD_SUFFIX = " + Reshape guard"
CAST_SUFFIX = " -> INT8 kernels"
FLOAT = Candidate(None, None)


@dataclass(frozen=True)
class LayerResult:
    """What the writer did to one weighted layer; the rows of the report."""

    name: str
    op_type: str
    weight_bits: int | None
    act_bits: int | None
    params: int
    macs: int
    weight_bytes: int
    weight_type: str
    act_type: str
    act_scale: float | None = None
    act_zero_point: int | None = None


@dataclass(frozen=True)
class UnitResult:
    """A unit without weights (Add, Concat, pooling, Softmax, a MatMul of two activations) and its width."""

    name: str
    op_type: str
    act_bits: int | None
    macs: int
    kernel: str | None


@dataclass(frozen=True)
class TensorResult:
    """One point tensor as written: the width it is stored at (None: float), its parameters, and the
    widths it is requantized to for readers at other widths."""

    name: str
    group: str
    bits: int | None
    type: str
    scale: float | None
    zero_point: int | None
    source: str | None
    requantized: tuple[int, ...] = ()
    elements: int = 0


@dataclass(frozen=True)
class Written:
    """What `build` wrote: weighted layers, other units, tensors, and the nodes left float."""

    layers: tuple[LayerResult, ...]
    units: tuple[UnitResult, ...]
    tensors: tuple[TensorResult, ...]
    floats: tuple[tuple[str, str], ...] = ()

    @property
    def requantize_bitops(self) -> int:
        return sum(t.elements * t.bits * b for t in self.tensors if t.bits for b in t.requantized)


def layer_formats(layer: LayerSpec | None, cand: Candidate,
                  options: QuantOptions) -> tuple[IntFormat | None, IntFormat | None]:
    wfmt = weight_format(cand.weight_bits, options.int2_container == "int4") if cand.weight_bits and layer else None
    afmt = act_format(cand.act_bits) if cand.act_bits else None
    return wfmt, afmt


def build(model: Model, assignment: Mapping[str, Candidate], stats: Mapping[str, TensorStats] | None,
          options: QuantOptions = QuantOptions(),
          weights: Mapping[str, QuantizedWeight] | None = None) -> tuple[onnx.ModelProto, Written]:
    """Writes the QDQ model.

    Args:
        model: the float model from `graph.load`.
        assignment: unit name -> Candidate; units not named stay float.
        stats: calibration statistics by group name (`Model.points(...).group`) of the quantized tensors.
        options: scope, ranges, INT2 storage, bias handling, weight layout.
        weights: pre-rounded codes (e.g. from GPTQ) by layer name; others are rounded to nearest here.

    Returns:
        The QDQ model (opset raised as the formats need) and what was written.
    """
    points = model.points(options)
    units = {u.name: u for u in points.units}
    unknown = sorted(set(assignment) - set(units))
    if unknown:
        raise OnnxmpqError(f"no quantizable layer or unit named {unknown[0]!r} ({len(unknown)} unknown).",
                           "list the names with `onnxmpq inspect MODEL`.")
    formats = {name: layer_formats(units[name].layer, cand, options) for name, cand in assignment.items()}
    opset = max(default_opset(model.proto), required_opset(f for pair in formats.values() for f in pair if f))
    proto = convert_opset(model.proto, opset)
    if proto is model.proto:
        proto = onnx.ModelProto()
        proto.CopyFrom(model.proto)
    editor = Editor(proto)
    width = {name: assignment.get(name, FLOAT).act_bits for name in units}
    params = _Params(stats, options, points)
    tensors = [_write_tensor(editor, points, units, t, width, params) for t in points.group]
    stored = {t.name: t.bits for t in tensors if t is not None}
    layers = []
    for unit in points.layers:
        cand = assignment.get(unit.name, FLOAT)
        wfmt, afmt = formats.get(unit.name, (None, None))
        layer = unit.layer  # never None in points.layers
        # a float unit reading a quantized tensor
        if afmt is None and layer is not None and (read_bits := stored.get(layer.activation)):
            afmt = act_format(read_bits)
        layers.append(_write_layer(editor, unit, cand, (wfmt, afmt), params, options, (weights or {}).get(unit.name)))
    editor.finish()
    others = tuple(UnitResult(u.name, u.op_type, width[u.name], u.macs, u.kernel)
                   for u in points.units if u.layer is None)
    metadata = {u.name: [assignment.get(u.name, FLOAT).weight_bits if u.layer else None, width[u.name]]
                for u in points.units}
    _set_metadata(proto, METADATA_KEY, json.dumps(metadata))
    return proto, Written(tuple(layers), others, tuple(t for t in tensors if t is not None), points.floats)


class _Params:
    """Activation parameters per (group, width), from the group's statistics and the range method."""

    def __init__(self, stats: Mapping[str, TensorStats] | None, options: QuantOptions, points: Points):
        self.stats, self.options, self.points = stats or {}, options, points
        self.cache: dict[tuple[str, int], ActParams] = {}

    def of(self, tensor: str, bits: int) -> ActParams:
        group = self.points.group[tensor]
        key = (group, bits)
        if key not in self.cache:
            tensor_stats = self.stats.get(group)
            if tensor_stats is None:
                raise OnnxmpqError(f"tensor {tensor!r} is quantized but has no calibration statistics.",
                                   "pass calibration data, or keep the units that read and write it float.")
            fmt = act_format(bits)
            lo, hi = choose_range(tensor_stats, fmt, self.options.act_range, self.options.percentile)
            self.cache[key] = act_params(lo, hi, fmt)
        return self.cache[key]


def _write_tensor(editor: Editor, points: Points, units: Mapping[str, Unit], tensor: str,
                  width: Mapping[str, int | None], params: _Params) -> TensorResult | None:
    """The Q/DQ nodes of one point tensor (see the module docstring); None when it stays float."""
    source = points.source.get(tensor)
    stored = width.get(source) if source else None
    readers = points.readers.get(tensor, ())
    wanted = sorted({bits for u in readers if (bits := width[u]) and bits != stored})
    if stored is None and not wanted:
        return None
    reading = {bits: [n for u in readers if width[u] == bits for n in units[u].nodes] for bits in wanted}
    if stored and source:  # a stored width comes from the writing unit
        writer = units[source]
        guarded = tensor in writer.writes and writer.layer is not None and \
            OP_HANDLERS.get(writer.op_type).guards_output(act_format(stored).container_bits)
        if tensor in {o.name for o in editor.graph.output}:
            float_out = editor.rename_output(tensor)
            dq = editor.qdq(editor.guard(float_out) if guarded else float_out, params.of(tensor, stored))
            editor.retarget(dq, tensor)
            dq = tensor
        else:
            consumers = [n.name for n in editor.graph.node if tensor in n.input]
            dq = editor.qdq(editor.guard(tensor) if guarded else tensor, params.of(tensor, stored))
            editor.rewire(tensor, dq, consumers)
        for bits in wanted:
            editor.rewire(dq, editor.qdq(dq, params.of(tensor, bits)), reading[bits])
    else:
        for bits in wanted:
            editor.rewire(tensor, editor.qdq(tensor, params.of(tensor, bits)), reading[bits])
    main = params.of(tensor, stored) if stored else None
    return TensorResult(tensor, points.group[tensor], stored, main.fmt.type_name if main else "float",
                        main.scale if main else None, main.zero_point if main else None, source,
                        tuple(wanted) if stored else (), points.elements.get(tensor, 0))


def _write_layer(editor: Editor, unit: Unit, cand: Candidate, fmts: tuple[IntFormat | None, IntFormat | None],
                 params: _Params, options: QuantOptions,
                 qweight: QuantizedWeight | None) -> LayerResult:
    """Weight (and bias) of one layer; the row reports the width its input is read at (`fmts[1]`: its
    own, or, for a float layer reading a quantized tensor, the stored one)."""
    spec = unit.layer
    if spec is None:
        raise InternalError(f"unit {unit.name!r} is written as a weighted layer but has no weight")
    wfmt, afmt = fmts
    handler = OP_HANDLERS.get(spec.op_type)
    read_params = params.of(spec.activation, afmt.bits) if afmt and spec.activation in params.points.group else None
    if wfmt is not None:
        weight = editor.array(spec.weight)
        if not np.isfinite(weight).all():
            raise OnnxmpqError(f"the weight of layer {spec.name!r} holds NaN or Inf values.",
                               "fix the exported model; its weights must be finite to be quantized.")
        qweight = qweight or round_nearest(weight, spec.channel_axis, wfmt, options.weight_range, spec.name)
        _check_codes(spec, qweight, wfmt)
        cast = weight_cast(spec, wfmt, afmt, options)
        guard = handler.needs_guard(spec, qweight.codes.ndim, 8 if cast else wfmt.container_bits,
                                    afmt.container_bits if afmt and read_params else None)
        handler.write_weight(editor, spec, qweight, guard, cast)
        if spec.bias and read_params and _int32_bias(options, wfmt):
            out = editor.int32_bias(spec.bias, spec.name, read_params.scale, qweight)
            if out is not None:
                editor.replace_input(spec.name, spec.bias, out)
        channels = qweight.scale.size
        wbytes = layer_weight_bytes(spec, qweight.fmt, channels, cast)
        narrowed = qweight.fmt.bits != qweight.fmt.container_bits
        wtype = qweight.fmt.type_name + (f" ({qweight.fmt.bits}-bit range)" if narrowed else "")
        wtype += CAST_SUFFIX if cast and not handler.casts_sub_byte else (GUARD_SUFFIX if guard else "")
    else:
        weight = editor.array(spec.weight)
        wbytes, wtype = spec.params * weight.dtype.itemsize, str(weight.dtype)
    return LayerResult(spec.name, spec.op_type, cand.weight_bits if wfmt else None,
                       afmt.bits if read_params and afmt else None, spec.params, spec.macs, wbytes, wtype,
                       afmt.type_name if read_params and afmt else "float",
                       read_params.scale if read_params else None, read_params.zero_point if read_params else None)


def _int32_bias(options: QuantOptions, wfmt: IntFormat) -> bool:
    return options.bias == "int32" or (options.bias == "auto" and wfmt.bits <= 8)


def _set_metadata(proto: onnx.ModelProto, key: str, value: str) -> None:
    for prop in proto.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    proto.metadata_props.add(key=key, value=value)


def _check_codes(spec: LayerSpec, qweight: QuantizedWeight, fmt: IntFormat) -> None:
    codes = qweight.codes
    if qweight.fmt.bits != fmt.bits or codes.min(initial=0) < fmt.qmin or codes.max(initial=0) > fmt.qmax:
        raise OnnxmpqError(f"the rounded codes of layer {spec.name!r} do not fit its {fmt.bits}-bit grid.",
                           "round the layer at the bit-width it is written with.")


def cast_to_int8(wfmt: IntFormat, afmt: IntFormat | None, options: QuantOptions) -> bool:
    """Whether a weight's INT4/INT2 codes reach their DQ through a Cast to INT8 (see the module doc)."""
    if wfmt.container_bits >= 8 or options.weight_layout == "native":
        return False
    if options.weight_layout == "int8-cast":
        return True
    return afmt is not None and afmt.container_bits == 8


def weight_cast(spec: LayerSpec, wfmt: IntFormat, afmt: IntFormat | None, options: QuantOptions) -> bool:
    """`cast_to_int8`, or a layer whose op takes no sub-byte weights at all (an embedding's Gather)."""
    return cast_to_int8(wfmt, afmt, options) or (OP_HANDLERS.get(spec.op_type).casts_sub_byte
                                                 and wfmt.container_bits < 8)


def stored_weight_bytes(wfmt: IntFormat, params: int, channels: int, cast: bool, zero_points: bool = True) -> int:
    """Bytes a quantized weight takes in the file: codes, float32 scales, zero points (INT8 when cast)."""
    zeros = (channels if cast else wfmt.storage_bytes(channels)) if zero_points else 0
    return wfmt.storage_bytes(params) + 4 * channels + zeros


def layer_weight_bytes(spec: LayerSpec, wfmt: IntFormat, channels: int, cast: bool) -> int:
    """`stored_weight_bytes` of a layer in its op's weight form (an embedding stores no zero points)."""
    return stored_weight_bytes(wfmt, spec.params, channels, cast, OP_HANDLERS.get(spec.op_type).weight_zero_points)


__all__ = ["CAST_SUFFIX", "GUARD_SUFFIX", "LayerResult", "Scope", "TensorResult", "UnitResult", "Written", "build",
           "cast_to_int8", "layer_formats", "layer_weight_bytes", "stored_weight_bytes", "weight_cast"]
