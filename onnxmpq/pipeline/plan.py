"""Choosing every layer's precision: sensitivity -> problem -> solver, with the drop-limited searches.

`choose` is the allocation stage of `quantize`:

- budgets only: the solver's answer under them;
- `max_drop` only: the most compressed point whose measured drop (see `verify`) stays within it. For
  `greedy` the points are its walk (AIMET phase 2: binary search along the list); for `ilp` and `eagl`
  the solutions at average weight bits from the largest candidate width down in steps of 0.25; for
  `threshold` its Optuna search. The search assumes the drop grows along the list, as AIMET does.
- both: the budgets' answer, checked against the drop (exit 2 when it does not hold).

Probes inside a search use nearest rounding (fast); the written model uses the requested rounding and
is verified again after writing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from onnxmpq import progress
from onnxmpq.allocate import Allocation, Budget, Problem, extremes, result, solve
from onnxmpq.allocate.greedy import ladder
from onnxmpq.allocate.problem import build_problem, candidate_columns
from onnxmpq.errors import ConstraintError, InternalError, OnnxmpqError
from onnxmpq.hardware import profiles
from onnxmpq.pipeline.context import DEFAULT_LIMIT, RunContext
from onnxmpq.types import Candidate, QuantOptions, Rounding
from onnxmpq.write.build import build

STEP_BITS = 0.25


@dataclass(frozen=True)
class Settings:
    """How to choose: metric, method, candidate widths, rules and search limits."""

    metric: str = "kl"
    method: str = "ilp"
    weight_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    act_bits: tuple[int | None, ...] = (8,)
    time_limit: float = 10.0
    cache_dir: str | None = None
    profile: str | None = None
    keep: Mapping[str, Candidate] = field(default_factory=dict)
    max_drop: float | None = None
    latency: str | None = None     # a latency table file; measured when a latency-ms budget needs one
    trials: int = 40
    limit: int = DEFAULT_LIMIT
    seed: int = 0

    def to_dict(self) -> dict:
        return {"metric": self.effective_metric, "method": self.method, "weight_bits": list(self.weight_bits),
                "act_bits": list(self.act_bits), "time_limit": self.time_limit,
                "profile": self.profile or "any", "keep": {k: v.key for k, v in self.keep.items()},
                "max_drop": self.max_drop, "trials": self.trials, "samples": self.limit, "seed": self.seed}

    @property
    def effective_metric(self) -> str:
        """eagl values weight entropy; threshold needs the output entropy; the rest use `metric`."""
        return {"eagl": "weight-entropy", "threshold": "output-entropy"}.get(self.method, self.metric)


@dataclass(frozen=True)
class Plan:
    assignment: dict[str, Candidate]
    allocation: Allocation
    problem: Problem
    fixed: dict[str, Candidate]
    table: object = None
    latency: object = None
    search: tuple[dict, ...] = ()   # the points a drop-limited search measured
    settings: Settings = Settings()
    profile: object = None


def measured_drop(ctx: RunContext, assignment: Mapping[str, Candidate], options: QuantOptions) -> float:
    """The measured drop of `assignment` built with nearest rounding, on the run's held-out samples."""
    proto, _ = build(ctx.model, assignment, ctx.stats(options), options)
    return ctx.judge.score(proto).drop


def choose(ctx: RunContext, budgets: Sequence[Budget], settings: Settings, options: QuantOptions,
           rounding: Rounding, sensitivity: Callable) -> Plan:
    """The allocation stage (see the module docstring) on the run's model and data.
    `sensitivity(metric, weight_bits, act_bits)` gives the SensitivityTable (the caller decides rounding,
    samples and caching)."""
    from onnxmpq.sensitivity import parse_candidates

    if not budgets and settings.max_drop is None:
        raise OnnxmpqError("choosing bits needs a --budget or a --max-drop.", "add e.g. --budget avg-bits=4.")
    profile = profiles.load(settings.profile)
    candidates = parse_candidates(settings.weight_bits, settings.act_bits)
    model = ctx.model
    table = sensitivity(settings.effective_metric, settings.weight_bits, settings.act_bits)
    latency = _latency(ctx, candidates, budgets, settings, options, profile)
    search_budgets = list(budgets) or [Budget("avg-bits", math.inf)]
    problem, fixed = build_problem(model, table, candidates, search_budgets, profile, options, settings.keep, latency)
    columns = candidate_columns(model.points(options), candidates)
    if settings.max_drop is not None or settings.method == "threshold":
        problem = _with_fidelity(problem, fixed, columns, ctx, options)
    with progress.bar(f"solve ({settings.method})", 1, unit="step") as advance:
        allocation, search = _solve(problem, budgets, settings)
        advance(1)
    by_key = {c.key: c for c in columns}
    assignment = {**{n: by_key[k] for n, k in allocation.choice.items()}, **fixed}
    assignment = {u.name: assignment[u.name] for u in model.points(options).units
                  if u.name in assignment}
    return Plan(assignment, allocation, problem, fixed, table, latency, tuple(search), settings, profile)


def _latency(ctx: RunContext, candidates, budgets, settings: Settings, options, profile):
    if not any(b.kind == "latency-ms" for b in budgets):
        return None
    from onnxmpq.allocate import latency

    if settings.latency:
        return latency.LatencyTable.load(settings.latency)
    points = ctx.model.points(options)
    fixed = {u.name: Candidate(None, None) for u in points.layers
             if not any(profile.allows(u.op_type, c) for c in candidates)}
    fixed.update({**profile.pin, **settings.keep})
    with progress.bar("latency", len(points.units), unit="unit") as advance:
        return latency.profile(ctx.model, candidates, ctx.stats(options), ctx.first(), options,
                               on_layer=lambda n: advance(1), fixed=fixed)


def _with_fidelity(problem: Problem, fixed, candidates, ctx: RunContext, options: QuantOptions) -> Problem:
    def fidelity(index: Sequence[int]) -> float:
        chosen = {problem.layers[l]: candidates[c] for l, c in enumerate(index)}
        return measured_drop(ctx, {**chosen, **fixed}, options)
    return replace(problem, fidelity=fidelity)


def _judge(problem: Problem) -> Callable[[Sequence[int]], float]:
    """The problem's fidelity judge, which `_with_fidelity` sets wherever a drop is measured."""
    if problem.fidelity is None:
        raise InternalError("a measured drop was asked of a problem without a fidelity judge")
    return problem.fidelity


def _solve(problem: Problem, budgets, settings: Settings) -> tuple[Allocation, list[dict]]:
    if settings.method == "threshold":
        alloc = solve(problem, "threshold", settings.time_limit, max_drop=settings.max_drop,
                      trials=settings.trials, seed=settings.seed)
        return alloc, []
    if settings.max_drop is None:
        return solve(problem, settings.method, settings.time_limit), []
    if budgets:
        alloc = solve(problem, settings.method, settings.time_limit)
        index = [problem.candidates.index(alloc.choice[n]) for n in problem.layers]
        drop = _judge(problem)(index)
        if drop > settings.max_drop:
            raise ConstraintError(f"at the budget the measured drop is {drop:.4f}, over --max-drop "
                                  f"{settings.max_drop:g}.", "raise the budget, or drop --budget to let "
                                  "--max-drop find the smallest model within it.")
        return alloc, [{"drop": drop, **alloc.costs}]
    return _drop_search(problem, settings)


def _drop_search(problem: Problem, settings: Settings) -> tuple[Allocation, list[dict]]:
    """Binary search along the method's list of points for the last one within the drop."""
    fidelity, max_drop = _judge(problem), settings.max_drop
    if max_drop is None:
        raise InternalError("the drop search needs --max-drop")
    if settings.method == "greedy":
        points = ladder(problem)
        at = lambda i: points[i]  # noqa: E731
        count = len(points)
    else:
        widths = [w for w in problem.weight_bits if w]
        least, most = (problem.user_value("avg-bits", v) for v in extremes(problem, "avg-bits"))
        grid = [v for v in np.arange(max(widths), min(widths) - 1e-9, -STEP_BITS) if least <= v <= most]
        grid = [most] + [v for v in grid if v < most] + ([least] if not grid or grid[-1] > least else [])
        cache: dict[int, list[int]] = {}

        def at(i: int) -> list[int]:
            if i not in cache:
                budget = replace(problem, limits={
                    **problem.limits, "avg-bits": grid[i] * problem.units["avg-bits"] - problem.offsets["avg-bits"]})
                alloc = solve(budget, settings.method, settings.time_limit)
                cache[i] = [problem.candidates.index(alloc.choice[n]) for n in problem.layers]
            return cache[i]
        count = len(grid)
    search, drops = [], {}

    def drop(i: int) -> float:
        if i not in drops:
            drops[i] = fidelity(at(i))
            row = result(problem, at(i), settings.method, "feasible")
            search.append({"point": i, "drop": drops[i], **row.costs})
        return drops[i]

    if drop(0) > max_drop:
        raise ConstraintError(f"even the most precise choice drops {drops[0]:.4f}, over --max-drop "
                              f"{settings.max_drop:g}.", "raise --max-drop or add wider candidates (--bits).")
    lo, hi = 0, count - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if drop(mid) <= max_drop:
            lo = mid
        else:
            hi = mid - 1
    alloc = result(problem, at(lo), f"{settings.method} + max-drop search", "feasible")
    return Allocation(alloc.choice, alloc.objective, alloc.solver, alloc.status, alloc.costs,
                      {"drop": drops[lo], "points": count, "measured": len(drops)}), search
