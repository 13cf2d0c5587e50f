"""Pareto sweep: the allocation at every value of one budget, each model built and measured.

`--sweep avg-bits=2.5:8:0.5` solves at 2.5, 3.0, ..., 8.0 average weight bits (any budget kind; values
in its unit), builds each model with the requested rounding, and scores it against the float model on
held-out calibration samples (`verify.judge`). The sensitivity table is measured once. Output, next to
OUTPUT: `<stem>.sweep.json` ({"kind", "points": [{value, avg_weight_bits, weight_bytes, bitops, drop,
agreement, kl, sqnr_db, status, model?}], "frontier": [indices of the non-dominated points]}) and
`<stem>.sweep.png` (size against drop, frontier joined); with `write_models`, `<stem>.<value>.onnx`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from onnxmpq import progress
from onnxmpq.allocate import SOLVERS, Budget, parse_budget, solve
from onnxmpq.allocate.problem import build_problem, candidate_columns
from onnxmpq.calibrate import Preprocess
from onnxmpq.errors import ConstraintError, OnnxmpqError, option
from onnxmpq.graph.model import Model
from onnxmpq.pipeline import plan
from onnxmpq.pipeline.config import QuantizeConfig, SearchConfig
from onnxmpq.pipeline.context import RunContext
from onnxmpq.pipeline.stages import materialize, table_source
from onnxmpq.report.plots import pareto_plot
from onnxmpq.report.summary import frontier, summarize
from onnxmpq.sensitivity import parse_candidates
from onnxmpq.types import QuantOptions
from onnxmpq.write.build import build
from onnxmpq.write.save import save_model, write_json


def parse_range(spec: str) -> tuple[str, list[float], bool]:
    """KIND=START:STOP:STEP -> (kind, values, relative)."""
    name, example = option("sweep.spec"), "write e.g. avg-bits=2.5:8:0.5."
    kind, sep, span = spec.partition("=")
    parts = span.split(":")
    if not sep or len(parts) != 3:
        raise OnnxmpqError(f"{name} {spec!r} is not KIND=START:STOP:STEP.", example)
    relative = parts[0].strip().lower().endswith("x")
    try:
        start, stop, step = (float(p.strip().rstrip("xX")) for p in parts)
    except ValueError:
        raise OnnxmpqError(f"{name} {spec!r} has a value that is not a number.", example) from None
    if step <= 0 or stop < start:
        raise OnnxmpqError(f"{name} {spec!r} needs START <= STOP and STEP > 0.", example)
    parse_budget(f"{kind}={start}{'x' if relative else ''}")  # validates the kind
    values = [round(v, 10) for v in np.arange(start, stop + step / 2, step)]
    if len(values) > 200:
        raise OnnxmpqError(f"{name} {spec!r} has {len(values)} points.", "use a larger STEP (at most 200 points).")
    return kind.strip().lower(), values, relative


def _json_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}.sweep.json")


def _plot_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}.sweep.png")


def _model_path(output: Path, value: float) -> Path:
    return output.with_name(f"{output.stem}.{value:g}.onnx")


def outputs(output, spec: str, write_models: bool) -> dict[str, Path]:
    """Every file a sweep writes, by role: its JSON, its plot and (`write_models`) one model per value."""
    output = Path(output)
    files = {"the sweep's JSON": _json_path(output), "the sweep's plot": _plot_path(output)}
    if write_models:
        files.update({f"the sweep model at {value:g}": _model_path(output, value) for value in parse_range(spec)[1]})
    return files


def run(cfg: QuantizeConfig, model: Model, preprocess: Preprocess | None = None) -> dict:
    """The sweep `cfg.sweep.spec` asks for, on one run context: one sensitivity table, one allocation,
    build and score per value. Writes the JSON and plot (and the models with `cfg.sweep.models`); the
    caller has checked the paths (`api.check_paths`)."""
    spec, search, rounding = str(cfg.sweep.spec), cfg.search, cfg.precision.rounding
    kind, values, relative = parse_range(spec)
    calib = cfg.data.calib
    if calib is None:
        raise OnnxmpqError("a sweep needs calibration data.", f"set {option('data.calib')}.")
    output, options = Path(str(cfg.output.path)), cfg.quantizers
    rounding = rounding.resolve(search.weight_bits, True)
    ctx = RunContext(model, calib, limit=cfg.data.limit, holdout=True, preprocess=preprocess,
                     batch_size=cfg.data.batch_size)
    table = table_source(ctx, search, rounding, options)
    points = []
    with progress.bar("sweep", len(values), unit="point") as advance:
        for value in values:
            at = dataclasses.replace(search, budgets=(Budget(kind, value, relative),), max_drop=None)
            try:
                chosen = plan.choose(ctx, at, cfg.precision.act_bits, options, table, prune=False)
            except ConstraintError as exc:
                points.append({"value": value, "error": str(exc).split(". Hint")[0]})
                advance(1)
                continue
            proto, results, _ = materialize(ctx, chosen.assignment, options, rounding, cfg.data.batch_size)
            point = {"value": value, **summarize(results), **ctx.judge.score(proto).to_dict(),
                     "status": chosen.allocation.status, "bits": {n: c.key for n, c in chosen.assignment.items()}}
            if cfg.sweep.models:
                path = _model_path(output, value)
                save_model(proto, path)
                point["model"] = str(path)
            points.append(point)
            advance(1)
    out: dict[str, Any] = {"kind": kind, "relative": relative, "metric": plan.metric_of(search), "method": search.method,
           "rounding": str(rounding), "points": points, "frontier": frontier(points),
           "json": str(_json_path(output)), "plot": str(_plot_path(output))}
    write_json(out, out["json"])
    pareto_plot(points, out["frontier"], out["plot"], f"{model.path.name if model.path else 'model'}: {kind} sweep")
    return out


def pareto_points(chosen: plan.Plan, ctx: RunContext, options: QuantOptions) -> list[dict]:
    """The report's Pareto curve: the chosen problem solved at each average width from the smallest to the
    largest candidate in 0.5 steps, built with nearest rounding, scored on the run's held-out samples.
    A method that judges fidelity itself answers a budget only through its search, so the curve is
    solved by the default method then."""
    settings, model = dataclasses.replace(chosen.settings, max_drop=None), ctx.model
    method = settings.method if not SOLVERS.get(settings.method).judge else SearchConfig().method
    candidates = parse_candidates(settings.weight_bits, chosen.act_bits)
    by_key = {c.key: c for c in candidate_columns(model.points(options), candidates)}
    points = []
    for value in np.arange(min(settings.weight_bits), max(settings.weight_bits) + 0.25, 0.5):
        problem, fixed = build_problem(model, chosen.table, candidates, [Budget("avg-bits", float(value))],
                                       chosen.profile, options, settings.keep, None)
        try:
            alloc = solve(problem, method, settings.time_limit)
        except ConstraintError:
            continue
        assignment = {**{n: by_key[k] for n, k in alloc.choice.items()}, **fixed}
        proto, results = build(model, assignment, ctx.stats(options), options)
        points.append({"value": float(value), **summarize(results), **ctx.judge.score(proto).to_dict()})
    return points
