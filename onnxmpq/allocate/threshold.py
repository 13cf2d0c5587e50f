"""`threshold` (Qin et al. 2025): smoothed per-layer output entropy against a tuned threshold.

H_l is the entropy of layer l's float output over the calibration set (the `output-entropy` metric's
raw value), in network order. A centred sliding window of k layers smooths it,
H~_l = mean(H_{l-h} .. H_{l+h}) with h = (k - 1) / 2 (fewer at the ends), and a dynamic threshold
tau * mean_l(H~_l) splits the layers: H~_l >= tau * mean gets the high width, the rest the low one
(more information, more bits). The paper leaves the levels open; here the pair (low, high) is tuned
with tau and k. Optuna's TPE sampler (seeded, so runs repeat) searches tau in [0.5, 1.5], k in
{1, 3, 5, 7, 9} and the two widths:

- with a drop limit (`--max-drop`): the most compression (smallest normalised budget cost, or average
  bits without a budget) whose measured fidelity drop stays within it and whose costs meet every budget;
- without one: the smallest measured drop among the splits that meet every budget.

Each trial builds the model and measures its drop on held-out calibration samples (`Problem.fidelity`),
the float model's soft outputs standing in for the paper's teacher. Its knowledge-distillation
retraining is out of scope for a post-training tool.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from onnxmpq.allocate import Allocation, Problem, admissible, result, solver, tied_ok, totals
from onnxmpq.errors import ConstraintError, option

TRIALS = 40
WINDOWS = (1, 3, 5, 7, 9)


def smooth(entropy: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over `window` layers (fewer at the ends)."""
    half = window // 2
    n = len(entropy)
    return np.array([entropy[max(0, i - half):min(n, i + half + 1)].mean() for i in range(n)])


def split(problem: Problem, tau: float, window: int, low: int, high: int) -> list[int]:
    """Candidate index per layer: the high or low weight width by the threshold rule (see module doc);
    each layer takes its allowed candidate of that width with the fewest activation bits, or the allowed
    candidate nearest in weight width."""
    smoothed = smooth(np.asarray(problem.entropy, float), window)
    cut = tau * smoothed.mean()
    allowed = admissible(problem)
    index = []
    for l, value in enumerate(smoothed):
        want = high if value >= cut else low
        cols = [int(c) for c in np.flatnonzero(allowed[l])]
        index.append(min(cols, key=lambda c: (abs((problem.weight_bits[c] or 32) - want), problem.act_bits[c] or 32)))
    return index


def _compression_cost(problem: Problem, index: Sequence[int]) -> float:
    """Budget costs normalised by their limits (by their largest total when unlimited) and summed."""
    if not problem.costs:
        return float(np.mean([problem.weight_bits[c] or 32 for c in index]))
    out = 0.0
    for kind, value in totals(problem, index).items():
        limit = problem.limits[kind]
        scale = limit if np.isfinite(limit) else problem.costs[kind].max(axis=1).sum()
        out += value / max(scale, 1e-12)
    return out


def _within(problem: Problem, index: Sequence[int]) -> bool:
    return tied_ok(problem, index) and all(v <= problem.limits[k] * (1 + 1e-9) for k, v in totals(problem, index).items())


@solver("threshold", "smoothed output entropy against an Optuna-tuned threshold (Qin et al. 2025)",
        metric="output-entropy", judge=True, drop="self")
def solve_threshold(problem: Problem, time_limit: float = 10.0, max_drop: float | None = None,
                    trials: int = TRIALS, seed: int = 0) -> Allocation:
    import optuna

    fidelity = problem.fidelity
    if problem.entropy is None or fidelity is None:
        raise ConstraintError("the threshold method needs each layer's output entropy and a fidelity judge.",
                              f"run it through a quantize run ({option('search.method')} threshold) with {option('data.calib')}.")
    widths = sorted({w for w in problem.weight_bits if w})
    if len(widths) < 2:
        raise ConstraintError("the threshold method needs at least two weight widths.",
                              f"set e.g. {option('search.weight_bits')} 2,3,4,5,6,8.")
    seen: dict[tuple[int, ...], float] = {}

    def drop_of(index: Sequence[int]) -> float:
        key = tuple(index)
        if key not in seen:
            seen[key] = fidelity(index)
        return seen[key]

    def objective(trial: optuna.Trial) -> float:
        tau = trial.suggest_float("tau", 0.5, 1.5)
        window = trial.suggest_categorical("window", list(WINDOWS))
        low_at = trial.suggest_int("low_index", 0, len(widths) - 2)
        high_at = trial.suggest_int("high_index", low_at + 1, len(widths) - 1)
        low, high = widths[low_at], widths[high_at]
        trial.set_user_attr("levels", [low, high])
        index = split(problem, tau, window, low, high)
        if not _within(problem, index):
            return 1e6 + _compression_cost(problem, index)
        drop = drop_of(index)
        trial.set_user_attr("index", index)
        trial.set_user_attr("drop", drop)
        if max_drop is None:
            return drop
        return _compression_cost(problem, index) if drop <= max_drop else 1e3 + drop

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=trials, timeout=None)
    good = [(t.value, t) for t in study.trials if t.value is not None and t.value < 1e3 and "index" in t.user_attrs]
    if not good:
        raise ConstraintError(f"no threshold split in {trials} trials meets the budgets"
                              f"{' and the drop limit' if max_drop is not None else ''}.",
                              f"raise the budget or {option('search.max_drop')}, or use {option('search.method')} ilp.")
    best = min(good, key=lambda vt: vt[0])[1]
    alloc = result(problem, best.user_attrs["index"], "threshold (entropy, Optuna TPE)", "feasible")
    params = {"tau": best.params["tau"], "window": best.params["window"], "levels": best.user_attrs["levels"],
              "trials": trials, "drop": best.user_attrs["drop"]}
    return Allocation(alloc.choice, alloc.objective, alloc.solver, alloc.status, alloc.costs, params)
