"""Tests of onnxmpq.evaluate: top-1, agreement, KL and SQNR against hand-computed values."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import model, node, vi

from onnxmpq.errors import OnnxmpqError
from onnxmpq.types import Batch
from onnxmpq.verify.evaluate import Evaluation, evaluate, probabilities

W = np.array([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [0.0, -1.0, 1.5], [1.0, 1.0, 1.0]], np.float32)
W_NOISY = W + np.array([[0.3, -0.2, 0.1], [0.0, 0.4, -0.5], [0.2, 0.0, 0.3], [-0.4, 0.1, 0.0]], np.float32)


def linear(w, softmax=False, rank3=False):
    """x(N,4) @ w(4,3) -> logits (or probabilities with `softmax`); `rank3`: x(N,2,4) -> y(N,2,3)."""
    nodes = [node("MatMul", ["x", "W"], ["z" if softmax else "y"], "mm")]
    if softmax:
        nodes.append(node("Softmax", ["z"], ["y"], "sm", axis=-1))
    shape_in, shape_out = (["N", 2, 4], ["N", 2, 3]) if rank3 else (["N", 4], ["N", 3])
    return model(nodes, [vi("x", shape_in)], [vi("y", shape_out)], {"W": w})


class Source:
    """A Python data source: `batches(batch_size)` of `Batch`es and `__len__`."""

    def __init__(self, x, labels=None):
        self.x, self.labels = x, labels

    def __len__(self):
        return len(self.x)

    def batches(self, batch_size):
        for i in range(0, len(self.x), batch_size):
            labels = None if self.labels is None else self.labels[i:i + batch_size]
            yield Batch({"x": self.x[i:i + batch_size]}, labels)


def data(n=37, seed=0, rank3=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2, 4) if rank3 else (n, 4)).astype(np.float32)
    labels = rng.integers(0, 3, size=n)
    return x, labels


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("batch_size", [1, 8, 100])
def test_metrics_equal_hand_computed_values(batch_size):
    x, labels = data()
    y = x.astype(np.float64) @ W_NOISY
    y_ref = x.astype(np.float64) @ W
    seen = []
    result = evaluate(linear(W_NOISY), Source(x, labels), linear(W), batch_size=batch_size, on_batch=seen.append)
    assert result.samples == 37 and sum(seen) == 37 and max(seen) <= batch_size
    assert result.top1 == pytest.approx(np.mean(y.argmax(1) == labels))
    assert result.agreement == pytest.approx(np.mean(y.argmax(1) == y_ref.argmax(1)))
    p, p_ref = softmax(y), softmax(y_ref)
    assert result.kl == pytest.approx(np.mean(np.sum(p_ref * np.log(p_ref / p), axis=1)), rel=1e-4)
    sqnr = 10 * np.log10(np.sum(y_ref**2) / np.sum((y_ref - y) ** 2))
    assert result.sqnr_db == pytest.approx(sqnr, rel=1e-4)
    assert 0 < result.agreement < 1  # the perturbation flips some predictions: the test can tell


def test_probability_outputs_are_not_softmaxed_twice():
    x, labels = data(seed=1)
    p = softmax(x.astype(np.float64) @ W_NOISY)
    p_ref = softmax(x.astype(np.float64) @ W)
    result = evaluate(linear(W_NOISY, softmax=True), Source(x, labels), linear(W, softmax=True))
    assert result.kl == pytest.approx(np.mean(np.sum(p_ref * np.log(p_ref / p), axis=1)), rel=1e-3)
    assert result.top1 == pytest.approx(np.mean(p.argmax(1) == labels))


def test_sequence_outputs_score_every_position_and_skip_top1():
    x, labels = data(n=10, seed=2, rank3=True)
    y = x.astype(np.float64) @ W_NOISY
    y_ref = x.astype(np.float64) @ W
    result = evaluate(linear(W_NOISY, rank3=True), Source(x, labels), linear(W, rank3=True), batch_size=4)
    rows, rows_ref = y.reshape(-1, 3), y_ref.reshape(-1, 3)
    assert result.top1 is None
    assert result.agreement == pytest.approx(np.mean(rows.argmax(1) == rows_ref.argmax(1)))
    p, p_ref = softmax(rows), softmax(rows_ref)
    assert result.kl == pytest.approx(np.mean(np.sum(p_ref * np.log(p_ref / p), axis=1)), rel=1e-4)


def test_identical_models_agree_fully_with_infinite_sqnr():
    x, labels = data(seed=3)
    result = evaluate(linear(W), Source(x, labels), linear(W))
    assert result.agreement == 1.0 and result.kl == pytest.approx(0.0, abs=1e-9)
    assert result.sqnr_db == float("inf")
    assert result.to_dict()["sqnr_db"] == 999.0


def test_without_reference_or_labels_only_samples_are_reported():
    x, _ = data(seed=4)
    result = evaluate(linear(W), Source(x))
    assert (result.samples, result.top1, result.agreement, result.kl, result.sqnr_db) == (37, None, None, None, None)
    assert set(result.to_dict()) == {"samples", "time_s"}


def test_empty_source_is_a_user_error():
    with pytest.raises(OnnxmpqError, match="no samples"):
        evaluate(linear(W), Source(np.zeros((0, 4), np.float32)))


def test_reference_with_another_output_shape_is_a_user_error():
    x, _ = data(n=4, seed=5)
    other = model([node("MatMul", ["x", "W"], ["y"], "mm")], [vi("x", ["N", 4])], [vi("y", ["N", 2])],
                  {"W": np.ones((4, 2), np.float32)})
    with pytest.raises(OnnxmpqError, match="shape"):
        evaluate(linear(W), Source(x), other)


def test_probabilities_softmaxes_logits_and_keeps_distributions():
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(probabilities(logits), softmax(logits))
    dist = np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    np.testing.assert_array_equal(probabilities(dist), dist)


def test_evaluation_to_dict_drops_missing_fields():
    e = Evaluation(samples=3, top1=None, agreement=0.5, kl=0.1, sqnr_db=float("nan"), time_s=0.0)
    assert e.to_dict() == {"samples": 3, "agreement": 0.5, "kl": 0.1, "time_s": 0.0}


def test_a_time_major_output_counts_samples_not_time_steps(tmp_path):
    """x (N, 5, 4) -> MatMul -> Transpose -> y (5, N, 6): verification and evaluate count the 37 samples
    fed, not the 5 time steps along the output's first axis."""
    from conftest import arr, model, node, vi

    import onnxmpq

    proto = model([node("MatMul", ["x", "W"], ["m"], "mm"), node("Transpose", ["m"], ["y"], "tr", perm=[1, 0, 2])],
                  [vi("x", ["N", 5, 4])], [vi("y", [5, "N", 6])], {"W": arr(1, 4, 6)})
    onnx.save(proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).normal(size=(37, 5, 4)).astype(np.float32))
    report = onnxmpq.quantize(tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "c.npz", weight_bits=8, act_bits=8)
    assert report.verification["samples"] == 37 // 5 and report.verification["held_out"]  # the held-out fifth
    from onnxmpq.pipeline import api
    assert api.evaluate(tmp_path / "q.onnx", tmp_path / "c.npz", tmp_path / "m.onnx").samples == 37


def test_a_single_score_output_is_scored_as_binary_decisions():
    """A detector's [N, 1] probability has no argmax: agreement was always 1.0 and KL 0, so --max-drop
    could never see a damaged model. Decisions at 0.5 (probabilities) or 0 (logits) instead."""
    from onnxmpq.verify.evaluate import Sums

    ref = np.array([[0.1], [0.4], [0.6], [0.9]])
    same, flipped = Sums(), Sums()
    same.add(ref + 0.05, np.array([0, 0, 1, 1]), ref)
    flipped.add(np.array([[0.1], [0.6], [0.4], [0.9]]), np.array([0, 0, 1, 1]), ref)
    assert same.agree == 4 and same.correct == 4 and 0 < same.kl < 0.1
    assert flipped.agree == 2 and flipped.correct == 2 and flipped.kl > same.kl
    logits = Sums()
    logits.add(np.array([[-2.0], [0.5], [-0.5], [3.0]]), None, np.array([[-1.0], [-0.5], [0.5], [2.0]]))
    assert logits.agree == 2
