"""Activation statistics and ranges.

`Histogram` accumulates a tensor's values batch by batch in a fixed number of bins whose range grows
when a batch falls outside it (old counts are re-binned at their bin centres), so memory is O(bins) per
tensor whatever the calibration set's size. `choose_range` turns it into [lo, hi]:

- minmax: the exact min and max seen.
- percentile p: lo, hi = the (100 - p)th and pth percentiles of the histogram.
- mse: [a*min, a*max] with a in a grid minimising the expected squared error
  sum_k n_k (c_k - deq(q(c_k)))^2 over bin centres c_k with counts n_k (clipping included).
- entropy (TensorRT's KL calibration on an asymmetric range): for each a in the grid, P is the histogram
  restricted to the bins inside [a*min, a*max] with the clipped mass folded into the two edge bins; Q
  splits the same bins, without the folded mass, into 2^b equal groups and spreads each group's mass
  evenly over the bins where P is non-zero (so clipping shows as P's edge mass that Q lacks);
  choose the a minimising KL(P || Q) = sum_k P_k log(P_k / Q_k). Exact zeros are left out of P: the
  grid holds zero exactly, and a ReLU's spike at zero would otherwise decide the choice. Only ranges holding at least 2^b bins
  are candidates (fewer would make every P equal its Q); when none does (16 bits), minmax.

Softmax logits (`floor` set: the smallest row maximum seen): softmax(x)_i = e^(x_i - m) / sum_j e^(x_j - m)
with m the row's maximum, so a value below m - LOGIT_SPAN weighs under e^-LOGIT_SPAN (1e-7) of the row's
largest term, and clipping it up to m - LOGIT_SPAN changes the output by at most n e^-LOGIT_SPAN for a row of
n. The histogram is cut at floor - LOGIT_SPAN before any method runs: an attention mask's -10000 then no
longer decides an 8-bit scale (40 per step uncut).

`act_params` turns a range into the asymmetric unsigned scale and zero point:
s = (hi - lo) / (2^b - 1), z = clip(round(-lo / s), 0, 2^b - 1), with lo <= 0 <= hi enforced.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from onnxmpq.errors import InternalError, OnnxmpqError
from onnxmpq.types import ActRange, TensorStats
from onnxmpq.write.formats import IntFormat

BINS = 2048
RANGE_GRID = np.linspace(1.0, 0.05, 96)
LOGIT_SPAN = 16.0


class Histogram:
    """Streaming histogram of one tensor (see the module docstring)."""

    def __init__(self, name: str, bins: int = BINS, floor_axis: int | None = None):
        self.name = name
        self.bins = bins
        self.floor_axis = floor_axis
        self.floor: float | None = None
        self.counts = np.zeros(bins, dtype=np.float64)
        self.lo: float | None = None  # the bins' range, set by the first non-empty batch
        self.hi: float | None = None
        self.min = np.inf
        self.max = -np.inf
        self.count = 0
        self.zeros = 0

    def update(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float32)
        if self.floor_axis is not None and values.size and values.ndim:
            row_floor = float(values.max(axis=self.floor_axis % values.ndim).min())
            self.floor = row_floor if self.floor is None else min(self.floor, row_floor)
        values = values.reshape(-1)
        if values.size == 0:
            return
        vmin, vmax = float(values.min()), float(values.max())
        if not (np.isfinite(vmin) and np.isfinite(vmax)):
            raise OnnxmpqError(f"tensor {self.name!r} took NaN or Inf values during calibration.",
                               "check the calibration data and the model; the float model itself overflows.")
        self.min, self.max = min(self.min, vmin), max(self.max, vmax)
        self.count += values.size
        self.zeros += int(np.count_nonzero(values == 0))
        if self.lo is None or self.hi is None:
            self.lo, self.hi = vmin, vmax if vmax > vmin else vmin + max(1e-8, 1e-6 * abs(vmin))
        elif vmin < self.lo or vmax > self.hi:
            self._grow(min(vmin, self.lo), max(vmax, self.hi))
        self.counts += self._bin(values)

    def _bin(self, values: np.ndarray) -> np.ndarray:
        """Counts of `values` in the current bins (the last bin closed), by index arithmetic + bincount."""
        lo, hi = self._bounds()
        scale = self.bins / (hi - lo)
        idx = ((values - np.float32(lo)) * np.float32(scale)).astype(np.int64)
        np.clip(idx, 0, self.bins - 1, out=idx)
        return np.bincount(idx, minlength=self.bins)

    def _grow(self, lo: float, hi: float) -> None:
        """Widens the range (by at least a quarter, so re-binning stays rare) and re-bins old counts."""
        old_lo, old_hi = self._bounds()
        width = old_hi - old_lo
        if lo < old_lo:
            lo = min(lo, old_lo - 0.25 * width)
        if hi > old_hi:
            hi = max(hi, old_hi + 0.25 * width)
        centres = self.edges[:-1] + 0.5 * (self.edges[1] - self.edges[0])
        self.lo, self.hi = lo, hi
        self.counts, _ = np.histogram(centres, bins=self.bins, range=(lo, hi), weights=self.counts)

    def _bounds(self) -> tuple[float, float]:
        if self.lo is None or self.hi is None:
            raise InternalError(f"histogram {self.name!r} has no range before its first values")
        return self.lo, self.hi

    @property
    def edges(self) -> np.ndarray:
        lo, hi = self._bounds()
        return np.linspace(lo, hi, self.bins + 1)

    def stats(self) -> TensorStats:
        if self.lo is None:
            raise OnnxmpqError(f"tensor {self.name!r} saw no calibration values.",
                               "give at least one calibration sample.")
        return TensorStats(self.name, self.min, self.max, self.counts.copy(), self.edges, self.count,
                           self.zeros, self.floor)


@dataclass(frozen=True)
class ActParams:
    """Scale and zero point of an activation quantizer: x ~= (q - zero_point) * scale."""

    scale: float
    zero_point: int
    fmt: IntFormat


def act_params(lo: float, hi: float, fmt: IntFormat) -> ActParams:
    """Asymmetric unsigned parameters for the range [lo, hi] (see the module docstring)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / (fmt.qmax - fmt.qmin)
    if scale <= 0 or not np.isfinite(scale):
        scale = 1e-8
    scale = float(np.float32(scale))
    zero_point = int(np.clip(np.rint(-lo / scale), fmt.qmin, fmt.qmax))
    return ActParams(scale, zero_point, fmt)


def choose_range(stats: TensorStats, fmt: IntFormat, method: ActRange,
                 percentile: float = 99.99) -> tuple[float, float]:
    """The [lo, hi] range of `stats` for the activation format `fmt` (see the module docstring), kept
    in `stats.ranges` for the next call."""
    key = (fmt, method, percentile)
    if key not in stats.ranges:
        stats.ranges[key] = _choose_range(stats, fmt, method, percentile)
    return stats.ranges[key]


def _choose_range(stats: TensorStats, fmt: IntFormat, method: ActRange, percentile: float) -> tuple[float, float]:
    stats = cut_logits(stats)
    if method == ActRange.MINMAX:
        return stats.min, stats.max
    if method == ActRange.PERCENTILE:
        return _percentile_range(stats, percentile)
    if method == ActRange.ENTROPY:
        errors = np.array([_kl_error(stats, a, fmt.qmax + 1) for a in RANGE_GRID])
    else:
        errors = _mse_errors(stats, fmt, RANGE_GRID)
    best = RANGE_GRID[int(np.argmin(errors))]
    return best * min(stats.min, 0.0), best * max(stats.max, 0.0)


def cut_logits(stats: TensorStats) -> TensorStats:
    """Softmax logits without the values below floor - LOGIT_SPAN (see the module docstring)."""
    if stats.floor is None or stats.min >= stats.floor - LOGIT_SPAN:
        return stats
    lo = stats.floor - LOGIT_SPAN
    first = min(int(np.searchsorted(stats.edges, lo, side="right")) - 1, stats.hist.size - 1)
    hist = stats.hist[first:].copy()
    edges = stats.edges[first:].copy()
    edges[0] = lo
    return dataclasses.replace(stats, min=lo, hist=hist, edges=edges, count=int(hist.sum()))


def _percentile_range(stats: TensorStats, percentile: float) -> tuple[float, float]:
    cdf = np.cumsum(stats.hist)
    total = cdf[-1]
    if total <= 0:
        return stats.min, stats.max
    tail = (100.0 - percentile) / 100.0 * total
    lo_idx = int(np.searchsorted(cdf, tail, side="right"))
    hi_idx = int(np.searchsorted(cdf, total - tail, side="left"))
    lo = stats.min if stats.min >= 0 else max(stats.min, stats.edges[lo_idx])
    hi = min(stats.max, stats.edges[min(hi_idx + 1, len(stats.edges) - 1)])
    return lo, hi


def _mse_errors(stats: TensorStats, fmt: IntFormat, alphas: np.ndarray) -> np.ndarray:
    """Expected squared quantization error of the histogram for the range scaled by each of `alphas`:
    sum_i hist_i (c_i - deq(c_i))^2 over the bin centres c_i, with the grid of `act_params` (the same
    float32 scale and integer zero point), all alphas at once."""
    lo, hi = alphas * min(stats.min, 0.0), alphas * max(stats.max, 0.0)
    scale = (hi - lo) / (fmt.qmax - fmt.qmin)
    scale = np.where((scale > 0) & np.isfinite(scale), scale, 1e-8).astype(np.float32).astype(np.float64)
    zero_point = np.clip(np.rint(-lo / scale), fmt.qmin, fmt.qmax)[:, None]
    centres = 0.5 * (stats.edges[:-1] + stats.edges[1:])
    codes = np.clip(np.rint(centres[None, :] / scale[:, None]) + zero_point, fmt.qmin, fmt.qmax)
    deq = (codes - zero_point) * scale[:, None]
    errors: np.ndarray = np.sum(stats.hist[None, :] * np.square(centres[None, :] - deq), axis=1)
    return errors


def _kl_error(stats: TensorStats, alpha: float, levels: int) -> float:
    """KL(P || Q) of the entropy method for the range scaled by `alpha`; inf when too few bins."""
    centres = 0.5 * (stats.edges[:-1] + stats.edges[1:])
    hist = stats.hist.astype(np.float64).copy()
    zero_bin = min(int(np.searchsorted(stats.edges, 0.0, side="right")) - 1, hist.size - 1)
    if zero_bin >= 0:
        hist[zero_bin] = max(hist[zero_bin] - stats.zeros, 0.0)
    lo, hi = alpha * min(stats.min, 0.0), alpha * max(stats.max, 0.0)
    inside = np.flatnonzero((centres >= lo) & (centres <= hi))
    if inside.size < levels:
        return 0.0 if alpha == 1.0 else np.inf
    kept = hist[inside[0]: inside[-1] + 1]
    p = kept.copy()
    p[0] += hist[: inside[0]].sum()
    p[-1] += hist[inside[-1] + 1:].sum()
    q = np.zeros_like(p)
    for group in np.array_split(np.arange(p.size), levels):
        nonzero = group[p[group] > 0]
        if nonzero.size:
            q[nonzero] = kept[group].sum() / nonzero.size
    if p.sum() <= 0 or q.sum() <= 0:
        return 0.0
    p, q = p / p.sum(), np.maximum(q / q.sum(), 1e-12)
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))
