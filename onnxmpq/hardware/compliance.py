"""Check a QDQ model against a hardware profile: does every layer run at a precision the target has?

Works on any QDQ model (onnxmpq's, onnxruntime's `quantize_static`, another tool's): the layers and
their weight/activation quantizers come from `qdq.read_layers`; ties are read from the graph. Each
broken rule gives one `Violation` with one of these rule ids:

    pair               the layer's (weight bits, activation bits) is not allowed for its op type
                       (`ops` and `pairs`); weight-only layers are judged as (W, float)
    float-layer        the layer's weights stay float but the profile has `float_layers: false`
                       (a layer with float weights is judged by this rule only)
    per-channel        per-channel or blocked weight scales, but the profile has `per_channel: false`
    symmetric-weights  a non-zero weight zero point, but the profile has `symmetric_weights: true`
    pin                a pinned layer is not at its pinned precision, or is not in the model
    max-distinct-bits  the model uses more weight widths than `max_distinct_bits` (one violation,
                       layer "(model)")
    tie                a node whose op type is in `tie` reads DequantizeLinear outputs that differ in
                       scale, zero point or type (values compared, not names)
    float-tensor       a float activation read by an op the target runs on integer kernels (Conv, MatMul,
                       Gemm, Add/Mul of two activations, Concat, pooling, LeakyRelu, Sigmoid, Softmax, and
                       the profile's `integer_ops`), under a profile with `float_layers: false`
    requantize         a tensor read at another width or scale than it is stored at (a DQ feeding a Q),
                       under a profile with `requantize: false`

Example:
    >>> violations = check(onnx.load("model_q.onnx"), profiles.load("int8-only"))
    >>> summary(violations)["complies"]
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from onnxmpq.graph import qdq
from onnxmpq.graph.index import GraphIndex
from onnxmpq.hardware import profiles
from onnxmpq.hardware.profiles import Profile
from onnxmpq.types import Candidate

RULES = ("pair", "float-layer", "per-channel", "symmetric-weights", "pin", "max-distinct-bits", "tie", "float-tensor",
         "requantize")
INTEGER_OPS = ("Conv", "MatMul", "Gemm", "Concat", "AveragePool", "GlobalAveragePool", "LeakyRelu", "Sigmoid",
               "Softmax")
TWO_INPUT_INTEGER_OPS = ("Add", "Mul")  # integer kernels only with both inputs activations
MODEL = "(model)"


@dataclass(frozen=True)
class Violation:
    """One broken rule: where (layer or node name), which rule id, what is wrong, what to change."""

    layer: str
    rule: str
    message: str
    fix: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def check(proto: onnx.ModelProto, profile: Profile | str) -> list[Violation]:
    """Every violation of `profile` (a Profile or a built-in name / YAML path) by the QDQ model `proto`.

    Returns:
        Violations in network order: per layer, then the model-wide width count, then ties.
    """
    profile = profiles.load(profile)
    index = GraphIndex.of(proto.graph)
    layers = qdq.read_layers(proto, index)
    out = [v for layer in layers for v in _layer_violations(layer, profile)]
    out += _missing_pins(layers, profile)
    out += _distinct_bits(layers, profile)
    out += _ties(index, profile)
    out += _float_tensors(index, profile)
    out += _requantizes(proto, index, profile)
    out += _unreadable(proto.graph)
    return out


# quantized ops that carry their precision inside the op, not in Q/DQ pairs around a float op
OPAQUE_OPS = ("MatMulNBits", "QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger",
              "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention", "GatherBlockQuantized")


def _unreadable(graph: onnx.GraphProto) -> list[Violation]:
    """A quantized op whose widths the checker does not read (an already fused model): compliance of
    that op is unknown, which is a violation, not a pass."""
    return [Violation(node.name or node.op_type, "unreadable-op",
                      f"{node.op_type} is a fused quantized op whose bit-widths check does not read; its "
                      "compliance is unknown.",
                      "check the QDQ model before onnxruntime's fusions (or quantize_static's QDQ format).")
            for node in graph.node if node.op_type in OPAQUE_OPS]


def summary(violations: Sequence[Violation], profile: Profile | None = None) -> dict[str, Any]:
    """JSON form: {"complies", "profile"?, "layers" (distinct names in violation), "rules" (count per
    rule id), "violations" [{layer, rule, message, fix}]}."""
    out: dict[str, Any] = {"complies": not violations}
    if profile is not None:
        out["profile"] = profile.name
    out["layers"] = len({v.layer for v in violations})
    out["rules"] = dict(Counter(v.rule for v in violations))
    out["violations"] = [v.to_dict() for v in violations]
    return out


def _label(cand: Candidate) -> str:
    if not cand.weight_bits:
        return "float" if not cand.act_bits else f"float weights with A{cand.act_bits}"
    return f"W{cand.weight_bits}A{cand.act_bits}" if cand.act_bits else f"W{cand.weight_bits} (float activations)"


def _flag(name: str, cand: Candidate) -> str:
    """The onnxmpq CLI override that sets `name` to `cand`."""
    return f"onnxmpq quantize --layer-bits {name}={cand.weight_bits or 'float'}:{cand.act_bits or 'float'}"


def _layer_violations(layer: qdq.QLayer, profile: Profile) -> list[Violation]:
    cand = Candidate(layer.weight_bits, layer.act_bits)
    out = []
    if layer.weight is None:
        if not profile.float_layers:
            out.append(Violation(layer.name, "float-layer", f"{layer.op_type} layer stays in float; profile "
                                 f"{profile.name} has no float layers.", _nearest_fix(layer, profile)))
    elif not profile.allows(layer.op_type, cand):
        out.append(Violation(layer.name, "pair", f"{layer.op_type} at {_label(cand)} is not allowed by profile "
                             f"{profile.name}.", _nearest_fix(layer, profile)))
    if layer.weight is not None and not profile.per_channel and layer.weight.granularity != "per-tensor":
        out.append(Violation(layer.name, "per-channel", f"weights are quantized {layer.weight.granularity}; "
                             f"profile {profile.name} takes one scale per tensor.",
                             "requantize this layer with per-tensor weight scales, or choose a profile with "
                             "per_channel: true."))
    if layer.weight is not None and profile.symmetric_weights and not layer.weight.symmetric:
        out.append(Violation(layer.name, "symmetric-weights", f"weight zero point "
                             f"{layer.weight.zero_point_name!r} is not 0 ({layer.weight.type_name} weights); "
                             f"profile {profile.name} needs symmetric weights.",
                             "requantize this layer with symmetric signed weights (zero point 0), or choose a "
                             "profile with symmetric_weights: false."))
    pinned = profile.pin.get(layer.name)
    if pinned is not None and pinned != cand:
        out.append(Violation(layer.name, "pin", f"layer is at {_label(cand)}; profile {profile.name} pins it "
                             f"at {_label(pinned)}.", f"requantize this layer at {_label(pinned)} "
                             f"({_flag(layer.name, pinned)})."))
    return out


def _nearest_fix(layer: qdq.QLayer, profile: Profile) -> str:
    """Requantize at the allowed precision nearest the current one (wider first), else change profile."""
    rule = profile.rule(layer.op_type)
    w, a = layer.weight_bits or 16, layer.act_bits or 16
    allowed = [(wb, ab) for wb in rule.weights for ab in rule.activations
               if profile.allows(layer.op_type, Candidate(wb, ab))]
    if not allowed:
        current = Candidate(layer.weight_bits, layer.act_bits)
        return f"choose a profile that allows {layer.op_type} at {_label(current)}."
    best = Candidate(*min(allowed, key=lambda c: (abs(c[0] - w), c[0] < w, abs((c[1] or 16) - a), (c[1] or 16) < a)))
    return f"requantize this layer at {_label(best)} ({_flag(layer.name, best)})."


def _missing_pins(layers: Sequence[qdq.QLayer], profile: Profile) -> list[Violation]:
    names = {layer.name for layer in layers}
    return [Violation(name, "pin", f"pinned layer {name!r} is not a quantizable layer of this model.",
                      "check the name with `onnxmpq inspect MODEL`, or remove the pin from the profile.")
            for name in profile.pin if name not in names]


def _distinct_bits(layers: Sequence[qdq.QLayer], profile: Profile) -> list[Violation]:
    limit = profile.max_distinct_bits
    counts = Counter(layer.weight_bits for layer in layers if layer.weight is not None)
    if limit is None or len(counts) <= limit:
        return []
    used = ", ".join(f"{bits}-bit: {n} layer{'s' * (n != 1)}" for bits, n in sorted(counts.items()))
    extra = sorted(counts, key=lambda bits: (counts[bits], bits))[:len(counts) - limit]
    move = " and ".join(f"the {counts[b]} {b}-bit layer{'s' * (counts[b] != 1)}" for b in extra)
    return [Violation(MODEL, "max-distinct-bits", f"weights use {len(counts)} widths ({used}); profile "
                      f"{profile.name} allows at most {limit}.", f"requantize {move} at one of the other widths.")]


def _ties(graph: GraphIndex, profile: Profile) -> list[Violation]:
    if not profile.tie:
        return []
    producers = graph.producer
    out = []
    for index, node in enumerate(graph.graph.node):
        if node.op_type not in profile.tie:
            continue
        dqs = [(name, producers[name]) for name in node.input
               if name in producers and producers[name].op_type == "DequantizeLinear"]
        groups: dict[tuple, list[str]] = {}
        for name, dq in dqs:
            groups.setdefault(_qparams(dq, graph), []).append(name)
        if len(groups) > 1:
            label = node.name or f"{node.op_type}#{index}"
            parts = "; ".join(f"{', '.join(names)} ({_describe(key)})" for key, names in groups.items())
            out.append(Violation(label, "tie", f"{node.op_type} inputs differ in quantization: {parts}.",
                                 f"give every quantized input of this {node.op_type} one scale, zero point and "
                                 "type (the range covering them all), or choose a profile without tie: "
                                 f"[{node.op_type}]."))
    return out


def _float_tensors(graph: GraphIndex, profile: Profile) -> list[Violation]:
    """Float activations read by the ops the target runs on integers (see the module docstring)."""
    if profile.float_layers:
        return []
    producers = graph.producer

    def constant(name: str) -> bool:
        return name in graph.consts or (name in producers and producers[name].op_type == "Constant")

    integer = set(INTEGER_OPS) | set(profile.integer_ops)
    out = []
    for index, node in enumerate(graph.graph.node):
        acts = [name for name in node.input if name and not constant(name)
                and not (name in producers and producers[name].op_type == "DequantizeLinear"
                         and constant(producers[name].input[0]))]  # a weight's DQ is no activation
        if not (node.op_type in integer or "all" in integer or
                (node.op_type in TWO_INPUT_INTEGER_OPS and len(acts) == 2)):
            continue
        for name in acts:
            producer = producers.get(name)
            if producer is None or producer.op_type != "DequantizeLinear":
                label = node.name or f"{node.op_type}#{index}"
                out.append(Violation(label, "float-tensor", f"{node.op_type} reads {name!r} in float; profile "
                                     f"{profile.name} runs {node.op_type} on integer kernels only.",
                                     "quantize the tensor (onnxmpq quantize writes Q/DQ on every tensor an "
                                     "integer op reads), or choose a profile with float_layers: true."))
    return out


def _requantizes(proto: onnx.ModelProto, index: GraphIndex, profile: Profile) -> list[Violation]:
    if profile.requantize:
        return []
    return [Violation(t.quantizer or t.name, "requantize", f"tensor {t.name!r} is stored at {t.requantized_from} "
                      f"bits and read again at {t.bits} bits (a DQ feeding a Q); profile {profile.name} takes "
                      "each tensor at one width.", "give the units that read and write it one activation width "
                      "(onnxmpq quantize --profile with this profile ties them).")
            for t in qdq.read_tensors(proto, index) if t.requantized_from is not None]


def _qparams(dq: onnx.NodeProto, graph: GraphIndex) -> tuple:
    """(scale, zero point, type) of a DequantizeLinear as hashable values; names when not constant."""
    scale = _value(dq.input[1], graph)
    zp_name = dq.input[2] if len(dq.input) > 2 else ""
    zp = _value(zp_name, graph) if zp_name else (0.0,)
    return scale, zp, _dq_type(dq, graph)


def _value(name: str, graph: GraphIndex) -> tuple:
    array = graph.literal(name)
    if array is None:
        return (("tensor", name),)
    return tuple(float(v) for v in np.asarray(array).astype(np.float64).ravel())


def _type_name(array: np.ndarray) -> str:
    return TensorProto.DataType.Name(onnx.helper.np_dtype_to_tensor_dtype(array.dtype))


def _dq_type(dq: onnx.NodeProto, graph: GraphIndex) -> str:
    """Integer type DequantizeLinear reads: its zero point's, its constant input's, or its QuantizeLinear's."""
    zp_name = dq.input[2] if len(dq.input) > 2 else ""
    for name in (zp_name, dq.input[0]):
        array = graph.literal(name) if name else None
        if array is not None:
            return _type_name(array)
    q = graph.producer.get(dq.input[0])
    if q is not None and q.op_type == "QuantizeLinear":
        zp = graph.literal(q.input[2]) if len(q.input) > 2 and q.input[2] else None
        if zp is not None:
            return _type_name(zp)
        dtype = next((a.i for a in q.attribute if a.name == "output_dtype" and a.i), TensorProto.UINT8)
        return TensorProto.DataType.Name(dtype)
    return "unknown"


def _describe(key: tuple) -> str:
    scale, zp, dtype = key
    return f"scale {_short(scale)}, zero point {_short(zp)}, {dtype}"


def _short(values: tuple) -> str:
    if values and isinstance(values[0], tuple):
        return repr(values[0][1])
    return f"{values[0]:.6g}" if len(values) == 1 else f"[{len(values)} values]"
