"""The allocation stage: `parse_budget`, the `ilp` solver (its fast path `mckp` with its Lagrangian
bound, and the MIP), `greedy`, `check_feasible` / `solve`, `api.allocation_problem` on ResNet-20 and
`api.quantize(..., budgets=...)` end to end.

Oracles are independent of the code under test: brute force over every combination for small random
problems, SCIP run to a gap of 1e-9 for larger ones, scipy's LP solver (HiGHS) for the Lagrangian
bound, a dynamic program over the (integer) avg-bits cost for the real ResNet-20 problem, costs
recomputed from the ONNX initializers and shape inference, and onnx's checker plus onnxruntime for the
written model.
"""

from __future__ import annotations

import itertools
import math
import time
from functools import reduce
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxmpq.allocate import Budget, Problem, admissible, check_feasible, ilp, lagrange, mckp, parse_budget, reachable, solve
from onnxmpq.errors import ConstraintError, OnnxmpqError
from onnxmpq.pipeline import api, stages
from onnxmpq.types import Candidate, LayerScores, SensitivityTable
from onnxmpq.write.formats import weight_format

ROOT = Path(__file__).resolve().parents[2]
RESNET = ROOT / "models" / "resnet20_cifar10.onnx"
CALIB = ROOT / "calibration" / "cifar10_train256.npz"
SLACK = 1e-9  # relative slack the package itself allows on a budget


# ---------------------------------------------------------------- helpers


def make_problem(scores, costs, limits, allowed=None, units=None) -> Problem:
    scores = np.asarray(scores, float)
    n_layers, n_cands = scores.shape
    return Problem(tuple(f"l{i}" for i in range(n_layers)), tuple(f"c{j}" for j in range(n_cands)), scores,
                   {k: np.asarray(v, float) for k, v in costs.items()}, dict(limits),
                   None if allowed is None else np.asarray(allowed, bool), units=dict(units or {}))


def indices(problem: Problem, allocation) -> np.ndarray:
    """The allocation's candidate index per layer, in layer order (also checks it names every layer)."""
    assert set(allocation.choice) == set(problem.layers)
    return np.array([problem.candidates.index(allocation.choice[name]) for name in problem.layers])


def objective(problem: Problem, index) -> float:
    return float(sum(problem.scores[l, c] for l, c in enumerate(index)))


def cost_totals(problem: Problem, index) -> dict[str, float]:
    return {k: float(sum(cost[l, c] for l, c in enumerate(index))) for k, cost in problem.costs.items()}


def within(problem: Problem, index) -> bool:
    return all(v <= problem.limits[k] * (1 + SLACK) + 1e-9 for k, v in cost_totals(problem, index).items())


def brute_force(problem: Problem):
    """(index, objective) of the best admissible combination within every budget, or None."""
    n_layers, n_cands = problem.scores.shape
    combos = np.array(list(itertools.product(range(n_cands), repeat=n_layers)))
    rows = np.arange(n_layers)
    ok = np.ones(len(combos), bool)
    if problem.allowed is not None:
        ok &= problem.allowed[rows, combos].all(axis=1)
    for kind, cost in problem.costs.items():
        ok &= cost[rows, combos].sum(axis=1) <= problem.limits[kind]
    if not ok.any():
        return None
    values = np.where(ok, problem.scores[rows, combos].sum(axis=1), np.inf)
    best = int(np.argmin(values))
    return combos[best], float(values[best])


@st.composite
def problems(draw, budgets=(1, 2)):
    """2-6 layers, 2-4 candidates, 1-2 budgets of integer costs; limits from below the cheapest total
    (infeasible) to above the dearest; optional `allowed` masks; sometimes integer scores with ties."""
    n_layers, n_cands = draw(st.integers(2, 6)), draw(st.integers(2, 4))
    n_budgets = draw(st.integers(*budgets)) if len(budgets) == 2 else budgets[0]
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    scores = rng.integers(0, 6, (n_layers, n_cands)).astype(float) if draw(st.booleans()) \
        else rng.uniform(0, 10, (n_layers, n_cands))
    allowed = None
    if draw(st.booleans()):
        allowed = rng.random((n_layers, n_cands)) < 0.7
        allowed[np.arange(n_layers), rng.integers(0, n_cands, n_layers)] = True
    mask = allowed if allowed is not None else np.ones((n_layers, n_cands), bool)
    costs, limits = {}, {}
    for kind in ["weight-bytes", "bitops"][:n_budgets]:
        cost = rng.integers(0, 50, (n_layers, n_cands)).astype(float)
        lo = np.where(mask, cost, np.inf).min(axis=1).sum()
        hi = np.where(mask, cost, -np.inf).max(axis=1).sum()
        costs[kind], limits[kind] = cost, float(lo + draw(st.floats(-0.2, 1.1)) * (hi - lo))
    return make_problem(scores, costs, limits, allowed)


HYPOTHESIS = settings(max_examples=60, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- parse_budget


@pytest.mark.parametrize("text, kind, value, relative", [
    ("weight-bytes=150KB", "weight-bytes", 150_000, False),
    ("weight-bytes=1.2MB", "weight-bytes", 1_200_000, False),
    ("weight-bytes=64KiB", "weight-bytes", 65_536, False),
    ("weight-bytes=2MiB", "weight-bytes", 2 * 1024 ** 2, False),
    ("weight-bytes=1000", "weight-bytes", 1000, False),
    ("weight-bytes=500B", "weight-bytes", 500, False),
    ("avg-bits=3.5", "avg-bits", 3.5, False),
    ("avg-bits=4", "avg-bits", 4, False),
    ("bitops=0.5x", "bitops", 0.5, True),
    ("bitops=2.1e9", "bitops", 2.1e9, False),
    ("BitOps = 2.1E9", "bitops", 2.1e9, False),
])
def test_parse_budget(text, kind, value, relative):
    budget = parse_budget(text)
    assert isinstance(budget, Budget)
    assert budget.kind == kind and budget.relative is relative
    assert budget.value == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("text, needle", [
    ("size=3", "size=3"),                    # unknown kind: the message names the text and the kinds
    ("avg-bits", "avg-bits"),                # no '='
    ("=3", "avg-bits"),                      # no kind
    ("avg-bits=three", "three"),             # not a number
    ("avg-bits=", "number"),
    ("avg-bits=3KB", "KB"),                  # a byte unit on bits
    ("bitops=5MB", "MB"),
    ("weight-bytes=150XB", "XB"),            # unknown unit
])
def test_parse_budget_rejects(text, needle):
    with pytest.raises(OnnxmpqError) as info:
        parse_budget(text)
    assert needle in str(info.value)
    assert info.value.hint


@pytest.mark.parametrize("text", ["avg-bits=3.5e", "weight-bytes=1.2.3KB", "avg-bits=-", "weight-bytes=150EB"])
def test_parse_budget_rejects_malformed_numbers_as_user_errors(text):
    """Text the number pattern lets through but float() refuses must still be a user error, not a ValueError."""
    with pytest.raises(OnnxmpqError):
        parse_budget(text)


def test_relative_avg_bits_is_not_read_as_absolute_bits():
    """avg-bits=0.5x must either be refused or mean a fraction of a reference width (8 or 32 bits);
    it must never silently become a limit of 0.5 bits per weight."""
    model = api.load(RESNET)
    cands = [Candidate(4, 8), Candidate(8, 8)]
    table = fake_table(model, cands)
    total = sum(spec.params for spec in model.layers)
    try:
        problem = api.allocation_problem(model, table, cands, [parse_budget("avg-bits=0.5x")])
    except OnnxmpqError:
        return
    limit = problem.limits["avg-bits"]
    assert limit == pytest.approx(0.5 * 8 * total) or limit == pytest.approx(0.5 * 32 * total), limit


# ---------------------------------------------------------------- ilp


@HYPOTHESIS
@given(problems())
def test_reachable_keeps_every_choice_of_every_feasible_allocation(problem):
    """Every (layer, candidate) that some allocation within the budgets uses is reachable, and with one
    budget nothing else is (the bound is then exact: the rest of the layers at their cheapest)."""
    n_layers, n_cands = problem.scores.shape
    rows = np.arange(n_layers)
    combos = np.array(list(itertools.product(range(n_cands), repeat=n_layers)))
    ok = admissible(problem)[rows, combos].all(axis=1)
    for kind, cost in problem.costs.items():
        ok &= cost[rows, combos].sum(axis=1) <= problem.limits[kind]
    used = np.zeros((n_layers, n_cands), bool)
    for combo in combos[ok]:
        used[rows, combo] = True
    mask = reachable(problem)
    assert not (used & ~mask).any()
    if len(problem.costs) == 1 and ok.any():
        assert (mask == used).all()


def test_reachable_leaves_one_choice_per_layer_at_the_cheapest_total():
    problem = make_problem([[0, 0], [0, 0], [0, 0]], {"bitops": [[1, 2], [2, 4], [3, 5]]}, {"bitops": 6})
    assert reachable(problem).tolist() == [[True, False], [True, False], [True, False]]
    wider = make_problem([[0, 0], [0, 0], [0, 0]], {"bitops": [[1, 2], [2, 4], [3, 5]]}, {"bitops": 7})
    assert reachable(wider).tolist() == [[True, True], [True, False], [True, False]]


@HYPOTHESIS
@given(problems())
def test_ilp_matches_brute_force(problem):
    best = brute_force(problem)
    if best is None:
        with pytest.raises(ConstraintError) as info:
            solve(problem, "ilp")
        assert info.value.exit_code == 2
        return
    _, best_value = best
    result = solve(problem, "ilp")
    index = indices(problem, result)
    value = objective(problem, index)
    tol = 1e-6 * max(float(problem.scores.max()), 1e-12) * len(problem.layers)
    assert value <= best_value + tol, (value, best_value)
    assert within(problem, index), (cost_totals(problem, index), problem.limits)
    if problem.allowed is not None:
        assert problem.allowed[np.arange(len(index)), index].all()
    assert result.status == "optimal"
    assert result.objective == pytest.approx(value, rel=1e-9, abs=1e-12)
    for kind, total in cost_totals(problem, index).items():
        assert result.costs[kind] == pytest.approx(total)


def test_ilp_honours_allowed_even_when_the_forbidden_choice_is_better():
    # layer 0 would take c0 (score 0, cheap) but only c1/c2 are allowed; layer 1 is free.
    problem = make_problem([[0, 5, 9], [9, 5, 0]], {"bitops": [[1, 2, 3], [3, 2, 1]]}, {"bitops": 6},
                           allowed=[[False, True, True], [True, True, True]])
    result = solve(problem, "ilp")
    assert result.choice == {"l0": "c1", "l1": "c2"}
    assert result.objective == pytest.approx(5)


def test_ilp_with_fractional_costs_finds_the_optimum():
    """Costs need not be whole numbers (e.g. kilobytes): rounding each cost up must not lose the optimum.
    Here every layer at `hi` costs 3 x 0.3 = 0.9 <= 1.0, so the zero-score answer is feasible."""
    problem = make_problem([[1.0, 0.0]] * 3, {"weight-bytes": [[0.1, 0.3]] * 3}, {"weight-bytes": 1.0})
    result = solve(problem, "ilp")
    assert result.choice == {"l0": "c1", "l1": "c1", "l2": "c1"}
    assert result.objective == pytest.approx(0.0)


@pytest.mark.parametrize("scores", [[[-1.0, -5.0]], [[3.0, -2.0]], [[-0.5, 0.0, -0.25]]])
def test_ilp_minimises_negative_scores_too(scores):
    """A degradation may come out negative (noise, a quantizer that helps); the minimum is still the minimum."""
    n = len(scores[0])
    problem = make_problem(scores, {"bitops": [[1.0] * n]}, {"bitops": 5})
    result = solve(problem, "ilp")
    assert result.objective == pytest.approx(min(scores[0]))


def test_ilp_matches_dynamic_program_on_resnet20(weight_entropy_problem):
    """The real 20-layer x 7-candidate problem under avg-bits=4, against an exact DP over the avg-bits cost."""
    problem = weight_entropy_problem
    cost = problem.costs["avg-bits"].astype(np.int64)
    g = reduce(math.gcd, cost.ravel().tolist())
    units, cap = cost // g, int(problem.limits["avg-bits"] // g)
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    for l in range(len(problem.layers)):
        nxt = np.full(cap + 1, np.inf)
        for c in range(len(problem.candidates)):
            u = int(units[l, c])
            if u <= cap:
                nxt[u:] = np.minimum(nxt[u:], best[: cap + 1 - u] + problem.scores[l, c])
        best = nxt
    optimum = float(best.min())
    result = solve(problem, "ilp")
    index = indices(problem, result)
    tol = 1e-6 * float(problem.scores.max()) * len(problem.layers)
    assert within(problem, index)
    assert optimum - tol <= objective(problem, index) <= optimum + tol, (objective(problem, index), optimum)
    assert result.status == "optimal"


# ---------------------------------------------------------------- ilp's fast path (mckp) against the MIP


def layered_problem(n_layers: int, n_budgets: int, seed: int, *, curve: bool, masked: bool = True) -> Problem:
    """Either sensitivity curves falling with the bits and costs params x bits, MACs x bits x 8 (the shape
    of a real problem, many near-ties) or uniform scores and integer costs unrelated to them; limits
    between the cheapest and the dearest totals; a random `allowed` mask (one choice per layer kept)."""
    rng = np.random.default_rng(seed)
    bits = np.array([2, 3, 4, 5, 6, 8])
    scores = np.exp(-0.7 * bits)[None, :] * rng.uniform(0.1, 10, (n_layers, 1)) if curve \
        else rng.uniform(0, 10, (n_layers, len(bits)))
    allowed = rng.random(scores.shape) < 0.75 if masked else np.ones(scores.shape, bool)
    allowed[np.arange(n_layers), rng.integers(0, len(bits), n_layers)] = True
    costs, limits = {}, {}
    for kind in ["avg-bits", "bitops", "weight-bytes"][:n_budgets]:
        cost = (rng.integers(100, 100_000, (n_layers, 1)) * bits).astype(float) if curve \
            else rng.integers(0, 50, scores.shape).astype(float)
        lo = float(np.where(allowed, cost, np.inf).min(axis=1).sum())
        hi = float(np.where(allowed, cost, -np.inf).max(axis=1).sum())
        costs[kind], limits[kind] = cost, lo + rng.uniform(0.2, 0.8) * (hi - lo)
    return make_problem(scores, costs, limits, allowed)


def exact_mip(problem: Problem, monkeypatch):
    """SCIP run to a relative gap of 1e-9: the oracle."""
    monkeypatch.setattr(ilp, "RELATIVE_GAP", 1e-9)
    return solve(problem, "ilp-scip", 60.0)


@pytest.mark.parametrize("n_layers", [8, 40, 150])
@pytest.mark.parametrize("n_budgets", [1, 2])
@pytest.mark.parametrize("curve", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_fast_path_matches_the_mip(n_layers, n_budgets, curve, seed, monkeypatch):
    problem = layered_problem(n_layers, n_budgets, 1000 * n_layers + 10 * seed + n_budgets, curve=curve)
    found = mckp.search(problem, time.perf_counter() + 20)
    assert found.complete and found.index is not None and found.gap() <= 1e-6
    index = np.array(found.index)
    assert problem.allowed[np.arange(n_layers), index].all()
    assert within(problem, index), (cost_totals(problem, index), problem.limits)
    assert objective(problem, index) == pytest.approx(found.objective, rel=1e-12)
    alloc = solve(problem, "ilp")
    assert alloc.solver == "ilp (Lagrangian branch and bound)" and alloc.status == "optimal"
    assert alloc.details["bound"] <= alloc.objective and alloc.details["gap"] <= 1e-6
    oracle = exact_mip(problem, monkeypatch)
    assert found.objective == pytest.approx(oracle.objective, rel=1e-7, abs=1e-9)
    assert alloc.objective == pytest.approx(oracle.objective, rel=1e-7, abs=1e-9)


def test_fast_path_with_three_budgets_matches_the_mip(monkeypatch):
    problem = layered_problem(60, 3, 7, curve=False)
    alloc = solve(problem, "ilp")
    assert alloc.status == "optimal"
    assert alloc.solver.startswith("ilp (Lagrangian")
    assert alloc.objective == pytest.approx(exact_mip(problem, monkeypatch).objective, rel=1e-7)


def test_fast_path_takes_a_choice_above_the_convex_hull():
    """Layer 0's middle choice (cost 1, score 1.5) lies above the hull line from (0, 2) to (2, 0), so the
    LP never takes it; with one unit of budget for the layer it is the integer optimum (1.5 + 0 < 2 + 0,
    the other layer costs nothing). A solver that kept only hull choices would answer 2."""
    problem = make_problem([[2.0, 1.5, 0.0], [1.0, 0.0, 0.0]], {"bitops": [[0, 1, 2], [0, 0, 5]]}, {"bitops": 1})
    alloc = solve(problem, "ilp")
    assert alloc.choice == {"l0": "c1", "l1": "c1"} and alloc.objective == pytest.approx(1.5)
    assert alloc.solver.startswith("ilp (Lagrangian")


def test_fast_path_never_takes_a_forbidden_choice():
    """Every layer's first choice is free and perfect but forbidden."""
    rng = np.random.default_rng(3)
    scores = np.hstack([np.zeros((30, 1)), rng.uniform(1, 2, (30, 3))])
    cost = np.hstack([np.zeros((30, 1)), rng.integers(1, 9, (30, 3))]).astype(float)
    allowed = np.ones((30, 4), bool)
    allowed[:, 0] = False
    problem = make_problem(scores, {"bitops": cost}, {"bitops": float(cost[:, 1:].mean(axis=1).sum())}, allowed)
    index = indices(problem, solve(problem, "ilp"))
    assert (index > 0).all() and within(problem, index)


def test_dominated_choices_are_dropped_and_ties_keep_the_first():
    """c1 is no better than c0 in score or cost (dropped); c2 equals c3 (c3 dropped); c4 is the dearest
    but the best score (kept)."""
    problem = make_problem([[1.0, 1.0, 0.5, 0.5, 0.0]], {"bitops": [[1, 2, 3, 3, 9]]}, {"bitops": 5})
    arrays = lagrange.normalise(problem, admissible(problem))
    assert np.isfinite(arrays.scores[0]).tolist() == [True, False, True, False, True]


@pytest.mark.parametrize("n_budgets", [1, 2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_lagrangian_bound_is_the_lp_optimum(n_budgets, seed):
    """max g(lam) equals the LP relaxation's optimum (scipy's HiGHS) for one and two budgets; with three
    (cyclic steps) it is a valid bound, at most the LP's."""
    from scipy.optimize import linprog

    problem = layered_problem(25, n_budgets, seed, curve=bool(seed % 2), masked=False)
    arrays = lagrange.normalise(problem, admissible(problem))
    value = lagrange.lagrangian(arrays, lagrange.multipliers(arrays, time.perf_counter() + 10))
    n_layers, n_cands = problem.scores.shape
    rows = np.kron(np.eye(n_layers), np.ones(n_cands))
    lp = linprog(problem.scores.ravel(), A_ub=np.array([c.ravel() for c in problem.costs.values()]),
                 b_ub=list(problem.limits.values()), A_eq=rows, b_eq=np.ones(n_layers), bounds=(0, 1), method="highs")
    assert lp.status == 0
    raw = arrays.floor + arrays.scale * value
    if n_budgets < 3:
        assert raw == pytest.approx(lp.fun, rel=1e-7)
    else:
        assert arrays.floor - 1e-9 <= raw <= lp.fun * (1 + 1e-9)


def test_fast_path_proves_two_budgets_cannot_be_met_together(monkeypatch):
    """Each budget alone can be met (check_feasible passes), both cannot: every layer's cheap choice in one
    budget is its dear one in the other. The Lagrangian bound proves it without the MIP."""
    n = 200
    problem = make_problem(np.tile([0.0, 1.0], (n, 1)), {"weight-bytes": np.tile([1.0, 9.0], (n, 1)),
                                                          "bitops": np.tile([9.0, 1.0], (n, 1))},
                           {"weight-bytes": 4.9 * n, "bitops": 4.9 * n})
    check_feasible(problem)
    found = mckp.search(problem, time.perf_counter() + 10)
    assert found.index is None and found.complete
    monkeypatch.setattr(ilp, "scip", lambda *a, **k: pytest.fail("the MIP was asked"))
    with pytest.raises(ConstraintError) as info:
        solve(problem, "ilp")
    assert info.value.exit_code == 2 and "no allocation meets the budgets" in info.value.message
    assert info.value.hint


@pytest.mark.parametrize("bound, status", [(10.0, "optimal"), (9.9995, "optimal"), (9.0, "feasible (gap 11%)"),
                                           (-np.inf, "feasible (no bound)")])
def test_status_says_the_gap(bound, status):
    """Objective 10 (floor 1: excess 9): a bound of 9.9995 leaves 0.0005 / 9 = 5.6e-5 (within 1e-4:
    optimal), 9 leaves 1 / 9 = 11%."""
    problem = make_problem([[1.0, 10.0], [0.0, 0.0]], {"bitops": [[1, 1], [1, 1]]}, {"bitops": 2})
    alloc = ilp.finish(problem, [1, 0], "test", bound)
    assert alloc.status == status and alloc.objective == 10.0
    if np.isfinite(bound):
        assert alloc.details["gap"] == pytest.approx((10.0 - bound) / 9)


def test_a_search_cut_short_reports_its_gap_honestly():
    """A 2,000-layer problem with no time: `ilp` may still answer, but its status must match its bound."""
    problem = layered_problem(2000, 2, 11, curve=False, masked=False)
    alloc = solve(problem, "ilp", time_limit=0.05)
    index = indices(problem, alloc)
    assert within(problem, index)
    floor = float(problem.scores.min(axis=1).sum())
    gap = (alloc.objective - alloc.details["bound"]) / (alloc.objective - floor)
    assert alloc.details["gap"] == pytest.approx(gap, abs=1e-12)
    assert alloc.status == "optimal" if gap <= ilp.RELATIVE_GAP else alloc.status == f"feasible (gap {100 * gap:.2g}%)"


def test_ilp_hands_ties_to_the_mip():
    """Untied, l0 takes a16 and l1 a8 (objective 0); tied, both a8 (1 + 0) beats both a16 (0 + 3)."""
    problem = Problem(("l0", "l1"), ("w8a8", "w8a16"), np.array([[1.0, 0.0], [0.0, 3.0]]),
                      {"bitops": np.array([[1.0, 2.0], [1.0, 2.0]])}, {"bitops": 10.0}, act_bits=(8, 16),
                      weight_bits=(8, 8), ties=((0, 1),))
    assert mckp.unmodelled(problem) == "tied activation widths"
    alloc = solve(problem, "ilp")
    assert "SCIP" in alloc.solver and alloc.status == "optimal"
    assert alloc.choice == {"l0": "w8a8", "l1": "w8a8"} and alloc.objective == pytest.approx(1)


# ---------------------------------------------------------------- greedy


def _check_greedy(problem):
    best = brute_force(problem)
    if best is None:
        with pytest.raises(ConstraintError):
            solve(problem, "greedy")
        return
    result = solve(problem, "greedy")
    index = indices(problem, result)
    assert within(problem, index), (result.status, cost_totals(problem, index), problem.limits)
    if problem.allowed is not None:
        assert problem.allowed[np.arange(len(index)), index].all()
    tol = 1e-6 * max(float(problem.scores.max()), 1e-12) * len(problem.layers)
    assert objective(problem, index) >= best[1] - tol
    assert objective(problem, index) >= solve(problem, "ilp").objective - tol
    assert result.objective == pytest.approx(objective(problem, index), rel=1e-9, abs=1e-12)


@HYPOTHESIS
@given(problems(budgets=(1,)))
def test_greedy_within_one_budget_and_never_better_than_ilp(problem):
    _check_greedy(problem)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(problems(budgets=(2,)))
def test_greedy_within_two_budgets_or_says_to_use_ilp(problem):
    """With two budgets greedy may miss a feasible mix (see the counterexample below): it then refuses
    with a hint to the ILP, and never returns an allocation over a budget."""
    try:
        _check_greedy(problem)
    except ConstraintError as exc:
        assert brute_force(problem) is not None and "search.method ilp" in str(exc)


def test_greedy_two_budgets_counterexample():
    """Two layers, candidates A (dear in both), B (cheap in k1), C (cheap in k2). A B/C mix meets both
    budgets (ILP: objective 3); greedy only moves each layer to its cheapest *combined* cost (B, ties
    resolved by order) and ends over budget in k2."""
    problem = make_problem([[0, 1, 2], [0, 1, 2]],
                           {"weight-bytes": [[10, 1, 5], [10, 1, 5]], "bitops": [[10, 5, 1], [10, 5, 1]]},
                           {"weight-bytes": 6, "bitops": 6})
    assert brute_force(problem)[1] == pytest.approx(3)
    assert solve(problem, "ilp").objective == pytest.approx(3)
    _check_greedy(problem)


def test_greedy_raises_when_budgets_jointly_cannot_be_met():
    """Each budget alone can be met (so check_feasible passes) but not both at once: greedy must raise
    ConstraintError like the ILP does, not hand back an allocation that breaks a budget."""
    problem = make_problem([[0, 1], [0, 1]], {"weight-bytes": [[1, 9], [1, 9]], "bitops": [[9, 1], [9, 1]]},
                           {"weight-bytes": 5, "bitops": 5})
    check_feasible(problem)
    assert brute_force(problem) is None
    with pytest.raises(ConstraintError) as info:
        solve(problem, "ilp")
    assert info.value.exit_code == 2
    with pytest.raises(ConstraintError) as info:
        solve(problem, "greedy")
    assert info.value.exit_code == 2


def test_greedy_strictly_worse_than_ilp():
    """Layer 0 saves 1 cost unit for +1 score (ratio 1); layer 1 saves 10 for +3 (ratio 0.3). One unit must
    be saved: greedy takes the better ratio (objective 3), the ILP the cheaper step (objective 1)."""
    problem = make_problem([[0, 1], [0, 3]], {"weight-bytes": [[10, 9], [10, 0]]}, {"weight-bytes": 19})
    greedy, ilp = solve(problem, "greedy"), solve(problem, "ilp")
    assert greedy.choice == {"l0": "c0", "l1": "c1"} and greedy.objective == pytest.approx(3)
    assert ilp.choice == {"l0": "c1", "l1": "c0"} and ilp.objective == pytest.approx(1)
    assert greedy.status == "feasible" and ilp.status == "optimal"


def test_greedy_equals_ilp_when_layers_are_separable():
    """A loose budget and scores that fall as cost rises: every layer keeps its dearest, best candidate."""
    scores = [[4, 2, 0], [5, 1, 0], [3, 3, 0]]
    problem = make_problem(scores, {"bitops": [[1, 2, 4], [1, 3, 5], [2, 3, 4]]}, {"bitops": 100})
    greedy, ilp = solve(problem, "greedy"), solve(problem, "ilp")
    assert greedy.choice == ilp.choice == {"l0": "c2", "l1": "c2", "l2": "c2"}
    assert greedy.objective == ilp.objective == 0


# ---------------------------------------------------------------- check_feasible / solve


def avg_bits_problem(limit_bits: float) -> Problem:
    """Layers of 100 and 300 params at 3, 5 or 8 bits; layer 1 may not use 3 bits. Smallest average:
    (100*3 + 300*5) / 400 = 4.5 bits."""
    params, bits = np.array([100, 300]), np.array([3, 5, 8])
    return make_problem([[3, 2, 0], [3, 2, 0]], {"avg-bits": params[:, None] * bits[None, :]},
                        {"avg-bits": limit_bits * 400}, allowed=[[True] * 3, [False, True, True]],
                        units={"avg-bits": 400})


@pytest.mark.parametrize("call", [check_feasible, lambda p: solve(p, "ilp"), lambda p: solve(p, "greedy")])
def test_infeasible_budget_names_smallest_value_in_user_units(call):
    with pytest.raises(ConstraintError) as info:
        call(avg_bits_problem(4.0))
    err = info.value
    assert err.exit_code == 2 and isinstance(err, OnnxmpqError)
    assert "avg-bits=4 " in err.message
    assert "smallest achievable is 4.5 " in err.message
    assert err.hint


def test_budget_at_the_smallest_value_is_feasible():
    problem = avg_bits_problem(4.5)
    check_feasible(problem)
    for method in ("ilp", "greedy"):
        result = solve(problem, method)
        assert result.choice == {"l0": "c0", "l1": "c1"}
        assert result.costs["avg-bits"] == pytest.approx(4.5)  # totals in the unit the user wrote


def test_unknown_method_is_a_user_error():
    with pytest.raises(OnnxmpqError) as info:
        solve(avg_bits_problem(8), "simplex")
    assert "ilp" in str(info.value) and "greedy" in str(info.value)


@pytest.mark.e2e
def test_ilp_500_layers_two_budgets_meets_both():
    """The benchmark's problem: `ilp` answers from its fast path, optimal, no worse than SCIP alone and
    above SCIP's proven bound. The times are benchmark figures (BENCHMARKS.md), not asserted here."""
    rng = np.random.default_rng(0)
    n_layers, bits = 500, np.array([2, 3, 4, 5, 6, 8])
    params, macs = rng.integers(100, 100_000, n_layers), rng.integers(1000, 10 ** 7, n_layers)
    scores = np.exp(-0.7 * bits)[None, :] * rng.uniform(0.1, 10, (n_layers, 1))
    problem = make_problem(scores, {"avg-bits": params[:, None] * bits, "bitops": macs[:, None] * bits * 8},
                           {"avg-bits": 4.3 * params.sum(), "bitops": 0.5 * (macs * 64).sum()})
    start = time.perf_counter()
    result = solve(problem, "ilp")
    elapsed = time.perf_counter() - start
    print(f"ilp 500x6, 2 budgets: {elapsed:.2f} s, status {result.status}, objective {result.objective:.6g}")
    assert within(problem, indices(problem, result))
    assert result.solver == "ilp (Lagrangian branch and bound)" and result.status == "optimal"
    scip = solve(problem, "ilp-scip")
    assert result.objective <= scip.objective + 1e-9
    assert result.objective >= scip.details["bound"] - 1e-9


# ---------------------------------------------------------------- allocation_problem on ResNet-20


def fake_table(model, candidates, seed=0) -> SensitivityTable:
    """A hand-made table in reverse layer order (rows are matched by name, not position)."""
    rng = np.random.default_rng(seed)
    rows = tuple(LayerScores(spec.name, spec.op_type, {c.key: float(rng.uniform(0, 1)) for c in candidates})
                 for spec in reversed(model.layers))
    return SensitivityTable("hand", tuple(c.key for c in candidates), rows, 0, 0.0)


def independent_layer_facts(path):
    """{node name: (params, output channels, MACs)} from the initializers and onnx shape inference."""
    proto = onnx.load(str(path))
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    proto = onnx.shape_inference.infer_shapes(proto)
    inits = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    shapes = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
              for v in list(proto.graph.value_info) + list(proto.graph.output)}
    facts = {}
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        w = inits[node.input[1]]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        out = shapes[node.output[0]]
        if node.op_type == "Conv":
            macs = int(np.prod(out)) * int(np.prod(w[1:]))
            channels = w[0]
        else:
            channels = w[0] if attrs.get("transB", 0) else w[1]
            macs = int(np.prod(out)) * (w[1] if attrs.get("transB", 0) else w[0])
        facts[node.name] = (int(np.prod(w)), channels, macs)
    return facts


@pytest.fixture(scope="module")
def resnet():
    return api.load(RESNET)


@pytest.fixture(scope="module")
def weight_entropy_problem(resnet):
    cands = [Candidate(w, 8) for w in range(2, 9)]
    table = api.sensitivity(resnet, None, metrics=["weight-entropy"], weight_bits=list(range(2, 9)), act_bits=[8])[0]
    return api.allocation_problem(resnet, table, cands, [parse_budget("avg-bits=4")])


def test_allocation_problem_costs_and_limits_on_resnet20(resnet):
    cands = [Candidate(2, 8), Candidate(3, 8), Candidate(4, 8), Candidate(8, 8), Candidate(4, None),
             Candidate(None, 8)]
    table = fake_table(resnet, cands)
    budgets = [parse_budget("avg-bits=4"), parse_budget("weight-bytes=150KB"), parse_budget("bitops=0.5x")]
    problem = api.allocation_problem(resnet, table, cands, budgets)
    facts = independent_layer_facts(RESNET)
    names = [spec.name for spec in resnet.layers]
    assert len(names) == 20 and set(names) == set(facts)
    # two activation widths (8 and float): the 9 residual Adds and the pooling are rows too, choosing a8 or float
    others = [u.name for u in resnet.points().units if u.layer is None]
    assert len(others) == 10 and all(n.endswith(("Add", "GlobalAveragePool")) for n in others)
    assert problem.layers == tuple(u.name for u in resnet.points().units)
    assert problem.candidates == ("w2a8", "w3a8", "w4a8", "w8a8", "w4", "a8", "float")
    for name in others:
        row = problem.layers.index(name)
        assert list(problem.allowed[row]) == [False] * 5 + [True, True]
        assert all(problem.costs[kind][row].max() == 0 for kind in problem.costs)  # no weights, no MACs

    rows = {row.name: row for row in table.layers}
    expected_scores = [[rows[n].scores.get(k, 0.0) for k in problem.candidates] for n in names]
    np.testing.assert_array_equal(problem.scores[[problem.layers.index(n) for n in names]], expected_scores)

    for name in names:
        l = problem.layers.index(name)
        params, channels, macs = facts[name]
        for c, cand in enumerate(cands):
            w, a = cand.weight_bits or 32, cand.act_bits or 32
            assert problem.costs["avg-bits"][l, c] == params * w
            assert problem.costs["bitops"][l, c] == macs * w * a
            if cand.weight_bits:
                fmt = weight_format(cand.weight_bits)
                # sub-byte codes beside 8-bit activations are cast to INT8 at run time: INT8 zero points
                zero_bytes = channels if fmt.container_bits < 8 and cand.act_bits == 8 else fmt.storage_bytes(channels)
                expect = fmt.storage_bytes(params) + 4 * channels + zero_bytes
            else:
                expect = 4 * params
            assert problem.costs["weight-bytes"][l, c] == expect, (name, cand)
    # spot values: a 16x16x3x3 conv at 2 bits is 2304 / 4 bytes of codes + 16 float scales + 16 INT8 zero points
    first = names.index("/layer1/layer1.0/conv1/Conv")
    assert problem.costs["weight-bytes"][first, 0] == 576 + 64 + 16

    total_params = sum(f[0] for f in facts.values())
    w8a8 = sum(f[2] * 64 for f in facts.values())
    assert problem.limits["avg-bits"] == pytest.approx(4 * total_params)
    assert problem.limits["weight-bytes"] == pytest.approx(150_000)
    assert problem.limits["bitops"] == pytest.approx(0.5 * w8a8)
    assert problem.units["avg-bits"] == total_params and problem.units["bitops"] == w8a8


def test_allocation_problem_absolute_bitops(resnet):
    cands = [Candidate(4, 8), Candidate(8, 8)]
    problem = api.allocation_problem(resnet, fake_table(resnet, cands), cands, [parse_budget("bitops=2.1e9")])
    assert problem.limits["bitops"] == pytest.approx(2.1e9)


# ---------------------------------------------------------------- api.quantize with budgets


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    out = tmp_path_factory.mktemp("alloc") / "r20_avg4.onnx"
    report = api.quantize(RESNET, out, CALIB, budgets=[parse_budget("avg-bits=4")],
                          search={"metric": "weight-entropy"}, limit=32, rounding="nearest")
    return out, report


def test_quantize_under_avg_bits_budget(quantized):
    out, report = quantized
    assert report.avg_weight_bits <= 4 + 1e-9
    bits = [layer.weight_bits for layer in report.layers]
    assert len(bits) == 20 and all(bits) and len(set(bits)) > 1
    params = [layer.params for layer in report.layers]
    assert sum(p * b for p, b in zip(params, bits)) / sum(params) == pytest.approx(report.avg_weight_bits)
    assert api.inspect(out)["avg_weight_bits"] <= 4 + 1e-9
    alloc = report.allocation
    assert alloc["solver"].startswith("ilp") and alloc["status"] == "optimal"
    assert alloc["budgets"] == [{"kind": "avg-bits", "value": 4.0, "relative": False}]
    assert alloc["metric"] == "weight-entropy"
    assert alloc["costs"]["avg-bits"] == pytest.approx(sum(p * b for p, b in zip(params, bits)) / sum(params))


def test_quantized_model_is_valid_and_runs(quantized):
    import onnxruntime as ort

    out, _ = quantized
    onnx.checker.check_model(str(out), full_check=True)
    x = np.load(CALIB)["input"][:8]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(None, {sess.get_inputs()[0].name: x})
    assert logits.shape == (8, 10) and np.isfinite(logits).all()


def test_quantize_limit_reaches_the_sensitivity_measurement(monkeypatch, tmp_path, resnet):
    """quantize(limit=32) promises at most 32 calibration samples; the allocation's probes must obey it."""
    seen = {}
    cands = [Candidate(w, 8) for w in range(2, 9)]

    def spy(ctx, metrics, *args, **kw):
        seen.update(metrics=metrics, samples=len(ctx.calibration))
        return [fake_table(resnet, cands)]

    monkeypatch.setattr(stages, "measure", spy)
    api.quantize(RESNET, tmp_path / "out.onnx", CALIB, budgets=[parse_budget("avg-bits=6")],
                 search={"metric": "kl"}, limit=32, rounding="nearest")
    assert seen["metrics"] == ["kl"]
    assert seen["samples"] <= 32, seen["samples"]
