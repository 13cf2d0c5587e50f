"""Every quantizable layer as groups of matrix products y = W_g x_g, the view that GPTQ works in.

For a layer with G groups, `to_matrices(w)` gives the G matrices W_g stacked as (G, rows, K), rows being
output channels, and `columns(x)` turns a batch of the layer's input into X stacked as (G, K, n): one
column per output position (im2col for convolutions), so that the layer's output (before bias) at
those positions is W_g X_g. `from_matrices` inverts `to_matrices`.

- Conv, weight (C_out, C_in/G, k...): W_g = w[g-th block of C_out].reshape(C_out/G, -1); X_g = im2col of
  the g-th block of input channels with the node's strides, pads and dilations.
- ConvTranspose, weight (C_in, C_out/G, k...): as the Conv over the input with zeros inserted between
  samples (stride), padded by d(k-1)-p, with the kernel flipped and its two channel axes swapped.
- Gemm: W = B (transB=1) or B^T; X = A^T (or A with transA=1).
- MatMul x @ W (W of shape (K, N)): W^T and the rows of x; W @ x: W and the columns of x.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view


@dataclass(frozen=True)
class LinearView:
    op_type: str
    weight_shape: tuple[int, ...]
    groups: int = 1
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    trans_a: bool = False
    trans_b: bool = False
    weight_left: bool = False

    def to_matrices(self, w: np.ndarray) -> np.ndarray:
        g = self.groups
        if self.op_type == "Conv":
            return w.reshape(g, w.shape[0] // g, -1)
        if self.op_type == "ConvTranspose":
            flipped = np.flip(w, axis=tuple(range(2, w.ndim)))
            blocks = flipped.reshape(g, w.shape[0] // g, *w.shape[1:])
            return np.swapaxes(blocks, 1, 2).reshape(g, w.shape[1], -1)
        if self.op_type == "Gemm":
            return (w if self.trans_b else w.T)[None]
        return (w if self.weight_left else w.T)[None]

    def from_matrices(self, mats: np.ndarray) -> np.ndarray:
        shape = self.weight_shape
        if self.op_type == "Conv":
            return mats.reshape(shape)
        if self.op_type == "ConvTranspose":
            g = self.groups
            blocks = np.swapaxes(mats.reshape(g, shape[1], shape[0] // g, *shape[2:]), 1, 2)
            return np.flip(blocks.reshape(shape), axis=tuple(range(2, len(shape))))
        m: np.ndarray = mats[0]
        if self.op_type == "Gemm":
            return m if self.trans_b else m.T
        return m if self.weight_left else m.T

    def columns(self, x: np.ndarray, first: int = 0, every: int = 1) -> np.ndarray:
        """The layer input `x` (a batch) as (G, K, n); with `every` s > 1 only the columns first, first + s,
        ... of that order, gathered without building the others (what `[:, :, first::every]` of the whole
        would give, in a layout BLAS reads without a copy)."""
        g = self.groups
        if self.op_type in ("Conv", "ConvTranspose"):
            kernel, strides, pads = self.weight_shape[2:], self.strides, self.pads
            if self.op_type == "ConvTranspose":
                x = _insert_zeros(x, strides)
                pads = tuple(d * (k - 1) - p for k, d, p in zip(kernel * 2, self.dilations * 2, self.pads))
                strides = (1,) * len(kernel)
            cols = _im2col(x, kernel, strides, pads, self.dilations, first, every)
            return cols.reshape(g, cols.shape[0] // g, -1)
        if self.op_type == "Gemm":
            a = x.T if self.trans_a else x
            rows = a.reshape(-1, a.shape[-1])
        elif self.weight_left:
            rows = np.moveaxis(x, -1, -2).reshape(-1, x.shape[-2])
        else:
            rows = x.reshape(-1, x.shape[-1])
        return rows[first::every].T[None]


def view_of(node: onnx.NodeProto, weight_shape: tuple[int, ...], weight_left: bool = False) -> LinearView | None:
    """The LinearView of a layer node, or None where GPTQ does not apply (batched MatMul weights,
    ConvTranspose with output_padding or output_shape, auto_pad other than NOTSET)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    n = len(weight_shape) - 2
    if node.op_type in ("Conv", "ConvTranspose"):
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or any(attrs.get("output_padding", [])) \
                or "output_shape" in attrs:
            return None  # onnxruntime derives the padding itself there
        return LinearView(node.op_type, weight_shape, int(attrs.get("group", 1)),
                          tuple(attrs.get("strides", [1] * n)), tuple(attrs.get("pads", [0] * 2 * n)),
                          tuple(attrs.get("dilations", [1] * n)))
    if node.op_type == "Gemm":
        return LinearView("Gemm", weight_shape, trans_a=bool(attrs.get("transA", 0)), trans_b=bool(attrs.get("transB", 0)))
    if node.op_type == "MatMul" and len(weight_shape) == 2:
        return LinearView("MatMul", weight_shape, weight_left=weight_left)
    return None


def _insert_zeros(x: np.ndarray, strides: tuple[int, ...]) -> np.ndarray:
    if all(s == 1 for s in strides):
        return x
    shape = list(x.shape[:2]) + [(d - 1) * s + 1 for d, s in zip(x.shape[2:], strides)]
    up = np.zeros(shape, x.dtype)
    up[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)] = x
    return up


def _im2col(x: np.ndarray, kernel: tuple[int, ...], strides: tuple[int, ...], pads: tuple[int, ...],
            dilations: tuple[int, ...], first: int = 0, every: int = 1) -> np.ndarray:
    """(N, C, *spatial) -> (C * prod(kernel), N * prod(out spatial)), rows ordered as the weight's
    (C, k1, k2, ...) flattening; with `every` > 1 only the columns first::every, gathered from the
    sliding windows directly (a (K, n) transpose of a C-ordered (n, K) array)."""
    n = len(kernel)
    x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + n]) for i in range(n)])
    span = [d * (k - 1) + 1 for k, d in zip(kernel, dilations)]
    win = sliding_window_view(x, span, axis=tuple(range(2, 2 + n)))
    win = win[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
              + (Ellipsis,) + tuple(slice(None, None, d) for d in dilations)]
    k = x.shape[1] * int(np.prod(kernel))
    if every > 1 or first:
        # win: (N, C, *out, *kernel) -> (N, *out, C, *kernel), the chosen (N, *out) positions gathered
        positions = (x.shape[0], *win.shape[2:2 + n])
        picked = np.unravel_index(np.arange(first, int(np.prod(positions)), every), positions)
        by_position = win.transpose([0] + list(range(2, 2 + n)) + [1] + list(range(2 + n, 2 + 2 * n)))
        return by_position[picked].reshape(-1, k).T
    # win: (N, C, *out, *kernel) -> (C, *kernel, N, *out)
    order = [1] + list(range(2 + n, 2 + 2 * n)) + [0] + list(range(2, 2 + n))
    return np.ascontiguousarray(win.transpose(order)).reshape(k, -1)
