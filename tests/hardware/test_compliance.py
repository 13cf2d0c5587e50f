"""`hardware.check` on real QDQ models: ResNet-20 quantized by onnxmpq and by onnxruntime's own
`quantize_static`, under the built-in profiles and custom YAML ones; ties on a hand-built Concat."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import ArraySource, build_cnn, feed_for, ort_reader, uniform
from onnx import TensorProto, helper, numpy_helper

from onnxmpq import calibrate
from onnxmpq.graph import model as graph
from onnxmpq.graph import qdq
from onnxmpq.hardware import compliance as hardware
from onnxmpq.hardware import profiles
from onnxmpq.pipeline import api
from onnxmpq.types import Candidate, QuantOptions, Scope
from onnxmpq.write.build import build

ROOT = Path(__file__).resolve().parents[2]
RESNET = ROOT / "models" / "resnet20_cifar10.onnx"
CALIB = ROOT / "calibration" / "cifar10_train256.npz"
FIRST, GEMM = "/conv1/Conv", "/linear/Gemm"
LAYERS = 20  # 19 Conv + 1 Gemm


def rules(violations) -> dict[str, int]:
    return dict(Counter(v.rule for v in violations))


@pytest.fixture(scope="module")
def mpq(tmp_path_factory):
    """onnxmpq-quantized ResNet-20 by name, built once per module."""
    folder, cache = tmp_path_factory.mktemp("mpq"), {}
    settings = {
        "w8a8": dict(weight_bits=8, act_bits=8),
        "w4a8": dict(weight_bits=4, act_bits=8),
        "w4": dict(weight_bits=4, act_bits=None),
        "mixed": dict(weight_bits=4, act_bits=8, layer_bits={FIRST: Candidate(8, 8), GEMM: Candidate(8, 8),
                                                             "/layer1/layer1.0/conv1/Conv": Candidate(2, 8)}),
        "float_gemm": dict(weight_bits=8, act_bits=8, layer_bits={GEMM: Candidate(None, None)}),
    }

    def get(name: str) -> onnx.ModelProto:
        if name not in cache:
            out = folder / f"{name}.onnx"
            api.quantize(RESNET, out, CALIB, rounding="nearest", limit=32, **settings[name])
            cache[name] = onnx.load(out)
        return cache[name]
    return get


@pytest.fixture(scope="module")
def ort(tmp_path_factory):
    """onnxruntime `quantize_static` QDQ ResNet-20 by (per_channel, weight/activation type), built once."""
    quantization = pytest.importorskip("onnxruntime.quantization")
    folder, cache = tmp_path_factory.mktemp("ort"), {}
    samples = np.load(CALIB)["input"][:4]

    def get(per_channel: bool, kind: str = "int8") -> onnx.ModelProto:
        key = (per_channel, kind)
        if key not in cache:
            types = {"int8": ("QInt8", "QInt8"), "uint8": ("QUInt8", "QUInt8"), "a16": ("QInt8", "QUInt16"),
                     "w4": ("QInt4", "QUInt8")}[kind]
            out = folder / f"ort_{per_channel}_{kind}.onnx"
            logging.disable(logging.WARNING)  # "consider pre-processing" noise
            try:
                quantization.quantize_static(
                    str(RESNET), str(out), ort_reader(samples), quant_format=quantization.QuantFormat.QDQ,
                    per_channel=per_channel, weight_type=getattr(quantization.QuantType, types[0]),
                    activation_type=getattr(quantization.QuantType, types[1]))
            finally:
                logging.disable(logging.NOTSET)
            cache[key] = onnx.load(out)
        return cache[key]
    return get


# --- onnxmpq's own output ---------------------------------------------------------------------------


@pytest.mark.parametrize("profile", sorted(profiles.BUILTINS))
def test_onnxmpq_w8a8_complies_with_every_builtin(mpq, profile):
    violations = hardware.check(mpq("w8a8"), profile)
    assert violations == []
    assert hardware.summary(violations)["complies"] is True


def test_onnxmpq_w4a8_breaks_int8_only_pair_on_every_layer(mpq):
    violations = hardware.check(mpq("w4a8"), "int8-only")
    assert rules(violations) == {"pair": LAYERS}
    assert [v.layer for v in violations] == [l.name for l in qdq.read_layers(mpq("w4a8"))]
    first = violations[0]
    assert first.message == "Conv at W4A8 is not allowed by profile int8-only."
    assert first.fix == f"requantize this layer at W8A8 (onnxmpq quantize --layer-bits {FIRST}=8:8)."


def test_onnxmpq_w4a8_on_npu_profiles(mpq):
    """npu-w4a8 runs W4 on Conv only: the Gemm alone breaks it; npu-w4w8-a8a16 takes W4A8 everywhere."""
    violations = hardware.check(mpq("w4a8"), "npu-w4a8")
    assert [(v.layer, v.rule) for v in violations] == [(GEMM, "pair")]
    assert "--layer-bits /linear/Gemm=8:8" in violations[0].fix
    assert hardware.check(mpq("w4a8"), "npu-w4w8-a8a16") == []


def test_weight_only_layers_are_judged_as_float_activations(mpq):
    model = mpq("w4")
    assert {(l.weight_bits, l.act_bits) for l in qdq.read_layers(model)} == {(4, None)}
    assert hardware.check(model, "any") == []  # `any` lists float activations
    violations = hardware.check(model, "npu-w4w8-a8a16")
    # and, the profile having no float layers, every tensor the integer ops read in float (20 layers, 9 Adds x 2,
    # the pooling)
    assert rules(violations) == {"pair": LAYERS, "float-tensor": LAYERS + 18 + 1}
    assert violations[0].message == "Conv at W4 (float activations) is not allowed by profile npu-w4w8-a8a16."
    assert "at W4A8 " in violations[0].fix  # the nearest allowed pair keeps the 4-bit weights


def test_three_widths_break_max_distinct_bits(mpq):
    violations = hardware.check(mpq("mixed"), "npu-w4a8")
    widths = [v for v in violations if v.rule == "max-distinct-bits"]
    assert len(widths) == 1 and widths[0].layer == hardware.MODEL
    assert "3 widths (2-bit: 1 layer, 4-bit: 17 layers, 8-bit: 2 layers)" in widths[0].message
    assert "at most 2" in widths[0].message
    assert widths[0].fix == "requantize the 1 2-bit layer at one of the other widths."
    # the 2-bit Conv is also no allowed pair; nothing else is wrong
    assert [(v.layer, v.rule) for v in violations if v.rule != "max-distinct-bits"] == \
        [("/layer1/layer1.0/conv1/Conv", "pair")]
    assert hardware.check(mpq("mixed"), "any") == []


def test_per_tensor_profile_flags_onnxmpq_per_channel_weights(mpq, ort):
    per_tensor = profiles.parse("name: per-tensor\nops: {default: {weights: [8], activations: [8]}}\n"
                                "per_channel: false\n")
    violations = hardware.check(mpq("w8a8"), per_tensor)
    assert rules(violations) == {"per-channel": LAYERS}
    assert "per-channel" in violations[0].message and "per_channel: true" in violations[0].fix
    assert hardware.check(ort(False), per_tensor) == []  # onnxruntime's per-tensor weights comply


def test_pinned_layer_at_another_width(mpq):
    pinned = profiles.parse(f'name: pinned\nops: {{default: {{weights: [4, 8], activations: [8]}}}}\n'
                            f'pin: {{{FIRST}: "8:8"}}\n')
    violations = hardware.check(mpq("w4a8"), pinned)
    assert [(v.layer, v.rule) for v in violations] == [(FIRST, "pin")]
    assert violations[0].message == "layer is at W4A8; profile pinned pins it at W8A8."
    assert "--layer-bits /conv1/Conv=8:8" in violations[0].fix
    # in the mixed model conv1 is at 8:8; only its 2-bit layer breaks a rule (no allowed pair)
    assert [v.rule for v in hardware.check(mpq("mixed"), pinned)] == ["pair"]


def test_pin_of_an_unknown_layer(mpq):
    profile = profiles.parse('ops: {default: {weights: [8], activations: [8]}}\npin: {/nope/Conv: "8:8"}\n')
    violations = hardware.check(mpq("w8a8"), profile)
    assert [(v.layer, v.rule) for v in violations] == [("/nope/Conv", "pin")]
    assert "not a quantizable layer" in violations[0].message


def test_float_layer(mpq):
    model = mpq("float_gemm")
    assert next(l for l in qdq.read_layers(model) if l.name == GEMM).weight is None
    violations = hardware.check(model, "int8-only")
    assert [(v.layer, v.rule) for v in violations] == [(GEMM, "float-layer")]
    assert "W8A8" in violations[0].fix
    assert hardware.check(model, "cpu-ort") == []  # float layers allowed there


def test_op_type_with_no_allowed_pair_suggests_another_profile(mpq):
    # float layers allowed, so the parser accepts a Gemm with no allowed pair
    profile = profiles.parse("ops: {Conv: {weights: [8], activations: [8]}, Gemm: {weights: [8], "
                             "activations: [16]}}\npairs: [[8, 8]]\n")
    violations = hardware.check(mpq("w8a8"), profile)
    assert [(v.layer, v.rule) for v in violations] == [(GEMM, "pair")]
    assert violations[0].fix == "choose a profile that allows Gemm at W8A8."


def test_summary_is_json(mpq):
    violations = hardware.check(mpq("mixed"), "int8-only")
    data = json.loads(json.dumps(hardware.summary(violations, profiles.load("int8-only"))))
    assert data["complies"] is False and data["profile"] == "int8-only"
    assert data["rules"] == {"pair": 18}  # every layer but the two pinned at 8:8
    assert data["layers"] == 18 and len(data["violations"]) == 18
    assert set(data["violations"][0]) == {"layer", "rule", "message", "fix"}


# --- onnxruntime's quantize_static output -----------------------------------------------------------


@pytest.mark.parametrize("per_channel", [True, False])
def test_ort_qdq_int8_complies_with_every_builtin(ort, per_channel):
    model = ort(per_channel)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["DequantizeLinear"] > LAYERS and ops["QuantizeLinear"] > 0 and "QLinearConv" not in ops
    layers = qdq.read_layers(model)
    granularity = "per-channel" if per_channel else "per-tensor"
    assert {(l.weight_bits, l.act_bits, l.weight.granularity, l.weight.symmetric) for l in layers} == \
        {(8, 8, granularity, True)}
    for name in profiles.BUILTINS:
        assert hardware.check(model, name) == [], name


def test_ort_asymmetric_uint8_weights_break_symmetric_weights(ort):
    model = ort(False, "uint8")
    violations = hardware.check(model, "int8-only")
    assert rules(violations) == {"symmetric-weights": LAYERS}
    assert "UINT8 weights" in violations[0].message
    loose = profiles.parse("ops: {default: {weights: [8], activations: [8]}}\nsymmetric_weights: false\n")
    assert hardware.check(model, loose) == []


def test_ort_16_bit_activations(ort):
    model = ort(True, "a16")
    assert rules(hardware.check(model, "int8-only")) == {"pair": LAYERS}
    assert hardware.check(model, "npu-w4w8-a8a16") == []  # W8A16 is one of its pairs


def test_ort_int4_weights_on_npu_w4a8(ort):
    model = ort(True, "w4")
    violations = hardware.check(model, "npu-w4a8")
    assert [(v.layer, v.rule) for v in violations] == [(GEMM, "pair")]


def test_add_inputs_are_not_tied_unless_the_profile_ties_them(ort, mpq):
    """onnxruntime and onnxmpq quantize both inputs of each residual Add with their own scales (QLinearAdd takes
    three); a profile that ties Add inputs flags both, and onnxmpq quantizing under it shares one scale."""
    tie_add = profiles.parse("ops: {default: {weights: [8], activations: [8]}}\ntie: [Add]\n")
    for model in (ort(True), mpq("w8a8")):
        violations = hardware.check(model, tie_add)
        assert rules(violations) == {"tie": 9}
        assert all(v.layer.endswith("/Add") for v in violations)
        assert "scale" in violations[0].message and "zero point" in violations[0].message
    m = api.load(RESNET)
    options = QuantOptions(tie_ops=frozenset({"Add"}))
    stats = calibrate.collect(m, calibrate.read(CALIB, m, limit=32), m.points(options).groups())
    tied, _ = build(m, uniform(m, 8, 8, options), stats, options)
    assert hardware.check(tied, tie_add) == []


# --- ties on a hand-built Concat ----------------------------------------------------------------------


def concat_model(scale_a: float, scale_b: float, type_b=TensorProto.UINT8) -> onnx.ModelProto:
    """x -Q/DQ(scale_a, UINT8)- \\ Concat -> y;  x -Q/DQ(scale_b, type_b)- /  (initializers named apart)."""
    inits = [numpy_helper.from_array(np.array(scale_a, np.float32), "sa"),
             numpy_helper.from_array(np.array(scale_b, np.float32), "sb"),
             numpy_helper.from_array(np.array(0, np.uint8), "za"),
             helper.make_tensor("zb", type_b, [], [0])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sa", "za"], ["qa"]),
             helper.make_node("DequantizeLinear", ["qa", "sa", "za"], ["a"]),
             helper.make_node("QuantizeLinear", ["x", "sb", "zb"], ["qb"]),
             helper.make_node("DequantizeLinear", ["qb", "sb", "zb"], ["b"]),
             helper.make_node("Concat", ["a", "b"], ["y"], name="cat", axis=1)]
    graph = helper.make_graph(nodes, "cat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    return model


def test_concat_with_different_scales_breaks_tie():
    violations = hardware.check(concat_model(0.1, 0.2), "int8-only")
    assert [(v.layer, v.rule) for v in violations] == [("cat", "tie")]
    assert violations[0].message == ("Concat inputs differ in quantization: a (scale 0.1, zero point 0, UINT8); "
                                     "b (scale 0.2, zero point 0, UINT8).")
    assert hardware.check(concat_model(0.1, 0.2), "any") == []  # `any` ties nothing


def test_concat_with_equal_scales_complies():
    assert hardware.check(concat_model(0.1, 0.1), "int8-only") == []


def test_concat_with_equal_scales_but_other_type_breaks_tie():
    violations = hardware.check(concat_model(0.1, 0.1, TensorProto.INT8), "int8-only")
    assert [v.rule for v in violations] == ["tie"] and "INT8" in violations[0].message


# --- tensors: float between integer ops, requantizes ----------------------------------------------------


def test_the_older_layer_scope_leaves_float_tensors_an_integer_only_target_refuses(tmp_path):
    out = tmp_path / "layers.onnx"
    api.quantize(RESNET, out, CALIB, rounding="nearest", limit=32, options=QuantOptions(scope=Scope.LAYERS))
    violations = hardware.check(onnx.load(out), "int8-only")
    assert rules(violations) == {"float-tensor": 19}  # 9 Adds read 2 float tensors each, the pooling reads 1
    assert {v.layer.rsplit("/", 1)[-1] for v in violations} == {"Add", "GlobalAveragePool"}
    assert hardware.check(onnx.load(out), "cpu-ort") == []  # a profile with float layers takes them


def test_onnxmpq_and_onnxruntime_w8a8_leave_no_float_tensor(mpq, ort):
    assert hardware.check(mpq("w8a8"), "int8-only") == []
    assert "float-tensor" not in rules(hardware.check(ort(True), "int8-only"))


def test_requantize_is_flagged_only_where_the_profile_forbids_it(tmp_path):
    m = graph.from_proto(build_cnn())
    stats = calibrate.collect(m, ArraySource(x=feed_for(m.proto, 16)["x"]), m.points().groups())
    q, _ = build(m, {"conv1": Candidate(8, 16), "conv2": Candidate(8, 8), "fc": Candidate(8, 8)}, stats)
    strict = profiles.parse("ops: {default: {weights: [8], activations: [8, 16]}}\nrequantize: false\n")
    violations = hardware.check(q, strict)
    assert rules(violations) == {"requantize": 1}
    assert "'r1'" in violations[0].message and "16 bits" in violations[0].message and "8 bits" in violations[0].message
    loose = profiles.parse("ops: {default: {weights: [8], activations: [8, 16]}}\n")
    assert hardware.check(q, loose) == []
    tensors = {t.name: t for t in qdq.read_tensors(q)}
    assert tensors["r1"].requantized_from == 16 and tensors["r1"].bits == 8
    assert tensors["x"].requantized_from is None and tensors["x"].bits == 16


def test_read_tensors_of_onnxruntime_qdq(ort):
    tensors = qdq.read_tensors(ort(True))  # signed 8-bit activations here (QInt8)
    assert len(tensors) == 38 and all(t.bits == 8 and t.type_name == "INT8" and t.signed for t in tensors)
    assert all(t.scale > 0 and -128 <= t.zero_point <= 127 and t.requantized_from is None for t in tensors)


def test_a_fused_quantized_op_is_not_a_pass():
    """A MatMulNBits (onnxruntime's fused 4-bit MatMul) carries its widths inside the op: check reads no
    layer from it, and says so instead of reporting compliance."""
    from onnx import TensorProto, helper

    weight = helper.make_tensor("Wq", TensorProto.UINT8, [8, 1, 8], bytes(64), raw=True)
    scales = helper.make_tensor("S", TensorProto.FLOAT, [8], [0.1] * 8)
    mm = helper.make_node("MatMulNBits", ["x", "Wq", "S"], ["y"], "fused", domain="com.microsoft",
                          K=16, N=8, bits=4, block_size=16)
    graph = helper.make_graph([mm], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [weight, scales])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    violations = hardware.check(proto, "int8-only")
    assert [(v.layer, v.rule) for v in violations] == [("fused", "unreadable-op")]
