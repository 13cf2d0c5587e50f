"""`greedy` (Pandey et al. 2023, AIMET AMP phase 1 + 2 with a budget as the stop): start every layer at
its most precise allowed candidate; list the steps (layer l: c -> c') that save cost, ordered by
sensitivity added per unit of (normalised) cost saved, (S[l, c'] - S[l, c]) / saved; apply them in
that order, cumulatively, skipping a step that no longer lowers a layer's precision, until every
budget holds."""

from __future__ import annotations

import numpy as np

from onnxmpq.allocate import SOLVERS, Allocation, Problem, totals
from onnxmpq.errors import ConstraintError


def _cost(problem: Problem) -> np.ndarray:
    """Every budget's cost normalised by its limit and summed: one scalar cost per (layer, candidate)."""
    return sum(cost / max(problem.limits[kind], 1e-12) for kind, cost in problem.costs.items())


def _over(problem: Problem, index) -> bool:
    return any(v > problem.limits[k] * (1 + 1e-9) for k, v in totals(problem, index).items())


def _repair(problem: Problem, allowed: np.ndarray, index: list[int]) -> None:
    """While a budget is exceeded, take the move that adds the least sensitivity per unit of the exceeded
    budgets' (normalised) cost it removes, even if it raises another budget's cost."""
    for _ in range(problem.scores.size):
        over = [k for k, v in totals(problem, index).items() if v > problem.limits[k] * (1 + 1e-9)]
        if not over:
            return
        excess = sum(problem.costs[k] / max(problem.limits[k], 1e-12) for k in over)
        best = None
        for l in range(len(index)):
            for c in np.flatnonzero(allowed[l]):
                saved = excess[l, index[l]] - excess[l, c]
                if saved > 0:
                    rate = (problem.scores[l, c] - problem.scores[l, index[l]]) / saved
                    if best is None or rate < best[0]:
                        best = (rate, l, int(c))
        if best is None:
            return
        index[best[1]] = best[2]


@SOLVERS.register("greedy")
def solve_greedy(problem: Problem, time_limit: float = 10.0) -> Allocation:
    n_layers, _ = problem.scores.shape
    allowed = problem.allowed if problem.allowed is not None else np.ones_like(problem.scores, dtype=bool)
    cost = _cost(problem)
    index = [int(np.argmax(np.where(allowed[l], cost[l], -np.inf))) for l in range(n_layers)]
    steps = []
    for l in range(n_layers):
        for c in np.flatnonzero(allowed[l]):
            saved = cost[l, index[l]] - cost[l, c]
            if saved > 0:
                steps.append(((problem.scores[l, c] - problem.scores[l, index[l]]) / saved, l, int(c)))
    steps.sort()
    for _, l, c in steps:
        if not _over(problem, index):
            break
        if cost[l, c] < cost[l, index[l]]:
            index[l] = c
    _repair(problem, allowed, index)
    if _over(problem, index):
        raise ConstraintError("the greedy walk ends over a budget: lowering precision by its combined cost "
                              "cannot meet these budgets together.", "use --method ilp, which can.")
    status = "feasible"
    return Allocation({problem.layers[l]: problem.candidates[index[l]] for l in range(n_layers)},
                      float(problem.scores[np.arange(n_layers), index].sum()), "greedy", status,
                      totals(problem, index))
