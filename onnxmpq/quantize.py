"""The QDQ writer: a float `Model` plus per-layer precisions -> a QDQ ModelProto. Pure: no onnxruntime.

For each layer with weight bits b_w the float weight W is replaced by DequantizeLinear(codes, scale, 0,
axis=channel) with codes in the ONNX type of b_w (see `formats`); the float initializer is dropped when
nothing else reads it. For each layer with activation bits b_a its activation input x becomes
DequantizeLinear(QuantizeLinear(x, s, z), s, z), unsigned with the range chosen from the calibration
statistics; layers reading the same tensor at the same width share one pair. Biases stay float, or with
`bias="int32"` become DequantizeLinear(round(b / (s_x s_w)), s_x s_w) when both sides are quantized.

onnxruntime 1.32 fuses DQ(INT2) + Conv + Q into a QLinearConv that rejects INT2, so an INT2 weight feeds
its layer through a shape-preserving Reshape ("INT2 + Reshape guard"), which onnxruntime does not fuse;
`int2_container="int4"` instead stores 2-bit codes in INT4 with a plain DQ. The same guard keeps two
other patterns away from kernels that reject them (see `needs_guard`).

Weight layout: onnxruntime has integer kernels (QLinearConv, MatMulInteger) for 8-bit weights only, so
a DQ(INT4) + Conv runs as a dequantize and a float Conv, slower than W8A8 (ResNet-20, 2 threads:
2.8 ms against 1.6 ms). With `weight_layout="int8-cast"` the INT4/INT2 codes stay in the file and a
Cast to INT8 sits in front of their DQ; onnxruntime folds the Cast into an INT8 initializer at load
and fuses the INT8 kernel: the file of W4, the speed of W8, the same values. `auto` does that where
the layer's activations are 8-bit (where an INT8 kernel exists).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxmpq.calibrate.ranges import ActParams, act_params, choose_range
from onnxmpq.errors import OnnxmpqError
from onnxmpq.formats import IntFormat, act_format, pack, required_opset, weight_format
from onnxmpq.graph import Model, convert_opset, default_opset, keep_initializers, names_read
from onnxmpq.qdq import METADATA_KEY
from onnxmpq.rounding import QuantizedWeight, round_nearest
from onnxmpq.types import Candidate, LayerSpec, QuantOptions, TensorStats

GUARD_SUFFIX = " + Reshape guard"
CAST_SUFFIX = " -> INT8 kernels"


@dataclass(frozen=True)
class LayerResult:
    """What the writer did to one layer; the rows of the report."""

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


def layer_formats(layer: LayerSpec, cand: Candidate, options: QuantOptions) -> tuple[IntFormat | None, IntFormat | None]:
    wfmt = weight_format(cand.weight_bits, options.int2_container == "int4") if cand.weight_bits else None
    afmt = act_format(cand.act_bits) if cand.act_bits else None
    return wfmt, afmt


def build(model: Model, assignment: Mapping[str, Candidate], stats: Mapping[str, TensorStats] | None,
          options: QuantOptions = QuantOptions(),
          weights: Mapping[str, QuantizedWeight] | None = None) -> tuple[onnx.ModelProto, list[LayerResult]]:
    """Writes the QDQ model.

    Args:
        model: the float model from `graph.load`.
        assignment: layer name -> Candidate; layers not named stay float.
        stats: calibration statistics of each quantized layer's activation tensor.
        options: ranges, INT2 storage, bias handling.
        weights: pre-rounded codes (e.g. from GPTQ) by layer name; others are rounded to nearest here.

    Returns:
        The QDQ model (opset raised as the formats need) and one `LayerResult` per layer.
    """
    layers = {spec.name: spec for spec in model.layers}
    unknown = sorted(set(assignment) - set(layers))
    if unknown:
        raise OnnxmpqError(f"no quantizable layer named {unknown[0]!r} ({len(unknown)} unknown).",
                           "run `onnxmpq inspect MODEL` to list the layer names.")
    formats = {name: layer_formats(layers[name], cand, options) for name, cand in assignment.items()}
    opset = max(default_opset(model.proto), required_opset(f for pair in formats.values() for f in pair if f))
    proto = convert_opset(model.proto, opset)
    if proto is model.proto:
        proto = onnx.ModelProto()
        proto.CopyFrom(model.proto)
    writer = _Writer(proto, options)
    results = []
    for spec in model.layers:
        cand = assignment.get(spec.name, Candidate(None, None))
        wfmt, afmt = formats.get(spec.name, (None, None))
        qweight = None
        if wfmt is not None:
            if not np.isfinite(writer.weight(spec.weight)).all():
                raise OnnxmpqError(f"the weight of layer {spec.name!r} holds NaN or Inf values.",
                                   "fix the exported model; its weights must be finite to be quantized.")
            qweight = (weights or {}).get(spec.name) or round_nearest(
                writer.weight(spec.weight), spec.channel_axis, wfmt, options.weight_range, spec.name)
            _check_codes(spec, qweight, wfmt)
        aparams = None
        if afmt is not None:
            aparams = _activation_params(spec, afmt, stats, options)
        writer.quantize_layer(spec, qweight, aparams)
        results.append(_result(spec, cand, qweight, afmt, aparams, writer.weight(spec.weight), options))
    writer.finish()
    _set_metadata(proto, METADATA_KEY, json.dumps({r.name: [r.weight_bits, r.act_bits] for r in results}))
    return proto, results


def _set_metadata(proto: onnx.ModelProto, key: str, value: str) -> None:
    for prop in proto.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    proto.metadata_props.add(key=key, value=value)


def _check_codes(spec: LayerSpec, qweight: QuantizedWeight, fmt: IntFormat) -> None:
    if qweight.fmt.bits != fmt.bits or qweight.codes.min(initial=0) < fmt.qmin or qweight.codes.max(initial=0) > fmt.qmax:
        raise OnnxmpqError(f"the rounded codes of layer {spec.name!r} do not fit its {fmt.bits}-bit grid.",
                           "round the layer at the bit-width it is written with.")


def _activation_params(spec: LayerSpec, fmt: IntFormat, stats, options: QuantOptions) -> ActParams:
    tensor_stats = (stats or {}).get(spec.activation)
    if tensor_stats is None:
        raise OnnxmpqError(f"layer {spec.name!r} has quantized activations but no calibration statistics.",
                           "pass calibration data (--calib) or keep its activations float.")
    lo, hi = choose_range(tensor_stats, fmt, options.act_range, options.percentile)
    return act_params(lo, hi, fmt)


def _result(spec, cand, qweight, afmt, aparams, float_weight, options: QuantOptions) -> LayerResult:
    if qweight is not None:
        channels = qweight.scale.size
        cast = cast_to_int8(qweight.fmt, afmt, options)
        wbytes = stored_weight_bytes(qweight.fmt, spec.params, channels, cast)
        wtype = qweight.fmt.type_name
        if qweight.fmt.bits != qweight.fmt.container_bits:
            wtype += f" ({qweight.fmt.bits}-bit range)"
        if cast:
            wtype += CAST_SUFFIX
        elif needs_guard(spec, qweight, aparams, cast):
            wtype += GUARD_SUFFIX
    else:
        wbytes, wtype = spec.params * float_weight.dtype.itemsize, str(float_weight.dtype)
    return LayerResult(spec.name, spec.op_type, cand.weight_bits if qweight else None,
                       cand.act_bits if aparams else None, spec.params, spec.macs, wbytes, wtype,
                       afmt.type_name if afmt else "float", aparams.scale if aparams else None,
                       aparams.zero_point if aparams else None)


class _Writer:
    """Edits one graph: adds Q/DQ nodes in front of their consumers and keeps the node order topological."""

    def __init__(self, proto: onnx.ModelProto, options: QuantOptions):
        self.proto = proto
        self.graph = proto.graph
        self.options = options
        self.inits = {t.name: t for t in self.graph.initializer}
        self.taken = set(self.inits) | {n.name for n in self.graph.node}
        self.taken |= {o for n in self.graph.node for o in n.output} | {i.name for i in self.graph.input}
        self.before: dict[str, list[onnx.NodeProto]] = {}  # node name -> nodes to insert before it
        self.act_pairs: dict[tuple[str, int, float, int], str] = {}
        self.nodes = {n.name: n for n in self.graph.node}
        self.replaced: set[str] = set()
        self._arrays: dict[str, np.ndarray] = {}
        values = list(self.graph.input) + list(self.graph.value_info) + list(self.graph.output)
        self.float_types = {v.name: v.type.tensor_type.elem_type for v in values}
        self.float_types.update({t.name: t.data_type for t in self.graph.initializer})

    def weight(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = numpy_helper.to_array(self.inits[name])
        return self._arrays[name]

    def _name(self, base: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_./:-]", "_", base)
        name, k = base, 1
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name

    def _init(self, base: str, tensor: TensorProto) -> str:
        tensor.name = self._name(base)
        self.graph.initializer.append(tensor)
        return tensor.name

    def quantize_layer(self, spec: LayerSpec, qweight: QuantizedWeight | None, aparams: ActParams | None) -> None:
        node = self.nodes[spec.name]
        inserted = self.before.setdefault(node.name, [])
        if qweight is not None:
            cast = cast_to_int8(qweight.fmt, aparams.fmt if aparams else None, self.options)
            inserted += self._weight_nodes(node, spec, qweight, needs_guard(spec, qweight, aparams, cast), cast)
        if aparams is not None:
            inserted += self._activation_nodes(node, spec, aparams)
        if qweight is not None and aparams is not None and self.options.bias == "int32" and spec.bias:
            inserted += self._bias_nodes(node, spec, qweight, aparams)

    def _scale(self, values, like: str) -> TensorProto:
        """Scales in the float type of the tensor `like` (float32 or float16), as DequantizeLinear needs."""
        dtype = self.float_types.get(like, TensorProto.FLOAT)
        if dtype not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            raise OnnxmpqError(f"tensor {like!r} is {TensorProto.DataType.Name(dtype)}; onnxmpq quantizes "
                               "float32 and float16 models.", "export the model in float32.")
        return numpy_helper.from_array(np.asarray(values, np.float16 if dtype == TensorProto.FLOAT16 else np.float32))

    def _weight_nodes(self, node, spec: LayerSpec, qweight: QuantizedWeight, guard: bool,
                      cast: bool = False) -> list[onnx.NodeProto]:
        fmt = qweight.fmt
        codes = helper.make_tensor("", fmt.onnx_type, qweight.codes.shape, pack(qweight.codes, fmt), raw=True)
        channels = qweight.scale.size
        q_name = self._init(f"{spec.weight}_{spec.name}_q{fmt.bits}", codes)
        s_name = self._init(f"{q_name}_scale", self._scale(qweight.scale, spec.weight))
        z_type = TensorProto.INT8 if cast else fmt.onnx_type
        z = helper.make_tensor("", z_type, [channels], np.zeros(channels, np.int8).tobytes() if cast
                               else pack(np.zeros(channels, np.int8), fmt), raw=True)
        z_name = self._init(f"{q_name}_zero_point", z)
        out = self._name(f"{q_name}_dq")
        nodes = []
        if cast:
            widened = self._name(f"{q_name}_int8")
            nodes.append(helper.make_node("Cast", [q_name], [widened], name=self._name(f"{spec.name}_weight_cast"),
                                          to=TensorProto.INT8))
            q_name = widened
        nodes.append(helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [out],
                                      name=self._name(f"{spec.name}_weight_dq"), axis=qweight.axis))
        if guard:
            shape = self._init(f"{q_name}_shape", numpy_helper.from_array(np.array(qweight.codes.shape, np.int64)))
            guarded = self._name(f"{out}_guard")
            nodes.append(helper.make_node("Reshape", [out, shape], [guarded], name=self._name(f"{spec.name}_fusion_guard")))
            out = guarded
        _replace_input(node, spec.weight, out)
        self.replaced.add(spec.weight)
        return nodes

    def _activation_nodes(self, node, spec: LayerSpec, params: ActParams) -> list[onnx.NodeProto]:
        key = (spec.activation, params.fmt.bits, params.scale, params.zero_point)
        if key in self.act_pairs:
            _replace_input(node, spec.activation, self.act_pairs[key])
            return []
        fmt = params.fmt
        s_name = self._init(f"{spec.activation}_a{fmt.bits}_scale", self._scale(params.scale, spec.activation))
        zp = helper.make_tensor("", fmt.onnx_type, [], pack(np.array([params.zero_point]), fmt), raw=True)
        z_name = self._init(f"{spec.activation}_a{fmt.bits}_zero_point", zp)
        q_out, dq_out = self._name(f"{spec.activation}_a{fmt.bits}_q"), self._name(f"{spec.activation}_a{fmt.bits}_dq")
        nodes = [helper.make_node("QuantizeLinear", [spec.activation, s_name, z_name], [q_out],
                                  name=self._name(f"{spec.activation}_a{fmt.bits}_QuantizeLinear")),
                 helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [dq_out],
                                  name=self._name(f"{spec.activation}_a{fmt.bits}_DequantizeLinear"))]
        self.act_pairs[key] = dq_out
        _replace_input(node, spec.activation, dq_out)
        return nodes

    def _bias_nodes(self, node, spec: LayerSpec, qweight: QuantizedWeight, aparams: ActParams) -> list[onnx.NodeProto]:
        """INT32 bias on the accumulator's grid: b_q = round(b / (s_x s_w)), dequantized with s_x s_w."""
        bias = self.weight(spec.bias).astype(np.float64).reshape(-1)
        scale = (np.float64(aparams.scale) * qweight.scale.astype(np.float64)).astype(np.float32)
        if bias.size != scale.size or self.float_types.get(spec.bias, TensorProto.FLOAT) != TensorProto.FLOAT:
            return []  # a grouped ConvTranspose's bias does not line up with per-axis scales: stays float
        limit = np.iinfo(np.int32)
        codes = np.clip(np.rint(bias / scale.astype(np.float64)), limit.min, limit.max).astype(np.int32)
        q_name = self._init(f"{spec.bias}_{spec.name}_int32", numpy_helper.from_array(codes))
        s_name = self._init(f"{q_name}_scale", numpy_helper.from_array(scale))
        out = self._name(f"{q_name}_dq")
        _replace_input(node, spec.bias, out)
        self.replaced.add(spec.bias)
        return [helper.make_node("DequantizeLinear", [q_name, s_name], [out], name=self._name(f"{spec.name}_bias_dq"), axis=0)]

    def finish(self) -> None:
        """Splices the new nodes in front of their consumers and drops float weights nothing reads."""
        ordered = []
        for node in self.graph.node:
            ordered += self.before.get(node.name, [])
            ordered.append(node)
        del self.graph.node[:]
        self.graph.node.extend(ordered)
        used = names_read(self.graph)
        keep_initializers(self.graph, {t.name for t in self.graph.initializer
                                       if t.name not in self.replaced or t.name in used})
        self.proto.ir_version = max(self.proto.ir_version, _min_ir(self.proto))


def cast_to_int8(wfmt: IntFormat, afmt: IntFormat | None, options: QuantOptions) -> bool:
    """Whether a weight's INT4/INT2 codes reach their DQ through a Cast to INT8 (see the module doc)."""
    if wfmt.container_bits >= 8 or options.weight_layout == "native":
        return False
    if options.weight_layout == "int8-cast":
        return True
    return afmt is not None and afmt.container_bits == 8


def stored_weight_bytes(wfmt: IntFormat, params: int, channels: int, cast: bool) -> int:
    """Bytes a quantized weight takes in the file: codes, float32 scales, zero points (INT8 when cast)."""
    return wfmt.storage_bytes(params) + 4 * channels + (channels if cast else wfmt.storage_bytes(channels))


def needs_guard(spec: LayerSpec, qweight: QuantizedWeight, aparams: ActParams | None, cast: bool = False) -> bool:
    """Whether the weight must reach its layer through a Reshape so that onnxruntime 1.32 does not fuse
    the pattern into a kernel that rejects it: INT2 weights (QLinearConv has no INT2), UINT4 inputs
    with INT8 weights (QLinearConv wants 8-bit inputs), and batched MatMul weights of rank > 2
    (MatMulIntegerToFloat rejects their per-channel zero points)."""
    container = 8 if cast else qweight.fmt.container_bits
    if container == 2 or (aparams is not None and aparams.fmt.container_bits == 4 and container == 8):
        return True
    return spec.op_type == "MatMul" and qweight.codes.ndim > 2


def _replace_input(node: onnx.NodeProto, old: str, new: str) -> None:
    for i, name in enumerate(node.input):
        if name == old:
            node.input[i] = new
            return


def _min_ir(proto: onnx.ModelProto) -> int:
    ir = helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
    uses_int2 = any(t.data_type in (TensorProto.INT2, TensorProto.UINT2) for t in proto.graph.initializer)
    return max(ir, 11 if not uses_int2 else 12)
