"""Tests of the op-handler registry (onnxmpq.ops) and of the generic Registry it is built on."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import MODELS, arr, feed_for, model, node, vi
from onnx import TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxmpq.errors import InternalError, OnnxmpqError
from onnxmpq.graph import model as graph
from onnxmpq.graph.index import GraphIndex
from onnxmpq.ops import OP_HANDLERS, NodeView, known_prod
from onnxmpq.registry import Registry

# name -> (weight, activation, bias, op_type) of each layer
EXPECTED = {
    "conv1": ("W1", "x", "B1", "Conv"), "conv2": ("W2", "r1", None, "Conv"), "fc": ("W3", "f", "B3", "Gemm"),
    "grouped": ("Wg", "x", None, "Conv"), "depthwise": ("Wd", "g", "Bd", "Conv"),
    "deconv": ("Wt", "x", "Bt", "ConvTranspose"),
    "mm_right": ("Wr", "x", None, "MatMul"), "mm_left": ("Wl", "x", None, "MatMul"),
    "gemm_t0": ("Wgemm", "x", "Cgemm", "Gemm"), "gemm_t1": ("Wgemm", "x", "Cgemm", "Gemm"),
}


def output_channels(layer, y_shape, group):
    """Output channels a per-channel scale must index: along the axis of the output that the weight's axis feeds."""
    if layer.op_type == "Conv":
        return y_shape[1]
    if layer.op_type == "ConvTranspose":
        return y_shape[1] // group  # weight (C_in, C_out/g, k, k): axis 1 holds C_out/g
    if layer.op_type == "Gemm":
        return y_shape[-1]
    return y_shape[-2] if layer.weight == "Wl" else y_shape[-1]  # W @ x: rows of W are output rows


@pytest.mark.parametrize("name", sorted(MODELS))
def test_handlers_name_weight_activation_bias(name):
    m = graph.from_proto(MODELS[name]())
    for layer in m.layers:
        assert (layer.weight, layer.activation, layer.bias, layer.op_type) == EXPECTED[layer.name]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_channel_axis_indexes_output_channels(name):
    m = graph.from_proto(MODELS[name]())
    feed = feed_for(m.proto)
    values = {**feed, **ReferenceEvaluator(m.proto).run(None, feed, intermediate=True)}
    inits = {t.name: numpy_helper.to_array(t) for t in m.proto.graph.initializer}
    nodes = {n.name: n for n in m.proto.graph.node}
    for layer in m.layers:
        attrs = {a.name: a.i for a in nodes[layer.name].attribute}
        w = inits[layer.weight]
        y = values[layer.output]
        assert w.shape[layer.channel_axis] == output_channels(layer, y.shape, attrs.get("group", 1))
        # zeroing one channel of the weight zeroes exactly that output channel (bias aside)
        if layer.bias is None and layer.op_type != "ConvTranspose":
            changed = inits[layer.weight].copy()
            np.moveaxis(changed, layer.channel_axis, 0)[1] = 0
            probe = onnx.ModelProto()
            probe.CopyFrom(m.proto)
            target = next(t for t in probe.graph.initializer if t.name == layer.weight)
            target.CopyFrom(numpy_helper.from_array(changed, layer.weight))
            y2 = {**feed, **ReferenceEvaluator(probe).run(None, feed, intermediate=True)}[layer.output]
            out_axis = 1 if layer.op_type == "Conv" else (-1 if layer.weight != "Wl" else -2)
            assert np.all(np.take(y2, 1, axis=out_axis) == 0)
            np.testing.assert_array_equal(np.delete(y2, 1, axis=out_axis), np.delete(y, 1, axis=out_axis))


@pytest.mark.parametrize("trans_b, axis", [(0, 1), (1, 0)])
def test_gemm_channel_axis_follows_transB(trans_b, axis):
    (layer,) = graph.from_proto(MODELS[f"gemm_t{trans_b}"]()).layers
    assert layer.channel_axis == axis


def test_matmul_axes_for_right_left_and_batched_weights():
    assert graph.from_proto(MODELS["matmul_right"]()).layers[0].channel_axis == 1
    assert graph.from_proto(MODELS["matmul_left"]()).layers[0].channel_axis == 0
    batched = model([node("MatMul", ["x", "W"], ["y"], "bmm")], [vi("x", [2, 6, 8])], [vi("y", [2, 6, 5])],
                    {"W": arr(0, 2, 8, 5)})
    assert graph.from_proto(batched).layers[0].channel_axis == 2


def test_convtranspose_channel_axis_is_one():
    (layer,) = graph.from_proto(MODELS["convtranspose"]()).layers
    assert layer.channel_axis == 1


@pytest.mark.parametrize("case", ["matmul_two_inputs", "matmul_two_consts", "gemm_const_a", "conv_weight_input",
                                  "int_weight", "other_domain"])
def test_nodes_without_a_single_constant_float_weight_are_not_layers(case):
    if case == "matmul_two_inputs":
        proto = model([node("MatMul", ["x", "w"], ["y"], "n")], [vi("x", [2, 3]), vi("w", [3, 4])], [vi("y", [2, 4])])
    elif case == "matmul_two_consts":
        proto = model([node("MatMul", ["A", "B"], ["c"], "n"), node("Add", ["x", "c"], ["y"], "a")],
                      [vi("x", [2, 4])], [vi("y", [2, 4])], {"A": arr(0, 2, 3), "B": arr(1, 3, 4)})
    elif case == "gemm_const_a":
        proto = model([node("Gemm", ["A", "x"], ["y"], "n")], [vi("x", [3, 4])], [vi("y", [2, 4])], {"A": arr(0, 2, 3)})
    elif case == "conv_weight_input":
        proto = model([node("Conv", ["x", "w"], ["y"], "n")], [vi("x", [1, 2, 3, 3]), vi("w", [2, 2, 1, 1])],
                      [vi("y", [1, 2, 3, 3])])
    elif case == "int_weight":
        proto = model([node("MatMulInteger", ["x", "W"], ["y"], "n")], [vi("x", [2, 3], TensorProto.INT8)],
                      [vi("y", [2, 4], TensorProto.INT32)], {"W": np.ones((3, 4), np.int8)})
        proto.graph.node[0].op_type = "MatMul"  # an integer MatMul weight is never quantized
        proto.graph.input[0].type.tensor_type.elem_type = TensorProto.INT32
        proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((3, 4), np.int32), "W"))
    else:
        proto = model([node("Conv", ["x", "W"], ["y"], "n", domain="com.example")], [vi("x", [1, 2, 3, 3])],
                      [vi("y", [1, 2, 3, 3])], {"W": arr(0, 2, 2, 1, 1)})
        proto.opset_import.add(domain="com.example", version=1)
    m = graph.from_proto(proto)
    assert m.layers == ()


def test_node_view_accessors():
    n = node("Conv", ["x", "W", ""], ["y"], "c", group=2)
    w = numpy_helper.from_array(arr(0, 2, 1, 1, 1), "W")
    index = GraphIndex(onnx.GraphProto(), {}, {}, {"W": w}, {"x": (1, 2, 3, 3), "y": (1, 2, 3, 3)}, {}, frozenset(), ())
    view = NodeView(n, index)
    assert view.input(0) == "x" and view.input(2) is None and view.input(5) is None
    assert view.float_const(1) is w and view.float_const(0) is None
    assert view.attr("group") == 2 and view.attr("strides", "default") == "default"
    assert view.in_shape(0) == (1, 2, 3, 3) and view.out_shape() == (1, 2, 3, 3)


def test_known_prod_counts_dynamic_dims_as_one():
    assert known_prod((2, None, 3)) == 6
    assert known_prod(()) == 1
    assert known_prod(None) == 1


# --- registry -------------------------------------------------------------------------------------


def test_op_registry_holds_the_handlers_the_integer_graphs_need():
    needed = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Concat", "MaxPool",
              "AveragePool", "GlobalAveragePool", "Resize", "Pad", "Gather", "Relu", "Clip", "LeakyRelu", "Sigmoid",
              "HardSigmoid", "HardSwish", "Tanh", "Softmax", "Erf", "Gelu", "LayerNormalization", "Reshape",
              "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Split"}
    assert needed <= set(OP_HANDLERS)
    assert "Loop" not in OP_HANDLERS and OP_HANDLERS.get_or_none("ReduceMean") is None


def test_registry_rejects_duplicates_and_explains_unknown_names():
    reg = Registry[int]("thing")
    reg.register("a")(1)
    reg.register("b")(2)
    with pytest.raises(InternalError, match="twice"):
        reg.register("a")(3)
    assert reg.get("a") == 1 and list(reg) == ["a", "b"] and "b" in reg
    with pytest.raises(OnnxmpqError) as info:
        reg.get("c")
    assert "a, b" in str(info.value) and info.value.hint


def test_registering_an_existing_op_handler_again_is_a_bug():
    with pytest.raises(InternalError):
        OP_HANDLERS.register("Conv")(object())
    assert type(OP_HANDLERS.get("Conv")).__name__ == "ConvHandler"
