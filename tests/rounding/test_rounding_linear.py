"""Tests of onnxmpq.rounding.linear: every layer kind as groups of products W_g X_g.

Oracle: a one-node model (no bias) run in onnxruntime. The blocks W_g @ X_g, stacked over groups and
arranged back into the layer's output layout, must equal its output; `from_matrices` must undo
`to_matrices` exactly.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from conftest import arr, model, node, vi

from onnxmpq.rounding.linear import LinearView, view_of


def run_ort(proto, feed):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)[0]


def one_node(op, x_shape, w, weight_left=False, **attrs):
    """(node, model) of `op` reading x and the constant W; the output's shape is left free."""
    ins = ["W", "x"] if weight_left else ["x", "W"]
    n = node(op, ins, ["y"], "layer", **attrs)
    return n, model([n], [vi("x", list(x_shape))], [vi("y", None)], {"W": w})


def products(view: LinearView, w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """W_g @ X_g for every group, stacked along the rows: (total rows, n), in float64."""
    mats, cols = view.to_matrices(w), view.columns(x)
    assert len(mats) == len(cols) == view.groups
    rows = {m.shape[0] for m in mats}
    assert len(rows) == 1 and rows.pop() * view.groups == out_channels(view)
    for m, c in zip(mats, cols):
        assert m.ndim == 2 and c.ndim == 2 and m.shape[1] == c.shape[0]
    return np.concatenate([m.astype(np.float64) @ c.astype(np.float64) for m, c in zip(mats, cols)], axis=0)


def out_channels(view: LinearView) -> int:
    shape = view.weight_shape
    if view.op_type == "Conv":
        return shape[0]
    if view.op_type == "ConvTranspose":
        return shape[1] * view.groups
    if view.op_type == "Gemm":
        return shape[0] if view.trans_b else shape[1]
    return shape[0] if view.weight_left else shape[1]


def check_round_trip(view: LinearView, w: np.ndarray) -> None:
    back = view.from_matrices(view.to_matrices(w))
    assert back.shape == w.shape
    np.testing.assert_array_equal(back, w)


def assert_close(got, want):
    scale = float(np.abs(want).max()) or 1.0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)


# --- Conv and ConvTranspose ---------------------------------------------------------------------------

CONV_CASES = {
    # name: (x shape, weight shape, attributes)
    "plain": ((2, 3, 7, 7), (4, 3, 3, 3), {}),
    "stride2": ((2, 3, 8, 8), (4, 3, 3, 3), {"strides": [2, 2]}),
    "stride_hw": ((1, 2, 9, 8), (3, 2, 3, 2), {"strides": [2, 1]}),
    "pads_asym": ((2, 3, 6, 7), (5, 3, 3, 3), {"pads": [0, 1, 2, 0]}),
    "dilation2": ((2, 2, 9, 9), (4, 2, 3, 3), {"dilations": [2, 2], "pads": [2, 2, 2, 2]}),
    "dilation_stride_pads": ((3, 2, 10, 9), (4, 2, 3, 2), {"dilations": [2, 1], "strides": [2, 2],
                                                           "pads": [1, 0, 0, 1]}),
    "groups2": ((2, 4, 6, 6), (6, 2, 3, 3), {"group": 2, "pads": [1, 1, 1, 1]}),
    "groups2_stride": ((2, 4, 7, 7), (4, 2, 3, 3), {"group": 2, "strides": [2, 2], "pads": [1, 0, 0, 1]}),
    "depthwise": ((2, 5, 6, 6), (5, 1, 3, 3), {"group": 5, "pads": [1, 1, 1, 1]}),
    "depthwise_mult2": ((2, 3, 6, 6), (6, 1, 3, 3), {"group": 3, "dilations": [2, 2], "pads": [1, 2, 1, 2]}),
    "pointwise": ((2, 6, 5, 5), (4, 6, 1, 1), {}),
    "conv1d": ((2, 3, 11), (4, 3, 3), {"strides": [2], "pads": [1, 2], "dilations": [2]}),
    "conv3d": ((1, 2, 5, 4, 6), (3, 2, 2, 3, 3), {"pads": [0, 1, 1, 1, 0, 1], "strides": [1, 2, 1]}),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_products_equal_onnxruntime(case):
    x_shape, w_shape, attrs = CONV_CASES[case]
    x, w = arr(1, *x_shape), arr(2, *w_shape)
    n, proto = one_node("Conv", x_shape, w, **attrs)
    y = run_ort(proto, {"x": x})
    view = view_of(n, w.shape)
    assert view is not None and view.op_type == "Conv" and view.groups == attrs.get("group", 1)
    prod = products(view, w, x)
    # columns are ordered (N, *out spatial): (C_out, N * prod(out)) -> (N, C_out, *out)
    got = np.moveaxis(prod.reshape(w_shape[0], y.shape[0], *y.shape[2:]), 0, 1)
    assert got.shape == y.shape
    assert_close(got, y)
    check_round_trip(view, w)


CONVT_CASES = {
    "plain": ((2, 3, 4, 4), (3, 4, 3, 3), {}),
    "stride2": ((2, 3, 4, 5), (3, 2, 3, 3), {"strides": [2, 2]}),
    "stride2_pads": ((2, 4, 5, 5), (4, 3, 3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "stride2_pads_asym": ((1, 3, 4, 6), (3, 2, 4, 3), {"strides": [2, 2], "pads": [1, 0, 2, 2]}),
    "dilation2": ((2, 2, 4, 4), (2, 3, 3, 3), {"dilations": [2, 2], "pads": [1, 2, 0, 1]}),
    "stride_dilation": ((1, 2, 3, 5), (2, 2, 3, 2), {"strides": [3, 2], "dilations": [2, 1], "pads": [2, 0, 1, 1]}),
    "kernel2_stride2": ((2, 3, 4, 4), (3, 5, 2, 2), {"strides": [2, 2]}),
    "conv1d": ((2, 3, 6), (3, 4, 3), {"strides": [2], "pads": [1, 0]}),
}


@pytest.mark.parametrize("case", sorted(CONVT_CASES))
def test_convtranspose_products_equal_onnxruntime(case):
    x_shape, w_shape, attrs = CONVT_CASES[case]
    x, w = arr(3, *x_shape), arr(4, *w_shape)
    n, proto = one_node("ConvTranspose", x_shape, w, **attrs)
    y = run_ort(proto, {"x": x})
    view = view_of(n, w.shape)
    assert view is not None and view.op_type == "ConvTranspose" and view.groups == 1
    prod = products(view, w, x)
    got = np.moveaxis(prod.reshape(w_shape[1], y.shape[0], *y.shape[2:]), 0, 1)
    assert got.shape == y.shape
    assert_close(got, y)
    check_round_trip(view, w)


def test_grouped_convtranspose_products_equal_onnxruntime():
    """The view also describes grouped ConvTranspose (round_model falls back for it, for its scales)."""
    x_shape, w_shape = (2, 4, 4, 4), (4, 3, 3, 3)  # 2 groups: 2 input channels -> 3 output channels each
    x, w = arr(5, *x_shape), arr(6, *w_shape)
    n, proto = one_node("ConvTranspose", x_shape, w, group=2, strides=[2, 2], pads=[1, 0, 0, 1])
    y = run_ort(proto, {"x": x})
    view = view_of(n, w.shape)
    prod = products(view, w, x)
    got = np.moveaxis(prod.reshape(6, y.shape[0], *y.shape[2:]), 0, 1)
    assert_close(got, y)
    check_round_trip(view, w)


@pytest.mark.parametrize("output_shape", [[8, 8], [9, 9], [10, 10]], ids=["pads", "default", "output_padding"])
def test_convtranspose_with_output_shape_has_no_view_or_a_right_one(output_shape):
    """`output_shape` makes the op compute its own pads (and output padding), ignoring `pads`: the view
    must either describe that or refuse the layer (GPTQ then falls back to nearest)."""
    x, w = arr(16, 2, 2, 4, 4), arr(17, 2, 3, 3, 3)
    n, proto = one_node("ConvTranspose", x.shape, w, strides=[2, 2], output_shape=output_shape)
    y = run_ort(proto, {"x": x})
    view = view_of(n, w.shape)
    if view is not None:
        prod = products(view, w, x)
        assert prod.shape[1] == y.shape[0] * y.shape[2] * y.shape[3], "columns do not match the output positions"
        assert_close(np.moveaxis(prod.reshape(3, y.shape[0], *y.shape[2:]), 0, 1), y)


# --- Gemm and MatMul ----------------------------------------------------------------------------------


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_products_equal_onnxruntime(trans_a, trans_b):
    m, k, n_out = 5, 7, 4
    x_shape = (k, m) if trans_a else (m, k)
    w = arr(7, *((n_out, k) if trans_b else (k, n_out)))
    x = arr(8, *x_shape)
    n, proto = one_node("Gemm", x_shape, w, transA=trans_a, transB=trans_b)
    y = run_ort(proto, {"x": x})  # (m, n_out)
    view = view_of(n, w.shape)
    assert view.trans_a == bool(trans_a) and view.trans_b == bool(trans_b)
    [mat] = list(view.to_matrices(w))
    assert mat.shape == (n_out, k)
    got = products(view, w, x).T  # (n_out, m) -> (m, n_out)
    assert_close(got, y)
    check_round_trip(view, w)


@pytest.mark.parametrize("x_shape", [(5, 8), (3, 5, 8), (2, 3, 4, 8)], ids=["2d", "3d", "4d"])
def test_matmul_constant_right_products_equal_onnxruntime(x_shape):
    w, x = arr(11, 8, 6), arr(12, *x_shape)
    n, proto = one_node("MatMul", x_shape, w)
    y = run_ort(proto, {"x": x})  # (..., 6)
    view = view_of(n, w.shape, weight_left=False)
    prod = products(view, w, x)  # (6, prod(batch dims))
    got = np.moveaxis(prod, 0, -1).reshape(y.shape)
    assert_close(got, y)
    check_round_trip(view, w)


@pytest.mark.parametrize("x_shape", [(6, 5), (3, 6, 5), (2, 3, 6, 4)], ids=["2d", "3d", "4d"])
def test_matmul_constant_left_products_equal_onnxruntime(x_shape):
    w, x = arr(13, 7, 6), arr(14, *x_shape)
    n, proto = one_node("MatMul", x_shape, w, weight_left=True)
    y = run_ort(proto, {"x": x})  # (..., 7, n)
    view = view_of(n, w.shape, weight_left=True)
    prod = products(view, w, x)  # (7, prod(batch) * n), columns ordered (batch..., n)
    batch, cols = x_shape[:-2], x_shape[-1]
    got = np.moveaxis(prod.reshape(7, *batch, cols), 0, -2)
    assert got.shape == y.shape
    assert_close(got, y)
    check_round_trip(view, w)


# --- forms the view refuses ---------------------------------------------------------------------------


@pytest.mark.parametrize("op, w_shape, attrs", [
    ("Conv", (4, 3, 3, 3), {"auto_pad": "SAME_UPPER"}),
    ("Conv", (4, 3, 3, 3), {"auto_pad": "VALID"}),
    ("ConvTranspose", (3, 4, 3, 3), {"strides": [2, 2], "output_padding": [1, 1]}),
    ("ConvTranspose", (3, 4, 3, 3), {"auto_pad": "SAME_LOWER", "strides": [2, 2]}),
    ("MatMul", (2, 8, 6), {}),
], ids=["conv_same", "conv_valid", "convt_output_padding", "convt_auto_pad", "matmul_batched"])
def test_unsupported_forms_have_no_view(op, w_shape, attrs):
    n = node(op, ["x", "W"], ["y"], "layer", **attrs)
    assert view_of(n, w_shape) is None


def test_explicit_notset_auto_pad_has_a_view():
    n = node("Conv", ["x", "W"], ["y"], "layer", auto_pad="NOTSET", pads=[1, 1, 1, 1])
    view = view_of(n, (4, 3, 3, 3))
    assert view is not None and view.pads == (1, 1, 1, 1)


def test_columns_of_the_float_view_are_the_input_for_a_1x1_conv():
    """A 1x1 stride-1 Conv's columns are the input channels with positions ordered (N, H, W)."""
    x = arr(15, 2, 3, 4, 5)
    view = view_of(node("Conv", ["x", "W"], ["y"]), (6, 3, 1, 1))
    [cols] = list(view.columns(x))
    np.testing.assert_array_equal(cols, x.transpose(1, 0, 2, 3).reshape(3, -1))


# --- every s-th column, gathered directly -------------------------------------------------------------

SELECTIONS = [(0, 2), (1, 3), (4, 7), (3, 1)]


@pytest.mark.parametrize("op, case", [("Conv", c) for c in sorted(CONV_CASES)]
                         + [("ConvTranspose", c) for c in sorted(CONVT_CASES)])
def test_selected_columns_are_the_slice_of_all_columns(op, case):
    x_shape, w_shape, attrs = (CONV_CASES if op == "Conv" else CONVT_CASES)[case]
    x, w = arr(1, *x_shape), arr(2, *w_shape)
    n, _ = one_node(op, x_shape, w, **attrs)
    view = view_of(n, w.shape)
    assert view is not None
    whole = view.columns(x)
    for first, every in SELECTIONS:
        np.testing.assert_array_equal(view.columns(x, first, every), whole[:, :, first::every])


@pytest.mark.parametrize("view, x_shape", [
    (LinearView("Gemm", (10, 4), trans_b=True), (7, 4)), (LinearView("Gemm", (4, 10), trans_a=True), (4, 7)),
    (LinearView("MatMul", (4, 10)), (2, 7, 4)), (LinearView("MatMul", (10, 4), weight_left=True), (3, 4, 7))],
    ids=["gemm", "gemm_trans_a", "matmul", "matmul_left"])
def test_selected_rows_of_linear_layers_are_the_slice_of_all(view, x_shape):
    x = arr(3, *x_shape)
    whole = view.columns(x)
    for first, every in SELECTIONS:
        np.testing.assert_array_equal(view.columns(x, first, every), whole[:, :, first::every])
