"""Quantization points (`onnxmpq.points`): units, tensor groups, absorbed activations, the tensors that
carry Q/DQ, the float islands, scope `layers`, a profile's integer and tied ops, and the load-time folds
they rely on (BatchNormalization and bias Adds into their layers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import arr, build_cnn, build_encoder, feed_for, model, node, vi
from onnx import TensorProto
from onnx.reference import ReferenceEvaluator

from onnxmpq.graph import model as graph
from onnxmpq.types import QuantOptions, Scope

ROOT = Path(__file__).resolve().parents[2]
RESNET = ROOT / "models" / "resnet20_cifar10.onnx"


@pytest.fixture(scope="module")
def resnet():
    return graph.load(RESNET)


def test_resnet_units_groups_and_sources(resnet):
    points = resnet.points()
    kinds = [u.op_type for u in points.units]
    assert kinds.count("Conv") == 19 and kinds.count("Add") == 9 and kinds.count("Gemm") == 1
    assert kinds.count("GlobalAveragePool") == 1 and len(points.units) == 30
    first = points.unit("/conv1/Conv")
    # the Relu after the first Conv is absorbed: the unit writes the Relu's output, the Conv output is no point
    assert first.reads == ("input",) and first.writes == ("/Relu_output_0",) and first.output == "/Relu_output_0"
    assert first.nodes == ("/conv1/Conv", "/Relu") and "/conv1/Conv_output_0" not in points.group
    add = points.unit("/layer1/layer1.0/Add")
    assert add.kernel == "QLinearAdd" and len(add.reads) == 2 and add.writes == ("/layer1/layer1.0/Relu_1_output_0",)
    # the option-A shortcut (Slice, Slice, Pad) passes its input's scale through: one group, one writer
    shortcut = [t for t in points.group if "/layer2/layer2.0/shortcut/" in t]
    assert len(shortcut) == 3
    assert {points.group[t] for t in shortcut} == {"/layer1/layer1.2/Relu_1_output_0"}
    assert {points.source[t] for t in shortcut} == {"/layer1/layer1.2/Add"}
    # the graph input has no writer (quantized at its first reader); the Gemm writes float logits
    assert points.source["input"] is None and "logits" not in points.group
    assert points.unit("/linear/Gemm").writes == () and points.floats == ()


def test_scope_layers_is_the_older_form(resnet):
    points = resnet.points(QuantOptions(scope=Scope.LAYERS))
    assert [u.name for u in points.units] == [s.name for s in resnet.layers]
    assert all(u.writes == () and u.reads == (u.layer.activation,) for u in points.units)
    assert set(points.group) == {s.activation for s in resnet.layers}


def test_groups_of_names_every_tensor_of_the_groups_the_units_touch(resnet):
    points = resnet.points()
    groups = points.groups_of(["/layer2/layer2.0/Add"])
    members = {t for ts in groups.values() for t in ts}
    assert "/layer2/layer2.0/shortcut/Pad_output_0" in members  # the Add reads the shortcut's Pad output
    assert "/layer1/layer1.2/Relu_1_output_0" in members       # ... whose group starts at the block input


def test_encoder_points_leave_float_islands_float():
    m = graph.from_proto(build_encoder())
    points = m.points()
    gelu = [u for u in points.units if u.op_type == "Gelu"]
    assert len(gelu) == 2
    # the Erf form of GELU is one unit: it reads the up-projection's bias Add, writes the last Mul's output
    assert gelu[0].nodes == ("l0/gelu_erf", "l0/gelu_div", "l0/gelu_add", "l0/gelu_mul", "l0/gelu")
    assert gelu[0].writes == ("l0/gelu",) and gelu[0].reads == ()  # its input feeds no integer kernel
    # a projection's output is float (MatMulIntegerToFloat) and its bias Add runs in float
    q = points.unit("l0.q/MatMul")
    assert q.writes == () and points.unit("l0.q/Add").reads == ()
    # Q K^T reads two activations; the Softmax reads the scaled scores and writes P for P V
    qk = points.unit("l0/QK")
    assert len(qk.reads) == 2 and qk.layer is None and qk.macs == 2 * 8 * 8 * 16
    assert points.unit("l0/Softmax").writes == ("l0/Softmax",) and "l0/Softmax" in points.unit("l0/PV").reads
    # the embedding table is a weighted layer (weight-only) and the position Add between float tensors stays float
    assert points.unit("emb/Gather").layer.params == 50 * 32
    assert ("emb/Add", "no integer kernel reads or writes its tensors: it runs in float") in points.floats


def test_integer_ops_of_a_profile_quantize_their_tensors():
    m = graph.from_proto(build_encoder())
    plain = m.points()
    everything = m.points(QuantOptions(integer_ops=frozenset({"all"})))
    assert "l0/gelu_div" not in plain.group and "l0.up/Add" not in plain.group
    assert "l0.up/Add" in everything.group  # the GELU's input, between two float ops, is quantized too
    assert len(everything.group) > len(plain.group)


def test_tied_ops_share_one_scale_across_inputs_and_output(resnet):
    plain = resnet.points()
    tied = resnet.points(QuantOptions(tie_ops=frozenset({"Add"})))
    add = tied.unit("/layer1/layer1.0/Add")
    assert len({tied.group[t] for t in (*add.reads, *add.writes)}) == 1
    assert len({plain.group[t] for t in (*add.reads, *add.writes)}) == 3


def test_concat_inputs_and_output_share_one_group():
    proto = model([node("Conv", ["x", "Wa"], ["a"], "ca"), node("Conv", ["x", "Wb"], ["b"], "cb"),
                   node("Concat", ["a", "b"], ["c"], "cat", axis=1), node("Conv", ["c", "Wc"], ["y"], "cc")],
                  [vi("x", ["N", 2, 4, 4])], [vi("y", ["N", 3, 4, 4])],
                  {"Wa": arr(1, 2, 2, 1, 1), "Wb": arr(2, 2, 2, 1, 1), "Wc": arr(3, 3, 4, 1, 1)})
    points = graph.from_proto(proto).points()
    assert points.group["a"] == points.group["b"] == points.group["c"]
    assert points.source["a"] == "ca" and points.source["c"] == "cat"
    assert points.unit("cat").kernel == "QLinearConcat"


def test_relu_with_two_readers_of_its_input_is_not_absorbed():
    proto = model([node("Conv", ["x", "W"], ["c"], "conv"), node("Relu", ["c"], ["r"], "relu"),
                   node("Add", ["c", "r"], ["y"], "add")],
                  [vi("x", ["N", 2, 3, 3])], [vi("y", ["N", 2, 3, 3])], {"W": arr(1, 2, 2, 1, 1)})
    points = graph.from_proto(proto).points()
    assert points.unit("conv").writes == ("c",)
    assert points.group["r"] == points.group["c"] and points.source["r"] == "conv"  # the Relu passes c's scale on


def test_unhandled_ops_are_listed_with_why():
    proto = model([node("Conv", ["x", "W"], ["c"], "conv"), node("Softplus", ["c"], ["s"], "soft"),
                   node("Div", ["s", "c"], ["y"], "div")],
                  [vi("x", ["N", 2, 3, 3])], [vi("y", ["N", 2, 3, 3])], {"W": arr(1, 2, 2, 1, 1)})
    points = graph.from_proto(proto).points()
    floats = dict(points.floats)
    assert floats["soft"] == "no handler for Softplus"
    assert "Div of two activations" in floats["div"]
    assert points.unit("conv").writes == ("c",)  # a Conv always writes Q (QLinearConv's only form)


# ---------------------------------------------------------------- folds at load


def test_batchnorm_after_conv_is_folded_into_it():
    rng = np.random.default_rng(0)
    stats = {"g": rng.uniform(0.5, 2, 3), "b": rng.normal(size=3), "m": rng.normal(size=3), "v": rng.uniform(0.1, 2, 3)}
    proto = model([node("Conv", ["x", "W", "B"], ["c"], "conv"),
                   node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], "bn", epsilon=1e-3)],
                  [vi("x", ["N", 2, 5, 5])], [vi("y", ["N", 3, 3, 3])],
                  {"W": arr(1, 3, 2, 3, 3), "B": arr(2, 3), **{k: v.astype(np.float32) for k, v in stats.items()}})
    m = graph.from_proto(proto)
    assert [n.op_type for n in m.proto.graph.node] == ["Conv"] and m.proto.graph.node[0].output[0] == "y"
    assert {t.name for t in m.proto.graph.initializer}.isdisjoint({"W", "B", "g", "b", "m", "v"})
    feed = feed_for(proto, 3)
    # onnxruntime (checked by hand here) as the oracle of the unfolded model: onnx 1.23's reference
    # BatchNormalization disagrees with it on this graph
    want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    x, w, b = feed["x"].astype(np.float64), arr(1, 3, 2, 3, 3).astype(np.float64), arr(2, 3).astype(np.float64)
    conv = np.einsum("ncij,kcij->nk", np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))
                     .reshape(3, 2, 9, 3, 3).transpose(0, 2, 1, 3, 4).reshape(27, 2, 3, 3), w).reshape(3, 3, 3, 3)
    conv = conv.transpose(0, 3, 1, 2) + b[:, None, None]
    by_hand = (conv - stats["m"][:, None, None]) / np.sqrt(stats["v"][:, None, None] + 1e-3) * \
        stats["g"][:, None, None] + stats["b"][:, None, None]
    np.testing.assert_allclose(want, by_hand, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ReferenceEvaluator(m.proto).run(None, feed)[0], want, rtol=1e-5, atol=1e-5)


def test_bias_adds_join_conv_and_2d_matmul():
    proto = model([node("Conv", ["x", "W"], ["c"], "conv"), node("Add", ["c", "Bc"], ["a"], "conv_bias"),
                   node("Flatten", ["a"], ["f"], "flat"), node("MatMul", ["f", "Wm"], ["m"], "mm"),
                   node("Add", ["Bm", "m"], ["y"], "mm_bias")],
                  [vi("x", ["N", 2, 3, 3])], [vi("y", ["N", 4])],
                  {"W": arr(1, 3, 2, 3, 3), "Bc": arr(2, 3, 1, 1), "Wm": arr(3, 3, 4), "Bm": arr(4, 4)})
    m = graph.from_proto(proto)
    assert [n.op_type for n in m.proto.graph.node] == ["Conv", "Flatten", "Gemm"]
    assert [(l.op_type, bool(l.bias)) for l in m.layers] == [("Conv", True), ("Gemm", True)]
    feed = feed_for(proto, 3)
    np.testing.assert_allclose(ReferenceEvaluator(m.proto).run(None, feed)[0],
                               ReferenceEvaluator(proto).run(None, feed)[0], rtol=1e-5, atol=1e-5)


def test_a_bias_add_with_two_readers_or_a_batched_matmul_stays_apart():
    proto = model([node("MatMul", ["x", "W"], ["m"], "mm"), node("Add", ["m", "B"], ["y"], "bias")],
                  [vi("x", ["N", 5, 3])], [vi("y", ["N", 5, 4])], {"W": arr(1, 3, 4), "B": arr(2, 4)})
    assert [n.op_type for n in graph.from_proto(proto).proto.graph.node] == ["MatMul", "Add"]
    proto = model([node("Conv", ["x", "W"], ["c"], "conv"), node("Add", ["c", "B"], ["y"], "bias"),
                   node("Relu", ["c"], ["z"], "relu")],
                  [vi("x", ["N", 2, 3, 3])], [vi("y", ["N", 3, 1, 1]), vi("z", ["N", 3, 1, 1])],
                  {"W": arr(1, 3, 2, 3, 3), "B": arr(2, 3, 1, 1)})
    assert [n.op_type for n in graph.from_proto(proto).proto.graph.node] == ["Conv", "Add", "Relu"]


@pytest.mark.parametrize("scale_shape, bias_shape", [((1,), (1,)), ((1, 3, 1, 1), (3, 1, 1)), ((), (1, 1, 1, 1))],
                         ids=["scalars", "per-channel", "rank-0-and-rank-4"])
@pytest.mark.parametrize("order", ["mul-add", "add-mul"])
def test_a_scale_and_shift_after_conv_fold_into_it(scale_shape, bias_shape, order):
    """PP-OCR's learnable affine after a Conv: (Conv * s) + b, or (Conv + b) * s, becomes one Conv."""
    s = (np.abs(arr(7, 3).reshape(-1)[: int(np.prod(scale_shape))]) + 0.5).reshape(scale_shape)
    ops = [node("Conv", ["x", "W", "B"], ["c"], "conv")]
    if order == "mul-add":
        ops += [node("Mul", ["c", "S"], ["m"], "scale"), node("Add", ["Sh", "m"], ["y"], "shift")]
    else:
        ops += [node("Add", ["c", "Sh"], ["m"], "shift"), node("Mul", ["S", "m"], ["y"], "scale")]
    proto = model(ops, [vi("x", ["N", 2, 5, 5])], [vi("y", ["N", 3, 3, 3])],
                  {"W": arr(1, 3, 2, 3, 3), "B": arr(2, 3), "S": s.astype(np.float32), "Sh": arr(3, *bias_shape)})
    m = graph.from_proto(proto)
    assert [n.op_type for n in m.proto.graph.node] == ["Conv"] and m.proto.graph.node[0].output[0] == "y"
    feed = feed_for(proto, 3)
    want = ReferenceEvaluator(proto).run(None, feed)[0]
    np.testing.assert_allclose(ReferenceEvaluator(m.proto).run(None, feed)[0], want, rtol=1e-5, atol=1e-5)
    got = ort.InferenceSession(m.proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_mul_that_is_not_per_channel_or_has_two_readers_stays_apart():
    # a (C,) constant broadcasts along the last (width) axis, not the channels
    proto = model([node("Conv", ["x", "W"], ["c"], "conv"), node("Mul", ["c", "S"], ["y"], "scale")],
                  [vi("x", ["N", 2, 5, 5])], [vi("y", ["N", 3, 3, 3])], {"W": arr(1, 3, 2, 3, 3), "S": arr(2, 3)})
    assert [n.op_type for n in graph.from_proto(proto).proto.graph.node] == ["Conv", "Mul"]
    proto = model([node("Conv", ["x", "W"], ["c"], "conv"), node("Mul", ["c", "S"], ["y"], "scale"),
                   node("Relu", ["c"], ["z"], "relu")],
                  [vi("x", ["N", 2, 5, 5])], [vi("y", ["N", 3, 3, 3]), vi("z", ["N", 3, 3, 3])],
                  {"W": arr(1, 3, 2, 3, 3), "S": arr(2, 1)})
    assert [n.op_type for n in graph.from_proto(proto).proto.graph.node] == ["Conv", "Mul", "Relu"]


def test_int_inputs_are_never_points():
    m = graph.from_proto(build_cnn())
    assert m.points().source["x"] is None
    proto = build_encoder()
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.INT64
    assert "ids" not in graph.from_proto(proto).points().group
    onnx.checker.check_model(proto, full_check=True)


def test_chained_folds_never_reuse_an_initializer_name():
    """Conv * s1 * s2 + b: three folds on one Conv, each writing a new, distinct initializer."""
    proto = model([node("Conv", ["x", "W", "B"], ["c"], "conv"), node("Mul", ["c", "S1"], ["m1"], "s1"),
                   node("Mul", ["m1", "S2"], ["m2"], "s2"), node("Add", ["m2", "Sh"], ["y"], "shift")],
                  [vi("x", ["N", 2, 5, 5])], [vi("y", ["N", 3, 3, 3])],
                  {"W": arr(1, 3, 2, 3, 3), "B": arr(2, 3), "S1": np.array([1.5], np.float32),
                   "S2": np.array([[[-2.0]], [[0.5]], [[3.0]]], np.float32), "Sh": arr(3, 1)})
    m = graph.from_proto(proto)
    assert [n.op_type for n in m.proto.graph.node] == ["Conv"]
    names = [t.name for t in m.proto.graph.initializer]
    assert len(names) == len(set(names))
    feed = feed_for(proto, 3)
    np.testing.assert_allclose(ReferenceEvaluator(m.proto).run(None, feed)[0],
                               ReferenceEvaluator(proto).run(None, feed)[0], rtol=1e-5, atol=1e-5)


def test_long_tensor_names_are_shortened_unless_a_short_name_is_taken():
    from onnxmpq.graph.model import short_name

    long = "t" * 300
    proto = model([node("Conv", ["x", "W"], [long], "conv"), node("Relu", [long], ["y"], "relu")],
                  [vi("x", ["N", 2, 3, 3])], [vi("y", ["N", 2, 1, 1])], {"W": arr(1, 2, 2, 3, 3)})
    assert graph.from_proto(proto).proto.graph.node[0].output[0] == short_name(long)
    taken = model([node("Conv", ["x", "W"], [long], "conv"), node("Relu", [long], [short_name(long)], "relu"),
                   node("Relu", [short_name(long)], ["y"], "relu2")],
                  [vi("x", ["N", 2, 3, 3])], [vi("y", ["N", 2, 1, 1])], {"W": arr(1, 2, 2, 3, 3)})
    assert graph.from_proto(taken).proto.graph.node[0].output[0] == long  # a clash: names left alone
