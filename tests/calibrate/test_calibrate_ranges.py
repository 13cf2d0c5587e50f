"""Tests of onnxmpq.calibrate.ranges: streaming histogram, range choice, asymmetric activation params."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from onnxmpq.calibrate.ranges import BINS, Histogram, act_params, choose_range
from onnxmpq.errors import OnnxmpqError
from onnxmpq.types import ActRange
from onnxmpq.write.formats import act_format


def widening_chunks(seed=0, n=4000):
    """Five chunks, each reaching further out than the previous ones (both sides, then the right only)."""
    rng = np.random.default_rng(seed)
    chunks = [rng.normal(loc=0.3 * k, scale=1.0 + k, size=n) for k in range(4)]
    chunks.append(rng.uniform(0.0, 25.0, size=n))
    return [c.astype(np.float32) for c in chunks]


def streamed(chunks, name="t"):
    hist = Histogram(name)
    for chunk in chunks:
        hist.update(chunk)
    return hist.stats()


def fake_quant(x, lo, hi, bits):
    """x through an asymmetric unsigned quantizer for [lo, hi], by the textbook formula."""
    p = act_params(lo, hi, act_format(bits))
    q = np.clip(np.rint(x / p.scale) + p.zero_point, 0, 2**bits - 1)
    return (q - p.zero_point) * p.scale


# --- histogram ------------------------------------------------------------------------------------


def test_streamed_histogram_has_exact_min_max_and_count():
    chunks = widening_chunks()
    data = np.concatenate(chunks)
    stats = streamed(chunks)
    assert stats.min == float(data.min()) and stats.max == float(data.max())
    assert stats.count == data.size
    assert stats.hist.sum() == pytest.approx(data.size)
    assert stats.hist.shape == (BINS,) and stats.edges.shape == (BINS + 1,)
    assert stats.edges[0] <= data.min() and stats.edges[-1] >= data.max()
    assert np.all(np.diff(stats.edges) > 0)


@pytest.mark.parametrize("p", [90.0, 99.0, 99.9])
def test_streamed_percentiles_are_close_to_numpy(p):
    chunks = widening_chunks(seed=int(p))
    data = np.concatenate(chunks).astype(np.float64)
    stats = streamed(chunks)
    width = stats.edges[1] - stats.edges[0]
    lo, hi = choose_range(stats, act_format(8), ActRange.PERCENTILE, p)
    for got, q in ((lo, 100 - p), (hi, p)):
        # re-binning moves a count by under half an old bin each time, and the answer is a bin edge;
        # where the data are sparse the neighbouring order statistics are allowed as well
        sparse = np.percentile(data, min(q + 0.05, 100)) - np.percentile(data, max(q - 0.05, 0))
        assert abs(got - np.percentile(data, q)) <= 4 * width + sparse, (q, got)


def test_single_chunk_histogram_equals_numpy_histogram():
    data = np.random.default_rng(3).laplace(size=10000).astype(np.float32)
    stats = streamed([data])
    expected, edges = np.histogram(data, bins=BINS, range=(float(data.min()), float(data.max())))
    np.testing.assert_array_equal(stats.hist, expected)
    np.testing.assert_allclose(stats.edges, edges)


@pytest.mark.parametrize("value", [0.0, 2.0, -1000.0])
def test_constant_first_chunk_then_wider_data(value):
    stats = streamed([np.full(100, value, np.float32), np.linspace(-1, 5, 300, dtype=np.float32)])
    assert (stats.min, stats.max, stats.count) == (min(value, -1.0), 5.0, 400)
    assert stats.hist.sum() == pytest.approx(400)
    # the 100 constant values stay near `value` after re-binning
    centres = 0.5 * (stats.edges[:-1] + stats.edges[1:])
    near = stats.hist[np.abs(centres - value) <= 2 * (stats.edges[1] - stats.edges[0])].sum()
    assert near >= 100


def test_constant_tensor_gives_usable_stats():
    stats = streamed([np.full(64, 3.0, np.float32)] * 2)
    assert (stats.min, stats.max, stats.count) == (3.0, 3.0, 128)
    lo, hi = choose_range(stats, act_format(8), ActRange.PERCENTILE)
    p = act_params(lo, hi, act_format(8))
    assert abs(fake_quant(np.float32(3.0), lo, hi, 8) - 3.0) <= p.scale / 2


def test_zeros_are_counted():
    relu = np.maximum(np.random.default_rng(4).normal(size=1000), 0).astype(np.float32)
    stats = streamed([relu, np.zeros(10, np.float32)])
    assert stats.zeros == int(np.sum(relu == 0)) + 10
    assert stats.min == 0.0


def test_empty_update_is_ignored_and_no_data_is_a_user_error():
    hist = Histogram("t")
    hist.update(np.array([], np.float32))
    with pytest.raises(OnnxmpqError, match="no calibration"):
        hist.stats()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_are_user_errors(bad):
    hist = Histogram("t")
    hist.update(np.array([0.0, 1.0, 2.0], np.float32))
    with pytest.raises(OnnxmpqError, match="NaN or Inf"):
        hist.update(np.array([1.0, bad], np.float32))


# --- act_params -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("lo, hi", [(-1.0, 3.0), (-5.0, 0.5), (-0.01, 100.0), (-2.0, 2.0), (-7.3, 1e-3)])
def test_act_params_map_lo_and_hi_to_grid_ends_and_zero_exactly(bits, lo, hi):
    qmax = 2**bits - 1
    p = act_params(lo, hi, act_format(bits))
    assert isinstance(p.zero_point, int) and 0 <= p.zero_point <= qmax
    assert p.scale == pytest.approx((hi - lo) / qmax, rel=1e-6)
    assert abs(lo / p.scale + p.zero_point - 0) <= 1
    assert abs(hi / p.scale + p.zero_point - qmax) <= 1
    # zero is a grid point: quantize(0) = zero_point, which dequantizes to exactly 0
    assert fake_quant(np.zeros(1), lo, hi, bits)[0] == 0.0
    assert np.float32(p.scale) == p.scale


def test_act_params_extend_the_range_to_include_zero():
    positive = act_params(2.0, 5.0, act_format(8))
    assert positive.zero_point == 0 and positive.scale == pytest.approx(5.0 / 255, rel=1e-6)
    negative = act_params(-4.0, -1.0, act_format(8))
    assert negative.zero_point == 255 and negative.scale == pytest.approx(4.0 / 255, rel=1e-6)


def test_act_params_of_an_all_zero_tensor_are_finite():
    p = act_params(0.0, 0.0, act_format(8))
    assert np.isfinite(p.scale) and p.scale > 0 and p.zero_point == 0


# --- choose_range ---------------------------------------------------------------------------------


def heavy_tail(seed=0):
    x = np.abs(np.random.default_rng(seed).laplace(size=20000)).astype(np.float32)
    x[:5] = 60.0
    return x


def test_minmax_range_is_exact():
    chunks = widening_chunks(5)
    stats = streamed(chunks)
    data = np.concatenate(chunks)
    assert choose_range(stats, act_format(8), ActRange.MINMAX) == (float(data.min()), float(data.max()))


def test_percentile_of_nonnegative_data_keeps_zero_as_lo():
    stats = streamed([heavy_tail()])
    lo, hi = choose_range(stats, act_format(8), ActRange.PERCENTILE, 99.0)
    assert lo == stats.min  # no low tail is cut from non-negative data; act_params extends it to 0
    assert hi < 60.0 and abs(hi - np.percentile(heavy_tail(), 99)) <= 4 * (stats.edges[1] - stats.edges[0])


@pytest.mark.parametrize("bits", [4, 8])
def test_mse_range_has_no_more_error_than_minmax_on_the_data(bits):
    x = heavy_tail(bits)
    stats = streamed([x])
    lo, hi = choose_range(stats, act_format(bits), ActRange.MSE)
    assert lo == 0.0 and 0.0 < hi <= stats.max
    err = np.sum((fake_quant(x, lo, hi, bits) - x) ** 2)
    err_minmax = np.sum((fake_quant(x, stats.min, stats.max, bits) - x) ** 2)
    assert err <= err_minmax * 1.001
    if bits == 4:
        assert hi < stats.max / 2  # the five outliers are not worth 4-bit resolution


def test_entropy_clips_an_outlier_at_four_bits_but_keeps_the_bulk():
    x = heavy_tail(1)
    stats = streamed([x, np.zeros(5000, np.float32)])
    lo, hi = choose_range(stats, act_format(4), ActRange.ENTROPY)
    assert lo == 0.0
    assert np.percentile(x, 99) <= hi < 30.0


@pytest.mark.parametrize("method", [ActRange.ENTROPY, ActRange.MSE])
def test_sixteen_bits_keeps_the_full_range(method):
    chunks = widening_chunks(6)
    stats = streamed(chunks)
    lo, hi = choose_range(stats, act_format(16), method)
    assert lo == pytest.approx(min(stats.min, 0.0)) and hi == pytest.approx(max(stats.max, 0.0))


def masked_scores(seed=0, rows=64, keys=16):
    """Attention-like logits: N(0, 2) scores with a random tail of each row masked by -10000."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(0.0, 2.0, size=(rows, keys)).astype(np.float32)
    for r, keep in enumerate(rng.integers(2, keys, rows)):
        scores[r, keep:] += -10000.0
    return scores


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_the_logits_floor_is_the_smallest_row_maximum_over_batches():
    scores = masked_scores()
    hist = Histogram("s", floor_axis=-1)
    for part in np.split(scores, 4):
        hist.update(part)
    stats = hist.stats()
    assert stats.floor == pytest.approx(float(scores.max(axis=-1).min()))
    plain = Histogram("s")
    plain.update(scores)
    assert plain.stats().floor is None  # without an axis no floor is kept


@pytest.mark.parametrize("method", list(ActRange))
def test_logits_range_stops_below_the_rows_and_keeps_the_softmax(method):
    """Cut at floor - LOGIT_SPAN, the 8-bit softmax matches float to 1e-2 (uncut: a step of ~40 ruins it)."""
    from onnxmpq.calibrate.ranges import LOGIT_SPAN, cut_logits

    scores = masked_scores(1)
    hist = Histogram("s", floor_axis=-1)
    hist.update(scores)
    stats = hist.stats()
    cut = cut_logits(stats)
    assert cut.min == pytest.approx(stats.floor - LOGIT_SPAN) and cut.max == stats.max
    assert cut.hist.sum() == np.count_nonzero(scores > -1000)  # the masked values are out, the rest in
    lo, hi = choose_range(stats, act_format(8), method)
    assert lo >= stats.floor - LOGIT_SPAN - 1e-3
    np.testing.assert_allclose(softmax(fake_quant(scores, lo, hi, 8)), softmax(scores), atol=2e-2)
    full_lo, full_hi = choose_range(dataclasses.replace(stats, floor=None), act_format(8), ActRange.MINMAX)
    assert np.abs(softmax(fake_quant(scores, full_lo, full_hi, 8)) - softmax(scores)).max() > 0.1
