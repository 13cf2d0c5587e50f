"""Read the precisions of any QDQ model: onnxmpq's own, onnxruntime's `quantize_static`, or another tool's:
the weighted layers (`read_layers`) and every activation quantizer (`read_tensors`).

For every Conv, ConvTranspose, Gemm and MatMul the weight input is traced back through shape-only ops
(Reshape, Transpose, Identity, Squeeze, Unsqueeze) to a DequantizeLinear of an integer initializer;
the activation input to a DequantizeLinear fed by a QuantizeLinear. From the types and the zero points
it reads signedness, granularity (per tensor, per channel, blocked) and width. A signed weight whose
codes fit a narrower restricted grid [-(2^(k-1)-1), 2^(k-1)-1] (onnxmpq's 3-bit codes in INT4, say)
reports that width k; onnxmpq's own models also carry the widths in metadata (`onnxmpq.layers`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnxmpq import progress
from onnxmpq.graph.index import GraphIndex
from onnxmpq.ops import OP_HANDLERS, NodeView

METADATA_KEY = "onnxmpq.layers"
_PASS_THROUGH = {"Reshape", "Transpose", "Identity", "Squeeze", "Unsqueeze", "Flatten"}
_BITS: dict[int, int] = {TensorProto.INT2: 2, TensorProto.UINT2: 2, TensorProto.INT4: 4, TensorProto.UINT4: 4,
         TensorProto.INT8: 8, TensorProto.UINT8: 8, TensorProto.INT16: 16, TensorProto.UINT16: 16,
         TensorProto.INT32: 32, TensorProto.UINT32: 32}
_SIGNED: set[int] = {TensorProto.INT2, TensorProto.INT4, TensorProto.INT8, TensorProto.INT16, TensorProto.INT32}


@dataclass(frozen=True)
class Quantizer:
    """How one tensor is quantized: width, type, signedness, granularity and whether zero points are 0."""

    bits: int
    type_name: str
    signed: bool
    granularity: str      # "per-tensor" | "per-channel" | "blocked"
    symmetric: bool       # every zero point is 0
    scale_name: str = ""
    zero_point_name: str = ""


@dataclass(frozen=True)
class QLayer:
    """A quantizable layer as found in a (possibly quantized) model."""

    name: str
    op_type: str
    params: int
    macs: int
    weight: Quantizer | None
    activation: Quantizer | None
    weight_bytes: int
    activation_tensor: str = ""

    @property
    def weight_bits(self) -> int | None:
        return self.weight.bits if self.weight else None

    @property
    def act_bits(self) -> int | None:
        return self.activation.bits if self.activation else None


def read_layers(proto: onnx.ModelProto, index: GraphIndex | None = None) -> list[QLayer]:
    """Every quantizable layer of the top-level graph with its weight and activation quantizers (`index`:
    the graph's, when the caller has built it)."""
    graph = proto.graph
    index = index or GraphIndex.of(graph)
    consts, producers = index.consts, index.producer
    stubs, weight_q = {}, {}
    stored = {**consts, **_casts_of_constants(graph, consts)}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in stored:
            codes = stored[node.input[0]]
            stub = TensorProto(name=node.output[0], data_type=TensorProto.FLOAT, dims=codes.dims)
            stubs[node.output[0]] = stub
            weight_q[node.output[0]] = (node, codes)
    for node in graph.node:  # shape-only ops after a weight DQ keep its identity (onnxmpq's INT2 guard)
        if node.op_type in _PASS_THROUGH and node.input and node.input[0] in stubs:
            stubs[node.output[0]] = stubs[node.input[0]]
            weight_q[node.output[0]] = weight_q[node.input[0]]
    for node in graph.node:  # an embedding looked up in integer codes, dequantized after (`ops.gather`)
        dq = _row_dequantizer(node, stored, producers, graph)
        if dq is not None:
            codes = stored[node.input[0]]
            stubs[node.input[0]] = TensorProto(name=node.input[0], data_type=TensorProto.FLOAT, dims=codes.dims)
            weight_q[node.input[0]] = (dq, codes)
    index = dataclasses.replace(index, consts={**consts, **stubs})
    meta = _metadata_bits(proto)
    layers = []
    for node in graph.node:
        handler = OP_HANDLERS.get_or_none(node.op_type)
        spec = handler.describe(NodeView(node, index)) if handler else None
        if spec is None:
            continue
        wq = _weight_quantizer(*weight_q[spec.weight], consts, meta.get(spec.name, (None, None))[0]) \
            if spec.weight in weight_q else None
        aq = _act_quantizer(spec.activation, producers, consts, meta.get(spec.name, (None, None))[1])
        wbytes = _weight_bytes(weight_q.get(spec.weight), consts, spec.weight)
        layers.append(QLayer(spec.name, spec.op_type, spec.params, spec.macs, wq, aq, wbytes, spec.activation))
    return layers


def _row_dequantizer(node, stored, producers, graph):
    """For a Gather of integer codes whose rows feed a DequantizeLinear with looked-up scales: a stand-in DQ
    node reading the codes with the scale table (for `_weight_quantizer` and `_weight_bytes`), else None."""
    if node.op_type != "Gather" or not node.input or node.input[0] not in stored:
        return None
    dq = next((n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] == node.output[0]), None)
    scales = producers.get(dq.input[1]) if dq is not None else None
    while scales is not None and scales.op_type in ("Unsqueeze", "Reshape"):
        scales = producers.get(scales.input[0])
    if scales is None or scales.op_type != "Gather":
        return None
    return onnx.helper.make_node("DequantizeLinear", [node.input[0], scales.input[0]], [node.output[0]], axis=0)


def _casts_of_constants(graph, consts) -> dict[str, TensorProto]:
    """Cast outputs of integer initializers -> the stored initializer (onnxmpq's INT4-on-disk, INT8-kernel
    layout: Cast(INT4 codes -> INT8) -> DequantizeLinear); the stored type is what the layer's width is."""
    return {node.output[0]: consts[node.input[0]] for node in graph.node
            if node.op_type == "Cast" and node.input and node.input[0] in consts
            and consts[node.input[0]].data_type in _BITS}


def _metadata_bits(proto: onnx.ModelProto) -> dict[str, tuple[int | None, int | None]]:
    """{layer: (weight bits, act bits)} from `onnxmpq.layers`; metadata of any other form (edited by hand
    or by another tool) is ignored with a warning, and the widths come from the tensor types alone."""
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            try:
                data = json.loads(prop.value)
                if not isinstance(data, dict) or not all(_is_pair(v) for v in data.values()):
                    raise ValueError("not a {layer: [weight bits, act bits]} mapping")
                return {str(k): (v[0], v[1]) for k, v in data.items()}
            except (ValueError, TypeError, RecursionError) as exc:
                progress.log(f"warning: ignoring the model's {METADATA_KEY} metadata ({exc}); widths are read "
                             "from the tensor types")
                return {}
    return {}


def _is_pair(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(
        v is None or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 32) for v in value)


def _zero_points(node, consts) -> np.ndarray | None:
    if len(node.input) > 2 and node.input[2] in consts:
        return numpy_helper.to_array(consts[node.input[2]])
    return None


def _weight_quantizer(dq, codes: TensorProto, consts, meta_bits) -> Quantizer:
    zp = _zero_points(dq, consts)
    scale = consts.get(dq.input[1])
    nscale = int(np.prod(scale.dims)) if scale is not None else 1
    block = next((a.i for a in dq.attribute if a.name == "block_size" and a.i > 0), 0)
    granularity = "blocked" if block else ("per-channel" if nscale > 1 else "per-tensor")
    bits = _BITS.get(codes.data_type, 32)
    signed = codes.data_type in _SIGNED
    if meta_bits:
        bits = meta_bits
    elif signed and bits <= 16:
        bits = _narrowest(numpy_helper.to_array(codes), bits)
    return Quantizer(bits, TensorProto.DataType.Name(codes.data_type), signed, granularity,
                     zp is None or not np.any(zp.astype(np.int64)), dq.input[1], dq.input[2] if len(dq.input) > 2 else "")


def _narrowest(codes: np.ndarray, bits: int) -> int:
    """Smallest k whose restricted grid holds the codes (only narrower than the type's own width)."""
    amax = int(np.abs(codes.astype(np.int64)).max(initial=0))
    for k in range(2, bits):
        if amax <= 2 ** (k - 1) - 1 and k > bits // 2:
            return k
    return bits


def _act_quantizer(tensor: str, producers, consts, meta_bits) -> Quantizer | None:
    dq = producers.get(tensor)
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] in consts:
        return None
    zp_name = dq.input[2] if len(dq.input) > 2 else ""
    zp = consts.get(zp_name)
    q = producers.get(dq.input[0])
    dtype = zp.data_type if zp is not None else _q_output_type(q, consts)
    zp_values = numpy_helper.to_array(zp) if zp is not None else np.zeros(1)
    scale = consts.get(dq.input[1])
    granularity = "per-channel" if scale is not None and int(np.prod(scale.dims)) > 1 else "per-tensor"
    bits = meta_bits or _BITS.get(dtype, 8)
    return Quantizer(bits, TensorProto.DataType.Name(dtype), dtype in _SIGNED, granularity,
                     not np.any(zp_values.astype(np.int64)), dq.input[1], zp_name)


def _q_output_type(q, consts) -> int:
    if q is not None:
        for attr in q.attribute:
            if attr.name == "output_dtype" and attr.i:
                return attr.i
    return TensorProto.UINT8


def _weight_bytes(entry, consts, name) -> int:
    """Bytes of the stored weight: codes + scales + zero points, or the float tensor."""
    if entry is None:
        tensor = consts.get(name)
        return len(tensor.raw_data) if tensor is not None and tensor.raw_data else (
            int(np.prod(tensor.dims)) * 4 if tensor is not None else 0)
    dq, codes = entry
    total = len(codes.raw_data) if codes.raw_data else numpy_helper.to_array(codes).nbytes
    for input_name in dq.input[1:]:
        tensor = consts.get(input_name)
        if tensor is not None:
            total += len(tensor.raw_data) if tensor.raw_data else numpy_helper.to_array(tensor).nbytes
    return total


def weight_bytes(layers: list[QLayer]) -> int:
    return sum(layer.weight_bytes for layer in layers)


@dataclass(frozen=True)
class QTensor:
    """One activation quantizer of a QDQ model: a QuantizeLinear of a computed tensor and its DQ.

    Attributes:
        name: the float tensor quantized (for a requantize, the one before its first DQ).
        bits, type_name, signed: the width and ONNX type of the codes.
        scale, zero_point: the quantizer's parameters (first value, where per channel).
        channels: how many scales (1 = per tensor).
        requantized_from: the width it was stored at, when this Q reads a DQ output with other parameters
            (a requantize).
        quantizer: the QuantizeLinear node's name.
    """

    name: str
    bits: int
    type_name: str
    signed: bool
    scale: float | None
    zero_point: int | None
    channels: int = 1
    requantized_from: int | None = None
    quantizer: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_tensors(proto: onnx.ModelProto, index: GraphIndex | None = None) -> list[QTensor]:
    """Every activation quantizer of the top-level graph, in graph order (a Q whose input is computed, not a
    constant: weights are read by `read_layers`)."""
    graph = proto.graph
    index = index or GraphIndex.of(graph)
    consts, producers = index.consts, index.producer
    out = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in consts:
            continue
        source, source_bits = node.input[0], None
        dtype = _q_type(node, consts)
        scale = _first(consts.get(node.input[1]))
        zp = _first(consts.get(node.input[2])) if len(node.input) > 2 and node.input[2] else 0
        dq = producers.get(source)
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in producers:
            first = producers[dq.input[0]]
            if first.op_type == "QuantizeLinear":
                source = first.input[0]
                first_zp = _first(consts.get(first.input[2])) if len(first.input) > 2 and first.input[2] else 0
                if (_q_type(first, consts), _first(consts.get(first.input[1])), first_zp) != (dtype, scale, zp):
                    source_bits = _q_bits(first, consts)  # a no-op DQ -> Q (same parameters) is no requantize
        channels = int(np.prod(consts[node.input[1]].dims)) if node.input[1] in consts else 1
        out.append(QTensor(source, _BITS.get(dtype, 8), TensorProto.DataType.Name(dtype), dtype in _SIGNED,
                           None if scale is None else float(scale), None if zp is None else int(zp), channels,
                           source_bits, node.name))
    return out


def _q_type(q, consts) -> int:
    zp = consts.get(q.input[2]) if len(q.input) > 2 and q.input[2] else None
    return zp.data_type if zp is not None else _q_output_type(q, consts)


def _q_bits(q, consts) -> int:
    return _BITS.get(_q_type(q, consts), 8)


def _first(tensor: TensorProto | None):
    if tensor is None:
        return None
    values = numpy_helper.to_array(tensor).ravel()
    return values[0] if values.size else None

