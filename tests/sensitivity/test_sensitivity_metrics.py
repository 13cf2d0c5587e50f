"""The sensitivity metrics (`onnxmpq.sensitivity.metrics`), each against a hand computation on small arrays.

Expectations are worked out independently of the code under test: closed forms (log(bins), ln 4, a
KL by hand), scipy's `rel_entr`/`softmax`, and a plain-loop plug-in mutual-information estimator that
bins by rank instead of by quantile edges.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.special import rel_entr, softmax

from onnxmpq.sensitivity import metrics as m

# --- independent helpers ----------------------------------------------------------------------------


def plugin_mi(zbins: np.ndarray, labels: np.ndarray) -> float:
    """I(B; Y) in nats of two discrete sequences, by counting pairs in a loop."""
    n = len(labels)
    joint = Counter(zip(zbins.tolist(), labels.tolist()))
    pb, py = Counter(zbins.tolist()), Counter(labels.tolist())
    return sum(c / n * math.log((c / n) / ((pb[b] / n) * (py[y] / n))) for (b, y), c in joint.items())


def rank_bins(column: np.ndarray, bins: int) -> np.ndarray:
    """Equal-frequency bins by rank: the r-th smallest of n values goes to bin floor(r * bins / n)."""
    ranks = np.empty(len(column), dtype=np.int64)
    ranks[np.argsort(column, kind="stable")] = np.arange(len(column))
    return ranks * bins // len(column)


def label_entropy(labels: np.ndarray) -> float:
    counts = np.array(list(Counter(labels.tolist()).values()), dtype=float)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


# --- noise_to_signal --------------------------------------------------------------------------------


def test_nsr_of_known_noise():
    # |y|^2 = 3^2 + 4^2 = 25, |noise|^2 = 0.3^2 + 0.4^2 = 0.25  ->  NSR = 0.01 (SQNR 20 dB)
    assert m.noise_to_signal(np.array([[3.0, 4.0]]), np.array([[3.3, 4.4]])) == pytest.approx(0.01, rel=1e-12)


def test_nsr_sums_over_all_rows_and_ignores_shape():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(2, 3, 5))
    noise = 0.1 * rng.normal(size=y.shape)
    expected = float((noise ** 2).sum() / (y ** 2).sum())
    assert m.noise_to_signal(y, y + noise) == pytest.approx(expected, rel=1e-12)
    assert m.noise_to_signal(y.reshape(6, 5), (y + noise).reshape(6, 5)) == pytest.approx(expected, rel=1e-12)
    assert m.noise_to_signal(y, y) == 0.0


def test_nsr_of_silent_reference_is_finite():
    assert m.noise_to_signal(np.zeros((2, 3)), np.zeros((2, 3))) == 0.0
    assert np.isfinite(m.noise_to_signal(np.zeros((2, 3)), np.ones((2, 3))))


# --- kl_divergence ----------------------------------------------------------------------------------


def test_kl_of_known_distributions():
    p = np.array([[0.5, 0.5], [0.25, 0.75]])
    q = np.array([[0.9, 0.1], [0.5, 0.5]])
    row0 = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    row1 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert m.kl_divergence(p, q) == pytest.approx((row0 + row1) / 2, rel=1e-9)
    assert m.kl_divergence(p, p) == pytest.approx(0.0, abs=1e-12)


def test_kl_of_logits_is_kl_of_their_softmax():
    # logits (0, 0) -> (0.5, 0.5); logits (ln 9, 0) -> (0.9, 0.1): the same pair as above
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    got = m.kl_divergence(np.array([[0.0, 0.0]]), np.array([[math.log(9.0), 0.0]]))
    assert got == pytest.approx(expected, rel=1e-9)
    rng = np.random.default_rng(1)
    z_ref, z = rng.normal(size=(8, 10)) * 2, rng.normal(size=(8, 10)) * 2
    expected = rel_entr(softmax(z_ref, axis=1), softmax(z, axis=1)).sum(axis=1).mean()
    # (the code smooths log p with EPS = 1e-12, so it is exact only to about EPS / min p)
    assert m.kl_divergence(z_ref, z) == pytest.approx(expected, rel=1e-7)
    # softmax is shift-invariant per row, so is the metric
    assert m.kl_divergence(z_ref + 5.0, z - 2.0) == pytest.approx(expected, rel=1e-7)


def test_kl_rows_over_time_steps_are_averaged():
    """A sequence output (N, T, C) is N*T rows: the mean over all of them."""
    rng = np.random.default_rng(2)
    z_ref, z = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 4))
    expected = rel_entr(softmax(z_ref.reshape(6, 4), axis=1), softmax(z.reshape(6, 4), axis=1)).sum(axis=1).mean()
    assert m.kl_divergence(z_ref, z) == pytest.approx(expected, rel=1e-9)


def test_probabilities_keeps_distributions_and_softmaxes_logits():
    p = np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(m.probabilities(p), p)
    z = np.array([[1.0, -2.0, 0.5]])
    np.testing.assert_allclose(m.probabilities(z), softmax(z, axis=1), rtol=1e-12)


@settings(max_examples=30, deadline=None)
@given(arrays(np.float64, (3, 5), elements=st.floats(-5, 5)), arrays(np.float64, (3, 5), elements=st.floats(-5, 5)))
def test_kl_is_nonnegative_and_matches_scipy_on_logits(z_ref, z):
    kl = m.kl_divergence(z_ref, z)
    assert kl >= -1e-12
    p_ref, p = m.probabilities(z_ref), m.probabilities(z)
    assert kl == pytest.approx(rel_entr(p_ref, p).sum(axis=1).mean(), rel=1e-6, abs=1e-9)


# --- histogram entropy ------------------------------------------------------------------------------


@pytest.mark.parametrize("bins", [2, 16, 256])
def test_entropy_of_uniform_histogram_is_log_bins(bins):
    lo, hi = -1.0, 3.0
    centres = lo + (np.arange(bins) + 0.5) * (hi - lo) / bins
    values = np.repeat(centres, 3)  # three values in every bin
    assert m.histogram_entropy(values, lo, hi, bins) == pytest.approx(math.log(bins), rel=1e-12)


def test_entropy_of_one_bin_is_zero_and_of_halves_is_ln2():
    assert m.histogram_entropy(np.full(50, 0.3), 0.0, 1.0, 8) == 0.0
    assert m.histogram_entropy(np.array([0.1, 0.2, 0.7, 0.8]), 0.0, 1.0, 2) == pytest.approx(math.log(2))


def test_entropy_puts_values_outside_the_range_in_the_end_bins():
    # on [0, 1] with 2 bins: -10 -> bin 0; 0.75 and 10 -> bin 1; counts (1, 2)
    expected = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))
    assert m.histogram_entropy(np.array([-10.0, 0.75, 10.0]), 0.0, 1.0, 2) == pytest.approx(expected)
    # the upper end of the range belongs to the last bin
    assert m.histogram_entropy(np.array([0.25, 1.0]), 0.0, 1.0, 2) == pytest.approx(math.log(2))


def test_entropy_loss_is_the_absolute_change():
    assert m.entropy_loss(4.5, 4.0) == pytest.approx(0.5)
    assert m.entropy_loss(4.0, 4.5) == pytest.approx(0.5)
    assert m.entropy_loss(3.0, 3.0) == 0.0


# --- weight entropy ---------------------------------------------------------------------------------


def test_weight_entropy_of_known_codes_in_bits():
    assert m.weight_entropy(np.array([0, 0, 1, 1])) == pytest.approx(1.0)
    assert m.weight_entropy(np.arange(-4, 4).reshape(2, 2, 2)) == pytest.approx(3.0)
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert m.weight_entropy(np.array([5, 5, 5, -1])) == pytest.approx(h)
    assert m.weight_entropy(np.full((3, 3), 7, dtype=np.int8)) == 0.0


def test_weight_entropy_loss_is_clamped_difference():
    assert m.weight_entropy_loss(5.0, 3.25) == pytest.approx(1.75)
    assert m.weight_entropy_loss(3.0, 5.0) == 0.0


# --- mutual information -----------------------------------------------------------------------------


def test_binned_mi_of_independent_variables_is_near_zero():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, size=4000)
    z = rng.normal(size=4000)
    mi = m.mutual_information_binned(z, labels, bins=16)
    assert mi.shape == (1,)
    # the plug-in estimator's bias is about (bins - 1)(classes - 1) / 2n = 0.0056 nats
    assert 0.0 <= mi[0] < 0.02


def test_binned_mi_of_a_deterministic_feature_is_label_entropy():
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(4), 400)
    rng.shuffle(labels)
    z = labels + 0.01 * rng.normal(size=labels.size)  # 16 equal-frequency bins: 4 pure bins per class
    assert m.mutual_information_binned(z, labels, bins=16)[0] == pytest.approx(math.log(4), rel=1e-9)
    unbalanced = np.where(labels == 3, 2, labels)  # classes of 400, 400, 800
    z = unbalanced + 0.01 * rng.normal(size=labels.size)
    assert m.mutual_information_binned(z, unbalanced, bins=16)[0] == pytest.approx(label_entropy(unbalanced), rel=1e-9)


def test_binned_mi_vectorised_over_columns_matches_a_per_column_loop():
    rng = np.random.default_rng(5)
    n, bins = 1600, 16  # n a multiple of bins, no ties: quantile edges and rank bins agree
    labels = rng.integers(0, 5, size=n)
    z = np.stack([rng.normal(size=n), labels + rng.normal(size=n), np.sin(labels) + 0.3 * rng.normal(size=n),
                  -2.0 * labels + 0.05 * rng.normal(size=n)], axis=1)
    got = m.mutual_information_binned(z, labels, bins)
    expected = [plugin_mi(rank_bins(z[:, p], bins), labels) for p in range(z.shape[1])]
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    assert got[0] < 0.03 and min(got[1:]) > 0.3 and max(got) <= label_entropy(labels) + 1e-9


def test_binned_mi_does_not_depend_on_label_values():
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 3, size=800)
    z = labels + rng.normal(size=800)
    renamed = np.array([7, 100, -3])[labels]
    np.testing.assert_allclose(m.mutual_information_binned(z, renamed), m.mutual_information_binned(z, labels))


def test_sliced_mi_is_the_mean_over_projections():
    rng = np.random.default_rng(7)
    n, bins = 1600, 16
    labels = rng.integers(0, 3, size=n)
    features = np.stack([labels + 0.5 * rng.normal(size=n), rng.normal(size=n), rng.normal(size=n)], axis=1)
    theta = rng.normal(size=(4, 3))
    theta /= np.linalg.norm(theta, axis=1, keepdims=True)
    expected = np.mean([plugin_mi(rank_bins(features @ t, bins), labels) for t in theta])
    got = m.sliced_mutual_information(features.reshape(n, 3, 1), labels, theta, bins)  # extra dims flattened
    assert got == pytest.approx(expected, rel=1e-9)


def test_mi_drop_formula():
    # mean |dSMI| = (0.2 + 0.1) / 2 = 0.15; mean reference = 0.6; at 4 bits: 0.15 / 0.6 / 4
    assert m.mi_drop([0.8, 0.4], [0.6, 0.5], 4) == pytest.approx(0.0625)
    assert m.mi_drop([0.8, 0.4], [0.8, 0.4], 2) == 0.0
    assert m.mi_drop([0.5], [0.7], 8) == pytest.approx(0.2 / 0.5 / 8)


def test_aggregate_sums_the_outputs():
    assert m.aggregate([0.25, 0.5, 1.0]) == pytest.approx(1.75)
    assert m.aggregate([]) == 0.0
