"""Choosing every layer's precision: sensitivity -> problem -> solver, with the drop-limited searches.

`choose` is the allocation stage of `quantize`:

- budgets only: the solver's answer under them;
- `max_drop` only: the most compressed point whose measured drop (see `verify.judge`) stays within it, found
  as the method's `SolverSpec.drop` says: along its own ladder of points (greedy's walk, AIMET phase 2:
  binary search along the list), along the solutions at average weight bits from the largest candidate
  width down in steps of 0.25 (the integer programs, eagl), or by the method itself (threshold's Optuna
  search). The search assumes the drop grows along the list, as AIMET does.
- both: the budgets' answer, checked against the drop (exit 2 when it does not hold).

Probes inside a search use nearest rounding (fast); the written model uses the requested rounding and
is verified again after writing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from onnxmpq import progress
from onnxmpq.allocate import SOLVERS, Allocation, Budget, Problem, admissible, extremes, latency, reachable, result, solve
from onnxmpq.allocate.latency import LatencyTable
from onnxmpq.allocate.problem import build_problem, candidate_columns
from onnxmpq.errors import ConfigError, ConstraintError, InternalError, OnnxmpqError, option
from onnxmpq.hardware import profiles
from onnxmpq.hardware.profiles import Profile
from onnxmpq.pipeline.config import SearchConfig
from onnxmpq.pipeline.context import RunContext
from onnxmpq.sensitivity import parse_candidates, resolve_probes
from onnxmpq.types import Candidate, QuantOptions, SensitivityTable
from onnxmpq.write.build import build

STEP_BITS = 0.25


def metric_of(search: SearchConfig) -> str:
    """The metric the allocation minimises: the method's own (its `SolverSpec.metric`), else the
    configured one, else kl. Asking a method for another metric than its own is an error, not a swap."""
    own = SOLVERS.get(search.method).metric
    if own and search.metric and search.metric != own:
        raise ConfigError("search.metric", f"is {search.metric}, but method {search.method} values layers by {own}",
                          f"leave {option('search.metric')} unset with this method")
    return own or search.metric or "kl"


def search_dict(search: SearchConfig, samples: int) -> dict:
    """The search settings as the report records them."""
    return {"metric": metric_of(search), "method": search.method, "weight_bits": list(search.weight_bits),
            "time_limit": search.time_limit, "profile": search.profile or "any",
            "keep": {k: v.key for k, v in search.keep.items()}, "max_drop": search.max_drop, "trials": search.trials,
            "samples": samples, "seed": search.seed,
            "probes": str(resolve_probes(search.probes, [metric_of(search)])),
            "probe_rounding": str(search.probe_rounding)}


@dataclass(frozen=True)
class Plan:
    assignment: dict[str, Candidate]
    allocation: Allocation
    problem: Problem
    fixed: dict[str, Candidate]
    table: SensitivityTable | None = None
    latency: LatencyTable | None = None
    search: tuple[dict, ...] = ()   # the points a drop-limited search measured
    settings: SearchConfig = SearchConfig()
    act_bits: tuple[int | None, ...] = (8,)
    profile: Profile = Profile("any", {})


def measured_drop(ctx: RunContext, assignment: Mapping[str, Candidate], options: QuantOptions) -> float:
    """The measured drop of `assignment` built with nearest rounding, on the run's held-out samples."""
    proto, _ = build(ctx.model, assignment, ctx.stats(options), options)
    return ctx.judge.score(proto).drop


def choose(ctx: RunContext, settings: SearchConfig, act_bits: Sequence[int | None], options: QuantOptions,
           sensitivity: Callable, prune: bool = True) -> Plan:
    """The allocation stage (see the module docstring) on the run's model and data, with `act_bits` the
    activation candidates. `sensitivity(metric, weight_bits, act_bits, only)` gives the SensitivityTable
    (the caller decides rounding, samples and caching); with `prune`, `only` names for each unit the
    candidates some allocation within the budgets can take (`allocate.reachable`), and a unit left with
    one is not probed: under a tight budget the sweep shrinks, and where the budgets admit a single
    allocation there is none. Without `prune` (a caller that re-solves the table under other budgets)
    every candidate is measured."""
    budgets = settings.budgets
    if not settings.choosing:
        raise OnnxmpqError(f"choosing bits needs {option('search.budgets')} or {option('search.max_drop')}.",
                           f"set e.g. {option('search.budgets')} avg-bits=4.")
    spec = SOLVERS.get(settings.method)
    profile = profiles.load(settings.profile)
    candidates = parse_candidates(settings.weight_bits, act_bits)
    model = ctx.model
    if settings.max_drop is not None:
        _check_reachable(ctx, settings, act_bits, options, profile)
    latency = _latency(ctx, candidates, budgets, settings, options, profile)
    search_budgets = list(budgets) or [Budget("avg-bits", math.inf)]
    only = _choices_within(model, candidates, search_budgets, profile, options, settings, latency) \
        if prune and budgets and spec.drop != "self" else None
    table = None
    if only is None or any(len(keys) > 1 for keys in only.values()):
        table = sensitivity(metric_of(settings), settings.weight_bits, tuple(act_bits), only)
    problem, fixed = build_problem(model, table, candidates, search_budgets, profile, options, settings.keep, latency)
    columns = candidate_columns(model.points(options), candidates)
    if settings.max_drop is not None or spec.judge:
        problem = _with_fidelity(problem, fixed, columns, ctx, options)
    with progress.bar(f"solve ({settings.method})", 1, unit="step") as advance:
        allocation, search = _solve(problem, budgets, settings)
        advance(1)
    by_key = {c.key: c for c in columns}
    assignment = {**{n: by_key[k] for n, k in allocation.choice.items()}, **fixed}
    assignment = {u.name: assignment[u.name] for u in model.points(options).units
                  if u.name in assignment}
    return Plan(assignment, allocation, problem, fixed, table, latency, tuple(search), settings, tuple(act_bits),
                profile)


def _choices_within(model, candidates, budgets, profile: Profile, options: QuantOptions, settings: SearchConfig,
                    latency: LatencyTable | None) -> dict[str, frozenset[str]] | None:
    """Each free unit's candidate keys that some allocation within `budgets` can take (`allocate.reachable`
    on the problem without scores), none for the fixed units (kept, pinned, left float); None when the
    budgets rule out no allowed choice (the full sweep, which a sensitivity cache shares between budgets)."""
    bare, fixed = build_problem(model, None, candidates, budgets, profile, options, settings.keep, latency)
    mask = reachable(bare)
    if (mask == admissible(bare)).all():
        return None
    return {**{name: frozenset() for name in fixed},
            **{name: frozenset(k for k, ok in zip(bare.candidates, row) if ok) for name, row in zip(bare.layers, mask)}}


def _check_reachable(ctx: RunContext, settings: SearchConfig, act_bits: Sequence[int | None], options: QuantOptions,
                     profile: Profile) -> None:
    """Before any sensitivity is measured: the drop limit must hold for the most precise choice (every
    unit at the widest candidates; kept and pinned units as fixed), and the judge must be able to see a
    drop that small: with n held-out samples one changed prediction is a drop of 1/n."""
    widest = Candidate(max(settings.weight_bits), max((a for a in act_bits if a), default=None))
    assignment = {u.name: Candidate(widest.weight_bits if u.layer else None, widest.act_bits)
                  for u in ctx.model.points(options).units}
    assignment.update({**profile.pin, **settings.keep})
    drop = measured_drop(ctx, assignment, options)
    if settings.max_drop is not None and drop > settings.max_drop:  # (always set here; for the type checker)
        n = len(ctx.held_out) if ctx.held_out is not None else len(ctx.require_data("the drop limit"))
        limit = option("search.max_drop")
        raise ConstraintError(f"even the most precise choice ({widest.key} everywhere) drops {drop:.4f}, over {limit} "
                              f"{settings.max_drop:g}; the drop is measured on {n} held-out samples, where one "
                              f"changed prediction is {1 / max(n, 1):.4f}.",
                              f"raise {limit} to at least {drop:.4f}, or give more calibration samples than "
                              f"{option('data.limit')} so that more are held out.")


def _latency(ctx: RunContext, candidates, budgets, settings: SearchConfig, options, profile):
    if not any(b.kind == "latency-ms" for b in budgets):
        return None
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


def _solve(problem: Problem, budgets, settings: SearchConfig) -> tuple[Allocation, list[dict]]:
    if SOLVERS.get(settings.method).drop == "self":
        alloc = solve(problem, settings.method, settings.time_limit, max_drop=settings.max_drop,
                      trials=settings.trials, seed=settings.seed)
        return alloc, []
    if settings.max_drop is None:
        return solve(problem, settings.method, settings.time_limit), []
    if budgets:
        alloc = solve(problem, settings.method, settings.time_limit)
        index = [problem.candidates.index(alloc.choice[n]) for n in problem.layers]
        drop = _judge(problem)(index)
        if drop > settings.max_drop:
            limit, budget = option("search.max_drop"), option("search.budgets")
            raise ConstraintError(f"at the budget the measured drop is {drop:.4f}, over {limit} "
                                  f"{settings.max_drop:g}.", f"raise the budget, or drop {budget} to let "
                                  f"{limit} find the smallest model within it.")
        return alloc, [{"drop": drop, **alloc.costs}]
    return _drop_search(problem, settings)


def _drop_search(problem: Problem, settings: SearchConfig) -> tuple[Allocation, list[dict]]:
    """Binary search along the method's list of points for the last one within the drop."""
    fidelity, max_drop, spec = _judge(problem), settings.max_drop, SOLVERS.get(settings.method)
    if max_drop is None:
        raise InternalError("the drop search needs a drop limit")
    if spec.drop == "ladder" and spec.ladder is not None:
        points = spec.ladder(problem)
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
        raise ConstraintError(f"even the most precise choice drops {drops[0]:.4f}, over {option('search.max_drop')} "
                              f"{settings.max_drop:g}.", f"raise {option('search.max_drop')} or add wider candidates "
                              f"({option('search.weight_bits')}).")
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
