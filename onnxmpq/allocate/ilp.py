"""`ilp`: the multiple-choice knapsack of HAWQ-V3 / InfoQ / EAGL as an integer program (OR-Tools CP-SAT).

    minimise   sum_l sum_c S[l, c] x[l, c]
    subject to sum_c x[l, c] = 1                      for every layer l
               sum_l sum_c cost_k[l, c] x[l, c] <= B_k for every budget k
               x[l, c] = 0 where the hardware rules forbid c for l;  x binary.

CP-SAT needs integers: S is scaled so its largest entry is 10^9 (ranking kept to 1 part in 10^9 of
the largest score) and costs are rounded up (limits down), so a solution never exceeds a budget.
"""

from __future__ import annotations

import numpy as np

from onnxmpq.allocate import SOLVERS, Allocation, Problem, totals

SCORE_SCALE = 10 ** 9


@SOLVERS.register("ilp")
def solve_ilp(problem: Problem, time_limit: float = 10.0) -> Allocation:
    from ortools.sat.python import cp_model

    n_layers, n_cands = problem.scores.shape
    top = float(problem.scores.max()) or 1.0
    weights = np.rint(np.maximum(problem.scores, 0) / top * SCORE_SCALE).astype(np.int64)
    model = cp_model.CpModel()
    x = [[model.NewBoolVar(f"x{l}_{c}") for c in range(n_cands)] for l in range(n_layers)]
    for l in range(n_layers):
        model.AddExactlyOne(x[l])
        if problem.allowed is not None:
            for c in range(n_cands):
                if not problem.allowed[l, c]:
                    model.Add(x[l][c] == 0)
    for kind, cost in problem.costs.items():
        ints = np.ceil(cost - 1e-9).astype(np.int64)
        model.Add(sum(int(ints[l, c]) * x[l][c] for l in range(n_layers) for c in range(n_cands))
                  <= int(np.floor(problem.limits[kind] + 1e-9)))
    model.Minimize(sum(int(weights[l, c]) * x[l][c] for l in range(n_layers) for c in range(n_cands)))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit
    solver.parameters.num_workers = 2
    status = solver.Solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        from onnxmpq.errors import ConstraintError
        raise ConstraintError("the integer program found no allocation within the budgets and rules "
                              f"({solver.StatusName(status)}).", "raise a budget or relax the rules.")
    index = [next(c for c in range(n_cands) if solver.Value(x[l][c])) for l in range(n_layers)]
    return Allocation({problem.layers[l]: problem.candidates[index[l]] for l in range(n_layers)},
                      float(problem.scores[np.arange(n_layers), index].sum()), "ilp (CP-SAT)",
                      "optimal" if status == cp_model.OPTIMAL else "feasible", totals(problem, index))
