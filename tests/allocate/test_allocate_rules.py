"""Hardware rules inside the solvers, on hand-made `Problem`s: ties (one activation width per group) and
`max_distinct` (with the fixed layers' widths counted) for `ilp` (its fast path for the cap, the MIP for
ties), `ilp-scip` and `ilp-cpsat`; `greedy` refusing a
walk that breaks a tie; `eagl` against brute force over every subset; `threshold.smooth` and `split`.

Oracles: answers worked out by hand in each docstring, and brute force over every combination.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnxmpq.allocate import Problem, solve, tied_ok
from onnxmpq.allocate.threshold import smooth, split
from onnxmpq.errors import ConstraintError

SOLVERS = ["ilp", "ilp-scip", "ilp-cpsat"]


def make(scores, costs=None, limits=None, *, cands, ties=(), max_distinct=None, fixed_widths=(), allowed=None,
         entropy=None) -> Problem:
    """`cands` is a list of (weight bits, act bits); with no costs, a loose avg-bits budget."""
    scores = np.asarray(scores, float)
    n_layers = len(scores)
    weights = tuple(w for w, _ in cands)
    if costs is None:
        costs = {"avg-bits": np.tile(np.array(weights, float), (n_layers, 1))}
        limits = {"avg-bits": 1e9}
    return Problem(tuple(f"l{i}" for i in range(n_layers)), tuple(f"w{w}a{a}" for w, a in cands), scores,
                   {k: np.asarray(v, float) for k, v in costs.items()}, dict(limits),
                   allowed=None if allowed is None else np.asarray(allowed, bool),
                   weight_bits=weights, act_bits=tuple(a for _, a in cands), ties=tuple(ties),
                   max_distinct=max_distinct, fixed_widths=frozenset(fixed_widths),
                   entropy=None if entropy is None else np.asarray(entropy, float))


def index_of(problem, alloc) -> list[int]:
    return [problem.candidates.index(alloc.choice[n]) for n in problem.layers]


def brute(problem: Problem):
    """(objective, index) of the best combination within budgets, allowed masks and the rules."""
    n_layers, n_cands = problem.scores.shape
    best = None
    for index in itertools.product(range(n_cands), repeat=n_layers):
        if problem.allowed is not None and not all(problem.allowed[l, c] for l, c in enumerate(index)):
            continue
        if any(sum(cost[l, c] for l, c in enumerate(index)) > problem.limits[k] for k, cost in problem.costs.items()):
            continue
        if not tied_ok(problem, index):
            continue
        value = sum(problem.scores[l, c] for l, c in enumerate(index))
        if best is None or value < best[0] - 1e-12:
            best = (value, list(index))
    return best


# ---------------------------------------------------------------- ties


TIE_CANDS = [(8, 8), (8, 16)]


@pytest.mark.parametrize("method", SOLVERS)
def test_tie_forces_one_activation_width(method):
    """Unconstrained: l0 takes a16 (0), l1 a8 (0), l2 a8 (0): objective 0. l0 and l1 tied: both a8 costs
    5 + 0, both a16 costs 0 + 3, so both a16 (3); l2 is free and stays at a8."""
    scores = [[5, 0], [0, 3], [0, 4]]
    free = solve(make(scores, cands=TIE_CANDS), method)
    assert free.choice == {"l0": "w8a16", "l1": "w8a8", "l2": "w8a8"} and free.objective == pytest.approx(0)
    tied = make(scores, cands=TIE_CANDS, ties=[(0, 1)])
    alloc = solve(tied, method)
    assert alloc.choice == {"l0": "w8a16", "l1": "w8a16", "l2": "w8a8"}
    assert alloc.objective == pytest.approx(3)
    assert tied_ok(tied, index_of(tied, alloc))


@pytest.mark.parametrize("method", SOLVERS)
def test_tie_group_of_three_with_a_budget(method):
    """Cost 1 at a8, 2 at a16, limit 5: at most two a16 layers, so the tied group (3 layers) must be a8
    even though each of its layers prefers a16; the free layer l3 takes a16."""
    scores = [[1, 0], [1, 0], [1, 0], [9, 0]]
    cost = np.tile([1.0, 2.0], (4, 1))
    problem = make(scores, {"bitops": cost}, {"bitops": 5}, cands=TIE_CANDS, ties=[(0, 1, 2)])
    alloc = solve(problem, method)
    assert alloc.choice == {"l0": "w8a8", "l1": "w8a8", "l2": "w8a8", "l3": "w8a16"}
    assert alloc.objective == pytest.approx(3)
    assert alloc.costs["bitops"] == pytest.approx(5)


@pytest.mark.parametrize("method", SOLVERS)
def test_tie_under_a_budget_that_fits_one_wide_layer(method):
    """Two tied layers, limit 3: one a16 and one a8 would fit, but tied they cost 2 or 4, so both a8."""
    problem = make([[1, 0], [1, 0]], {"bitops": np.tile([1.0, 2.0], (2, 1))}, {"bitops": 3}, cands=TIE_CANDS,
                   ties=[(0, 1)])
    alloc = solve(problem, method)
    assert alloc.choice == {"l0": "w8a8", "l1": "w8a8"}


# ---------------------------------------------------------------- max distinct widths


DISTINCT_CANDS = [(2, 8), (4, 8), (8, 8)]
DISTINCT_SCORES = [[0, 3, 9], [9, 0, 4], [9, 5, 0]]


@pytest.mark.parametrize("method", SOLVERS)
def test_max_distinct_two(method):
    """Unconstrained {2, 4, 8} (objective 0). At most two widths: {2,4} costs 5, {2,8} 4, {4,8} 3 -> l0 w4,
    l1 w4, l2 w8."""
    free = solve(make(DISTINCT_SCORES, cands=DISTINCT_CANDS), method)
    assert free.objective == pytest.approx(0) and len(set(free.choice.values())) == 3
    problem = make(DISTINCT_SCORES, cands=DISTINCT_CANDS, max_distinct=2)
    alloc = solve(problem, method)
    assert alloc.choice == {"l0": "w4a8", "l1": "w4a8", "l2": "w8a8"}
    assert alloc.objective == pytest.approx(3)


@pytest.mark.parametrize("method", SOLVERS)
def test_max_distinct_counts_fixed_widths(method):
    """A fixed layer already uses 2 bits, so only one more width: {2,4} costs 5, {2,8} 4 -> l0 w2, l1 w8,
    l2 w8 (the free optimum {4,8} would make three widths in the model)."""
    problem = make(DISTINCT_SCORES, cands=DISTINCT_CANDS, max_distinct=2, fixed_widths=[2])
    alloc = solve(problem, method)
    assert alloc.choice == {"l0": "w2a8", "l1": "w8a8", "l2": "w8a8"}
    assert alloc.objective == pytest.approx(4)


@pytest.mark.parametrize("method", SOLVERS)
def test_max_distinct_one_with_fixed_width(method):
    problem = make(DISTINCT_SCORES, cands=DISTINCT_CANDS, max_distinct=1, fixed_widths=[4])
    alloc = solve(problem, method)
    assert set(alloc.choice.values()) == {"w4a8"}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("method", SOLVERS)
def test_rules_match_brute_force(method, seed):
    """Random 5-layer problems over (2|4|8) x (8|16) with a budget, a tie group and a cap of two widths."""
    rng = np.random.default_rng(seed)
    cands = [(w, a) for w in (2, 4, 8) for a in (8, 16)]
    scores = rng.uniform(0, 1, (5, 6)) / np.array([w * a for w, a in cands])[None, :] * 64
    cost = np.array([[w * a for w, a in cands]] * 5, float) * rng.integers(1, 4, (5, 1))
    lo, hi = cost.min(axis=1).sum(), cost.max(axis=1).sum()
    problem = make(scores, {"bitops": cost}, {"bitops": lo + 0.4 * (hi - lo)}, cands=cands, ties=[(0, 2), (1, 3, 4)],
                   max_distinct=2, fixed_widths=[8] if seed % 2 else ())
    best = brute(problem)
    assert best is not None
    alloc = solve(problem, method)
    index = index_of(problem, alloc)
    assert tied_ok(problem, index)
    assert sum(problem.costs["bitops"][l, c] for l, c in enumerate(index)) <= problem.limits["bitops"] * (1 + 1e-9)
    assert alloc.objective == pytest.approx(best[0], rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("cap", [1, 2, 3])
def test_cap_on_widths_without_ties_is_the_fast_path_and_matches_brute_force(seed, cap):
    """Random 6-layer problems over widths 2..8 with one or two budgets and a cap: `ilp` answers from its
    fast path (one search per set of widths), with brute force's objective."""
    rng = np.random.default_rng(seed)
    cands = [(w, 8) for w in (2, 3, 4, 6, 8)]
    scores = rng.uniform(0, 1, (6, 5)) * np.exp(-0.5 * np.array([w for w, _ in cands]))[None, :]
    costs = {"avg-bits": np.array([[w for w, _ in cands]] * 6, float) * rng.integers(1, 9, (6, 1)),
             "bitops": rng.integers(1, 30, (6, 5)).astype(float)}
    costs = dict(list(costs.items())[:1 + seed % 2])
    limits = {k: float(c.min(axis=1).sum() + 0.5 * (c.max(axis=1).sum() - c.min(axis=1).sum())) for k, c in costs.items()}
    problem = make(scores, costs, limits, cands=cands, max_distinct=cap, fixed_widths=[8] if seed % 3 == 0 else ())
    best = brute(problem)
    if best is None:
        with pytest.raises(ConstraintError):
            solve(problem, "ilp")
        return
    alloc = solve(problem, "ilp")
    assert alloc.solver.startswith("ilp (Lagrangian") and alloc.status == "optimal"
    assert tied_ok(problem, index_of(problem, alloc))
    assert alloc.objective == pytest.approx(best[0], rel=1e-9, abs=1e-12)


# ---------------------------------------------------------------- greedy refuses rule breaks


def test_greedy_refuses_a_walk_that_breaks_a_tie():
    """Cost 1 at a8, 2 at a16, limit 3 for two tied layers: greedy lowers one layer (cost 3, tie broken) and
    must refuse; the ILP lowers both."""
    problem = make([[1, 0], [2, 0]], {"bitops": np.tile([1.0, 2.0], (2, 1))}, {"bitops": 3}, cands=TIE_CANDS,
                   ties=[(0, 1)])
    with pytest.raises(ConstraintError) as info:
        solve(problem, "greedy")
    assert info.value.exit_code == 2 and "ilp" in str(info.value)
    assert solve(problem, "ilp").choice == {"l0": "w8a8", "l1": "w8a8"}
    # without the tie the same walk is fine
    untied = make([[1, 0], [2, 0]], {"bitops": np.tile([1.0, 2.0], (2, 1))}, {"bitops": 3}, cands=TIE_CANDS)
    assert solve(untied, "greedy").choice == {"l0": "w8a8", "l1": "w8a16"}


def test_greedy_refuses_too_many_distinct_widths():
    """Costs 2/4/8 bits; the walk lowers l0 to 4 then l1 to 2 (cheapest score per cost), ending at
    {2, 4, 8} with a cap of two."""
    scores = [[0.5, 0.1, 0], [0.2, 0.15, 0], [9, 9, 0]]
    cost = np.tile([2.0, 4.0, 8.0], (3, 1))
    problem = make(scores, {"avg-bits": cost}, {"avg-bits": 14}, cands=DISTINCT_CANDS, max_distinct=2)
    free = make(scores, {"avg-bits": cost}, {"avg-bits": 14}, cands=DISTINCT_CANDS)
    walk = solve(free, "greedy")
    assert len({free.weight_bits[c] for c in index_of(free, walk)}) == 3
    with pytest.raises(ConstraintError):
        solve(problem, "greedy")
    alloc = solve(problem, "ilp")
    assert tied_ok(problem, index_of(problem, alloc))


# ---------------------------------------------------------------- eagl


def two_level_problem(seed, n_layers=10, budgets=("avg-bits",), negative=False):
    rng = np.random.default_rng(seed)
    params = rng.integers(50, 5000, n_layers).astype(float)
    macs = rng.integers(1000, 100000, n_layers).astype(float)
    lo_score = rng.uniform(0.5, 3.0, n_layers)
    hi_score = lo_score * rng.uniform(0.05, 0.9, n_layers)
    if negative:  # some layers lose nothing (or gain) at the low width
        flip = rng.random(n_layers) < 0.3
        hi_score = np.where(flip, lo_score + rng.uniform(0.01, 0.5, n_layers), hi_score)
    scores = np.stack([lo_score, hi_score], axis=1)
    costs, limits = {}, {}
    for kind in budgets:
        base = params if kind == "avg-bits" else macs * 8
        cost = np.stack([base * 2, base * 4], axis=1)
        costs[kind] = cost
        limits[kind] = float(cost[:, 0].sum() + rng.uniform(0.2, 0.7) * (cost[:, 1] - cost[:, 0]).sum())
    return make(scores, costs, limits, cands=[(2, 8), (4, 8)])


def subsets_optimum(problem: Problem) -> float:
    n = len(problem.layers)
    masks = np.array(list(itertools.product((0, 1), repeat=n)))
    rows = np.arange(n)
    ok = np.ones(len(masks), bool)
    for kind, cost in problem.costs.items():
        ok &= cost[rows, masks].sum(axis=1) <= problem.limits[kind]
    return float(problem.scores[rows, masks].sum(axis=1)[ok].min())


@pytest.mark.parametrize("seed", range(8))
def test_eagl_matches_brute_force_on_two_levels(seed):
    problem = two_level_problem(seed, budgets=("avg-bits",) if seed < 4 else ("avg-bits", "bitops"))
    best = subsets_optimum(problem)
    alloc = solve(problem, "eagl")
    assert alloc.solver.startswith("eagl (knapsack")
    index = index_of(problem, alloc)
    for kind, cost in problem.costs.items():
        assert sum(cost[l, c] for l, c in enumerate(index)) <= problem.limits[kind]
    assert alloc.objective == pytest.approx(best, rel=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_eagl_keeps_layers_low_when_raising_them_gains_nothing(seed):
    """A layer whose high width scores worse than its low one should stay low: raising it costs budget
    and adds degradation."""
    problem = two_level_problem(seed + 100, negative=True)
    best = subsets_optimum(problem)
    alloc = solve(problem, "eagl")
    index = index_of(problem, alloc)
    assert sum(problem.costs["avg-bits"][l, c] for l, c in enumerate(index)) <= problem.limits["avg-bits"]
    assert alloc.objective == pytest.approx(best, rel=1e-5)


def test_eagl_budget_below_all_low_is_a_constraint_error():
    problem = two_level_problem(0)
    low = float(problem.costs["avg-bits"][:, 0].sum())
    tight = Problem(**{**problem.__dict__, "limits": {"avg-bits": low * 0.99}})
    with pytest.raises(ConstraintError):
        solve(tight, "eagl")


def test_eagl_falls_back_to_the_multiple_choice_solver_with_rules():
    problem = make(DISTINCT_SCORES, cands=DISTINCT_CANDS, max_distinct=2)
    alloc = solve(problem, "eagl")
    assert alloc.solver.startswith("eagl (multiple-choice knapsack, ilp")
    assert alloc.choice == {"l0": "w4a8", "l1": "w4a8", "l2": "w8a8"}


# ---------------------------------------------------------------- threshold: smooth and split


def test_smooth_by_hand():
    h = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    np.testing.assert_allclose(smooth(h, 1), h)
    np.testing.assert_allclose(smooth(h, 3), [1.5, 2.0, 3.0, 4.0, 4.5])
    np.testing.assert_allclose(smooth(h, 5), [2.0, 2.5, 3.0, 3.5, 4.0])
    np.testing.assert_allclose(smooth(np.array([0, 0, 9, 0, 0.0]), 3), [0, 3, 3, 3, 0])
    np.testing.assert_allclose(smooth(np.array([2.0, 8.0]), 9), [5.0, 5.0])


def test_split_gives_high_widths_to_high_entropy():
    cands = [(2, 8), (4, 8), (8, 8)]
    problem = make(np.zeros((5, 3)), cands=cands, entropy=[1, 5, 1, 5, 3])
    # mean 3: entropy >= 3 gets the high width
    assert split(problem, 1.0, 1, 2, 8) == [0, 2, 0, 2, 2]
    assert split(problem, 1.0, 1, 4, 8) == [1, 2, 1, 2, 2]
    # tau raises the cut to 4.5: only the two 5s stay high
    assert split(problem, 1.5, 1, 2, 4) == [0, 1, 0, 1, 0]


def test_split_uses_the_smoothed_entropy():
    """Raw [0, 0, 9, 0, 0] (mean 1.8): window 1 raises only l2; window 3 smooths to [0, 3, 3, 3, 0]."""
    problem = make(np.zeros((5, 2)), cands=[(2, 8), (8, 8)], entropy=[0, 0, 9, 0, 0])
    assert split(problem, 1.0, 1, 2, 8) == [0, 0, 1, 0, 0]
    assert split(problem, 1.0, 3, 2, 8) == [0, 1, 1, 1, 0]


def test_split_respects_allowed():
    """l0 may not take 2 bits: it takes the nearest allowed width (4); l1's only choice is 8."""
    problem = make(np.zeros((2, 3)), cands=[(2, 8), (4, 8), (8, 8)], entropy=[0, 1],
                   allowed=[[False, True, True], [False, False, True]])
    assert split(problem, 1.5, 1, 2, 8) == [1, 2]


def test_split_prefers_fewer_activation_bits_at_a_width():
    problem = make(np.zeros((2, 4)), cands=[(4, 16), (4, 8), (8, 16), (8, 8)], entropy=[1, 3])
    assert split(problem, 1.0, 1, 4, 8) == [1, 3]


def test_threshold_needs_entropy_and_fidelity():
    problem = make(np.zeros((2, 2)), cands=[(2, 8), (8, 8)])
    with pytest.raises(ConstraintError):
        solve(problem, "threshold", trials=2)


def test_threshold_search_with_a_fake_judge():
    """A judge whose drop is the share of layers at 2 bits: the most compressed split within drop 0.25
    puts exactly one of the four layers at 2 bits; the search must find it and report its settings."""
    cands = [(2, 8), (8, 8)]
    base = make(np.zeros((4, 2)), {"avg-bits": np.tile([2.0, 8.0], (4, 1))}, {"avg-bits": np.inf}, cands=cands,
                entropy=[1, 2, 3, 10])
    problem = Problem(**{**base.__dict__, "fidelity": lambda index: sum(c == 0 for c in index) / 4})
    alloc = solve(problem, "threshold", max_drop=0.25, trials=40, seed=0)
    index = index_of(problem, alloc)
    assert sum(c == 0 for c in index) == 1 and index[0] == 0
    assert set(alloc.details) >= {"tau", "window", "levels", "drop"}
    assert alloc.details["levels"] == [2, 8] and alloc.details["drop"] == pytest.approx(0.25)
    assert 0.5 <= alloc.details["tau"] <= 1.5 and alloc.details["window"] in (1, 3, 5, 7, 9)
