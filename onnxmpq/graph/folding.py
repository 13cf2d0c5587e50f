"""Float rewrites done once at load, before any quantization point is found (the float model they give
computes the same function, to float rounding; it is the model every quantized one is compared with).

`fold_batchnorm`: a BatchNormalization right after a Conv (with constant weight and statistics, and the
Conv's output read by it alone) becomes part of the Conv, as exporters usually do themselves:

    W'[c] = W[c] * g_c,   B'[c] = (B[c] - mean_c) * g_c + beta_c,   g_c = gamma_c / sqrt(var_c + eps)

so that no Q/DQ pair ever sits between the two (onnxruntime fuses them at load only in float graphs).
`fold_conv_scale`: a constant Mul right after a Conv (a scalar, or one value per output channel: the
"learnable affine" blocks of PP-LCNet/PP-OCR after a Conv without BN) joins the Conv, W'[c] = W[c] * s_c,
B'[c] = B[c] * s_c. Left apart, the Conv's output and the product are both quantized and every value is
rounded twice; when the product's step is a little wider than s times the Conv output's, neighbouring
codes merge (measured on PP-OCRv4: one such tensor decided the CER between 0.8% and 9%).
`fold_bias_add`: a bias written as a separate Add after a Conv or a 2-D MatMul joins the layer.
`fold_all` applies them until none applies ((Conv * s) + b folds whole, in either order).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxmpq.graph.index import GraphIndex


def fold_batchnorm(graph: onnx.GraphProto) -> int:
    """Folds every eligible Conv + BatchNormalization pair in place; returns how many it folded."""
    index = GraphIndex.of(graph)
    folded: list[onnx.NodeProto] = []
    for bn in [n for n in graph.node if n.op_type == "BatchNormalization"]:
        conv = index.producer.get(bn.input[0])
        if conv is None or not _eligible(conv, bn, index):
            continue
        gamma, beta, mean, var = (index.const_array(name).astype(np.float64) for name in bn.input[1:5])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gain = gamma / np.sqrt(var + eps)
        weight = index.const_array(conv.input[1])
        bias = index.const_array(conv.input[2]).astype(np.float64) if len(conv.input) > 2 and conv.input[2] \
            else np.zeros(weight.shape[0])
        shape = (-1,) + (1,) * (weight.ndim - 1)
        new_w = (weight.astype(np.float64) * gain.reshape(shape)).astype(weight.dtype)
        new_b = ((bias - mean) * gain + beta).astype(weight.dtype)
        w_name = fresh_name(graph, f"{conv.input[1]}_bn_folded")
        b_name = fresh_name(graph, f"{bn.name or conv.name}_bias_bn_folded")
        graph.initializer.extend([numpy_helper.from_array(new_w, w_name), numpy_helper.from_array(new_b, b_name)])
        del conv.input[1:]
        conv.input.extend([w_name, b_name])
        conv.output[0] = bn.output[0]
        folded.append(bn)
    for bn in folded:
        graph.node.remove(bn)
    return len(folded)


def _eligible(conv: onnx.NodeProto, bn: onnx.NodeProto, index: GraphIndex) -> bool:
    if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or len(bn.input) < 5:
        return False
    if len([o for o in bn.output if o]) != 1 or len(index.consumers.get(conv.output[0], [])) != 1 \
            or conv.output[0] in index.outputs:
        return False
    consts = [conv.input[1], *bn.input[1:5]] + ([conv.input[2]] if len(conv.input) > 2 and conv.input[2] else [])
    if not all(index.float_const(name) is not None for name in consts):
        return False
    channels = index.consts[conv.input[1]].dims[0]
    return all(int(np.prod(index.consts[name].dims)) == channels for name in bn.input[1:5])


def fresh_name(graph: onnx.GraphProto, base: str) -> str:
    """`base`, or `base_2`, `base_3`, ...: a name no initializer, node output or input of `graph` has (a
    fold applied twice to one layer must not write a second initializer of the same name)."""
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} | \
        {i.name for i in graph.input}
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def fold_all(graph: onnx.GraphProto) -> int:
    """Every fold of this module, repeated until none applies; returns how many nodes were folded away."""
    total = 0
    while done := fold_batchnorm(graph) + fold_conv_scale(graph) + fold_bias_add(graph):
        total += done
    return total


def fold_conv_scale(graph: onnx.GraphProto) -> int:
    """Folds a constant per-channel or scalar Mul right after a Conv into its weight and bias, in place;
    returns how many it folded."""
    index = GraphIndex.of(graph)
    done = []
    for mul in [n for n in graph.node if n.op_type == "Mul" and len(n.input) == 2]:
        for data, const in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
            conv = index.producer.get(data)
            if conv is None or conv.op_type != "Conv" or index.float_const(const) is None \
                    or len(index.consumers.get(data, [])) != 1 or data in index.outputs:
                continue
            if _scale_conv(graph, index, conv, index.const_array(const), mul):
                done.append(mul)
                break
    for mul in done:
        graph.node.remove(mul)
    return len(done)


def _channel_values(index: GraphIndex, conv: onnx.NodeProto, value: np.ndarray) -> np.ndarray | None:
    """`value` as one number per output channel of `conv` when it broadcasts along the channel axis only
    (a scalar, (C,1,..,1) or (1,C,1,..,1)); else None."""
    weight = index.float_const(conv.input[1]) if len(conv.input) > 1 else None
    out_shape = index.shapes.get(conv.output[0])
    if weight is None or conv.domain not in ("", "ai.onnx") or out_shape is None:
        return None
    channels, rank, dims = weight.dims[0], len(out_shape), list(value.shape)
    if value.size == 1 and len(dims) <= rank:
        return np.full(channels, value.reshape(-1)[0], value.dtype)
    if value.size == channels and (dims == [channels] + [1] * (rank - 2) or dims == [1, channels] + [1] * (rank - 2)):
        return value.reshape(-1)
    return None


def _scale_conv(graph: onnx.GraphProto, index: GraphIndex, conv: onnx.NodeProto, value: np.ndarray,
                mul: onnx.NodeProto) -> bool:
    scale = _channel_values(index, conv, value)
    has_bias = len(conv.input) > 2 and bool(conv.input[2])
    if scale is None or (has_bias and index.float_const(conv.input[2]) is None):
        return False
    weight = index.const_array(conv.input[1])
    shape = (-1,) + (1,) * (weight.ndim - 1)
    new_w = (weight.astype(np.float64) * scale.reshape(shape)).astype(weight.dtype)
    w_name = fresh_name(graph, f"{conv.name}_weight_scale_folded")
    graph.initializer.append(numpy_helper.from_array(new_w, w_name))
    if has_bias:
        b_name = fresh_name(graph, f"{conv.name}_bias_scale_folded")
        bias = index.const_array(conv.input[2]).astype(np.float64) * scale
        graph.initializer.append(numpy_helper.from_array(bias.astype(weight.dtype), b_name))
        conv.input[2] = b_name
    conv.input[1] = w_name
    conv.output[0] = mul.output[0]
    return True


def fold_bias_add(graph: onnx.GraphProto) -> int:
    """Folds a constant Add right after a layer into the layer's bias, in place; returns how many:

    - Conv + Add(C) with C of C_out values broadcast along the channel axis ((C,1,..,1) or (1,C,1,..,1)):
      B' = B + C (exporters such as CNTK's write the bias that way);
    - MatMul(x, W) of a 2-D x and a 2-D constant W, + Add(b) with b of W's N columns: Gemm(x, W, b),
      which onnxruntime runs as one QGemm (left apart, it would fuse the pair into a float Gemm first).
    """
    index = GraphIndex.of(graph)
    done = []
    for add in [n for n in graph.node if n.op_type == "Add" and len(n.input) == 2]:
        for data, const in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
            layer = index.producer.get(data)
            value = index.value(const) if index.float_const(const) is not None else None
            if layer is None or value is None or len(index.consumers.get(data, [])) != 1 or data in index.outputs:
                continue
            if layer.op_type == "Conv" and _fold_conv_bias(graph, index, layer, value, add):
                done.append(add)
                break
            if layer.op_type == "MatMul" and _fold_matmul_bias(graph, index, layer, value, add):
                done.append(add)
                break
    for add in done:
        graph.node.remove(add)
    return len(done)


def _fold_conv_bias(graph: onnx.GraphProto, index: GraphIndex, conv: onnx.NodeProto, value: np.ndarray,
                    add: onnx.NodeProto) -> bool:
    add_c = _channel_values(index, conv, value)
    if add_c is None:
        return False
    channels = add_c.size
    bias = index.value(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else np.zeros(channels, value.dtype)
    if len(conv.input) > 2 and conv.input[2] and index.float_const(conv.input[2]) is None:
        return False
    name = fresh_name(graph, f"{conv.name}_bias_add_folded")
    graph.initializer.append(numpy_helper.from_array((bias + add_c).astype(value.dtype), name))
    del conv.input[2:]
    conv.input.append(name)
    conv.output[0] = add.output[0]
    return True


def _fold_matmul_bias(graph: onnx.GraphProto, index: GraphIndex, matmul: onnx.NodeProto, value: np.ndarray,
                      add: onnx.NodeProto) -> bool:
    weight = index.float_const(matmul.input[1])
    x_shape = index.shapes.get(matmul.input[0])
    if weight is None or len(weight.dims) != 2 or x_shape is None or len(x_shape) != 2 \
            or index.is_const(matmul.input[0]) or value.size != weight.dims[1] or value.ndim > 2:
        return False
    name = fresh_name(graph, f"{matmul.name}_bias_add_folded")
    graph.initializer.append(numpy_helper.from_array(value.reshape(-1), name))
    gemm = onnx.helper.make_node("Gemm", [matmul.input[0], matmul.input[1], name], [add.output[0]], name=matmul.name)
    matmul.CopyFrom(gemm)
    return True
