"""`ilp`: the multiple-choice knapsack of HAWQ-V3 / InfoQ / EAGL. `ilp` tries the fast exact path
(`mckp`: branch and bound on a Lagrangian bound) first and hands the problem to OR-Tools' MIP solver
(SCIP, also `ilp-scip` alone) when the path does not model a rule or leaves a gap; `ilp-cpsat` solves
the integer program with CP-SAT.

    minimise   sum_l sum_c S[l, c] x[l, c]
    subject to sum_c x[l, c] = 1                      for every layer l
               sum_l sum_c cost_k[l, c] x[l, c] <= B_k for every budget k
               x[l, c] = 0 where the hardware rules forbid c for l;  x binary;
               sum_{c: a(c)=a} x[l, c] = sum_{c: a(c)=a} x[m, c]  for tied layers l, m and each act width a;
               x[l, c] <= y[w(c)],  sum_w y[w] <= K (max distinct widths), y binary;
               requantizes (`Link`): r[t, b1, b2] >= A[s, b1] + A[r, b2] - 1 for a writer s and each
               reader r, A[u, b] = sum_{c: a(c)=b} x[u, c] (a constant for fixed units), r >= 0, its
               n * b1 * b2 BitOps added to the bitops budget.

Every solver stops at a relative gap of 1e-4 or its time limit. The gap is (objective - bound) /
(objective - floor), the floor being every layer at its best allowed score: the status is "optimal"
within 1e-4, else "feasible (gap x%)", and `details` carries the gap and the bound. `ilp` gives the
fast path a fifth of the time limit; the MIP gets the rest, starting from the path's best allocation.

CP-SAT needs integers: each layer's scores are shifted by their minimum (which changes no choice) and
scaled so the largest entry is 10^9; costs and limits are scaled so the limit is 10^9 and rounded down,
so every choice within the budgets stays feasible and a chosen one exceeds a budget by less than
L parts in 10^9 (L layers).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from onnxmpq.allocate import Allocation, Problem, admissible, mckp, result, solver
from onnxmpq.errors import ConstraintError

SCORE_SCALE = 10 ** 9
RELATIVE_GAP = 1e-4  # every solver stops within 0.01% of the optimum ("optimal" within that gap)
COST_SCALE = 10 ** 9
FAST_SHARE = 0.2     # of `ilp`'s time limit, for the fast path

# A solver's variable or linear expression: pywraplp's (a module without type information) or CP-SAT's;
# the rules below are written once for both.
Var = Any


def _no_allocation(detail: str, hint: str = "raise a budget or relax the rules.") -> ConstraintError:
    return ConstraintError(f"no allocation meets the budgets and rules together ({detail}).", hint)


def _floor(problem: Problem) -> np.ndarray:
    """Each layer's best allowed score (what the objectives are measured from)."""
    best: np.ndarray = np.where(admissible(problem), problem.scores, np.inf).min(axis=1)
    return best


def finish(problem: Problem, index: Sequence[int], solver: str, bound: float, proven: bool = False) -> Allocation:
    """The Allocation with its honest status: "optimal" when `proven` or within RELATIVE_GAP of `bound`
    (a lower bound on the objective), else "feasible (gap x%)"."""
    alloc = result(problem, index, solver, "optimal")
    excess = alloc.objective - float(_floor(problem).sum())
    gap = max(0.0, alloc.objective - bound) / excess if excess > 0 else 0.0
    if not np.isfinite(gap):
        return replace(alloc, status="feasible (no bound)")
    status = "optimal" if proven or gap <= RELATIVE_GAP else f"feasible (gap {100 * gap:.2g}%)"
    return replace(alloc, status=status, details={"gap": gap, "bound": min(bound, alloc.objective)})


@solver("ilp", "integer program, least summed sensitivity under every budget and rule: exact Lagrangian branch "
         "and bound, then OR-Tools MIP (SCIP) for ties, requantizes or a gap left")
def solve_ilp(problem: Problem, time_limit: float = 10.0) -> Allocation:
    """The fast path within FAST_SHARE of the time limit when it models the rules; the MIP (`scip`,
    warm-started) for the rest of the time otherwise or when the path leaves a gap above RELATIVE_GAP."""
    start = time.perf_counter()
    found = None
    if mckp.unmodelled(problem) is None:
        found = mckp.search(problem, start + FAST_SHARE * time_limit)
        if found.index is None and found.complete:
            raise _no_allocation("the Lagrangian bound and the search prove it")
        if found.index is not None and found.gap() <= RELATIVE_GAP:
            alloc = finish(problem, found.index, "ilp (Lagrangian branch and bound)", found.bound)
            return replace(alloc, details={**alloc.details, "nodes": found.nodes})
    return scip(problem, max(time_limit - (time.perf_counter() - start), 0.0), found)


@solver("ilp-scip", "the same integer program with OR-Tools MIP (SCIP) alone")
def solve_scip(problem: Problem, time_limit: float = 10.0) -> Allocation:
    """The integer program with OR-Tools' MIP solver (SCIP) alone."""
    return scip(problem, time_limit)


def scip(problem: Problem, time_limit: float, start: mckp.Search | None = None) -> Allocation:
    """The integer program with OR-Tools' MIP solver (SCIP): float scores and costs, no scaling. `start`:
    a fast-path search whose allocation is the solver's hint and whose bound and allocation count when
    they are the better ones."""
    from ortools.linear_solver import pywraplp

    n_layers, n_cands = problem.scores.shape
    solver = pywraplp.Solver.CreateSolver("SCIP")
    x = [[solver.BoolVar(f"x{l}_{c}") for c in range(n_cands)] for l in range(n_layers)]
    for l in range(n_layers):
        solver.Add(solver.Sum(x[l]) == 1)
        if problem.allowed is not None:
            for c in np.flatnonzero(~problem.allowed[l]):
                solver.Add(x[l][int(c)] == 0)
    extra = link_terms(problem, x, solver.Add, lambda name: solver.NumVar(0, 1, name))
    for kind, cost in problem.costs.items():
        terms = [float(cost[l, c]) * x[l][c] for l in range(n_layers) for c in range(n_cands)]
        terms += [weight * var for weight, var in extra] if kind == "bitops" else []
        solver.Add(solver.Sum(terms) <= float(problem.limits[kind]))
    add_rules(problem, x, solver.Add, solver.Sum, solver.BoolVar)
    floor = _floor(problem)
    shifted = np.where(admissible(problem), problem.scores - floor[:, None], 0.0)
    solver.Minimize(solver.Sum([float(shifted[l, c]) * x[l][c] for l in range(n_layers) for c in range(n_cands)]))
    if start is not None and start.index is not None:
        solver.SetHint([v for row in x for v in row],
                       [float(c == start.index[l]) for l in range(n_layers) for c in range(n_cands)])
    solver.SetTimeLimit(max(int(time_limit * 1000), 1))
    params = pywraplp.MPSolverParameters()
    params.SetDoubleParam(pywraplp.MPSolverParameters.RELATIVE_MIP_GAP, RELATIVE_GAP)
    status = solver.Solve(params)
    solved = status in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE)
    bound = float(solver.Objective().BestBound()) + float(floor.sum()) if solved else -np.inf
    index = [int(np.argmax([x[l][c].solution_value() for c in range(n_cands)])) for l in range(n_layers)] \
        if solved else None
    name = "ilp (OR-Tools MIP, SCIP)"
    if start is not None:
        bound = max(bound, start.bound)
        if start.index is not None and (index is None or start.objective < result(problem, index, "", "").objective):
            index, name = list(start.index), "ilp (Lagrangian branch and bound, then SCIP)"
    if index is None and status == pywraplp.Solver.INFEASIBLE:
        raise _no_allocation("the MIP solver proves it")
    if index is None:
        raise _no_allocation(f"the MIP solver found none in {time_limit:.3g} s",
                             "raise --time-limit, or a budget, or relax the rules.")
    return finish(problem, index, name, bound, proven=status == pywraplp.Solver.OPTIMAL)


def link_terms(problem: Problem, x: Sequence[Sequence[Var]], add: Callable[[Var], object],
               var: Callable[[str], Var]) -> list[tuple[float, Var]]:
    """The (BitOps, variable) terms of the requantizes (see the module docstring)."""
    widths = sorted({b for b in problem.act_bits if b})
    n_cands = len(problem.candidates)

    def uses(row: int, bits: int) -> list[Var]:
        return [x[row][c] for c in range(n_cands) if problem.act_bits[c] == bits]

    terms: list[tuple[float, Var]] = []
    for k, link in enumerate(problem.links):
        stored = [link.source_bits] if link.source is None else widths
        for b1 in stored:
            if not b1:
                continue
            for b2 in widths + [b for b in link.fixed_readers if b not in widths]:
                if b2 == b1 or not b2:
                    continue
                r = var(f"r{k}_{b1}_{b2}")
                writer = uses(link.source, b1) if link.source is not None else []
                for reader in link.readers:
                    add(r >= sum(writer) + sum(uses(reader, b2)) - (1 if link.source is not None else 0))
                if b2 in link.fixed_readers:
                    add(r >= sum(writer) if link.source is not None else r >= 1)
                terms.append((float(link.elements * b1 * b2), r))
    return terms


def add_rules(problem: Problem, x: Sequence[Sequence[Var]], add: Callable[[Var], object],
              total: Callable[[list[Var]], Var], boolvar: Callable[[str], Var]) -> None:
    """Tie groups share activation widths; at most `max_distinct` weight widths (see the module doc)."""
    n_cands = len(problem.candidates)
    if problem.ties and problem.act_bits:
        for group in problem.ties:
            for a in set(problem.act_bits):
                cols = [c for c in range(n_cands) if problem.act_bits[c] == a]
                for other in group[1:]:
                    add(total([x[group[0]][c] for c in cols]) == total([x[other][c] for c in cols]))
    if problem.max_distinct is not None and problem.weight_bits:
        widths = sorted({w for w in problem.weight_bits if w} | set(problem.fixed_widths))
        y = {w: boolvar(f"y{w}") for w in widths}
        for w in problem.fixed_widths:
            add(y[w] == 1)
        for l in range(len(problem.layers)):
            for c in range(n_cands):
                if problem.weight_bits[c]:
                    add(x[l][c] <= y[problem.weight_bits[c]])
        add(total(list(y.values())) <= problem.max_distinct)


@solver("ilp-cpsat", "the same integer program with OR-Tools CP-SAT")
def solve_cpsat(problem: Problem, time_limit: float = 10.0) -> Allocation:
    """The integer program with CP-SAT on 2 workers (integers: see the module docstring)."""
    from ortools.sat.python import cp_model

    n_layers, n_cands = problem.scores.shape
    shifted = np.where(admissible(problem), problem.scores - _floor(problem)[:, None], 0.0)
    top = float(shifted.max()) or 1.0
    weights = np.rint(shifted / top * SCORE_SCALE).astype(np.int64)
    model = cp_model.CpModel()
    x = [[model.new_bool_var(f"x{l}_{c}") for c in range(n_cands)] for l in range(n_layers)]
    for l in range(n_layers):
        model.add_exactly_one(x[l])
        if problem.allowed is not None:
            for c in range(n_cands):
                if not problem.allowed[l, c]:
                    model.add(x[l][c] == 0)
    flat = [x[l][c] for l in range(n_layers) for c in range(n_cands)]
    extra = link_terms(problem, x, model.add, model.new_bool_var)
    for kind, cost in problem.costs.items():
        factor = COST_SCALE / max(problem.limits[kind], 1e-12)
        ints = np.floor(cost * factor).astype(np.int64).ravel().tolist()
        terms, weights_k = list(flat), ints
        if kind == "bitops" and extra:
            terms += [var for _, var in extra]
            weights_k = ints + [int(np.ceil(w * factor)) for w, _ in extra]
        model.add(cp_model.LinearExpr.weighted_sum(terms, weights_k) <= int(np.floor(problem.limits[kind] * factor)))
    add_rules(problem, x, model.add, sum, model.new_bool_var)
    model.minimize(cp_model.LinearExpr.weighted_sum(flat, weights.ravel().tolist()))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit
    solver.parameters.num_workers = 2
    solver.parameters.relative_gap_limit = RELATIVE_GAP
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise _no_allocation(solver.status_name(status))
    index = [next(c for c in range(n_cands) if solver.value(x[l][c])) for l in range(n_layers)]
    bound = float(_floor(problem).sum()) + solver.best_objective_bound / SCORE_SCALE * top
    return finish(problem, index, "ilp (CP-SAT)", bound, proven=status == cp_model.OPTIMAL)
