"""Tests of onnxmpq.graph: loading, Constant folding, opset upgrade, node naming, layer discovery, MACs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import MODELS, arr, build_cnn, build_if_model, feed_for, model, node, vi
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxmpq.errors import OnnxmpqError
from onnxmpq.graph import model as graph


def layers_by_name(m):
    return {layer.name: layer for layer in m.layers}


# --- Constant folding, opset, names ------------------------------------------------------------------


def test_constant_weights_become_initializers_and_their_conv_a_layer(constant_weights):
    m = graph.from_proto(constant_weights)
    assert all(n.op_type != "Constant" for n in m.proto.graph.node)
    inits = {t.name: numpy_helper.to_array(t) for t in m.proto.graph.initializer}
    original = numpy_helper.to_array(constant_weights.graph.node[0].attribute[0].t)
    np.testing.assert_array_equal(inits["Wc"], original)
    np.testing.assert_array_equal(inits["Bc"], np.array([0.1, -0.2, 0.3], np.float32))
    (layer,) = m.layers
    assert (layer.name, layer.weight, layer.bias, layer.activation) == ("conv_c", "Wc", "Bc", "x")
    feed = feed_for(constant_weights)
    np.testing.assert_allclose(ReferenceEvaluator(m.proto).run(None, feed)[0],
                               ReferenceEvaluator(constant_weights).run(None, feed)[0], rtol=1e-6)


def test_from_proto_leaves_its_argument_alone(constant_weights):
    before = constant_weights.SerializeToString()
    graph.from_proto(constant_weights)
    assert constant_weights.SerializeToString() == before


@pytest.mark.parametrize("opset", [8, 11])
def test_old_opsets_are_upgraded_to_13(opset):
    old = build_cnn(opset=opset)
    m = graph.from_proto(old)
    assert m.opset == 13 and graph.default_opset(m.proto) == 13
    assert [layer.name for layer in m.layers] == ["conv1", "conv2", "fc"]
    onnx.checker.check_model(m.proto, full_check=True)
    feed = feed_for(m.proto)
    sess = ort.InferenceSession(m.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, feed)[0], ReferenceEvaluator(build_cnn()).run(None, feed)[0],
                               rtol=1e-5, atol=1e-5)


def test_newer_opset_is_kept():
    assert graph.from_proto(build_cnn(opset=17)).opset == 17


def test_unnamed_and_duplicate_nodes_get_unique_names(unnamed):
    m = graph.from_proto(unnamed)
    names = [n.name for n in m.proto.graph.node]
    assert all(names) and len(set(names)) == len(names)
    layer_names = [layer.name for layer in m.layers]
    assert len(layer_names) == 3 and len(set(layer_names)) == 3
    assert set(layer_names) <= set(names)
    assert names.count("dup") == 1
    # names are stable: loading twice gives the same ids
    assert [n.name for n in graph.from_proto(unnamed).proto.graph.node] == names


def test_explicit_node_name_is_not_taken_by_a_generated_one(unnamed):
    m = graph.from_proto(unnamed)
    # the Gemm is the only node the user named "Conv_0": that name must keep pointing at it
    assert m.layer("Conv_0").op_type == "Gemm"


def test_initializers_listed_as_inputs_are_not_user_inputs():
    proto = build_cnn()
    proto.graph.input.extend([helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims))
                              for t in proto.graph.initializer])
    m = graph.from_proto(proto)
    assert [spec.name for spec in m.inputs] == ["x"]
    (spec,) = m.inputs
    assert spec.dtype == np.float32 and spec.shape == (None, 3, 8, 8)


def test_empty_graph_is_a_user_error():
    with pytest.raises(OnnxmpqError):
        graph.from_proto(model([], [vi("x", [1])], [vi("x", [1])]))


def test_unknown_layer_name_is_a_user_error(cnn):
    with pytest.raises(OnnxmpqError, match="nope"):
        graph.from_proto(cnn).layer("nope")


# --- subgraphs --------------------------------------------------------------------------------------


def test_conv_inside_if_branch_is_skipped(if_model):
    m = graph.from_proto(if_model)
    assert [layer.name for layer in m.layers] == ["conv_top"]
    assert [name for name, _ in m.skipped] == ["conv_in_then"]
    assert "If" in m.skipped[0][1]


# --- files ----------------------------------------------------------------------------------------


def test_load_reads_a_saved_model(tmp_path, cnn):
    path = tmp_path / "m.onnx"
    onnx.save(cnn, str(path))
    m = graph.load(path)
    assert m.path == path
    assert [layer.name for layer in m.layers] == ["conv1", "conv2", "fc"]


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(OnnxmpqError, match="does not exist"):
        graph.load(tmp_path / "nope.onnx")


def test_folder_is_a_user_error(tmp_path):
    with pytest.raises(OnnxmpqError):
        graph.load(tmp_path)


def test_truncated_file_is_a_user_error(tmp_path, cnn):
    path = tmp_path / "cut.onnx"
    data = cnn.SerializeToString()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(OnnxmpqError):
        graph.load(path)


@pytest.mark.parametrize("content", [b"this is not an onnx model\n", bytes(range(256)) * 4, b""])
def test_non_onnx_file_is_a_user_error(tmp_path, content):
    path = tmp_path / "junk.onnx"
    path.write_bytes(content)
    with pytest.raises(OnnxmpqError):
        graph.load(path)


def test_external_data_next_to_the_model_is_loaded(external_model):
    assert (external_model.parent / "weights.data").stat().st_size > 0
    m = graph.load(external_model)
    inits = {t.name: numpy_helper.to_array(t) for t in m.proto.graph.initializer}
    for t in build_cnn().graph.initializer:
        np.testing.assert_array_equal(inits[t.name], numpy_helper.to_array(t))
    assert [layer.name for layer in m.layers] == ["conv1", "conv2", "fc"]


def test_missing_external_data_is_a_user_error(external_model):
    (external_model.parent / "weights.data").unlink()
    with pytest.raises(OnnxmpqError, match="missing"):
        graph.load(external_model)


def _point_outside(tensor: TensorProto, location: str, length: int) -> None:
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, where):
    secret = tmp_path / "x.data"
    secret.write_bytes(np.zeros(216, np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    proto = build_cnn()
    w1 = next(t for t in proto.graph.initializer if t.name == "W1")
    _point_outside(w1, "../x.data" if where == "parent" else str(secret), 216 * 4)
    path = folder / "m.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(OnnxmpqError, match="outside"):
        graph.load(path)


def test_external_data_of_a_subgraph_outside_the_model_folder_is_refused(tmp_path):
    (tmp_path / "x.data").write_bytes(np.zeros(36, np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    proto = build_if_model()
    branch = next(n for n in proto.graph.node if n.op_type == "If")
    then = next(a.g for a in branch.attribute if a.name == "then_branch")
    _point_outside(then.initializer[0], "../x.data", 36 * 4)
    path = folder / "m.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(OnnxmpqError):
        graph.load(path)


# --- params and MACs ------------------------------------------------------------------------------


def conv_macs(c_out, c_in, groups, kernel, out_hw):
    """Each output element costs (c_in / groups) * kh * kw products."""
    return c_out * out_hw[0] * out_hw[1] * (c_in // groups) * kernel[0] * kernel[1]


EXPECTED = {
    # name: (params, macs per sample)
    "conv1": (8 * 3 * 3 * 3, conv_macs(8, 3, 1, (3, 3), (8, 8))),
    "conv2": (4 * 8 * 3 * 3, conv_macs(4, 8, 1, (3, 3), (4, 4))),       # stride 2: 8x8 -> 4x4
    "fc": (10 * 64, 10 * 64),                                          # Gemm: one row of N x K
    "grouped": (6 * 2 * 3 * 3, conv_macs(6, 4, 2, (3, 3), (4, 4))),     # 6x6, no pad -> 4x4
    "depthwise": (6 * 1 * 3 * 3, conv_macs(6, 6, 6, (3, 3), (4, 4))),
    # ConvTranspose: every input pixel of every input channel scatters into c_out/g * kh * kw outputs
    "deconv": (4 * 3 * 3 * 3, 4 * 5 * 5 * 3 * 3 * 3),
    "mm_right": (8 * 5, 6 * 5 * 8),                                    # (6,8) @ (8,5)
    "mm_left": (5 * 6, 5 * 7 * 6),                                     # (5,6) @ (6,7)
    "gemm_t0": (8 * 5, 8 * 5),
    "gemm_t1": (8 * 5, 8 * 5),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_params_and_macs_equal_hand_computed(name):
    m = graph.from_proto(MODELS[name]())
    assert m.layers
    for layer in m.layers:
        assert (layer.params, layer.macs) == EXPECTED[layer.name], layer.name


def test_matmul_left_constant_with_2d_activation_counts_every_product():
    proto = model([node("MatMul", ["W", "x"], ["y"], "mm")], [vi("x", [3, 7])], [vi("y", [5, 7])],
                  {"W": arr(0, 5, 3)})
    (layer,) = graph.from_proto(proto).layers
    assert layer.params == 15
    assert layer.macs == 5 * 7 * 3


def test_conv_with_dynamic_spatial_dims_counts_them_as_one():
    proto = model([node("Conv", ["x", "W"], ["y"], "c")], [vi("x", ["N", 3, "H", "W"])],
                  [vi("y", ["N", 4, None, None])], {"W": arr(0, 4, 3, 3, 3)})
    (layer,) = graph.from_proto(proto).layers
    assert layer.macs == layer.params == 4 * 3 * 3 * 3


def test_a_weighted_op_without_a_handler_is_listed_as_float():
    """An LSTM (W, R, B constants: 4*H*(I + H) + 8*H parameters) has no handler: the model's skipped
    list says so, with its parameter count, instead of the report claiming every layer quantized."""
    from conftest import arr, model, node, vi

    hidden, inputs = 16, 8
    proto = model([node("MatMul", ["x", "Wm"], ["m"], "proj"),
                   node("LSTM", ["m", "W", "R", "B"], ["y"], "lstm", hidden_size=hidden)],
                  [vi("x", [5, "N", 4])], [vi("y", [5, 1, "N", hidden])],
                  {"Wm": arr(1, 4, inputs), "W": arr(2, 1, 4 * hidden, inputs), "R": arr(3, 1, 4 * hidden, hidden),
                   "B": arr(4, 1, 8 * hidden)})
    m = graph.from_proto(proto)
    assert [l.name for l in m.layers] == ["proj"]
    params = 4 * hidden * (inputs + hidden) + 8 * hidden
    assert dict(m.skipped)["lstm"] == f"LSTM with {params:,d} constant parameters has no quantization handler: stays float"
