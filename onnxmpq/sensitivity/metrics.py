"""Sensitivity metrics: pure numpy functions, each returning a degradation (larger = more damage).

Network outputs are compared as rows of scores: an output y of shape (N, ..., C) is seen as rows
y.reshape(-1, C), one prediction per image (classifiers) or per time step (sequence models such as
the CTC output of PP-OCR). A model with several outputs is scored on each and the scores are summed
(`aggregate`), so every output counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EPS = 1e-12


def rows(y: np.ndarray) -> np.ndarray:
    """(N, ..., C) -> (rows, C) in float64; a 1-D output is one row per sample."""
    y = np.asarray(y, dtype=np.float64)
    return y.reshape(-1, 1) if y.ndim == 1 else y.reshape(-1, y.shape[-1])


def probabilities(y: np.ndarray) -> np.ndarray:
    """Rows of class probabilities: y itself when its rows already are distributions, else softmax(y)."""
    y = rows(y)
    if y.min() >= 0 and np.allclose(y.sum(axis=1), 1.0, atol=1e-3):
        return y
    e = np.exp(y - y.max(axis=1, keepdims=True))
    p: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return p


def noise_to_signal(y_ref: np.ndarray, y: np.ndarray) -> float:
    """The `sqnr` metric (Pandey et al. 2023, AIMET AMP), as a degradation.

    NSR = sum (y_ref - y)^2 / sum y_ref^2, the inverse of the network output's SQNR
    (SQNR_dB = -10 log10 NSR). Linear rather than in dB so that independent layers' noise powers add,
    which is what an additive allocator assumes.
    """
    y_ref, y = rows(y_ref), rows(y)
    return float(np.sum((y_ref - y) ** 2) / max(np.sum(y_ref ** 2), EPS))


def log_probabilities(y: np.ndarray) -> np.ndarray:
    """log of `probabilities(y)`, computed as log-softmax for scores (exact for large logit gaps)."""
    y = rows(y)
    log_p: np.ndarray
    if y.min() >= 0 and np.allclose(y.sum(axis=1), 1.0, atol=1e-3):
        log_p = np.log(np.maximum(y, EPS))
        return log_p
    shifted = y - y.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return log_p


def kl_divergence(y_ref: np.ndarray, y: np.ndarray) -> float:
    """The `kl` metric: mean over rows of KL(p_ref || p) = sum_c p_ref,c log(p_ref,c / p_c), with p the
    softmax of each output row (the float model is the teacher, its soft labels the targets)."""
    log_ref, log_p = log_probabilities(y_ref), log_probabilities(y)
    return float(np.mean(np.sum(np.exp(log_ref) * (log_ref - log_p), axis=1)))


def histogram_entropy(values: np.ndarray, lo: float, hi: float, bins: int = 256) -> float:
    """Shannon entropy (nats) of `values` in `bins` equal bins on [lo, hi] (values outside go to the
    end bins): H = -sum_k p_k log p_k."""
    width = (hi - lo) / bins if hi > lo else 1.0
    idx = np.clip(((np.ravel(values).astype(np.float32) - np.float32(lo)) / np.float32(width)).astype(np.int64), 0, bins - 1)
    counts = np.bincount(idx, minlength=bins).astype(np.float64)
    p = counts / max(counts.sum(), 1.0)
    p = p[p > 0]
    return float(-np.sum(p * np.log(p)))


def entropy_loss(h_float: float, h_quant: float) -> float:
    """The `output-entropy` metric (Qin et al. 2025) as a degradation: |H(y_float) - H(y_quant)|, the
    entropy the layer's output loses (or gains from noise) when that layer alone is quantized, both
    histograms on the float output's bins."""
    return abs(h_float - h_quant)


def weight_entropy(codes: np.ndarray) -> float:
    """Entropy (bits) of a layer's quantized weight codes: H_b = -sum_q p_q log2 p_q over the code values."""
    _, counts = np.unique(np.ravel(codes), return_counts=True)
    p = counts / counts.sum()
    return float(-np.sum(p * np.log2(p)))


def weight_entropy_loss(h_reference: float, h_b: float) -> float:
    """The `weight-entropy` metric (EAGL 2023) as a degradation: H_16 - H_b, the information the weight
    distribution loses at b bits against a 16-bit (near-float) grid; data-free."""
    return max(h_reference - h_b, 0.0)


def mutual_information_binned(z: np.ndarray, labels: np.ndarray, bins: int = 16) -> np.ndarray:
    """I(Z_p; Y) in nats for each column p of z (n, P) and discrete labels (n,), by equal-frequency
    binning of each column: I = sum_{b,y} p(b, y) log(p(b, y) / (p(b) p(y)))."""
    z = np.asarray(z, dtype=np.float64).reshape(len(labels), -1)
    n, cols = z.shape
    edges = np.quantile(z, np.linspace(0, 1, bins + 1)[1:-1], axis=0)           # (bins-1, P)
    zb = (z[None, :, :] > edges[:, None, :]).sum(axis=0)                          # (n, P) bin index
    _, y = np.unique(labels, return_inverse=True)
    classes = int(y.max()) + 1 if n else 1
    flat = (np.arange(cols)[None, :] * bins + zb) * classes + y[:, None]
    joint = np.bincount(flat.ravel(), minlength=cols * bins * classes).reshape(cols, bins, classes) / max(n, 1)
    pz, py = joint.sum(axis=2, keepdims=True), joint.sum(axis=1, keepdims=True)
    ratio = np.where(joint > 0, joint / np.maximum(pz * py, 1e-300), 1.0)
    mi: np.ndarray = np.sum(joint * np.log(ratio), axis=(1, 2))
    return mi


def sliced_mutual_information(features: np.ndarray, labels: np.ndarray, projections: np.ndarray,
                              bins: int = 16) -> float:
    """Sliced MI (Goldfeld and Greenewald): SMI(L; Y) = mean_theta I(theta^T L; Y) over the given unit
    projections theta (rows of `projections`), each 1-D MI by `mutual_information_binned`."""
    flat = np.asarray(features, dtype=np.float64).reshape(len(labels), -1)
    return float(np.mean(mutual_information_binned(flat @ projections.T, labels, bins)))


def mi_drop(smi_reference: Sequence[float], smi_quant: Sequence[float], bits: int) -> float:
    """The `mutual-info` metric (InfoQ 2025): S = (1/b) <|dSMI|>_observers / <SMI_reference>_observers,
    the mean change of sliced MI with the label at the observer layers, normalised by the mean
    reference SMI and divided by the bit-width b (the float model's prediction stands in for the label)."""
    ref, quant = np.asarray(smi_reference, float), np.asarray(smi_quant, float)
    return float(np.mean(np.abs(ref - quant)) / max(np.mean(ref), EPS) / bits)


def aggregate(scores: Sequence[float]) -> float:
    """Several outputs' scores combined: their sum."""
    return float(np.sum(scores))
