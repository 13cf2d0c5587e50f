"""The fast path of `ilp`: the multiple-choice knapsack solved exactly by branch and bound on the
Lagrangian bound g(lam) of `lagrange` (normalised arrays; no MIP solver).

With the reduced costs r[l, c] = S[l, c] + lam . a[l, c] - min_c' (S[l, c'] + lam . a[l, c']) >= 0,

    S(x) = g(lam) + sum_l r[l, x_l] + lam . (B - a(x))      for every choice x,

so no choice with r >= UB - g is part of an allocation better than the incumbent UB (it is dropped),
and a depth-first search over the layers left with several choices (each layer's choices by r; the
layers whose second-best r is largest first) prunes a node when g + the chosen layers' r + lam . (the
slack the other layers cannot fill) comes within `stop` of UB, or when the other layers cannot fit the
budgets. The incumbent: the Lagrangian choice repaired until it fits and filled greedily, then every
node's completion (the other layers at r = 0) that fits. `stop` is 1e-9 of the objective or of the
largest score of one layer, whichever is larger (the search proves the optimum to that), or just under
one unit when every score is an integer.

At most K distinct weight widths: each set of K widths (with the fixed layers' widths) is one plain
problem, searched in turn with the best allocation so far as the cutoff. Ties between activation
widths and requantizes (`Link`) are not modelled here: `unmodelled` names them and `ilp` hands such a
problem to the MIP.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np

from onnxmpq.allocate import Problem, admissible
from onnxmpq.allocate.lagrange import FIT, Arrays, lagrangian, multipliers, normalise

EXACT = 1e-9       # the search proves the optimum to this fraction of the objective (or of one layer's score)
MAX_SUBSETS = 64   # more sets of widths than this under max_distinct: the MIP's job


@dataclass(frozen=True)
class Search:
    """A search's outcome: the best choice (None: none found), its objective sum_l S[l, x_l] (inf
    without one), a proven lower bound on every allocation's objective, the objective's floor (each
    layer at its best allowed score), the nodes visited and whether the search ran to the end (a
    complete search without a choice proves that no allocation fits)."""

    index: tuple[int, ...] | None
    objective: float
    bound: float
    floor: float
    nodes: int
    complete: bool

    def gap(self) -> float:
        """(objective - bound) / (objective - floor): 0 at a proven optimum, inf without a choice."""
        if self.index is None:
            return float("inf")
        excess = self.objective - self.floor
        return max(0.0, self.objective - self.bound) / excess if excess > 0 else 0.0


def unmodelled(problem: Problem) -> str | None:
    """The rule of `problem` the fast path does not model (None: it models them all)."""
    allowed = admissible(problem)
    if problem.links and "bitops" in problem.costs:
        return "requantize BitOps"
    if problem.ties and problem.act_bits:
        for group in problem.ties:
            if len({problem.act_bits[c] for l in group for c in np.flatnonzero(allowed[l])}) > 1:
                return "tied activation widths"
    subsets = _width_sets(problem, allowed)
    return "a cap on distinct widths" if subsets is not None and len(subsets) > MAX_SUBSETS else None


def search(problem: Problem, deadline: float) -> Search:
    """The best allocation within the budgets and `max_distinct`, stopped at `deadline`
    (time.perf_counter()); ties and links are ignored (see `unmodelled`)."""
    allowed = admissible(problem)
    subsets = _width_sets(problem, allowed)
    if subsets is None:
        return _search(problem, allowed, deadline)
    return _capped(problem, allowed, subsets, deadline)


# ---------------------------------------------------------------- one plain problem


def _search(problem: Problem, allowed: np.ndarray, deadline: float, cutoff: float = np.inf) -> Search:
    """The bound, the incumbent and the depth-first search over the choices `allowed`; `cutoff`: only
    an allocation below this objective is wanted."""
    floor = float(np.where(allowed, problem.scores, np.inf).min(axis=1).sum())
    arrays = normalise(problem, allowed)
    root = _root(arrays, deadline) if arrays is not None else None
    if arrays is None or root is None:
        return Search(None, np.inf, np.inf, floor, 0, True)
    lam, g, bound = root
    s, scale = arrays.scores, arrays.scale
    rows = np.arange(s.shape[0])
    weighted = s + np.tensordot(lam, arrays.costs, axes=1)
    reduced = weighted - weighted.min(axis=1, keepdims=True)
    index = incumbent(arrays, lam)
    top = float(np.where(np.isfinite(s), s, 0.0).max(axis=1).sum())
    upper = min(float(s[rows, index].sum()) if index is not None else top * (1 + EXACT) + EXACT,
                (cutoff - arrays.floor) / scale)
    stop = max(EXACT * max(upper, 1.0), (1 - 1e-6) / scale if arrays.integral else 0.0)
    keep = reduced < upper - g
    keep[rows, np.argmin(reduced, axis=1)] = True
    t, base, room = tree(arrays, reduced, keep)
    best, nodes, complete = None, 0, True
    if upper - bound > stop:
        best, _, nodes, complete = depth_first(t, tuple(lam.tolist()), tuple(room.tolist()),
                                               tuple(arrays.fit.tolist()), upper - g, stop, deadline)
    if best is not None:
        index = base.copy()
        index[list(t.rows)] = best
    value = float(s[rows, index].sum()) if index is not None else np.inf
    if index is None or value > upper:  # nothing below the cutoff
        return Search(None, np.inf, arrays.floor + scale * (max(bound, upper - stop) if complete else bound),
                      floor, nodes, complete)
    proven = (value if arrays.integral else max(bound, value - stop)) if complete else bound
    return Search(tuple(index.tolist()), arrays.floor + scale * value, arrays.floor + scale * min(proven, value),
                  floor, nodes, complete)


def _root(arrays: Arrays, deadline: float) -> tuple[np.ndarray, float, float] | None:
    """(lam, g(lam), the bound: g clamped to [0, the largest objective], rounded up for integer
    scores); None when g passes the largest objective (the LP relaxation has no solution)."""
    lam = multipliers(arrays, deadline)
    g = lagrangian(arrays, lam)
    top = float(np.where(np.isfinite(arrays.scores), arrays.scores, 0.0).max(axis=1).sum())
    if not g <= top + 1e-9 * (1.0 + top + float(lam.sum())):  # (float error in lam . a allowed)
        return None
    bound = min(max(g, 0.0), top)
    if arrays.integral:
        bound = float(np.ceil(bound * arrays.scale - 1e-6)) / arrays.scale
    return lam, g, bound


def _fits(arrays: Arrays, index: np.ndarray) -> bool:
    rows = np.arange(len(index))
    return bool((arrays.costs[:, rows, index].sum(axis=1) <= arrays.limits + arrays.fit).all())


def incumbent(arrays: Arrays, lam: np.ndarray) -> np.ndarray | None:
    """The Lagrangian choice (ties to the cheaper choice), repaired until it fits (each step removes
    some of the budgets' total excess at the least score added per unit removed), then filled (the
    largest score drop that still fits, until none does). None when the repair gets stuck."""
    s, a, b, fit = arrays.scores, arrays.costs, arrays.limits, arrays.fit
    rows = np.arange(s.shape[0])
    weighted = s + np.tensordot(lam, a, axes=1)
    finite = np.isfinite(weighted)
    index: np.ndarray = np.argmin(weighted + a.sum(axis=0) * 1e-12 * (1 + np.abs(weighted[finite]).max(initial=0.0)),
                                  axis=1)
    for _ in range(s.size):
        total = a[:, rows, index].sum(axis=1)
        if (total <= b + fit).all():
            break
        excess = float(np.maximum(total - b, 0.0).sum())
        moved = total[:, None, None] + a - a[:, rows, index][:, :, None]  # each budget's total after a move
        removed = excess - np.maximum(moved - b[:, None, None], 0.0).sum(axis=0)
        rate = np.where((removed > FIT) & finite, (s - s[rows, index][:, None]) / np.maximum(removed, FIT), np.inf)
        l, c = np.unravel_index(np.argmin(rate), rate.shape)
        if not np.isfinite(rate[l, c]):
            return None
        index[l] = c
    if not _fits(arrays, index):
        return None
    for _ in range(s.size):
        room = b - a[:, rows, index].sum(axis=1)
        fits = (a - a[:, rows, index][:, :, None] <= room[:, None, None] + fit[:, None, None]).all(axis=0)
        gain = np.where(fits & finite, s[rows, index][:, None] - s, -np.inf)
        l, c = np.unravel_index(np.argmax(gain), gain.shape)
        if not gain[l, c] > 0:
            break
        index[l] = c
    return index


# ---------------------------------------------------------------- branch and bound


@dataclass(frozen=True)
class Tree:
    """The depth-first search's input: per depth (a layer with several choices left) the layer and its
    choices as (r, column, costs) by r; per depth d the sums over the depths from d on of each budget's
    smallest cost, largest cost and cost at r = 0."""

    rows: tuple[int, ...]
    choices: tuple[tuple[tuple[float, int, tuple[float, ...]], ...], ...]
    least: tuple[tuple[float, ...], ...]
    most: tuple[tuple[float, ...], ...]
    zero: tuple[tuple[float, ...], ...]


def tree(arrays: Arrays, reduced: np.ndarray, keep: np.ndarray) -> tuple[Tree, np.ndarray, np.ndarray]:
    """(the tree, every layer's r = 0 choice, the room the layers with one choice left leave in each
    budget). `keep` must hold each layer's r = 0 choice."""
    a = arrays.costs
    base = np.argmin(reduced, axis=1)
    free = np.flatnonzero(keep.sum(axis=1) > 1)
    fixed = np.setdiff1d(np.arange(len(base)), free)
    room = arrays.limits - a[:, fixed, base[fixed]].sum(axis=1)
    second = np.array([np.sort(reduced[l][keep[l]])[1] for l in free])
    order = free[np.argsort(-second, kind="stable")] if len(free) else free
    choices = tuple(tuple((float(reduced[l, c]), int(c), tuple(a[:, l, c].tolist()))
                          for c in sorted(np.flatnonzero(keep[l]), key=lambda c: (reduced[l, c], c)))
                    for l in order)

    def suffix(per_depth: np.ndarray) -> tuple[tuple[float, ...], ...]:
        sums = np.cumsum(per_depth.reshape(len(order), a.shape[0])[::-1], axis=0)[::-1]
        return tuple(map(tuple, np.vstack([sums, np.zeros((1, a.shape[0]))]).tolist()))

    least = suffix(np.where(keep[None], a, np.inf).min(axis=2)[:, order].T)
    most = suffix(np.where(keep[None], a, -np.inf).max(axis=2)[:, order].T)
    zero = suffix(np.array([c[0][2] for c in choices]))
    return Tree(tuple(order.tolist()), choices, least, most, zero), base, room


def depth_first(t: Tree, lam: tuple[float, ...], room: tuple[float, ...], fit: tuple[float, ...], gap: float,
                stop: float, deadline: float) -> tuple[list[int] | None, float, int, bool]:
    """(the best completion found, as a column per depth, or None; its r + lam . slack; nodes; whether
    the search ran to the end). `gap` is UB - g on entry (see the module docstring); a total may pass
    its limit by `fit`."""
    n = len(t.choices)
    least = [tuple(v - f for v, f in zip(row, fit)) for row in t.least]
    fits = [tuple(v - f for v, f in zip(row, fit)) for row in t.zero]
    zero = [sum(l * v for l, v in zip(lam, row)) for row in t.zero]  # lam . (cost of the r = 0 rest)
    best: list[int] | None = None
    pos, chosen, rsum, resid = [0] * (n + 1), [0] * n, [0.0] * (n + 1), [room] * (n + 1)
    depth, entering, nodes = 0, True, 0
    while depth >= 0:
        if entering:
            nodes, entering, pos[depth] = nodes + 1, False, 0
            if nodes & 1023 == 0 and time.perf_counter() > deadline:
                return best, gap, nodes, False
            res, r = resid[depth], rsum[depth]
            if any(x < y for x, y in zip(res, least[depth])):  # the rest cannot fit
                depth -= 1
                continue
            floor = r + sum(l * (x - m) for l, x, m in zip(lam, res, t.most[depth]) if x > m)
            if floor >= gap - stop:
                depth -= 1
                continue
            if all(x >= y for x, y in zip(res, fits[depth])):  # the r = 0 completion fits
                value = r + sum(l * x for l, x in zip(lam, res)) - zero[depth]
                if value < gap:
                    gap, best = value, chosen[:depth] + [c[0][1] for c in t.choices[depth:]]
                if value - floor <= stop:
                    depth -= 1
                    continue
        if depth == n or pos[depth] >= len(t.choices[depth]):
            depth -= 1
            continue
        r_c, col, cost = t.choices[depth][pos[depth]]
        pos[depth] += 1
        if rsum[depth] + r_c >= gap - stop:  # and every later choice of this layer
            pos[depth] = len(t.choices[depth])
            continue
        chosen[depth], rsum[depth + 1] = col, rsum[depth] + r_c
        resid[depth + 1] = tuple(x - c for x, c in zip(resid[depth], cost))
        depth, entering = depth + 1, True
    return best, gap, nodes, True


# ---------------------------------------------------------------- at most K distinct widths


def _width_sets(problem: Problem, allowed: np.ndarray) -> list[tuple[int, ...]] | None:
    """The sets of weight widths an allocation under `max_distinct` may use beside the fixed layers'
    (None: the cap binds nothing; [] : the fixed layers alone break it)."""
    if problem.max_distinct is None or not problem.weight_bits:
        return None
    used = {problem.weight_bits[c] for c in np.flatnonzero(allowed.any(axis=0)) if problem.weight_bits[c]}
    fixed = set(problem.fixed_widths)
    if len(used | fixed) <= problem.max_distinct:
        return None
    free = sorted(used - fixed)
    room = problem.max_distinct - len(fixed)
    return list(itertools.combinations(free, room)) if room >= 0 else []


def _capped(problem: Problem, allowed: np.ndarray, subsets: list[tuple[int, ...]], deadline: float) -> Search:
    """The best over each set of widths (see the module docstring): the uncapped optimum first (a bound
    for all; the answer when it keeps to the cap), then the sets by how many of its layers they keep."""
    floor = float(np.where(allowed, problem.scores, np.inf).min(axis=1).sum())
    free = _search(problem, allowed, deadline)
    widths = np.array(problem.weight_bits)
    fixed = set(problem.fixed_widths)
    if free.index is None and free.complete:
        return free
    if free.index is not None and len({int(widths[c]) for c in free.index if widths[c]} | fixed) \
            <= (problem.max_distinct or 0):
        return free
    chosen = [int(widths[c]) for c in free.index] if free.index is not None else []
    subsets = sorted(subsets, key=lambda ws: -sum(w in ws or w in fixed or not w for w in chosen))
    best: Search | None = None
    bounds, nodes, complete = [], free.nodes, free.complete
    for subset in subsets:
        mask = allowed & np.isin(widths, list(subset) + sorted(fixed) + [0])[None, :]
        part = _search(problem, mask, deadline, best.objective if best is not None else np.inf)
        bounds.append(part.bound)
        nodes, complete = nodes + part.nodes, complete and part.complete
        if part.index is not None and (best is None or part.objective < best.objective):
            best = part
    bound = max(min(bounds, default=np.inf), free.bound)
    if best is None:
        return Search(None, np.inf, bound, floor, nodes, complete)
    return Search(best.index, best.objective, min(bound, best.objective), floor, nodes, complete)
