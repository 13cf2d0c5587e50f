"""Tests of the QDQ writer (onnxmpq.write.build.build), numerics checked against onnx's reference evaluator.

The written model must pass the full checker, run in onnxruntime's CPU provider at the default
optimisation level and agree with `onnx.reference.ReferenceEvaluator`; its weights must be exactly
`round_nearest`'s codes times scales, stored packed.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import (
    MODELS,
    arr,
    build_cnn,
    build_constant_weights,
    build_gemm,
    feed_for,
    group_stats,
    model,
    node,
    uniform,
    vi,
)
from onnx import TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxmpq.errors import OnnxmpqError
from onnxmpq.graph import model as graph
from onnxmpq.rounding import round_nearest
from onnxmpq.types import ActRange, Candidate, QuantOptions, Scope, WeightRange
from onnxmpq.write.build import CAST_SUFFIX, GUARD_SUFFIX, build
from onnxmpq.write.formats import act_format, weight_format

WEIGHT_BITS = [2, 3, 4, 5, 6, 7, 8, 16]
ACT_BITS = [None, 4, 8, 16]
# onnxruntime fuses DQ(weight on axis 1) + MatMul/Gemm(transB=0) into MatMulNBits with accuracy_level 4,
# which quantizes the activations to int8 inside the kernel: those outputs are only int8-accurate.
INT8_KERNEL_MODELS = {"matmul_right", "gemm_t0"}
# On x86 CPUs with AVX2 but no VNNI, onnxruntime's fused U8S8 kernels (QLinearConv, W8A8 MatMul) add
# pairs of u8*s8 products in int16 with saturation (VPMADDUBSW; onnxruntime's docs advise reduce_range /
# 7-bit weights there), so at the default optimisation level W8A8 outputs may differ from exact QDQ
# arithmetic by more than a few steps. The exact numerics are checked with optimisations off.
SATURATING_PAIRS = {(8, 8)}


def quantized(proto, wb, ab, options=QuantOptions(), batch=3, seed=0):
    """Loads `proto`, quantizes every layer at (wb, ab) with exact statistics; returns (model, qdq, results, feed)."""
    m = graph.from_proto(proto)
    feed = feed_for(m.proto, batch, seed)
    stats = group_stats(m, feed, options) if ab else None
    q, written = build(m, uniform(m, wb, ab, options), stats, options)
    return m, q, written.layers, feed


def run_ort(proto, feed, optimize=True):
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def nodes_by_output(proto):
    return {out: n for n in proto.graph.node for out in n.output}


def weight_dq(proto, layer, float_model):
    """(codes tensor, scale array, zero-point tensor, axis) of the DequantizeLinear feeding `layer`'s weight."""
    inits = {t.name: t for t in proto.graph.initializer}
    producers = nodes_by_output(proto)
    index = list(next(n for n in float_model.proto.graph.node if n.name == layer.name).input).index(layer.weight)
    consumer = next(n for n in proto.graph.node if n.name == layer.name)
    producer = producers[consumer.input[index]]
    while producer.op_type == "Reshape":
        producer = producers[producer.input[0]]
    assert producer.op_type == "DequantizeLinear"
    axis = next((a.i for a in producer.attribute if a.name == "axis"), 1)
    return (inits[producer.input[0]], numpy_helper.to_array(inits[producer.input[1]]),
            inits[producer.input[2]], axis)


def tolerance(name, y_ref, ab):
    """A few quantization steps of the output range at the activation width (int8 for fused MatMul)."""
    span = float(y_ref.max() - y_ref.min()) or 1.0
    tol = 1e-5 * span
    if ab:
        tol = max(tol, 3 * span / (2**ab - 1))
    if name in INT8_KERNEL_MODELS:
        tol = max(tol, 3 * span / 255)
    return tol


# --- oracle: checker + onnxruntime + reference evaluator ----------------------------------------------


@pytest.mark.parametrize("ab", ACT_BITS, ids=lambda b: f"a{b}")
@pytest.mark.parametrize("wb", WEIGHT_BITS, ids=lambda b: f"w{b}")
@pytest.mark.parametrize("name", sorted(MODELS))
def test_qdq_model_is_valid_and_ort_matches_reference(name, wb, ab):
    _, q, _, feed = quantized(MODELS[name](), wb, ab)
    onnx.checker.check_model(q, full_check=True)
    want = ReferenceEvaluator(q).run(None, feed)[0]
    exact = run_ort(q, feed, optimize=False)[0]
    span = float(want.max() - want.min()) or 1.0
    np.testing.assert_allclose(exact, want, rtol=0, atol=1e-4 * span)
    got = run_ort(q, feed)[0]
    assert got.shape == want.shape
    if (wb, ab) in SATURATING_PAIRS:  # fused int8 kernels: a gross error (scale, axis, zero point) still fails
        mean_error = float(np.abs(got - want).mean())
        assert mean_error <= 0.02 * span, f"mean error {mean_error:.4g} over 2% of the output span {span:.4g}"
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=tolerance(name, want, ab))


@pytest.mark.parametrize("wb", WEIGHT_BITS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_weights_are_round_nearest_codes_times_scale(name, wb):
    m, q, _, _ = quantized(MODELS[name](), wb, None)
    inits = {t.name: t for t in m.proto.graph.initializer}
    for layer in m.layers:
        fmt = weight_format(wb)
        w = numpy_helper.to_array(inits[layer.weight])
        expected = round_nearest(w, layer.channel_axis, fmt)
        codes_t, scale, zp_t, axis = weight_dq(q, layer, m)
        codes = numpy_helper.to_array(codes_t).astype(np.int64)
        qmax = 2 ** (wb - 1) - 1
        assert codes.min() >= -qmax and codes.max() <= qmax
        np.testing.assert_array_equal(codes, expected.codes.astype(np.int64))
        np.testing.assert_array_equal(scale, expected.scale)
        assert axis == layer.channel_axis
        assert not numpy_helper.to_array(zp_t).astype(np.int64).any()
        shape = [1] * codes.ndim
        shape[axis] = -1
        np.testing.assert_array_equal(codes.astype(np.float32) * scale.reshape(shape), expected.dequantize())
        # a sane rounding: every dequantized weight within half a step of the float one, or clipped
        step = np.broadcast_to(scale.reshape(shape).astype(np.float64), w.shape)
        error = np.abs(codes * step - w.astype(np.float64))
        unclipped = np.abs(w) <= qmax * step
        assert np.all(error[unclipped] <= 0.5001 * step[unclipped] + 1e-6 * np.abs(w[unclipped]))


@pytest.mark.parametrize("name", ["cnn", "grouped", "convtranspose", "matmul_left", "gemm_t1"])
@pytest.mark.parametrize("wb", [2, 4, 8])
def test_weight_only_model_equals_float_model_with_dequantized_weights(name, wb):
    m, q, _, feed = quantized(MODELS[name](), wb, None)
    substituted = onnx.ModelProto()
    substituted.CopyFrom(m.proto)
    inits = {t.name: t for t in substituted.graph.initializer}
    for layer in m.layers:
        w = numpy_helper.to_array(inits[layer.weight])
        deq = round_nearest(w, layer.channel_axis, weight_format(wb)).dequantize()
        inits[layer.weight].CopyFrom(numpy_helper.from_array(deq.astype(np.float32), layer.weight))
    want = ReferenceEvaluator(substituted).run(None, feed)[0]
    got = run_ort(q, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("ab", [None, 8])
@pytest.mark.parametrize("wb", [2, 4, 8])
def test_batched_matmul_weight_runs_in_ort(wb, ab):
    proto = model([node("MatMul", ["x", "W"], ["y"], "bmm")], [vi("x", [2, 6, 8])], [vi("y", [2, 6, 5])],
                  {"W": arr(0, 2, 8, 5)})
    m, q, _, feed = quantized(proto, wb, ab)
    assert m.layers[0].channel_axis == 2
    onnx.checker.check_model(q, full_check=True)
    want = ReferenceEvaluator(q).run(None, feed)[0]
    np.testing.assert_allclose(run_ort(q, feed)[0], want, rtol=0, atol=tolerance("bmm", want, ab))


# --- storage: packed sub-byte tensors --------------------------------------------------------------


@pytest.mark.parametrize("wb, per_byte, onnx_type", [(2, 4, TensorProto.INT2), (3, 2, TensorProto.INT4),
                                                     (4, 2, TensorProto.INT4), (8, 1, TensorProto.INT8)])
@pytest.mark.parametrize("builder", [build_cnn, build_constant_weights], ids=["cnn", "odd_count"])
def test_codes_are_packed_and_round_trip(builder, wb, per_byte, onnx_type):
    m, q, _, _ = quantized(builder(), wb, None)
    for layer in m.layers:
        codes_t, _, zp_t, _ = weight_dq(q, layer, m)
        assert codes_t.data_type == onnx_type and zp_t.data_type == onnx_type
        assert len(codes_t.raw_data) == math.ceil(layer.params / per_byte)
        expected = round_nearest(numpy_helper.to_array(
            next(t for t in m.proto.graph.initializer if t.name == layer.weight)), layer.channel_axis,
            weight_format(wb)).codes
        np.testing.assert_array_equal(numpy_helper.to_array(codes_t).astype(np.int64), expected.astype(np.int64))


def test_file_really_shrinks_with_fewer_bits():
    k, n = 128, 96
    proto = model([node("MatMul", ["x", "W"], ["y"], "mm")], [vi("x", ["N", k])], [vi("y", ["N", n])],
                  {"W": arr(0, k, n)})
    sizes = {wb: quantized(proto, wb, None)[1].ByteSize() for wb in (2, 4, 8, 16)}
    float_size = graph.from_proto(proto).proto.ByteSize()
    params = k * n
    # each halving of the container saves about half of the remaining code bytes (plus small overheads)
    assert float_size - sizes[16] >= 0.95 * params * 2
    assert sizes[16] - sizes[8] >= 0.95 * params
    assert sizes[8] - sizes[4] >= 0.95 * params / 2
    assert sizes[4] - sizes[2] >= 0.95 * params / 4 - 200  # INT2 adds a Reshape guard and its shape


def test_int2_container_int4_stores_ternary_codes_in_int4_without_guard():
    m, q, results, feed = quantized(build_cnn(), 2, None, QuantOptions(int2_container="int4"))
    assert all(n.op_type != "Reshape" for n in q.graph.node)
    for layer in m.layers:
        codes_t, _, _, _ = weight_dq(q, layer, m)
        assert codes_t.data_type == TensorProto.INT4
        codes = numpy_helper.to_array(codes_t).astype(np.int64)
        assert set(np.unique(codes)) <= {-1, 0, 1}
    assert graph.default_opset(q) == 21
    assert all(r.weight_type == "INT4 (2-bit range)" for r in results)
    np.testing.assert_allclose(run_ort(q, feed)[0], ReferenceEvaluator(q).run(None, feed)[0], rtol=1e-5, atol=1e-5)


def test_int2_uses_reshape_guard_and_opset_25():
    _, q, results, _ = quantized(build_cnn(), 2, 8, QuantOptions(weight_layout="native"))
    assert graph.default_opset(q) == 25
    assert sum(n.op_type == "Reshape" for n in q.graph.node) == 3
    assert all(r.weight_type == "INT2" + GUARD_SUFFIX for r in results)


@pytest.mark.parametrize("wb", [2, 3, 4])
def test_sub_byte_weights_with_8_bit_activations_are_cast_to_int8_for_the_int8_kernels(wb):
    """auto layout: the file keeps INT4/INT2 codes; a Cast to INT8 feeds their DQ (no guard needed), and
    onnxruntime folds it so QLinearConv runs; values equal the native layout's."""
    _, q, results, feed = quantized(build_cnn(), wb, 8)
    _, native, _, _ = quantized(build_cnn(), wb, 8, QuantOptions(weight_layout="native"))
    inits = {t.name: t for t in q.graph.initializer}
    casts = [n for n in q.graph.node if n.op_type == "Cast"]
    assert len(casts) == 3 and not any(n.op_type == "Reshape" for n in q.graph.node)
    assert all(inits[n.input[0]].data_type in (onnx.TensorProto.INT4, onnx.TensorProto.INT2) for n in casts)
    assert all(r.weight_type.endswith(CAST_SUFFIX) for r in results)
    onnx.checker.check_model(q, full_check=True)
    np.testing.assert_allclose(ReferenceEvaluator(q).run(None, feed)[0], ReferenceEvaluator(native).run(None, feed)[0],
                               rtol=1e-6, atol=1e-6)
    assert run_ort(q, feed)[0].shape == run_ort(native, feed)[0].shape
    _, no_acts, _, _ = quantized(build_cnn(), wb, None)
    assert not any(n.op_type == "Cast" for n in no_acts.graph.node)  # no INT8 kernel without 8-bit activations


@pytest.mark.parametrize("wb", [3, 4, 8, 16])
def test_opset_is_21_without_int2(wb):
    _, q, _, _ = quantized(build_cnn(), wb, 8)
    assert graph.default_opset(q) == 21


# --- activations ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ab", [4, 8, 16])
def test_minmax_activation_params_match_hand_formula(ab):
    proto = build_gemm(1)
    m, q, results, feed = quantized(proto, 8, ab, QuantOptions(act_range=ActRange.MINMAX))
    x = feed["x"].astype(np.float64)
    lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
    scale = (hi - lo) / (2**ab - 1)
    zero_point = round(-lo / scale)
    qnode = next(n for n in q.graph.node if n.op_type == "QuantizeLinear")
    inits = {t.name: t for t in q.graph.initializer}
    got_scale = float(numpy_helper.to_array(inits[qnode.input[1]]))
    zp = inits[qnode.input[2]]
    assert zp.data_type == act_format(ab).onnx_type
    assert got_scale == pytest.approx(scale, rel=1e-6)
    assert int(numpy_helper.to_array(zp)) == zero_point
    assert results[0].act_scale == pytest.approx(scale, rel=1e-6) and results[0].act_zero_point == zero_point
    # the activation seen by the Gemm is x fake-quantized with those parameters
    codes = np.clip(np.rint(x / got_scale) + zero_point, 0, 2**ab - 1)
    fake = (codes - zero_point) * got_scale
    dq_out = next(n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == qnode.output[0])
    seen = ReferenceEvaluator(q).run(None, feed, intermediate=True)[dq_out]
    np.testing.assert_allclose(seen, fake, rtol=0, atol=1e-6 * got_scale + 1e-7)


def test_layers_reading_one_tensor_share_one_qdq_pair():
    proto = model([node("Conv", ["x", "Wa"], ["a"], "ca"), node("Conv", ["x", "Wb"], ["b"], "cb"),
                   node("Add", ["a", "b"], ["y"], "add")],
                  [vi("x", ["N", 2, 3, 3])], [vi("y", ["N", 2, 3, 3])],
                  {"Wa": arr(1, 2, 2, 1, 1), "Wb": arr(2, 2, 2, 1, 1)})
    for scope in Scope:
        _, q, _, feed = quantized(proto, 8, 8, QuantOptions(scope=scope))
        q_of_x = [n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x"]
        assert len(q_of_x) == 1
        dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q_of_x[0].output[0]]
        assert len(dq) == 1
        convs = [n for n in q.graph.node if n.op_type == "Conv"]
        assert convs[0].input[0] == convs[1].input[0] == dq[0].output[0]
        # graph scope: the Conv outputs as well (QLinearAdd reads them); the Add's output is a graph output
        # and stays float (nothing integer reads it)
        assert sum(n.op_type == "QuantizeLinear" for n in q.graph.node) == (3 if scope == Scope.GRAPH else 1)
        onnx.checker.check_model(q, full_check=True)


def test_missing_statistics_is_a_user_error(cnn):
    m = graph.from_proto(cnn)
    with pytest.raises(OnnxmpqError, match="calibration"):
        build(m, {"conv1": Candidate(8, 8)}, {})


def test_unknown_layer_is_a_user_error(cnn):
    m = graph.from_proto(cnn)
    with pytest.raises(OnnxmpqError, match="nope"):
        build(m, {"nope": Candidate(8, None)}, None)


# --- graph edits ----------------------------------------------------------------------------------


def test_float_weight_dropped_unless_still_read():
    proto = model([node("Conv", ["x", "W"], ["a"], "ca"), node("Conv", ["a", "W"], ["y"], "cb")],
                  [vi("x", ["N", 2, 3, 3])], [vi("y", ["N", 2, 3, 3])], {"W": arr(1, 2, 2, 1, 1)})
    m = graph.from_proto(proto)
    both, _ = build(m, {"ca": Candidate(4, None), "cb": Candidate(8, None)}, None)
    assert "W" not in {t.name for t in both.graph.initializer}
    one, _ = build(m, {"ca": Candidate(4, None)}, None)
    assert "W" in {t.name for t in one.graph.initializer}
    assert next(n for n in one.graph.node if n.name == "cb").input[1] == "W"
    for q in (both, one):
        onnx.checker.check_model(q, full_check=True)
        feed = feed_for(q)
        np.testing.assert_allclose(run_ort(q, feed)[0], ReferenceEvaluator(q).run(None, feed)[0], rtol=1e-5, atol=1e-6)


def test_unassigned_layers_stay_float(cnn):
    m = graph.from_proto(cnn)
    feed = feed_for(m.proto)
    for scope, quantized_tensors in ((Scope.LAYERS, {"r1"}), (Scope.GRAPH, {"r1", "c2", "f"})):
        options = QuantOptions(scope=scope)
        q, written = build(m, {"conv2": Candidate(4, 8)}, group_stats(m, feed, options), options)
        by_name = {r.name: r for r in written.layers}
        assert by_name["conv1"].weight_bits is None and by_name["conv1"].weight_type == "float32"
        # the float fc reads the tensor conv2 stores at 8 bits in graph scope, a float one in layers scope
        assert by_name["fc"].act_bits == (8 if scope == Scope.GRAPH else None)
        assert next(n for n in q.graph.node if n.name == "conv1").input[1] == "W1"
        # conv2 reads r1 and, in graph scope, writes c2 (and the Flatten passes it on as f)
        assert {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"} == quantized_tensors


def test_build_does_not_modify_the_input_model():
    m = graph.from_proto(build_cnn(opset=21))
    before = m.proto.SerializeToString()
    build(m, {layer.name: Candidate(8, None) for layer in m.layers}, None)
    assert m.proto.SerializeToString() == before
    again, _ = build(m, {layer.name: Candidate(4, None) for layer in m.layers}, None)
    onnx.checker.check_model(again, full_check=True)


def test_subgraph_layer_stays_float_and_model_runs(if_model):
    m, q, _, feed = quantized(if_model, 4, 8)
    assert [layer.name for layer in m.layers] == ["conv_top"]
    onnx.checker.check_model(q, full_check=True)
    branch = next(n for n in q.graph.node if n.op_type == "If")
    then = next(a.g for a in branch.attribute if a.name == "then_branch")
    assert all(n.op_type != "DequantizeLinear" for n in then.node)
    want = ReferenceEvaluator(q).run(None, feed)[0]
    np.testing.assert_allclose(run_ort(q, feed)[0], want, rtol=0, atol=tolerance("if", want, 8))


def test_old_opset_model_is_written_at_opset_21():
    m, q, _, feed = quantized(build_cnn(opset=11), 4, 8)
    assert graph.default_opset(q) == 21
    onnx.checker.check_model(q, full_check=True)
    want = ReferenceEvaluator(q).run(None, feed)[0]
    np.testing.assert_allclose(run_ort(q, feed)[0], want, rtol=0, atol=tolerance("cnn", want, 8))


def test_metadata_records_widths(cnn):
    m = graph.from_proto(cnn)
    stats = group_stats(m, feed_for(m.proto))
    q, _ = build(m, {"conv1": Candidate(4, 8), "conv2": Candidate(2, 16)}, stats)
    meta = {p.key: p.value for p in q.metadata_props}
    assert json.loads(meta["onnxmpq.layers"]) == {"conv1": [4, 8], "conv2": [2, 16], "fc": [None, None]}


# --- results --------------------------------------------------------------------------------------


@pytest.mark.parametrize("wb", [2, 3, 4, 8, 16])
def test_result_weight_bytes_equal_stored_bytes(wb):
    m, q, results, _ = quantized(build_cnn(), wb, None)
    inits = {t.name: t for t in q.graph.initializer}
    for layer, result in zip(m.layers, results):
        codes_t, scale, zp_t, _ = weight_dq(q, layer, m)
        stored = len(codes_t.raw_data) + scale.nbytes + len(zp_t.raw_data)
        assert result.weight_bytes == stored
        assert result.params == layer.params and result.macs == layer.macs
        assert result.weight_bits == wb and result.act_bits is None
    assert inits  # the model kept its other initializers


def test_prerounded_weights_are_used_verbatim(cnn):
    m = graph.from_proto(cnn)
    layer = m.layer("conv1")
    w = numpy_helper.to_array(next(t for t in m.proto.graph.initializer if t.name == layer.weight))
    mine = round_nearest(w, 0, weight_format(4), WeightRange.MINMAX)
    q, _ = build(m, {"conv1": Candidate(4, None)}, None, weights={"conv1": mine})
    codes_t, scale, _, _ = weight_dq(q, layer, m)
    np.testing.assert_array_equal(numpy_helper.to_array(codes_t).astype(np.int64), mine.codes.astype(np.int64))
    np.testing.assert_array_equal(scale, mine.scale)
    wrong = round_nearest(w, 0, weight_format(8))
    with pytest.raises(OnnxmpqError, match="grid"):
        build(m, {"conv1": Candidate(4, None)}, None, weights={"conv1": wrong})


def test_candidate_key():
    assert Candidate(4, 8).key == "w4a8"
    assert Candidate(None, 8).key == "a8"
    assert Candidate(2, None).key == "w2"
    assert Candidate(None, None).key == "float"


# --- documented options and dtypes ----------------------------------------------------------------


def test_int32_bias_is_dequantized_from_sx_times_sw(cnn):
    m = graph.from_proto(cnn)
    feed = feed_for(m.proto)
    stats = group_stats(m, feed)
    q, written = build(m, {"conv1": Candidate(8, 8)}, stats, QuantOptions(bias="int32"))
    results = written.layers
    conv = next(n for n in q.graph.node if n.name == "conv1")
    bias_dq = nodes_by_output(q).get(conv.input[2])
    assert bias_dq is not None and bias_dq.op_type == "DequantizeLinear", "bias was left float"
    inits = {t.name: t for t in q.graph.initializer}
    _, w_scale, _, _ = weight_dq(q, m.layer("conv1"), m)
    codes = inits[bias_dq.input[0]]
    assert codes.data_type == TensorProto.INT32
    b = numpy_helper.to_array(next(t for t in m.proto.graph.initializer if t.name == "B1")).astype(np.float64)
    expected = np.rint(b / (results[0].act_scale * w_scale.astype(np.float64)))
    np.testing.assert_array_equal(numpy_helper.to_array(codes), expected)


def test_float16_model_weight_only_is_valid():
    w = arr(3, 4, 3, 3, 3).astype(np.float16)
    proto = model([node("Conv", ["x", "W"], ["y"], "c16", pads=[1, 1, 1, 1])],
                  [vi("x", ["N", 3, 5, 5], TensorProto.FLOAT16)], [vi("y", ["N", 4, 5, 5], TensorProto.FLOAT16)],
                  {"W": w})
    m = graph.from_proto(proto)
    assert [layer.name for layer in m.layers] == ["c16"]
    q, _ = build(m, {"c16": Candidate(8, None)}, None)
    onnx.checker.check_model(q, full_check=True)
    feed = feed_for(q)
    np.testing.assert_allclose(run_ort(q, feed)[0].astype(np.float32),
                               ReferenceEvaluator(q).run(None, feed)[0].astype(np.float32), rtol=1e-2, atol=1e-2)
