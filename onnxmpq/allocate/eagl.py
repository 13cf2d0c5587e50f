"""`eagl` (EAGL, 2023): a knapsack over two precisions valued by weight entropy.

Every layer starts at its lower allowed precision c_lo and may be raised to the higher one c_hi (EAGL:
{2, 4} bits). Raising layer l gains v_l = S[l, c_lo] - S[l, c_hi] (the weight entropy its codes keep,
the `weight-entropy` metric) and costs w_kl = cost_k[l, c_hi] - cost_k[l, c_lo] of each budget k:

    maximise sum_l v_l z_l   subject to   sum_l w_kl z_l <= B_k - sum_l cost_k[l, c_lo],  z binary

solved by OR-Tools' multidimensional knapsack (branch and bound) on integers: values scaled to 10^6,
weights rounded up and capacities down, so the answer never exceeds a budget. With more than two
candidates per layer, ties or a cap on distinct widths the knapsack is multiple-choice, and `ilp`
solves it.
"""

from __future__ import annotations

import math

import numpy as np

from onnxmpq.allocate import Allocation, Problem, admissible, result, solver
from onnxmpq.allocate.ilp import solve_ilp
from onnxmpq.errors import ConstraintError

VALUE_SCALE = 10 ** 6
COST_SCALE = 10 ** 7


def _levels(problem: Problem) -> list[tuple[int, int]] | None:
    """(low, high) candidate index per layer by total cost, or None when a layer has not exactly two."""
    allowed = admissible(problem)
    cost = np.sum(list(problem.costs.values()), axis=0) if problem.costs else np.zeros_like(problem.scores)
    levels: list[tuple[int, int]] = []
    for l in range(len(problem.layers)):
        cols = [int(c) for c in np.flatnonzero(allowed[l])]
        if len(cols) != 2:
            return None
        lo, hi = sorted(cols, key=lambda c: cost[l, c])
        levels.append((lo, hi))
    return levels


@solver("eagl", "weight entropy as value, a knapsack over the candidate widths (EAGL 2023)", metric="weight-entropy")
def solve_eagl(problem: Problem, time_limit: float = 10.0) -> Allocation:
    from ortools.algorithms.python import knapsack_solver

    levels = _levels(problem)
    if levels is None or problem.ties or problem.max_distinct is not None:
        knapsack = solve_ilp(problem, time_limit)
        return Allocation(knapsack.choice, knapsack.objective, f"eagl (multiple-choice knapsack, {knapsack.solver})",
                          knapsack.status, knapsack.costs, knapsack.details)
    rows = range(len(levels))
    values = [max(0, round((problem.scores[l, lo] - problem.scores[l, hi]) * VALUE_SCALE)) for l, (lo, hi) in
              zip(rows, levels)]
    weights, capacities = [], []
    for kind, cost in problem.costs.items():
        base = sum(cost[l, lo] for l, (lo, _) in zip(rows, levels))
        room = problem.limits[kind] - base
        if room < 0:
            raise ConstraintError(f"budget {kind} cannot be met even with every layer at its lower precision.",
                                  "raise the budget or allow lower bit-widths.")
        extra = [max(0.0, cost[l, hi] - cost[l, lo]) for l, (lo, hi) in zip(rows, levels)]
        factor = COST_SCALE / max(room, max(extra, default=0.0), 1e-12)
        weights.append([math.ceil(e * factor) for e in extra])
        capacities.append(math.floor(room * factor))
    solver = knapsack_solver.KnapsackSolver(
        knapsack_solver.SolverType.KNAPSACK_MULTIDIMENSION_BRANCH_AND_BOUND_SOLVER, "eagl")
    solver.set_time_limit(time_limit)
    solver.init(values, weights or [[0] * len(values)], capacities or [0])
    solver.solve()
    index = [hi if solver.best_solution_contains(l) else lo for l, (lo, hi) in zip(rows, levels)]
    status = "optimal" if solver.is_solution_optimal() else "feasible"
    return result(problem, index, "eagl (knapsack, OR-Tools branch and bound)", status)
