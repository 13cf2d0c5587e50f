"""GPTQ-style rounding with a float-target re-fit: every layer's rounding error is compensated by the
weights not yet rounded, and every layer first absorbs the error of the layers before it.

For each layer with quantized weights, in topological order (G groups, see `linear.LinearView`):

1. Inputs. X_q: the layer's input as the network quantized so far produces it in onnxruntime (earlier
   layers at their rounded codes, activations through their Q/DQ pairs, this layer's own input
   quantizer included); X_f: the float model's input to the layer. Both as im2col columns (K, n).
2. Statistics, accumulated batch by batch (never all columns at once):
   H = sum X_q X_q^T and C = sum X_f X_q^T, both K x K per group, over about columns_per_k * K columns
   (every s-th im2col column when the calibration set gives more: GPTQ's own setting, 128 sequences of
   2048 tokens for K = 4096, is 64 per row of H; a conv's neighbouring columns overlap, and at 64 per
   row the top-1 of W3/W4 ResNet-20/56 is that of all columns within 0.4 points, BENCHMARKS.md).
3. Re-fit (least squares to the float target, regularised toward the float weights):
   W' = argmin ||W X_f - W' X_q||^2 + lambda ||W' - W||^2 = (W C + lambda W)(H + lambda I)^-1,
   with lambda = refit_damp * mean(diag H); W' = W when X_q = X_f.
4. Scales by a clip search on the output error: s_c = alpha_c max|W'_c| / Q, alpha_c in CLIP_GRID
   minimising (W'_c - s_c q_c) H (W'_c - s_c q_c)^T for round-to-nearest codes q_c (diag(H) in place
   of H for very large layers).
5. GPTQ (Frantar et al. 2022): H <- H + delta I with delta = damp * mean(diag H); columns ordered by
   decreasing diag(H); U the upper Cholesky factor of H^-1; for each column j in that order
   q_j = clip(round(w_j / s), -Q, Q), e_j = (w_j - s q_j) / U_jj and w_k <- w_k - e_j U_jk for k > j,
   applied within blocks of `block` columns and to the rest of the matrix once per block.

Parameters (`GptqSettings`): damp = 0.01, refit = True, refit_damp = 0.01, block = 128,
memory_budget = 1 GiB for H and C of one layer, columns_per_k = 64 (None: every column). A layer
whose statistics would not fit the budget, or whose op the method does not cover (batched MatMul
weights, ConvTranspose with groups, output_padding or auto_pad), is rounded to nearest and listed in
`RoundingResult.fallbacks`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from onnxmpq.errors import InternalError
from onnxmpq.rounding import QuantizedWeight
from onnxmpq.rounding.linear import LinearView
from onnxmpq.write.formats import IntFormat

CLIP_GRID = np.linspace(1.0, 0.3, 36)
FULL_H_CLIP_LIMIT = 3e8  # rows * K^2 above which the clip search uses diag(H)


@dataclass(frozen=True)
class GptqSettings:
    """Parameters of the method (see the module docstring)."""

    damp: float = 0.01
    refit: bool = True
    refit_damp: float = 0.01
    block: int = 128
    memory_budget: int = 1 << 30
    columns_per_k: int | None = 64


@dataclass(frozen=True)
class RoundingResult:
    """Rounded weights by layer name, the layers that fell back to nearest (with why), and the time."""

    weights: Mapping[str, QuantizedWeight]
    fallbacks: tuple[tuple[str, str], ...]
    time_s: float


def refit(w: np.ndarray, h: np.ndarray, c: np.ndarray, damp: float) -> np.ndarray:
    """W' = (W C + lambda W)(H + lambda I)^-1 per group, lambda = damp * mean(diag H);
    w (G, R, K), h and c (G, K, K)."""
    lam = damp * np.maximum(np.diagonal(h, axis1=1, axis2=2).mean(axis=1), 1e-12)
    lhs = h + lam[:, None, None] * np.eye(h.shape[1])
    rhs = w @ c + lam[:, None, None] * w
    return np.swapaxes(np.linalg.solve(lhs, np.swapaxes(rhs, 1, 2)), 1, 2)


def clip_scales(w: np.ndarray, h: np.ndarray, fmt: IntFormat) -> np.ndarray:
    """Per-row scales (G, R) minimising the H-weighted error of round-to-nearest (see step 4)."""
    amax = np.abs(w).max(axis=2)
    amax[amax == 0] = 1.0
    use_full = w.size * w.shape[2] <= FULL_H_CLIP_LIMIT
    diag = np.diagonal(h, axis1=1, axis2=2)[:, None, :]
    best_err = np.full(amax.shape, np.inf)
    best: np.ndarray = amax / fmt.qmax
    for alpha in CLIP_GRID:
        scale = (alpha * amax / fmt.qmax).astype(np.float32).astype(np.float64)
        delta = w - np.clip(np.rint(w / scale[..., None]), fmt.qmin, fmt.qmax) * scale[..., None]
        err = np.einsum("grk,grk->gr", delta @ h, delta) if use_full else (delta ** 2 * diag).sum(axis=2)
        better = err < best_err
        best_err[better], best[better] = err[better], scale[better]
    return best.astype(np.float32)


def gptq_codes(w: np.ndarray, h: np.ndarray, scale: np.ndarray, fmt: IntFormat,
               damp: float = 0.01, block: int = 128) -> np.ndarray:
    """Integer codes of w (G, R, K) on `fmt` with GPTQ error propagation (see step 5), all groups at once."""
    w = w.astype(np.float64).copy()
    h = h.astype(np.float64).copy()
    diag = np.diagonal(h, axis1=1, axis2=2).copy()
    dead = diag == 0
    g_idx, k_idx = np.nonzero(dead)
    h[g_idx, k_idx, k_idx] = 1.0
    w[g_idx, :, k_idx] = 0.0
    perm = np.argsort(-np.where(dead, 1.0, diag), axis=1, kind="stable")
    w = np.take_along_axis(w, perm[:, None, :], axis=2)
    h = np.take_along_axis(np.take_along_axis(h, perm[:, :, None], axis=1), perm[:, None, :], axis=2)
    u = _upper_cholesky_of_inverse(h, damp)
    s = scale.astype(np.float64)
    codes = np.zeros_like(w)
    k = w.shape[2]
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err = w[:, :, i1:i2].copy(), np.zeros(w.shape[:2] + (i2 - i1,))
        u1 = u[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            q = np.clip(np.rint(w1[:, :, i] / s), fmt.qmin, fmt.qmax)
            codes[:, :, i1 + i] = q
            e = (w1[:, :, i] - q * s) / u1[:, i, i][:, None]
            w1[:, :, i:] -= e[:, :, None] * u1[:, None, i, i:]
            err[:, :, i] = e
        w[:, :, i2:] -= err @ u[:, i1:i2, i2:]
    return np.take_along_axis(codes, np.argsort(perm, axis=1)[:, None, :], axis=2)


def _upper_cholesky_of_inverse(h: np.ndarray, damp: float) -> np.ndarray:
    """U (G, K, K) with H^-1 = U^T U after damping H; more damping while some H stays singular."""
    mean_diag: np.ndarray = np.diagonal(h, axis1=1, axis2=2).mean(axis=1)[:, None, None]
    eye = np.eye(h.shape[1])
    for factor in (1, 10, 100, 1000):
        try:
            return np.swapaxes(np.linalg.cholesky(np.linalg.inv(h + damp * factor * mean_diag * eye)), 1, 2)
        except np.linalg.LinAlgError:
            continue
    return eye[None] / np.sqrt(np.diagonal(h, axis1=1, axis2=2) + damp * mean_diag[:, :, 0])[:, None, :]


def round_layer(w: np.ndarray, view: LinearView, stats: tuple[np.ndarray, np.ndarray], fmt: IntFormat,
                channel_axis: int, settings: GptqSettings) -> QuantizedWeight:
    """Re-fit, clip search and GPTQ on every group of one layer; codes and scales in the weight's layout."""
    h, c = stats
    mats = view.to_matrices(w.astype(np.float64))
    target = refit(mats, h, c, settings.refit_damp) if settings.refit else mats
    scale = clip_scales(target, h, fmt)
    codes = gptq_codes(target, h, scale, fmt, settings.damp, settings.block)
    full = view.from_matrices(codes).astype(fmt.numpy_dtype)
    return QuantizedWeight(np.ascontiguousarray(full), scale.reshape(-1), channel_axis, fmt)


COLUMN_BUDGET = 1 << 24  # float32 im2col elements per side and chunk (64 MiB)


def accumulate(view: LinearView, batches: Iterable[tuple[np.ndarray, np.ndarray]],
               stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """H = sum X_q X_q^T and C = sum X_f X_q^T, each (G, K, K), over (x_float, x_quant) batches,
    im2col'd a few samples at a time so the columns stay within COLUMN_BUDGET; with `stride` s > 1
    over every s-th column only (the sample's columns in order, starting one further each chunk)."""
    h: np.ndarray | None = None
    c: np.ndarray | None = None
    chunk = 0
    for x_f, x_q in batches:
        x_f, x_q = np.asarray(x_f, np.float32), np.asarray(x_q, np.float32)
        per_sample = view.columns(x_q[:1]).size if x_q.ndim > 1 else x_q.size
        step = max(1, COLUMN_BUDGET // max(per_sample, 1))
        for i in range(0, max(len(x_q), 1), step):
            start = chunk % stride
            cols_q = view.columns(x_q[i:i + step], start, stride)
            cols_f = view.columns(x_f[i:i + step], start, stride)
            chunk += 1
            if h is None or c is None:
                h = np.zeros((cols_q.shape[0], cols_q.shape[1], cols_q.shape[1]))
                c = np.zeros_like(h)
            h += cols_q @ np.swapaxes(cols_q, 1, 2)  # float32 products of a chunk, summed in float64
            c += cols_f @ np.swapaxes(cols_q, 1, 2)
    if h is None or c is None:
        raise InternalError("GPTQ statistics asked of no batches (the calibration data is checked non-empty)")
    return h, c


def column_stride(view: LinearView, input_shape: tuple[int, ...], samples: int, columns_per_k: int | None) -> int:
    """The `accumulate` stride that keeps about columns_per_k * K columns of `samples` samples (1: all)."""
    if columns_per_k is None:
        return 1
    per_sample = view.columns(np.zeros((1, *input_shape[1:]), np.float32)).shape[2]
    k = view.to_matrices(np.zeros(view.weight_shape, np.float32)).shape[2]
    return max(1, int(per_sample * samples) // (columns_per_k * int(k)))


def statistics_bytes(view: LinearView, groups_k: int) -> int:
    return 2 * view.groups * groups_k * groups_k * 8
