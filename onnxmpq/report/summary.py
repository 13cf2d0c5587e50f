"""What a quantize run wrote, summarised: the `Report`, the totals of the written layers (weight
bytes, average bits, BitOps), where the file's bytes are, and notes on storage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import onnx

from onnxmpq.errors import option
from onnxmpq.graph.index import GraphIndex
from onnxmpq.write.build import LayerResult, TensorResult, UnitResult, Written

FLOAT_BITS = 32



@dataclass(frozen=True)
class Report:
    """What `quantize` wrote: per-layer precisions and sizes, the other units and the quantized tensors,
    plus model totals.

    avg_weight_bits = sum_l params_l * b_w(l) / sum_l params_l; bitops = sum_l macs_l * b_w(l) * b_a(l)
    over the weighted layers + sum_u macs_u * b_a(u)^2 over units without weights (a MatMul of two
    activations) + sum n_t * b1 * b2 over requantizes (n_t elements from b1 to b2 bits), a float side
    counted as 32 bits.
    """

    model: str
    output: str
    layers: Sequence[LayerResult]
    weight_bytes: int
    float_weight_bytes: int
    avg_weight_bits: float
    bitops: int
    file_bytes: int
    float_file_bytes: int
    opset: int
    time_s: float
    skipped: Sequence[tuple[str, str]] = ()
    units: Sequence[UnitResult] = ()
    tensors: Sequence[TensorResult] = ()
    float_ops: Sequence[tuple[str, str]] = ()
    notes: Sequence[str] = ()
    settings: dict = field(default_factory=dict)
    allocation: dict | None = None
    verification: dict | None = None  # the written file against the float model (held-out samples)
    file_breakdown: dict | None = None  # where the written file's bytes are (see `file_breakdown`)
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage (`progress.timings`)

    def to_dict(self, stable: bool = False) -> dict:
        """The report as JSON data; `stable` drops what changes from run to run (wall times, latencies),
        so the same inputs and seed give the same bytes."""
        out = asdict(self)
        out["skipped"] = [{"name": n, "reason": r} for n, r in self.skipped]
        out["float_ops"] = [{"name": n, "reason": r} for n, r in self.float_ops]
        if stable:
            out.pop("time_s")
            out.pop("stages")
            if out.get("verification"):
                out["verification"] = {k: v for k, v in out["verification"].items() if "latency" not in k}
        return out


def file_breakdown(proto: onnx.ModelProto) -> dict[str, int]:
    """Where a QDQ model's bytes are: the stored weight codes (initializers read as a DequantizeLinear's
    input 0, directly or through a Cast or Reshape), the scales and zero points (its inputs 1 and 2, and a
    QuantizeLinear's), the other constants (biases, float weights, shapes), and the rest: nodes, names,
    value infos and metadata (the serialized size minus the three)."""
    producers = GraphIndex.of(proto.graph).producer

    def source(name: str) -> str:
        node = producers.get(name)
        while node is not None and node.op_type in ("Cast", "Reshape") and node.input:
            name, node = node.input[0], producers.get(node.input[0])
        return name

    codes, params = set(), set()
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.input:
            codes.add(source(node.input[0]))
        if node.op_type in ("DequantizeLinear", "QuantizeLinear"):
            params.update(node.input[1:3])
    sizes = {"weight_codes": 0, "scales_and_zero_points": 0, "other_constants": 0}
    for tensor in proto.graph.initializer:
        kind = "weight_codes" if tensor.name in codes else (
            "scales_and_zero_points" if tensor.name in params else "other_constants")
        sizes[kind] += tensor.ByteSize()
    sizes["graph_and_metadata"] = max(proto.ByteSize() - sum(sizes.values()), 0)
    return sizes


def summarize(written: Written) -> dict:
    """Totals: weight bytes, float weight bytes, average weight bits and BitOps (see `Report`)."""
    results = written.layers
    params = sum(r.params for r in results) or 1
    bitops = sum(r.macs * (r.weight_bits or FLOAT_BITS) * (r.act_bits or FLOAT_BITS) for r in results)
    bitops += sum(u.macs * (u.act_bits or FLOAT_BITS) ** 2 for u in written.units)
    return {
        "weight_bytes": sum(r.weight_bytes for r in results),
        "float_weight_bytes": sum(r.params * 4 for r in results),
        "avg_weight_bits": sum(r.params * (r.weight_bits or FLOAT_BITS) for r in results) / params,
        "bitops": bitops + written.requantize_bitops,
    }


def storage_notes(results: Sequence[LayerResult]) -> list[str]:
    """Plain-language notes on how unusual widths are stored."""
    notes = []
    if any(r.weight_type.startswith(("INT4", "INT2")) and r.weight_type.endswith("INT8 kernels") for r in results):
        notes.append("INT4/INT2 weights beside 8-bit activations are stored packed and reach their DQ through a "
                     "Cast to INT8, which onnxruntime folds at load so the layer runs on its INT8 kernels "
                     f"(the file of the narrow type, the speed of W8A8; {option('quantizers.weight_layout')} native "
                     "to drop it).")
    if any(r.weight_type.startswith("INT2") and "Reshape guard" in r.weight_type for r in results):
        notes.append("2-bit weights are stored as INT2 (4 per byte) and reach their layer through a "
                     "shape-preserving Reshape: onnxruntime 1.32 would otherwise fuse DQ(INT2)+Conv into a "
                     f"QLinearConv it cannot build. Use {option('quantizers.int2_container')} int4 for a plain DQ "
                     "(2 per byte).")
    if any("Reshape guard" in r.weight_type and not r.weight_type.startswith("INT2") for r in results):
        notes.append("Some weights reach their layer through a shape-preserving Reshape so that onnxruntime "
                     "does not fuse them into a kernel that rejects the pattern (4-bit inputs with 8-bit "
                     "weights, batched MatMul weights); those layers run as dequantize + float op.")
    if any(r.op_type in ("MatMul", "Gemm") and r.weight_bits and not r.act_bits for r in results):
        notes.append("onnxruntime runs weight-only MatMul/Gemm layers of 3-8 bits as MatMulNBits, which "
                     "quantizes their inputs to 8 bits inside the kernel (accuracy_level 4).")
    if any("-bit range" in r.weight_type for r in results):
        notes.append("Widths without an ONNX type (3, 5, 6, 7, ...) are stored in the next wider type "
                     "with the narrowed integer range; their file size is that of the wider type.")
    if any(r.act_bits and not r.weight_bits for r in results):
        notes.append("Layers with quantized activations but float weights: onnxruntime's "
                     "WeightBiasQuantization pass quantizes such Conv/Gemm weights to 8 bits at load time.")
    return notes


def frontier(points: list[dict]) -> list[int]:
    """Indices of points no other point beats on both weight bytes and drop (ties kept)."""
    ok = [i for i, p in enumerate(points) if "error" not in p]
    return [i for i in ok if not any(points[j]["weight_bytes"] <= points[i]["weight_bytes"]
                                     and points[j]["drop"] <= points[i]["drop"]
                                     and (points[j]["weight_bytes"], points[j]["drop"]) !=
                                     (points[i]["weight_bytes"], points[i]["drop"]) for j in ok)]
