"""`greedy` (Pandey et al. 2023, AIMET AMP phase 1 + 2 with a budget as the stop): start every layer at
its most precise allowed candidate; list the steps (layer l: c -> c') that save cost, ordered by
sensitivity added per unit of (normalised) cost saved, (S[l, c'] - S[l, c]) / saved; apply them in
that order, cumulatively, skipping a step that no longer lowers a layer's precision, until every
budget holds. `ladder` gives every point of that walk, for the --max-drop search of AIMET's phase 2.
Ties and a cap on distinct widths are the integer program's job: greedy refuses a walk that breaks them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from onnxmpq.allocate import Allocation, Problem, admissible, result, solver, tied_ok, totals
from onnxmpq.errors import ConstraintError, option


def _cost(problem: Problem) -> np.ndarray:
    """Every budget's cost normalised by its limit (by the largest total when unlimited) and summed: one
    scalar cost per (layer, candidate)."""
    if not problem.costs:
        raise ConstraintError("the greedy walk needs a cost to lower.", f"give {option('search.budgets')} (e.g. avg-bits=4).")
    def scale(kind: str) -> float:
        limit = problem.limits[kind]
        return limit if np.isfinite(limit) else float(problem.costs[kind].max(axis=1).sum())
    total: np.ndarray = np.sum([cost / max(scale(kind), 1e-12) for kind, cost in problem.costs.items()], axis=0)
    return total


def _over(problem: Problem, index: Sequence[int]) -> bool:
    return any(v > problem.limits[k] * (1 + 1e-9) for k, v in totals(problem, index).items())


def _repair(problem: Problem, allowed: np.ndarray, index: list[int]) -> None:
    """While a budget is exceeded, take the move that adds the least sensitivity per unit of the exceeded
    budgets' (normalised) cost it removes, even if it raises another budget's cost."""
    for _ in range(problem.scores.size):
        over = [k for k, v in totals(problem, index).items() if v > problem.limits[k] * (1 + 1e-9)]
        if not over:
            return
        excess = np.sum([problem.costs[k] / max(problem.limits[k], 1e-12) for k in over], axis=0)
        best: tuple[float, int, int] | None = None
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


def ladder(problem: Problem) -> list[list[int]]:
    """Every point of the walk: the most precise start, then one more step applied at each point."""
    n_layers, _ = problem.scores.shape
    allowed = admissible(problem)
    cost = _cost(problem)
    index = [int(np.argmax(np.where(allowed[l], cost[l], -np.inf))) for l in range(n_layers)]
    steps: list[tuple[float, int, int]] = []
    for l in range(n_layers):
        for c in np.flatnonzero(allowed[l]):
            saved = cost[l, index[l]] - cost[l, c]
            if saved > 0:
                steps.append(((problem.scores[l, c] - problem.scores[l, index[l]]) / saved, l, int(c)))
    steps.sort()
    points = [list(index)]
    for _, row, col in steps:
        if cost[row, col] < cost[row, index[row]]:
            index[row] = col
            points.append(list(index))
    return points


@solver("greedy", "lower precision step by step, least sensitivity per cost saved first (AIMET AMP)",
        drop="ladder", ladder=ladder)
def solve_greedy(problem: Problem, time_limit: float = 10.0) -> Allocation:
    allowed = admissible(problem)
    points = ladder(problem)
    index = next((p for p in points if not _over(problem, p)), list(points[-1]))
    _repair(problem, allowed, index)
    if _over(problem, index):
        raise ConstraintError("the greedy walk ends over a budget: lowering precision by its combined cost "
                              "cannot meet these budgets together.", f"use {option('search.method')} ilp, which can.")
    if not tied_ok(problem, index):
        raise ConstraintError("the greedy walk breaks a hardware rule (tied activation widths or the cap on "
                              "distinct widths).", f"use {option('search.method')} ilp, which honours them.")
    return result(problem, index, "greedy", "feasible")
