"""Evaluate a model on a data source: accuracy against labels, fidelity against a reference model.

All metrics use the first output y, seen as rows of class scores y[n, ..., c] (the last axis holds the
classes, every other position is one prediction: an image, or one time step of a sequence model):

- top1 = mean_n [argmax_c y[n, c] == label_n]            (outputs of shape (N, C) and labelled data)
- agreement = mean_rows [argmax_c y == argmax_c y_ref]   (top-1 agreement with the reference)
- kl = mean_rows sum_c p_ref log(p_ref / p), p = softmax(y) (or y itself when rows already sum to 1)
- sqnr_db = 10 log10(sum y_ref^2 / sum (y_ref - y)^2)    (inf when identical)

A single score per row (last axis of size 1: a detector's probability, a binary logit) has no argmax;
its rows are binary decisions instead, at t = 0.5 for a reference in [0, 1] (probabilities) and t = 0
otherwise (logits), with p = y or sigmoid(y):

- agreement = mean_rows [(y > t) == (y_ref > t)]; top1 = mean_n [(y_n > t) == label_n] (labels 0/1)
- kl = mean_rows KL(Bernoulli(p_ref) || Bernoulli(p))

Sums are streamed batch by batch, so memory holds one batch.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from onnxmpq.errors import OnnxmpqError
from onnxmpq.graph import runtime
from onnxmpq.sensitivity.metrics import log_probabilities, probabilities  # noqa: F401 (part of this API)


@dataclass(frozen=True)
class Evaluation:
    """Results of `evaluate`; fields that do not apply are None."""

    samples: int
    top1: float | None
    agreement: float | None
    kl: float | None
    sqnr_db: float | None
    time_s: float

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["sqnr_db"] is not None and not np.isfinite(out["sqnr_db"]):
            out["sqnr_db"] = None if np.isnan(out["sqnr_db"]) else 999.0
        return {k: v for k, v in out.items() if v is not None or k in ("samples",)}


class Sums:
    """Streamed sums behind the metrics of the module docstring (shared with `verify.judge`)."""

    def __init__(self):
        self.samples = self.correct = self.labelled = 0
        self.rows = self.agree = 0
        self.kl = self.signal = self.noise = 0.0

    def add(self, y: np.ndarray, labels, ref: np.ndarray | None, samples: int | None = None) -> None:
        """One batch: `samples` is its size in the inputs (an output's first axis may be time, as in a
        time-major [T, N, C] head; without it, that axis is counted)."""
        if y.ndim == 0 or y.size == 0:
            raise OnnxmpqError(f"the model's first output has shape {y.shape}: no scores to compare.",
                               "evaluate a model whose first output holds values per sample.")
        self.samples += y.shape[0] if samples is None else samples
        if labels is not None and y.ndim == 2:
            t = 0.5 if y.min() >= 0 and y.max() <= 1 else 0.0
            predicted = (y[:, 0] > t).astype(np.int64) if y.shape[1] == 1 else y.argmax(-1)
            self.correct += int((predicted == labels).sum())
            self.labelled += len(labels)
        if ref is None:
            return
        if ref.shape != y.shape:
            raise OnnxmpqError(f"the model's output shape {y.shape} differs from the reference's {ref.shape}.",
                               "compare a quantized model with the float model it came from.")
        rows_y, rows_r = y.reshape(-1, y.shape[-1]), ref.reshape(-1, ref.shape[-1])
        self.rows += rows_y.shape[0]
        if rows_y.shape[-1] == 1:
            self._add_binary(rows_y[:, 0].astype(np.float64), rows_r[:, 0].astype(np.float64))
        else:
            self.agree += int((rows_y.argmax(-1) == rows_r.argmax(-1)).sum())
            log_p, log_ref = log_probabilities(rows_y), log_probabilities(rows_r)
            self.kl += float(np.sum(np.exp(log_ref) * (log_ref - log_p)))
        self.signal += float(np.sum(rows_r.astype(np.float64) ** 2))
        self.noise += float(np.sum((rows_r.astype(np.float64) - rows_y) ** 2))


    def _add_binary(self, y: np.ndarray, ref: np.ndarray) -> None:
        """Single scores as binary decisions (see the module docstring)."""
        probability = bool(ref.min() >= 0 and ref.max() <= 1)
        t = 0.5 if probability else 0.0
        self.agree += int(((y > t) == (ref > t)).sum())
        p, q = (ref, y) if probability else (1 / (1 + np.exp(-ref)), 1 / (1 + np.exp(-y)))
        p, q = np.clip(p, 1e-12, 1 - 1e-12), np.clip(q, 1e-12, 1 - 1e-12)
        self.kl += float(np.sum(p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))))


def evaluate(model, source, reference=None, *, batch_size: int = 100, threads: int | None = None,
             on_batch=None) -> Evaluation:
    """Runs `model` (a ModelProto or path) over `source`; see the module docstring for the metrics.

    Args:
        model: the model to score.
        source: a `DataSource` (from `calibrate.read`).
        reference: optional model whose outputs are the fidelity reference (usually the float model).
        batch_size: samples per onnxruntime call.
        on_batch: optional callback with the number of samples done in each batch (progress bars).
    """
    start = time.perf_counter()
    sess = runtime.session(model, threads)
    ref_sess = runtime.session(reference, threads) if reference is not None else None
    sums = Sums()
    for batch in source.batches(batch_size):
        feed = dict(batch.inputs)
        y = runtime.run(sess, feed)[0]
        ref = runtime.run(ref_sess, feed)[0] if ref_sess is not None else None
        sums.add(np.asarray(y), batch.labels, ref, batch.size)
        if on_batch:
            on_batch(batch.size)
    if sums.samples == 0:
        raise OnnxmpqError("the evaluation data holds no samples.", "point --data at a non-empty set.")
    return Evaluation(
        samples=sums.samples,
        top1=sums.correct / sums.labelled if sums.labelled else None,
        agreement=sums.agree / sums.rows if sums.rows else None,
        kl=sums.kl / sums.rows if sums.rows else None,
        sqnr_db=(10 * np.log10(sums.signal / sums.noise) if sums.noise > 0 else float("inf")) if sums.rows else None,
        time_s=time.perf_counter() - start,
    )
