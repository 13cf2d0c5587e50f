"""Rounding: float weights -> integer codes on a layer's grid plus per-channel scales.

`nearest` rounds each weight to the closest grid point, q = clip(round(w / s), -Q, Q), with the scale
s_c = alpha_c * max|W_c| / Q of each output channel c chosen by `clip_scale` (MSE search or min/max).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxmpq.errors import OnnxmpqError
from onnxmpq.types import WeightRange
from onnxmpq.write.formats import IntFormat

CLIP_GRID = np.linspace(1.0, 0.1, 91)


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer codes (the weight's shape) and float32 scales along `axis`: w ~= codes * scale."""

    codes: np.ndarray
    scale: np.ndarray
    axis: int
    fmt: IntFormat

    def dequantize(self) -> np.ndarray:
        shape = [1] * self.codes.ndim
        shape[self.axis] = -1
        values: np.ndarray = self.codes.astype(np.float32) * self.scale.reshape(shape)
        return values


def per_channel(weight: np.ndarray, axis: int) -> np.ndarray:
    """View of `weight` as (channels, elements per channel)."""
    return np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)


def clip_scale(rows: np.ndarray, fmt: IntFormat, method: WeightRange) -> np.ndarray:
    """Per-row symmetric scale, float32.

    minmax: s = max|w| / Q.  mse: s = alpha * max|w| / Q with alpha in CLIP_GRID minimising
    sum_i (w_i - s * clip(round(w_i / s), -Q, Q))^2 for each row independently.
    """
    amax = np.abs(rows).max(axis=1).astype(np.float32)
    amax[amax == 0] = 1.0
    base: np.ndarray = amax / np.float32(fmt.qmax)
    if method == WeightRange.MINMAX:
        return base.astype(np.float32)
    best_err = np.full(rows.shape[0], np.inf)
    best = base.copy()
    for alpha in CLIP_GRID:
        scale = (base * np.float32(alpha)).astype(np.float32)
        codes = np.clip(np.rint(rows / scale[:, None]), fmt.qmin, fmt.qmax)
        err = np.square(codes * scale[:, None] - rows).sum(axis=1)
        better = err < best_err
        best_err[better] = err[better]
        best[better] = scale[better]
    return best


def round_nearest(weight: np.ndarray, axis: int, fmt: IntFormat,
                  method: WeightRange = WeightRange.MINMAX, name: str = "weight") -> QuantizedWeight:
    """Round-to-nearest per-channel quantization of `weight` (see the module docstring)."""
    weight = np.asarray(weight, dtype=np.float32)
    if not np.isfinite(weight).all():
        bad = int((~np.isfinite(weight)).sum())
        raise OnnxmpqError(f"weight {name!r} holds {bad} NaN or Inf values.",
                           "fix the exported model; a non-finite weight cannot be quantized.")
    rows = per_channel(weight, axis)
    scale = clip_scale(rows, fmt, method)
    codes = np.clip(np.rint(rows / scale[:, None]), fmt.qmin, fmt.qmax)
    moved = np.moveaxis(weight, axis, 0).shape
    codes = np.moveaxis(codes.reshape(moved), 0, axis).astype(fmt.numpy_dtype)
    return QuantizedWeight(codes, scale, axis, fmt)
