"""Pareto sweep: the allocation at every value of one budget, each model built and measured.

`--sweep avg-bits=2.5:8:0.5` solves at 2.5, 3.0, ..., 8.0 average weight bits (any budget kind; values
in its unit), builds each model with the requested rounding, and scores it against the float model on
held-out calibration samples (`verify`). The sensitivity table is measured once. Output, next to
OUTPUT: `<stem>.sweep.json` ({"kind", "points": [{value, avg_weight_bits, weight_bytes, bitops, drop,
agreement, kl, sqnr_db, status, model?}], "frontier": [indices of the non-dominated points]}) and
`<stem>.sweep.png` (size against drop, frontier joined); with `write_models`, `<stem>.<value>.onnx`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from onnxmpq import paths
from onnxmpq.allocate import Budget, parse_budget
from onnxmpq.errors import ConstraintError, OnnxmpqError


def parse_range(spec: str) -> tuple[str, list[float], bool]:
    """KIND=START:STOP:STEP -> (kind, values, relative)."""
    kind, sep, span = spec.partition("=")
    parts = span.split(":")
    if not sep or len(parts) != 3:
        raise OnnxmpqError(f"--sweep {spec!r} is not KIND=START:STOP:STEP.", "write e.g. --sweep avg-bits=2.5:8:0.5.")
    relative = parts[0].strip().lower().endswith("x")
    try:
        start, stop, step = (float(p.strip().rstrip("xX")) for p in parts)
    except ValueError:
        raise OnnxmpqError(f"--sweep {spec!r} has a value that is not a number.", "write e.g. avg-bits=2.5:8:0.5.") from None
    if step <= 0 or stop < start:
        raise OnnxmpqError(f"--sweep {spec!r} needs START <= STOP and STEP > 0.", "write e.g. avg-bits=2.5:8:0.5.")
    parse_budget(f"{kind}={start}{'x' if relative else ''}")  # validates the kind
    values = [round(v, 10) for v in np.arange(start, stop + step / 2, step)]
    if len(values) > 200:
        raise OnnxmpqError(f"--sweep {spec!r} has {len(values)} points.", "use a larger STEP (at most 200 points).")
    return kind.strip().lower(), values, relative


def frontier(points: list[dict]) -> list[int]:
    """Indices of points no other point beats on both weight bytes and drop (ties kept)."""
    ok = [i for i, p in enumerate(points) if "error" not in p]
    return [i for i in ok if not any(points[j]["weight_bytes"] <= points[i]["weight_bytes"]
                                     and points[j]["drop"] <= points[i]["drop"]
                                     and (points[j]["weight_bytes"], points[j]["drop"]) !=
                                     (points[i]["weight_bytes"], points[i]["drop"]) for j in ok)]


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


def run(model, output, calib, spec: str, settings, *, options, rounding, batch_size: int = 32, preprocess=None,
        write_models: bool = False) -> dict:
    from onnxmpq import progress
    from onnxmpq.pipeline import api, plan
    from onnxmpq.pipeline.context import RunContext
    from onnxmpq.report.summary import summarize
    from onnxmpq.types import Rounding
    from onnxmpq.write.save import save_model, write_json

    kind, values, relative = parse_range(spec)
    model = api.load(model)
    if calib is None:
        raise OnnxmpqError("a sweep needs calibration data.", "pass --calib PATH.")
    output = Path(output)
    paths.check_writes(outputs(output, spec, write_models), {"model": model.path, "calibration data": calib,
                                                          **api.model_files(model)})
    rounding = Rounding(rounding).resolve(settings.weight_bits, True)
    ctx = RunContext(model, calib, limit=settings.limit, holdout=True, preprocess=preprocess, batch_size=batch_size)
    table = api.table_source(ctx, settings, rounding, options)
    points = []
    with progress.bar("sweep", len(values), unit="point") as advance:
        for value in values:
            budget = Budget(kind, value * (1 if relative else 1), relative)
            try:
                chosen = plan.choose(ctx, [budget], dataclasses.replace(settings, max_drop=None), options,
                                     rounding, table)
            except ConstraintError as exc:
                points.append({"value": value, "error": str(exc).split(". Hint")[0]})
                advance(1)
                continue
            proto, results, _ = api.materialize(ctx, chosen.assignment, options, rounding, batch_size)
            point = {"value": value, **summarize(results), **ctx.judge.score(proto).to_dict(),
                     "status": chosen.allocation.status, "bits": {n: c.key for n, c in chosen.assignment.items()}}
            if write_models:
                path = _model_path(output, value)
                save_model(proto, path)
                point["model"] = str(path)
            points.append(point)
            advance(1)
    out = {"kind": kind, "relative": relative, "metric": settings.effective_metric, "method": settings.method,
           "rounding": str(rounding), "points": points, "frontier": frontier(points),
           "json": str(_json_path(output)), "plot": str(_plot_path(output))}
    write_json(out, out["json"])
    from onnxmpq.report.plots import pareto_plot
    pareto_plot(points, out["frontier"], out["plot"], f"{model.path.name if model.path else 'model'}: {kind} sweep")
    return out
