"""The Lagrangian bound of the multiple-choice knapsack, on normalised arrays (the fast path of `ilp`).

    minimise  S(x) = sum_l S[l, x_l]   subject to   a_k(x) = sum_l a_k[l, x_l] <= B_k  for every budget k

Normalised: scores shifted by each layer's smallest allowed score and divided by the largest entry
left; costs shifted by each layer's cheapest allowed choice and divided by the budget's spread (the sum
of the layers' largest shifted costs), so 0 <= B_k < 1; a budget every choice fits is left out. Choices
the rules forbid, and choices another choice of the layer matches or beats in score and every cost,
get S = inf. For multipliers lam >= 0,

    g(lam) = sum_l min_c (S[l, c] + lam . a[l, c]) - lam . B   <=   S(x)   for every feasible x,

a concave function whose maximum is the LP relaxation's optimum. One budget: exact, by bisection over
the breakpoints mu = (S[l, c] - S[l, c']) / (a[l, c'] - a[l, c]) on the sign of the slope between them;
two: golden-section search over lam_1 of the exact maximum over lam_2; more: cyclic exact steps, one
multiplier at a time (a valid bound, perhaps below the LP's).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from onnxmpq.allocate import Problem

GOLDEN = (np.sqrt(5.0) - 1) / 2
FLAT = 1e-12  # a relative rise below this is no rise (bracketing lam_1, stopping the cyclic steps)
FIT = 1e-12   # float error allowed on a normalised total (limits are below 1) ...
SLACK = 1e-9  # ... but never more than the package's slack on a budget: this fraction of its limit


@dataclass(frozen=True)
class Arrays:
    """The normalised problem: scores (L, C) with inf for dropped choices, costs (K, L, C), limits (K,)
    and `fit` (K,), how far a total may pass its limit (float error; the package's 1e-9 of the limit
    at most); raw objective = floor + scale * normalised objective; `integral`: every shifted score is
    an integer."""

    scores: np.ndarray
    costs: np.ndarray
    limits: np.ndarray
    fit: np.ndarray
    scale: float
    floor: float
    integral: bool


def normalise(problem: Problem, allowed: np.ndarray) -> Arrays | None:
    """The arrays above for the choices `allowed` (L, C); None when a layer has no choice or a budget
    cannot be met even at every layer's cheapest choice."""
    if not allowed.any(axis=1).all():
        return None
    raw = np.where(allowed, problem.scores, np.inf)
    low = raw.min(axis=1, keepdims=True)
    scores = np.where(allowed, raw - low, np.inf)
    costs, limits, fit = [], [], []
    for kind, full in problem.costs.items():
        cheapest = np.where(allowed, full, np.inf).min(axis=1, keepdims=True)
        cost = np.where(allowed, full - cheapest, 0.0)
        room, spread = problem.limits[kind] - float(cheapest.sum()), float(cost.max(axis=1).sum())
        slack = SLACK * abs(problem.limits[kind])
        if room < -slack:
            return None
        if room < spread:  # else every choice fits: the budget binds nothing
            costs.append(cost / spread)
            limits.append(max(room, 0.0) / spread)
            fit.append(min(FIT, slack / spread))
    finite = scores[allowed]
    scale = float(finite.max(initial=0.0)) or 1.0
    arrays = Arrays(scores / scale, np.array(costs).reshape((len(costs),) + scores.shape), np.array(limits),
                    np.array(fit), scale, float(low.sum()), bool(np.all(finite == np.round(finite))))
    return _undominated(arrays)


def _undominated(arrays: Arrays) -> Arrays:
    """Drops each choice another choice of its layer matches or beats in score and every cost (of two
    equal choices the first stays)."""
    s, a = arrays.scores, arrays.costs
    no_worse = s[:, :, None] <= s[:, None, :]  # [l, c, d]: c is no worse than d
    for cost in a:
        no_worse &= cost[:, :, None] <= cost[:, None, :]
    mutual = no_worse & np.transpose(no_worse, (0, 2, 1))
    earlier = np.arange(s.shape[1])[:, None] < np.arange(s.shape[1])[None, :]
    beaten = (((no_worse & ~mutual) | (mutual & earlier)) & np.isfinite(s)[:, :, None]).any(axis=1)
    return replace(arrays, scores=np.where(beaten, np.inf, s))


def line(scores: np.ndarray, cost: np.ndarray, limit: float) -> tuple[float, float]:
    """(mu, value): mu >= 0 maximising sum_l min_c (scores + mu cost) - mu limit, and that maximum
    (inf when even the cheapest choices exceed the limit)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        rise, run = scores[:, :, None] - scores[:, None, :], cost[:, None, :] - cost[:, :, None]
        ratio = rise / run
    points = np.unique(ratio[(run > 0) & (rise > 0) & np.isfinite(ratio)])
    rows = np.arange(scores.shape[0])

    def slope(i: int) -> float:  # inside the i-th interval between breakpoints (-1: before the first)
        if i < 0:
            mu = points[0] / 2 if len(points) else 1.0
        else:
            mu = (points[i] + points[i + 1]) / 2 if i + 1 < len(points) else 2 * points[i] + 1.0
        return float(cost[rows, np.argmin(scores + mu * cost, axis=1)].sum()) - limit

    lo, hi = -1, len(points) - 1
    if slope(hi) > 0:
        return float("inf"), float("inf")
    while lo < hi:  # the first interval where g falls
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if slope(mid) <= 0 else (mid + 1, hi)
    mu = float(points[lo]) if lo >= 0 else 0.0
    return mu, float((scores + mu * cost).min(axis=1).sum()) - mu * limit


def lagrangian(arrays: Arrays, lam: np.ndarray) -> float:
    """g(lam), normalised (see the module docstring)."""
    weighted = arrays.scores + np.tensordot(lam, arrays.costs, axes=1)
    return float(weighted.min(axis=1).sum() - lam @ arrays.limits)


def multipliers(arrays: Arrays, deadline: float) -> np.ndarray:
    """The lam that maximises g (see the module docstring); `deadline` (time.perf_counter()) cuts the
    search short with a valid, weaker lam."""
    s, a, b = arrays.scores, arrays.costs, arrays.limits
    if len(b) <= 1:
        return np.array([line(s, a[0], b[0])[0]] if len(b) else [])
    if len(b) == 2:
        return _golden(arrays, deadline)
    lam, best = np.zeros(len(b)), -np.inf
    for _ in range(50):
        for k in range(len(b)):
            rest = np.arange(len(b)) != k
            lam[k] = line(s + np.tensordot(lam[rest], a[rest], axes=1), a[k], b[k])[0]
        value = lagrangian(arrays, lam)
        if not value > best + FLAT * (1 + abs(value)) or time.perf_counter() > deadline:
            break
        best = value
    return lam


def _golden(arrays: Arrays, deadline: float) -> np.ndarray:
    """Two budgets: h(lam_1) = max_mu g(lam_1, mu) is concave; its maximum is bracketed by doubling and
    found by golden-section search to 1e-10 of the bracket (48 steps)."""
    s, a, b = arrays.scores, arrays.costs, arrays.limits

    def h(lam1: float) -> float:
        return line(s + lam1 * a[0], a[1], b[1])[1] - lam1 * float(b[0])

    hi, at_hi = 1.0, h(1.0)
    for _ in range(100):  # past 2^100 the LP has no solution (g grows without end)
        twice = h(2 * hi)
        if not twice > at_hi + FLAT * (1 + abs(at_hi)):
            break
        hi, at_hi = 2 * hi, twice
    lo, hi = 0.0, 2 * hi
    width = hi
    x1, x2 = hi - GOLDEN * width, GOLDEN * width
    f1, f2 = h(x1), h(x2)
    while hi - lo > 1e-10 * width and time.perf_counter() < deadline:
        if f1 < f2:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + GOLDEN * (hi - lo)
            f2 = h(x2)
        else:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - GOLDEN * (hi - lo)
            f1 = h(x1)
    lam1 = max((0.0, h(0.0)), (x1, f1), (x2, f2), key=lambda pair: pair[1])[0]
    return np.array([lam1, line(s + lam1 * a[0], a[1], b[1])[0]])
