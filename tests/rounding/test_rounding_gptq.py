"""Tests of onnxmpq.rounding.gptq: re-fit, clip search, GPTQ codes, one layer, statistics.

Oracles: least squares by `np.linalg.lstsq`, round-to-nearest computed here, the H-weighted error of
every alpha of the clip grid computed here, and onnxruntime for a grouped Conv layer.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from conftest import arr, model, node, vi
from onnx import numpy_helper
from scipy.ndimage import uniform_filter

from onnxmpq.rounding import gptq, round_nearest
from onnxmpq.rounding.gptq import CLIP_GRID, GptqSettings, accumulate, round_layer
from onnxmpq.rounding.linear import view_of
from onnxmpq.write.formats import weight_format

# The functions work on all groups of a layer at once: w (G, R, K), h and c (G, K, K), scales (G, R).
# These wrappers run them on one group.


def refit(w, h, c, damp):
    return gptq.refit(w[None], h[None], c[None], damp)[0]


def clip_scales(w, h, fmt):
    return gptq.clip_scales(w[None], h[None], fmt)[0]


def gptq_codes(w, h, scale, fmt, damp=0.01, block=128):
    return gptq.gptq_codes(w[None], h[None], np.asarray(scale)[None], fmt, damp, block)[0]


def correlated(seed: int, k: int, n: int, rank: int | None = None) -> np.ndarray:
    """(k, n) inputs with strongly correlated rows: a random mix of `rank` sources plus a little noise."""
    rng = np.random.default_rng(seed)
    rank = rank or k // 2
    mix = rng.normal(size=(k, rank))
    x = mix @ rng.normal(size=(rank, n)) + 0.1 * rng.normal(size=(k, n))
    return x * rng.uniform(0.5, 2.0, size=(k, 1))  # unequal column norms so the ordering matters


def rtn(w: np.ndarray, scale: np.ndarray, fmt) -> np.ndarray:
    return np.clip(np.rint(w / scale[:, None].astype(np.float64)), fmt.qmin, fmt.qmax)


def out_err(w, codes, scale, x) -> float:
    return float(np.linalg.norm((w - codes * scale[:, None].astype(np.float64)) @ x))


def h_err(w, codes, scale, h) -> np.ndarray:
    delta = w - codes * scale[:, None].astype(np.float64)
    return np.einsum("rk,kl,rl->r", delta, h, delta)


# --- refit ----------------------------------------------------------------------------------------------


def test_refit_recovers_w_when_inputs_are_equal():
    rng = np.random.default_rng(0)
    w, x = rng.normal(size=(6, 10)), correlated(1, 10, 200, rank=10)
    h = x @ x.T
    np.testing.assert_allclose(refit(w, h, h, 1e-12), w, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refit_is_the_least_squares_fit_to_the_float_output(seed):
    rng = np.random.default_rng(seed)
    w, x_f = rng.normal(size=(5, 12)), correlated(seed, 12, 300, rank=12)
    x_q = x_f + 0.3 * rng.normal(size=x_f.shape)
    h, c = x_q @ x_q.T, x_f @ x_q.T
    w2 = refit(w, h, c, 1e-10)
    # oracle: min_W' ||W X_f - W' X_q||  <=>  X_q^T W'^T ~ X_f^T W^T
    want = np.linalg.lstsq(x_q.T, x_f.T @ w.T, rcond=None)[0].T
    np.testing.assert_allclose(w2, want, rtol=1e-6, atol=1e-8)
    before = np.linalg.norm(w @ x_f - w @ x_q)
    after = np.linalg.norm(w @ x_f - w2 @ x_q)
    assert after < before


def test_refit_undoes_a_systematic_distortion_of_the_inputs():
    """X_q = D X_f + noise (an upstream layer's rounding error is mostly such a map): the re-fit
    W' ~ W D^-1 removes most of the output error that W alone leaves."""
    rng = np.random.default_rng(5)
    w, x_f = rng.normal(size=(6, 10)), correlated(6, 10, 500, rank=10)
    d = np.eye(10) + 0.2 * rng.normal(size=(10, 10))
    x_q = d @ x_f + 0.01 * rng.normal(size=x_f.shape)
    w2 = refit(w, x_q @ x_q.T, x_f @ x_q.T, GptqSettings().refit_damp)
    assert np.linalg.norm(w @ x_f - w2 @ x_q) < 0.2 * np.linalg.norm(w @ x_f - w @ x_q)


def test_refit_at_default_damping_keeps_w_when_inputs_match():
    """With X_q = X_f there is nothing to correct: the re-fit must leave the layer's output as it is, to
    far better than 8-bit rounding does, not shrink W toward zero through the ridge term."""
    rng = np.random.default_rng(9)
    w, x = rng.normal(size=(6, 18)), correlated(10, 18, 400)
    h = x @ x.T
    w2 = refit(w, h, h, GptqSettings().refit_damp)
    fmt = weight_format(8)
    q = round_nearest(w.astype(np.float32), 0, fmt).dequantize().astype(np.float64)
    assert np.linalg.norm((w2 - w) @ x) < 0.1 * np.linalg.norm((q - w) @ x)


# --- clip_scales ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_clip_scales_beat_every_single_alpha(bits, seed):
    fmt = weight_format(bits)
    rng = np.random.default_rng(seed)
    w = rng.laplace(size=(8, 24))
    x = correlated(seed + 10, 24, 400)
    h = x @ x.T
    scale = clip_scales(w, h, fmt)
    assert scale.dtype == np.float32 and scale.shape == (8,) and np.all(scale > 0)
    best = h_err(w, rtn(w, scale, fmt), scale, h)
    amax = np.abs(w).max(axis=1)
    for alpha in CLIP_GRID:
        s = (alpha * amax / fmt.qmax).astype(np.float32)
        err = h_err(w, rtn(w, s, fmt), s, h)
        assert np.all(best <= err * (1 + 1e-9) + 1e-12), alpha
    # the minimum over the grid is reached (the scale is one of the grid's)
    ratio = scale.astype(np.float64) * fmt.qmax / amax
    assert np.all(ratio <= 1 + 1e-6) and np.all(ratio >= CLIP_GRID.min() - 1e-6)


def test_clip_scales_with_diagonal_h_for_large_layers(monkeypatch):
    """Above FULL_H_CLIP_LIMIT only diag(H) weighs the error: best among alphas for that error."""
    monkeypatch.setattr(gptq, "FULL_H_CLIP_LIMIT", 0)
    fmt = weight_format(3)
    rng = np.random.default_rng(4)
    w, x = rng.normal(size=(6, 16)), correlated(5, 16, 200)
    h = x @ x.T
    d = np.diag(np.diag(h))
    scale = clip_scales(w, h, fmt)
    best = h_err(w, rtn(w, scale, fmt), scale, d)
    amax = np.abs(w).max(axis=1)
    for alpha in CLIP_GRID:
        s = (alpha * amax / fmt.qmax).astype(np.float32)
        assert np.all(best <= h_err(w, rtn(w, s, fmt), s, d) * (1 + 1e-9) + 1e-12)


def test_clip_scales_of_a_zero_row_is_finite():
    fmt = weight_format(4)
    w = np.zeros((2, 5))
    w[1] = [1, -2, 3, 0.5, 0]
    scale = clip_scales(w, np.eye(5), fmt)
    assert np.all(np.isfinite(scale)) and np.all(scale > 0)


# --- gptq_codes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_codes_lie_on_the_grid(bits):
    fmt = weight_format(bits)
    rng = np.random.default_rng(bits)
    w = rng.normal(size=(10, 40))
    x = correlated(bits, 40, 300)
    h = x @ x.T
    scale = clip_scales(w, h, fmt)
    codes = gptq_codes(w, h, scale, fmt, block=16)
    assert codes.shape == w.shape
    np.testing.assert_array_equal(codes, np.rint(codes))
    assert codes.min() >= fmt.qmin and codes.max() <= fmt.qmax


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_output_error_is_smaller_than_round_to_nearest(bits):
    fmt = weight_format(bits)
    ratios = []
    for seed in range(4):
        rng = np.random.default_rng(100 + seed)
        w = rng.normal(size=(16, 48))
        x = correlated(200 + seed, 48, 1000)
        h = x @ x.T
        scale = (np.abs(w).max(axis=1) / fmt.qmax).astype(np.float32)  # the same scales for both
        g = out_err(w, gptq_codes(w, h, scale, fmt, block=32), scale, x)
        r = out_err(w, rtn(w, scale, fmt), scale, x)
        ratios.append(g / r)
    assert np.mean(ratios) < 0.8, ratios
    assert max(ratios) < 1.0, ratios


@pytest.mark.parametrize("block", [1, 7, 128])
def test_gptq_codes_do_not_depend_on_the_block_size(block):
    """Lazy batch updates are an implementation detail: the same codes as one column at a time."""
    fmt = weight_format(4)
    rng = np.random.default_rng(7)
    w = rng.normal(size=(6, 30))
    x = correlated(8, 30, 300)
    h = x @ x.T
    scale = clip_scales(w, h, fmt)
    np.testing.assert_array_equal(gptq_codes(w, h, scale, fmt, block=block), gptq_codes(w, h, scale, fmt, block=30))


def gptq_reference(w, h, scale, fmt, damp):
    """Textbook GPTQ (Frantar et al. 2022, Alg. 1 without lazy batches), in the order of decreasing diag(H)."""
    w = w.astype(np.float64).copy()
    order = np.argsort(-np.diag(h), kind="stable")
    w, h = w[:, order], h[order][:, order]
    h = h + damp * np.mean(np.diag(h)) * np.eye(len(h))
    hinv = np.linalg.inv(h)
    codes = np.zeros_like(w)
    for j in range(w.shape[1]):
        q = np.clip(np.rint(w[:, j] / scale), fmt.qmin, fmt.qmax)
        codes[:, j] = q
        err = (w[:, j] - q * scale) / hinv[j, j]
        w[:, j + 1:] -= np.outer(err, hinv[j, j + 1:])
        # H^-1 of the remaining columns: Schur complement of the eliminated one
        hinv = hinv - np.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return codes[:, np.argsort(order)]


def test_gptq_codes_match_the_textbook_algorithm():
    fmt = weight_format(3)
    rng = np.random.default_rng(11)
    w = rng.normal(size=(5, 20))
    x = correlated(12, 20, 200)
    h = x @ x.T
    scale = clip_scales(w, h, fmt).astype(np.float64)
    got = gptq_codes(w, h, scale, fmt, damp=0.01, block=8)
    want = gptq_reference(w, h, scale, fmt, 0.01)
    assert np.mean(got == want) > 0.99  # ties at .5 may break differently under rounding noise


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_with_identity_h_is_round_to_nearest(bits):
    fmt = weight_format(bits)
    rng = np.random.default_rng(20 + bits)
    w = rng.normal(size=(7, 33))
    scale = (np.abs(w).max(axis=1) * 0.7 / fmt.qmax).astype(np.float32)  # clipping active
    codes = gptq_codes(w, np.eye(33), scale, fmt, block=8)
    np.testing.assert_array_equal(codes, rtn(w, scale, fmt))


def test_gptq_with_dead_inputs():
    """Zero rows of X give zero rows/columns of H: codes stay finite and on the grid, and the live part
    is still better than round-to-nearest."""
    fmt = weight_format(3)
    rng = np.random.default_rng(30)
    w = rng.normal(size=(8, 24))
    x = correlated(31, 24, 500)
    dead = [0, 5, 6, 23]
    x[dead] = 0.0
    h = x @ x.T
    scale = clip_scales(w, h, fmt)
    assert np.all(np.isfinite(scale))
    codes = gptq_codes(w, h, scale, fmt, block=8)
    assert np.all(np.isfinite(codes)) and codes.min() >= fmt.qmin and codes.max() <= fmt.qmax
    np.testing.assert_array_equal(codes, np.rint(codes))
    assert out_err(w, codes, scale, x) < out_err(w, rtn(w, scale, fmt), scale, x)
    # the re-fit with dead inputs stays finite too (what it gives the dead inputs does not matter)
    assert np.all(np.isfinite(refit(w, h, h, 0.01)))


def test_gptq_with_all_inputs_dead():
    fmt = weight_format(4)
    w = np.random.default_rng(32).normal(size=(3, 6))
    h = np.zeros((6, 6))
    scale = clip_scales(w, h, fmt)
    codes = gptq_codes(w, h, scale, fmt)
    assert np.all(np.isfinite(codes)) and codes.min() >= fmt.qmin and codes.max() <= fmt.qmax
    assert np.all(np.isfinite(refit(w, h, h, 0.01)))


def test_groups_are_independent():
    """All groups at once give what each group gives alone, dead inputs in one group included."""
    fmt = weight_format(3)
    rng = np.random.default_rng(33)
    w = rng.normal(size=(3, 5, 16))
    xs = [correlated(34 + g, 16, 200) for g in range(3)]
    xs[1][[2, 9]] = 0.0
    xs[2] *= 50.0  # very different scales per group
    h = np.stack([x @ x.T for x in xs])
    c = np.stack([(x + 0.1) @ x.T for x in xs])
    np.testing.assert_allclose(gptq.refit(w, h, c, 0.01), np.stack([refit(w[g], h[g], c[g], 0.01) for g in range(3)]),
                               rtol=1e-9, atol=1e-12)
    scale = gptq.clip_scales(w, h, fmt)
    assert scale.shape == (3, 5)
    np.testing.assert_array_equal(scale, np.stack([clip_scales(w[g], h[g], fmt) for g in range(3)]))
    codes = gptq.gptq_codes(w, h, scale, fmt, block=4)
    np.testing.assert_array_equal(codes, np.stack([gptq_codes(w[g], h[g], scale[g], fmt, block=4) for g in range(3)]))


# --- accumulate and round_layer ----------------------------------------------------------------------------


def grouped_conv():
    """x(N,4,7,7) -Conv(6, group 2, 3x3, stride 2, pads 1)- y."""
    w = arr(40, 6, 2, 3, 3, scale=0.4)
    n = node("Conv", ["x", "W"], ["y"], "grouped", group=2, strides=[2, 2], pads=[1, 1, 1, 1])
    return n, w, model([n], [vi("x", ["N", 4, 7, 7])], [vi("y", None)], {"W": w})


def conv_input(seed, n):
    """(n, 4, 7, 7) inputs that are spatially smooth and correlated across channels, as feature maps
    are: neighbouring im2col rows correlate, which is where GPTQ's compensation pays."""
    rng = np.random.default_rng(seed)
    x = uniform_filter(rng.normal(size=(n, 4, 9, 9)), size=(1, 1, 3, 3))[:, :, 1:-1, 1:-1] * 3
    mix = np.array([[1, .8, 0, 0], [.8, 1, 0, 0], [0, 0, 1, .7], [0, 0, -.7, 1]])
    x = np.einsum("ij,njhw->nihw", mix, x) + 0.1 * rng.normal(size=(n, 4, 7, 7))
    return x.astype(np.float32)


def test_accumulate_sums_over_batches_of_any_size():
    n, w, _ = grouped_conv()
    view = view_of(n, w.shape)
    xf = conv_input(0, 11)
    xq = (xf + 0.1 * np.random.default_rng(1).normal(size=xf.shape)).astype(np.float32)
    cuts = [0, 3, 4, 11]
    hs, cs = accumulate(view, ((xf[a:b], xq[a:b]) for a, b in zip(cuts, cuts[1:])))
    assert hs.shape == cs.shape == (2, 18, 18)
    for h, c, f, q in zip(hs, cs, view.columns(xf), view.columns(xq)):
        f, q = f.astype(np.float64), q.astype(np.float64)
        np.testing.assert_allclose(h, q @ q.T, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(c, f @ q.T, rtol=1e-5, atol=1e-4)


def test_accumulate_in_chunks_gives_the_same_sums(monkeypatch):
    n, w, _ = grouped_conv()
    view = view_of(n, w.shape)
    x = conv_input(5, 7)
    whole = accumulate(view, [(x, x)])
    monkeypatch.setattr(gptq, "COLUMN_BUDGET", 1)  # one sample at a time
    chunked = accumulate(view, [(x, x)])
    for a, b in zip(whole, chunked):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_accumulate_with_a_stride_sums_every_strided_column_starting_one_further_per_chunk(monkeypatch):
    n, w, _ = grouped_conv()
    view = view_of(n, w.shape)
    xf = conv_input(2, 5)
    xq = (xf + 0.1 * np.random.default_rng(3).normal(size=xf.shape)).astype(np.float32)
    monkeypatch.setattr(gptq, "COLUMN_BUDGET", 1)  # one sample per chunk
    hs, cs = accumulate(view, [(xf, xq)], stride=3)
    want_h, want_c = np.zeros_like(hs), np.zeros_like(cs)
    for i in range(len(xf)):
        f, q = view.columns(xf[i:i + 1])[:, :, i % 3::3], view.columns(xq[i:i + 1])[:, :, i % 3::3]
        want_h += q.astype(np.float64) @ np.swapaxes(q, 1, 2)
        want_c += f.astype(np.float64) @ np.swapaxes(q, 1, 2)
    np.testing.assert_allclose(hs, want_h, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(cs, want_c, rtol=1e-5, atol=1e-4)
    full = accumulate(view, [(xf, xq)])[0]
    assert not np.allclose(hs, full, rtol=0.1)  # a third of the columns, not all of them


def test_column_stride_keeps_about_the_asked_columns_per_row_of_h():
    n, w, _ = grouped_conv()
    view = view_of(n, w.shape)  # K = 2 * 3 * 3 = 18 per group; 16 columns per sample (4x4 outputs)
    assert gptq.column_stride(view, (1, 4, 7, 7), 100, None) == 1
    assert gptq.column_stride(view, (1, 4, 7, 7), 100, 10) == 1600 // 180
    assert gptq.column_stride(view, (1, 4, 7, 7), 5, 10) == 1


def run(proto, x):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def with_weight(proto, w):
    copy = type(proto)()
    copy.CopyFrom(proto)
    copy.graph.initializer[0].CopyFrom(numpy_helper.from_array(w.astype(np.float32), "W"))
    return copy


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_round_layer_on_grouped_conv(bits):
    n, w, proto = grouped_conv()
    view = view_of(n, w.shape)
    fmt = weight_format(bits)
    calib = conv_input(2, 32)
    stats = accumulate(view, [(calib[:20], calib[:20]), (calib[20:], calib[20:])])
    q = round_layer(w, view, stats, fmt, 0, GptqSettings())
    assert q.codes.shape == w.shape and q.codes.dtype == np.dtype(fmt.numpy_dtype)
    assert q.scale.shape == (6,) and q.scale.dtype == np.float32 and q.axis == 0 and q.fmt == fmt
    assert q.codes.min() >= fmt.qmin and q.codes.max() <= fmt.qmax
    deq = q.dequantize()
    nearest = round_nearest(w, 0, fmt).dequantize()
    # GPTQ trades weight error for output error, but only a little of it
    assert np.linalg.norm(deq - w) < 1.5 * np.linalg.norm(nearest - w)
    # the layer's output on the calibration data: closer than round-to-nearest at low widths
    y = run(proto, calib)
    err_g = np.linalg.norm(run(with_weight(proto, deq), calib) - y)
    err_n = np.linalg.norm(run(with_weight(proto, nearest), calib) - y)
    if bits <= 4:
        assert err_g < err_n
    else:
        assert err_g < 1.2 * err_n
    # and on held-out data from the same distribution
    held = conv_input(3, 16)
    y = run(proto, held)
    if bits <= 4:
        err_g = np.linalg.norm(run(with_weight(proto, deq), held) - y)
        assert err_g < np.linalg.norm(run(with_weight(proto, nearest), held) - y)


def test_round_layer_keeps_the_groups_in_place():
    """Each group's codes come from that group's own statistics: scaling group 1's inputs by 100 leaves
    group 0's codes as they were."""
    n, w, _ = grouped_conv()
    view = view_of(n, w.shape)
    fmt = weight_format(4)
    x = conv_input(4, 16)
    a = round_layer(w, view, accumulate(view, [(x, x)]), fmt, 0, GptqSettings(refit=False))
    x2 = x.copy()
    x2[:, 2:] *= 100
    b = round_layer(w, view, accumulate(view, [(x2, x2)]), fmt, 0, GptqSettings(refit=False))
    np.testing.assert_array_equal(a.codes[:3], b.codes[:3])
    np.testing.assert_array_equal(a.scale[:3], b.scale[:3])


def test_round_layer_gemm_scales_follow_the_channel_axis():
    """Gemm with transB=0: weight (K, N), per-channel on axis 1; codes in the weight's own layout."""
    fmt = weight_format(4)
    rng = np.random.default_rng(50)
    w = rng.normal(size=(12, 5)).astype(np.float32)
    n = node("Gemm", ["x", "W"], ["y"], "g")
    view = view_of(n, w.shape)
    x = correlated(51, 12, 300).T.astype(np.float32)  # (batch, K)
    q = round_layer(w, view, accumulate(view, [(x, x)]), fmt, 1, GptqSettings())
    assert q.codes.shape == (12, 5) and q.scale.shape == (5,) and q.axis == 1
    rel = np.linalg.norm(x @ q.dequantize() - x @ w) / np.linalg.norm(x @ w)
    rel_n = np.linalg.norm(x @ round_nearest(w, 1, fmt).dequantize() - x @ w) / np.linalg.norm(x @ w)
    assert rel < rel_n
