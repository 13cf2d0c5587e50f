"""Allocation: one candidate precision per layer, minimising summed sensitivity under budgets.

`Problem` is arrays only (a solver never sees the graph): scores[l, c] (degradation of layer l at
candidate c), and per budget kind a cost[l, c] with its limit. Costs: weight bytes of the stored
codes, parameter-weighted bits (avg-bits x total params), and BitOps = MACs x w_bits x a_bits.
latency-ms costs come from a measured `latency.LatencyTable` (per-layer change against a reference
precision, shifted so each layer's cheapest choice costs 0). Hardware rules arrive as `allowed` (the
profile's admissible choices), `ties` (layers reading one tensor must share activation bits: one
quantizer) and `max_distinct` (at most K distinct weight widths). SOLVERS: `ilp` (exact branch and
bound on a Lagrangian bound, `mckp`, then OR-Tools' MIP for the rules it leaves or a gap), `ilp-scip`
(the MIP alone), `ilp-cpsat`, `greedy` (AIMET-style: lower precision step by step, least sensitivity
per cost saved first), `eagl` (weight-entropy knapsack) and `threshold` (Qin et al.: smoothed output
entropy against a tuned threshold; it needs `entropy` and a `fidelity` judge).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxmpq.errors import ConstraintError, OnnxmpqError, option
from onnxmpq.registry import Registry

BUDGET_KINDS = ("weight-bytes", "avg-bits", "bitops", "latency-ms")
_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 1024, "MIB": 1024 ** 2, "GIB": 1024 ** 3}


@dataclass(frozen=True)
class Budget:
    """One limit: `kind` in BUDGET_KINDS, `value` in bytes / bits / BitOps; `relative` means a fraction of
    W8A8 BitOps (bitops) or of the float32 weight bytes (weight-bytes)."""

    kind: str
    value: float
    relative: bool = False


def parse_budget(text: str) -> Budget:
    """KIND=VALUE: weight-bytes=150KB, avg-bits=3.5, bitops=0.5x (of W8A8) or bitops=2.1e9, latency-ms=1.2."""
    kind, sep, value = text.partition("=")
    kind = kind.strip().lower()
    if not sep or kind not in BUDGET_KINDS:
        raise OnnxmpqError(f"budget {text!r} is not KIND=VALUE with KIND one of {', '.join(BUDGET_KINDS)}.",
                           "write e.g. avg-bits=3 or weight-bytes=150KB.")
    match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([A-Za-z]*)\s*", value)
    if not match:
        raise OnnxmpqError(f"budget value {value!r} is not a number.", "write e.g. 3.5, 150KB or 0.5x.")
    try:
        number = float(match.group(1))
    except ValueError:
        raise OnnxmpqError(f"budget value {value!r} is not a number.", "write e.g. 3.5, 150KB or 0.5x.") from None
    unit = match.group(2).upper()
    if number <= 0:
        raise OnnxmpqError(f"budget {text!r} must be positive.", "write e.g. avg-bits=3.")
    if unit == "X":
        if kind in ("avg-bits", "latency-ms"):
            raise OnnxmpqError("avg-bits takes bits, not a fraction (x).", "write e.g. avg-bits=3.5.")
        return Budget(kind, number, relative=True)
    if unit not in _UNITS or (unit and kind != "weight-bytes"):
        raise OnnxmpqError(f"unit {match.group(2)!r} does not apply to {kind}.", "units: B, KB, MB, KiB, MiB; or x.")
    return Budget(kind, number * _UNITS[unit])


@dataclass(frozen=True)
class Link:
    """A tensor stored at its writer's width and read by other units: for each distinct reader width b2
    other than the stored b1 (both integer) one requantize of `elements` values, n * b1 * b2 BitOps.
    `source` and `readers` are rows; a writer or readers fixed outside the problem give their widths
    in `source_bits` / `fixed_readers` (0 = float)."""

    source: int | None
    readers: tuple[int, ...]
    elements: int
    source_bits: int = 0
    fixed_readers: tuple[int, ...] = ()


@dataclass(frozen=True)
class Problem:
    """What a solver sees: names, candidate keys, scores (L, C) and budget costs (L, C) with limits."""

    layers: tuple[str, ...]
    candidates: tuple[str, ...]
    scores: np.ndarray
    costs: Mapping[str, np.ndarray]
    limits: Mapping[str, float]
    allowed: np.ndarray | None = None  # (L, C) bool: the hardware rules' admissible choices
    units: Mapping[str, float] = field(default_factory=dict)  # limit / units = the value the user wrote
    offsets: Mapping[str, float] = field(default_factory=dict)  # cost of the layers fixed outside the problem
    weight_bits: tuple[int, ...] = ()   # per candidate (0 = float), for max_distinct
    act_bits: tuple[int, ...] = ()      # per candidate (0 = float), for ties
    ties: tuple[tuple[int, ...], ...] = ()  # groups of layers that must share activation bits
    max_distinct: int | None = None     # at most this many distinct weight widths (fixed layers' included)
    fixed_widths: frozenset[int] = frozenset()  # weight widths already used by fixed layers
    entropy: np.ndarray | None = None   # (L,) raw output entropy of each float layer (threshold method)
    fidelity: Callable[[Sequence[int]], float] | None = None  # measured drop of a choice (threshold, max-drop)
    links: tuple[Link, ...] = ()        # requantizes' BitOps, added to the bitops budget
    weighted: tuple[bool, ...] = ()     # per row: a weighted layer (False: a unit without weights)

    def user_value(self, kind: str, total: float) -> float:
        """A cost total in the unit the user wrote (adds back the fixed layers' share)."""
        return (total + self.offsets.get(kind, 0.0)) / self.units.get(kind, 1.0)


@dataclass(frozen=True)
class Allocation:
    """Solver output: layer -> candidate key, the objective, the solver and its status."""

    choice: Mapping[str, str]
    objective: float
    solver: str
    status: str
    costs: Mapping[str, float] = field(default_factory=dict)
    details: Mapping[str, object] = field(default_factory=dict)  # method-specific (threshold: tau, window)


Solver = Callable[..., Allocation]   # (problem, time_limit, **settings) -> Allocation


@dataclass(frozen=True)
class SolverSpec:
    """An allocation method and what it needs from the pipeline, so that no code outside it names it.

    metric: the sensitivity metric it values layers by (None: the configured metric).
    judge: it measures fidelity itself, so the problem needs a fidelity judge (`Problem.fidelity`).
    drop: how a drop limit (`max_drop`) is met: "grid" solves at average weight widths from the widest
      down and binary-searches the measured drop; "ladder" binary-searches along `ladder(problem)`, the
      method's own list of ever smaller points; "self" hands `max_drop`, `trials` and `seed` to the solver.
    """

    solve: Solver
    summary: str
    metric: str | None = None
    judge: bool = False
    drop: str = "grid"
    ladder: Callable[[Problem], list[list[int]]] | None = None


SOLVERS: Registry[SolverSpec] = Registry("allocation method")


def solver(name: str, summary: str, **needs: Any) -> Callable[[Solver], Solver]:
    """Registers a solve function under `name` with its `SolverSpec` fields (`needs`)."""
    def register(fn: Solver) -> Solver:
        SOLVERS.register(name)(SolverSpec(fn, summary, **needs))
        return fn
    return register


def admissible(problem: Problem) -> np.ndarray:
    """The (L, C) mask of the choices the hardware rules allow (every choice without rules)."""
    return problem.allowed if problem.allowed is not None else np.ones_like(problem.scores, dtype=bool)


def extremes(problem: Problem, kind: str) -> tuple[float, float]:
    """The smallest and largest total of one budget's cost over the allowed choices (in cost units)."""
    allowed, cost = admissible(problem), problem.costs[kind]
    return (float(np.where(allowed, cost, np.inf).min(axis=1).sum()),
            float(np.where(allowed, cost, -np.inf).max(axis=1).sum()))


def reachable(problem: Problem) -> np.ndarray:
    """The (L, C) mask of the allowed choices that some allocation within every budget can take: (l, c)
    is reachable when cost_k[l, c] + sum_{l' != l} min_c' cost_k[l', c'] <= limit_k for every budget k
    (a necessary condition: the ties, links and distinct-width rules only narrow it further)."""
    allowed = admissible(problem)
    mask = allowed.copy()
    for kind, cost in problem.costs.items():
        least = np.where(allowed, cost, np.inf).min(axis=1)
        rest = float(least.sum()) - least
        limit = problem.limits[kind]
        mask &= cost + rest[:, None] <= limit + 1e-9 * max(abs(limit), 1.0)
    return mask


def check_feasible(problem: Problem) -> None:
    """Raises ConstraintError naming, for a budget no allocation can meet, the smallest value it can."""
    for kind in problem.costs:
        smallest = extremes(problem, kind)[0]
        if smallest > problem.limits[kind] * (1 + 1e-9):
            raise ConstraintError(f"budget {kind}={problem.user_value(kind, problem.limits[kind]):.6g} cannot be met: "
                                  f"the smallest achievable is {problem.user_value(kind, smallest):.6g} with these "
                                  "candidates and rules.",
                                  f"raise the budget or allow lower bit-widths ({option('search.weight_bits')}).")


def totals(problem: Problem, index: Sequence[int]) -> dict[str, float]:
    """Each budget's total cost of a choice (requantizes included in bitops)."""
    rows = np.arange(len(problem.layers))
    out = {kind: float(cost[rows, index].sum()) for kind, cost in problem.costs.items()}
    if "bitops" in out and problem.links:
        out["bitops"] += link_bitops(problem, index)
    return out


def link_bitops(problem: Problem, index: Sequence[int]) -> float:
    """BitOps of the requantizes a choice needs (see `Link`)."""
    total = 0.0
    for link in problem.links:
        stored = problem.act_bits[index[link.source]] if link.source is not None else link.source_bits
        if not stored:
            continue
        wanted = {problem.act_bits[index[r]] for r in link.readers} | set(link.fixed_readers)
        total += sum(link.elements * stored * b for b in wanted if b and b != stored)
    return total


def tied_ok(problem: Problem, index: Sequence[int]) -> bool:
    """Every tie group shares one activation width, and at most max_distinct weight widths are used."""
    if problem.ties and problem.act_bits:
        for group in problem.ties:
            if len({problem.act_bits[index[l]] for l in group}) > 1:
                return False
    if problem.max_distinct is not None and problem.weight_bits:
        used = {problem.weight_bits[c] for c in index if problem.weight_bits[c]} | set(problem.fixed_widths)
        return len(used) <= problem.max_distinct
    return True


def solve(problem: Problem, method: str = "ilp", time_limit: float = 10.0, **settings: float | None) -> Allocation:
    """Runs the solver `method`; `settings` go to solvers that take them (threshold: max_drop, trials)."""
    check_feasible(problem)
    spec = SOLVERS.get(method)
    return spec.solve(problem, time_limit, **settings) if settings else spec.solve(problem, time_limit)


def result(problem: Problem, index: Sequence[int], solver: str, status: str) -> Allocation:
    """An Allocation from chosen candidate indices, with the objective and the budgets' totals."""
    rows = np.arange(len(problem.layers))
    return Allocation({problem.layers[l]: problem.candidates[index[l]] for l in range(len(problem.layers))},
                      float(problem.scores[rows, list(index)].sum()), solver, status,
                      {k: problem.user_value(k, v) for k, v in totals(problem, index).items()})


from onnxmpq.allocate import eagl, greedy, ilp, threshold  # noqa: E402,F401  (register the solvers)
