"""Tests of onnxmpq.rounding: per-channel round-to-nearest with min/max or MSE clip search."""

from __future__ import annotations

import numpy as np
import pytest

from onnxmpq.errors import OnnxmpqError
from onnxmpq.rounding import CLIP_GRID, per_channel, round_nearest
from onnxmpq.types import WeightRange
from onnxmpq.write.formats import weight_format

BITS = [2, 3, 4, 5, 6, 8, 16]


def sq_error(rows: np.ndarray, scale: np.ndarray, qmax: int) -> np.ndarray:
    """Per-row sum of squared errors of symmetric rounding at `scale`, in float64."""
    rows = rows.astype(np.float64)
    scale = scale.astype(np.float64)[:, None]
    codes = np.clip(np.rint(rows / scale), -qmax, qmax)
    return np.square(codes * scale - rows).sum(axis=1)


def weights(kind: str, seed: int, shape=(16, 4, 3, 3)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=shape) if kind == "gauss" else rng.laplace(size=shape)
    return w.astype(np.float32)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("method", list(WeightRange))
def test_codes_on_grid_and_dequantize_is_codes_times_scale(bits, method):
    w = weights("gauss", bits)
    fmt = weight_format(bits)
    q = round_nearest(w, 0, fmt, method)
    assert q.codes.shape == w.shape and q.codes.dtype == np.dtype(fmt.numpy_dtype)
    assert q.scale.shape == (16,) and q.scale.dtype == np.float32 and np.all(q.scale > 0)
    assert q.codes.min() >= -(2 ** (bits - 1) - 1) and q.codes.max() <= 2 ** (bits - 1) - 1
    assert q.axis == 0 and q.fmt == fmt
    np.testing.assert_array_equal(q.dequantize(), q.codes.astype(np.float32) * q.scale[:, None, None, None])
    # each code is the nearest grid point to w / s, clipped
    ratio = w.astype(np.float64) / q.scale[:, None, None, None]
    target = np.clip(ratio, fmt.qmin, fmt.qmax)
    assert np.all(np.abs(q.codes - target) <= 0.5 + 1e-6 * np.abs(ratio))  # slack: float32 division


@pytest.mark.parametrize("bits", BITS)
def test_minmax_scale_is_max_abs_over_qmax(bits):
    w = weights("laplace", bits)
    q = round_nearest(w, 0, weight_format(bits), WeightRange.MINMAX)
    qmax = 2 ** (bits - 1) - 1
    amax = np.abs(w).reshape(16, -1).max(axis=1)
    np.testing.assert_allclose(q.scale, amax / qmax, rtol=1e-6)
    # the largest weight of each channel lands on the edge of the grid
    assert np.all(np.abs(q.codes).reshape(16, -1).max(axis=1) == qmax)


@pytest.mark.parametrize("kind", ["gauss", "laplace"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mse_scale_error_is_at_most_minmax_error(kind, bits, seed):
    w = weights(kind, 100 * bits + seed)
    fmt = weight_format(bits)
    rows = per_channel(w, 0)
    mse = round_nearest(w, 0, fmt, WeightRange.MSE)
    minmax = round_nearest(w, 0, fmt, WeightRange.MINMAX)
    err_mse, err_minmax = sq_error(rows, mse.scale, fmt.qmax), sq_error(rows, minmax.scale, fmt.qmax)
    assert np.all(err_mse <= err_minmax * (1 + 1e-5) + 1e-12)
    # and it is the best of the searched grid, row by row
    base = np.abs(rows).max(axis=1) / fmt.qmax
    grid = np.stack([sq_error(rows, (base * np.float32(a)).astype(np.float32), fmt.qmax) for a in CLIP_GRID])
    assert np.all(err_mse <= grid.min(axis=0) * (1 + 1e-5) + 1e-12)
    if bits <= 4:  # at low widths clipping pays off on heavy tails: strictly better on most channels
        assert np.mean(err_mse < err_minmax) > 0.5


def test_mse_clips_an_outlier_at_low_width():
    rng = np.random.default_rng(0)
    row = rng.normal(size=(1, 512)).astype(np.float32)
    row[0, 0] = 40.0
    q = round_nearest(row, 0, weight_format(4), WeightRange.MSE)
    assert q.scale[0] < 40.0 / 7


def test_channels_of_different_magnitude_get_their_own_scales():
    base = weights("gauss", 7, shape=(3, 8, 3, 3))
    w = base * np.array([1e-3, 1.0, 1e3], np.float32)[:, None, None, None]
    for method in WeightRange:
        q = round_nearest(w, 0, weight_format(8), method)
        ratios = q.scale[1:] / q.scale[:-1]
        assert np.all(ratios > 100) and np.all(ratios < 1e4)
        # relative error of every channel is small, whatever its magnitude
        rel = np.linalg.norm((q.dequantize() - w).reshape(3, -1), axis=1) / np.linalg.norm(w.reshape(3, -1), axis=1)
        assert np.all(rel < 0.02)


@pytest.mark.parametrize("axis", [0, 1, 3])
def test_scales_live_along_the_given_axis(axis):
    w = weights("gauss", 3, shape=(4, 5, 2, 6))
    mult = np.arange(1, w.shape[axis] + 1, dtype=np.float32) ** 2
    shape = [1] * 4
    shape[axis] = -1
    w = w * mult.reshape(shape)
    q = round_nearest(w, axis, weight_format(8), WeightRange.MINMAX)
    assert q.scale.shape == (w.shape[axis],)
    amax = np.abs(np.moveaxis(w, axis, 0)).reshape(w.shape[axis], -1).max(axis=1)
    np.testing.assert_allclose(q.scale, amax / 127, rtol=1e-6)
    assert np.max(np.abs(q.dequantize() - w)) <= 0.5 * q.scale.max() * 1.0001


def test_all_zero_channel_has_zero_codes_and_a_finite_scale():
    w = weights("gauss", 4, shape=(3, 2, 1, 1))
    w[1] = 0
    for method in WeightRange:
        q = round_nearest(w, 0, weight_format(4), method)
        assert np.all(np.isfinite(q.scale)) and np.all(q.scale > 0)
        assert not q.codes[1].any()
        assert np.all(q.dequantize()[1] == 0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_user_errors(bad):
    w = weights("gauss", 5, shape=(2, 2))
    w[0, 1] = bad
    with pytest.raises(OnnxmpqError, match="NaN or Inf"):
        round_nearest(w, 0, weight_format(8), name="W")


def test_sixteen_bits_is_nearly_lossless():
    w = weights("laplace", 6)
    q = round_nearest(w, 0, weight_format(16))
    assert np.max(np.abs(q.dequantize() - w)) <= np.abs(w).max() / 32767
