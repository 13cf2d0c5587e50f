"""The Python API: the same jobs as the CLI, as functions.

Example:
    >>> import onnxmpq
    >>> report = onnxmpq.quantize("models/resnet20_cifar10.onnx", "out.onnx",
    ...                           calib="calibration/cifar10_train256.npz", weight_bits=4, act_bits=8)
    >>> report.weight_bytes < report.float_weight_bytes
    True
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from onnxmpq import calibrate, paths, progress
from onnxmpq.errors import OnnxmpqError
from onnxmpq.graph import model as graph
from onnxmpq.graph import qdq, runtime
from onnxmpq.graph.model import Model
from onnxmpq.pipeline.context import RunContext
from onnxmpq.report.summary import FLOAT_BITS, Report, file_breakdown, storage_notes, summarize
from onnxmpq.rounding import sequential
from onnxmpq.types import Candidate, QuantOptions, Rounding
from onnxmpq.verify.evaluate import Evaluation
from onnxmpq.verify.evaluate import evaluate as _evaluate
from onnxmpq.write.build import build
from onnxmpq.write.save import save_model

if TYPE_CHECKING:
    from onnxmpq.pipeline import plan


def load(model: str | os.PathLike | Model) -> Model:
    """A `Model` from a path (or the model itself)."""
    return model if isinstance(model, Model) else graph.load(model)


def model_files(model: Model) -> dict[str, Path]:
    """The external data files a model was read with, by role (for `paths.check_writes`)."""
    return {f"model's external data {p.name!r}": p for p in model.data_files}


def assign(model: Model, weight_bits: int | None, act_bits: int | None,
           layer_bits: Mapping[str, Candidate] | None = None,
           options: QuantOptions = QuantOptions()) -> dict[str, Candidate]:
    """Uniform precision for every unit (weight bits for the weighted layers, activation bits for all),
    then the per-unit overrides by name."""
    points = model.points(options)
    assignment = {u.name: Candidate(weight_bits if u.layer else None, act_bits) for u in points.units}
    for name, cand in (layer_bits or {}).items():
        points.unit(name)  # raises a clear error for an unknown name
        assignment[name] = cand
    return {name: cand for name, cand in assignment.items() if cand.weight_bits or cand.act_bits}


def read_allocation(path: str | os.PathLike) -> dict[str, Candidate]:
    """Per-layer bits from JSON: a report's `layers` list, or {"layers": {name: {"weight_bits", "act_bits"}}}."""
    hint = "pass a JSON file written by onnxmpq (a report or an allocation)."
    try:
        data = json.loads(paths.read_regular(path, "allocation file", hint))
    except ValueError as exc:
        raise OnnxmpqError(f"cannot read allocation file {str(path)!r}: {exc}.", hint) from None
    layers = data.get("layers") if isinstance(data, dict) else None
    if isinstance(layers, dict):
        layers = [dict(entry, name=name) for name, entry in layers.items()]
    if not isinstance(layers, list) or not all(isinstance(e, dict) and "name" in e for e in layers):
        raise OnnxmpqError(f"allocation file {str(path)!r} has no list of layers with names.",
                           'expected {"layers": [{"name": ..., "weight_bits": 4, "act_bits": 8}, ...]}.')
    return {str(e["name"]): Candidate(_allocation_bits(e, "weight_bits", path), _allocation_bits(e, "act_bits", path))
            for e in layers}


def _allocation_bits(entry: dict, key: str, path) -> int | None:
    """A width from an allocation entry: an integer 2..16, or null/absent for float."""
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 16:
        raise OnnxmpqError(f"allocation file {str(path)!r}: layer {entry['name']!r} has {key} {value!r}, "
                           "not an integer from 2 to 16.", f"write {key} as a number such as 8, or null for float.")
    return value


def round_weights(ctx: RunContext, assignment, stats, options: QuantOptions, batch_size: int = 32):
    """GPTQ codes for the assignment's layers, with a progress bar per layer."""
    todo = sum(1 for c in assignment.values() if c.weight_bits)
    with progress.bar("gptq", todo, unit="layer") as advance:
        return sequential.round_model(ctx.model, assignment, ctx.require_data("gptq rounding"), stats, options,
                                      batch_size=max(batch_size, 64), on_layer=lambda name: advance(1))


def with_profile_rules(options: QuantOptions, profile) -> QuantOptions:
    """The writer options with a hardware profile's op rules: the ops it runs on integers and the ops whose
    inputs share one scale."""
    if profile is None:
        return options
    from onnxmpq.hardware import profiles

    rules = profiles.load(profile)
    return dataclasses.replace(options, integer_ops=options.integer_ops | rules.integer_ops,
                               tie_ops=options.tie_ops | frozenset(rules.tie))


def quantize(model, output: str | os.PathLike, calib=None, *, weight_bits: int | None = 8,
             act_bits: int | None = 8, layer_bits: Mapping[str, Candidate] | None = None,
             options: QuantOptions = QuantOptions(), rounding: Rounding | str = Rounding.AUTO,
             batch_size: int = 32, limit: int | None = None, preprocess=None, budgets=(),
             allocation: plan.Settings | Mapping | None = None, verify: bool = True,
             report_dir: str | os.PathLike | None = None, stable: bool = False) -> Report:
    """Quantizes `model` to `output` and returns the report (see `onnxmpq quantize --help`).

    With `budgets` (or `allocation.max_drop`) every layer's precision is chosen by `plan.choose` under
    `allocation` (a `plan.Settings`: metric, method, candidates, profile, kept layers); `layer_bits`
    then override single layers. `rounding="gptq"` rounds each layer against the inputs the quantized
    network gives it, after a least-squares re-fit to the float outputs (see `onnxmpq.rounding.gptq`);
    `auto` (the default) uses gptq when a layer has fewer than 8 weight bits and `calib` is given.
    With `calib` and `verify`, the written file is scored against the float model on held-out samples
    and timed (report `verification`). `report_dir` also writes report.json and report.html with plots
    (see `onnxmpq.report`); `stable` leaves the run-dependent timings out of that report.json.
    """
    from onnxmpq.pipeline import plan

    start = time.perf_counter()
    rounding = Rounding(rounding)
    settings = allocation if isinstance(allocation, plan.Settings) else plan.Settings(**(allocation or {}))
    if limit is not None:
        settings = dataclasses.replace(settings, limit=limit)
    choosing = bool(budgets) or (allocation is not None and settings.max_drop is not None)
    options = with_profile_rules(options, settings.profile if allocation is not None else None)
    model = load(model)
    if verify and calib is None:
        verify = False
    output = Path(output)
    from onnxmpq.report.html import FILES
    paths.check_writes({"the output": output, **paths.folder_files(report_dir, FILES, "report folder")},
                       {"model": model.path, "calibration data": calib, **model_files(model)})
    if report_dir is not None:
        paths.check_new_folder(report_dir)
    if not model.layers:
        raise OnnxmpqError("the model has no quantizable layer (Conv, ConvTranspose, Gemm, MatMul with a constant weight).",
                           "nothing to do; run `onnxmpq inspect MODEL` to see what it holds.")
    judged = verify or (choosing and (settings.max_drop is not None or settings.method == "threshold"
                                      or report_dir is not None))
    ctx = RunContext(model, calib, limit=settings.limit, holdout=judged, preprocess=preprocess,
                     batch_size=batch_size)
    model, chosen = ctx.model, None
    if choosing:
        if calib is None:
            raise OnnxmpqError("choosing bits under a budget needs calibration data.", "pass --calib PATH.")
        rounding = rounding.resolve(settings.weight_bits, True)
        chosen = plan.choose(ctx, budgets, settings, options, rounding,
                             sensitivity=table_source(ctx, settings, rounding, options))
        assignment = {**chosen.assignment, **(layer_bits or {})}
    else:
        assignment = assign(model, weight_bits, act_bits, layer_bits, options)
    proto, results, notes = materialize(ctx, assignment, options, rounding, batch_size)
    with progress.bar("write", 1, unit="file") as advance:
        file_bytes = save_model(proto, output)
        advance(1)
    breakdown = file_breakdown(proto)
    float_file_bytes = model.path.stat().st_size if model.path else model.proto.ByteSize()
    if file_bytes > float_file_bytes:
        notes.append(f"the quantized file is larger than its input ({file_bytes:,d} against {float_file_bytes:,d} "
                     "bytes): " + ", ".join(f"{k.replace('_', ' ')} {v:,d}" for k, v in breakdown.items())
                     + "; small layers carry a Q/DQ pair per tensor and a scale per channel, which can outweigh "
                     "what their narrower weights save (keep such layers float with --layer-bits NAME=float)")
    checked = None
    if verify:
        with progress.bar("verify", 1, unit="model") as advance:
            try:
                checked = verification(ctx, output, chosen)
            except OnnxmpqError as exc:  # the model is written and valid; say why it could not be scored
                checked = {"error": str(exc)}
            advance(1)
    report = Report(
        model=str(model.path) if model.path else "<memory>", output=str(output), layers=results.layers,
        units=results.units, tensors=results.tensors, float_ops=results.floats,
        file_bytes=file_bytes, float_file_bytes=float_file_bytes, file_breakdown=breakdown,
        opset=graph.default_opset(proto), time_s=time.perf_counter() - start, skipped=model.skipped,
        notes=list(model.notes) + storage_notes(results.layers) + notes,
        allocation=_allocation_dict(chosen, budgets, settings, {s.name for s in model.layers}),
        verification=checked,
        settings={"rounding": str(rounding.resolve([c.weight_bits for c in assignment.values()], calib is not None)),
                  "weight_range": str(options.weight_range), "act_range": str(options.act_range),
                  "percentile": options.percentile, "int2_container": options.int2_container, "bias": options.bias,
                  "weight_layout": options.weight_layout, "scope": str(options.scope),
                  "integer_ops": sorted(options.integer_ops)},
        **summarize(results))
    if report_dir is not None:
        from onnxmpq.report import html as pages
        with progress.bar("report", 1, unit="page") as advance:
            figs = pages.figures(report.to_dict(), chosen, ctx, options)
            pages.write(report.to_dict(stable=stable), report_dir, figs)
            advance(1)
    return report


def materialize(ctx: RunContext, assignment, options: QuantOptions, rounding: Rounding, batch_size: int = 32):
    """Statistics, rounding and the QDQ writer for one assignment: (proto, results, notes)."""
    rounding = rounding.resolve([c.weight_bits for c in assignment.values()], ctx.has_data)
    acts = [name for name, cand in assignment.items() if cand.act_bits]
    if not ctx.has_data and (acts or rounding == Rounding.GPTQ):
        raise OnnxmpqError(f"{'gptq rounding' if rounding == Rounding.GPTQ else 'quantized activations'} "
                           "needs calibration data.", "pass --calib PATH.")
    stats = ctx.stats(options, acts) if acts else {}
    weights, notes = None, []
    if rounding == Rounding.GPTQ:
        result = round_weights(ctx, assignment, stats, options, batch_size)
        weights = result.weights
        notes += [f"{name}: {reason}" for name, reason in result.fallbacks]
    proto, results = build(ctx.model, assignment, stats, options, weights=weights)
    return proto, results, notes


def verification(ctx: RunContext, output: Path, chosen=None) -> dict:
    """The written file against the float model on the held-out samples, its latency beside the float
    model's (timed in alternation, batch 1), and the kernels onnxruntime runs it on after load."""
    from onnxmpq.allocate import latency

    fidelity = ctx.judge.score(str(output))
    quantized_ms, float_ms = latency.time_pair(str(output), ctx.model.proto, ctx.first())
    kernels = runtime.census(str(output))
    out = {**fidelity.to_dict(), "latency_ms": quantized_ms, "float_latency_ms": float_ms, "latency_batch": 1,
           "kernels": {"integer_compute": kernels.int_compute, "float_compute": kernels.float_compute}}
    if chosen is not None and chosen.latency is not None:
        # the table's prediction, and the same rescaled by how fast the float model runs now against
        # when the table was measured: T_now = T_pred * float_ms(now) / float_ms(table)
        out["predicted_latency_ms"] = predicted = chosen.latency.predict(chosen.assignment)
        if chosen.latency.float_ms > 0:
            out["predicted_latency_now_ms"] = predicted * float_ms / chosen.latency.float_ms
    return out


def _allocation_dict(chosen, budgets, settings, layers) -> dict | None:
    if chosen is None:
        return None
    alloc = chosen.allocation
    return {"solver": alloc.solver, "status": alloc.status, "objective": alloc.objective,
            "budgets": [{"kind": b.kind, "value": b.value, "relative": b.relative} for b in budgets],
            "costs": dict(alloc.costs), "details": dict(alloc.details),
            "fixed": {name: c.key for name, c in chosen.fixed.items()  # units without weights only when asked
                      if name in layers or name in settings.keep or name in chosen.profile.pin},
            "search": list(chosen.search),
            **settings.to_dict()}


def evaluate(model, data, reference=None, *, limit: int | None = None, batch_size: int = 100,
             preprocess=None) -> Evaluation:
    """Scores `model` on `data` (labels give top1; a reference model gives agreement, kl, sqnr_db)."""
    model = load(model)
    ref = load(reference) if reference is not None else None
    source = calibrate.read(data, model, limit=limit, preprocess=preprocess)
    with progress.bar("evaluate", len(source)) as advance:
        return _evaluate(model.proto, source, ref.proto if ref else None, batch_size=batch_size, on_batch=advance)


def inspect(model) -> dict:
    """The quantizable layers of any model (float or QDQ) with their bits, sizes and MACs, and every
    quantized activation tensor with its width, scale and zero point."""
    model = load(model)
    layers = qdq.read_layers(model.proto)
    tensors = qdq.read_tensors(model.proto)
    params = sum(layer.params for layer in layers) or 1
    rows = [{"name": l.name, "op_type": l.op_type, "weight_bits": l.weight_bits, "act_bits": l.act_bits,
             "params": l.params, "macs": l.macs, "weight_bytes": l.weight_bytes,
             "weight_type": l.weight.type_name if l.weight else "float",
             "act_type": l.activation.type_name if l.activation else "float",
             "weight_granularity": l.weight.granularity if l.weight else None} for l in layers]
    return {"model": str(model.path), "opset": model.opset, "layers": rows,
            "weight_bytes": qdq.weight_bytes(layers),
            "avg_weight_bits": sum(l.params * (l.weight_bits or FLOAT_BITS) for l in layers) / params,
            "tensors": [t.to_dict() for t in tensors],
            "requantizes": sum(1 for t in tensors if t.requantized_from is not None),
            "skipped": [{"name": n, "reason": r} for n, r in model.skipped]}


def compare(reference, models, data, *, limit: int | None = None, preprocess=None) -> list[dict]:
    """Size and accuracy of the reference and each model, all on the same samples."""
    rows = []
    for path in [reference] + list(models):
        info = inspect(path)
        result = evaluate(path, data, reference if path != reference else None, limit=limit, preprocess=preprocess)
        rows.append({"model": str(path), "file_bytes": _file_bytes(Path(path)), "weight_bytes": info["weight_bytes"],
                     "avg_weight_bits": info["avg_weight_bits"], **result.to_dict()})
    return rows


def _file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def sensitivity(model, calib=None, *, metrics: Sequence[str] = ("sqnr",), weight_bits: Sequence[int] = (2, 4, 8),
                act_bits: Sequence[int | None] = (None,), separate: bool = False,
                rounding: Rounding | str = Rounding.AUTO, options: QuantOptions = QuantOptions(),
                limit: int = 256, batch_size: int = 64, workers: int = 1, cache_dir=None, preprocess=None,
                naive: bool = False, executor: str = "process", address: str | None = None) -> list:
    """Sensitivity tables, one per metric (see `onnxmpq sensitivity --help` and `onnxmpq.sensitivity`).

    The calibration samples (at most `limit`) are held in memory with the activations at the probe
    engine's cut; `workers` > 1 splits the candidates over processes.
    """
    from onnxmpq import sensitivity as sens

    model = load(model)
    for name in metrics:
        sens.METRICS.get(name)
    data_free = all(sens.METRICS.get(name).data_free for name in metrics)
    ctx = RunContext(model, None if data_free else calib, limit=limit, preprocess=preprocess, batch_size=batch_size)
    return measure(ctx, metrics, weight_bits, act_bits, separate=separate, rounding=rounding, options=options,
                   batch_size=batch_size, workers=workers, cache_dir=cache_dir, naive=naive, executor=executor,
                   address=address)


def measure(ctx: RunContext, metrics: Sequence[str], weight_bits: Sequence[int], act_bits: Sequence[int | None], *,
            separate: bool = False, rounding: Rounding | str = Rounding.AUTO, options: QuantOptions = QuantOptions(),
            batch_size: int = 64, workers: int = 1, cache_dir=None, naive: bool = False, executor: str = "process",
            address: str | None = None) -> list:
    """The sensitivity tables of `sensitivity`, measured on the run's calibration samples and statistics."""
    from onnxmpq import sensitivity as sens
    from onnxmpq.sensitivity import cache, parallel

    candidates = sens.parse_candidates(weight_bits, act_bits, separate)
    data_free = all(sens.METRICS.get(name).data_free for name in metrics)
    rounding = Rounding(rounding).resolve(weight_bits, ctx.has_data and not data_free)
    batches, stats = [], None
    if not data_free:
        if not ctx.has_data:
            raise OnnxmpqError(f"metric(s) {', '.join(metrics)} need calibration data.", "pass --calib PATH.")
        batches = ctx.require_data("sensitivity").feeds(batch_size)
        if any(c.act_bits for c in candidates):
            stats = ctx.stats(options)
    model = ctx.model
    keys = [c.key for c in candidates]
    settings = {"metrics": list(metrics), "candidates": keys, "rounding": str(rounding),
                "options": repr(options), "naive": naive}
    key = cache.cache_key(model.proto, batches, settings) if cache_dir else None
    if key and (hit := cache.load(cache_dir, key, list(metrics), keys)) is not None:
        return hit
    points = model.points(options)
    several_acts = len({c.act_bits for c in candidates}) > 1 and not data_free
    with progress.bar("sensitivity", len(points.units) if several_acts else len(points.layers), unit="unit") as advance:
        tables = parallel.measure(model, batches, list(metrics), candidates, stats, options, Rounding(rounding),
                                  workers=workers, naive=naive, executor=executor, address=address,
                                  on_layer=lambda name: advance(1))
    if key:
        cache.store(cache_dir, key, tables)
    return tables


def allocation_problem(model: Model, table, candidates: Sequence[Candidate], budgets, options: QuantOptions = QuantOptions(),
                       profile=None, keep=None, latency=None):
    """The solver's view of `model` (see `onnxmpq.allocate.problem`); layers the rules fix are left out."""
    from onnxmpq.allocate.problem import build_problem
    from onnxmpq.hardware import profiles

    return build_problem(model, table, candidates, budgets, profiles.load(profile), options, keep, latency)[0]


def table_source(ctx: RunContext, settings, rounding: Rounding, options: QuantOptions):
    """The `sensitivity(metric, weight_bits, act_bits)` callable `plan.choose` takes: one measured table
    per metric, with the run's samples, cache and rounding, kept for later calls (a sweep)."""
    tables: dict = {}

    def table(metric: str, weight_bits, act_bits):
        if metric not in tables:
            tables[metric] = measure(ctx, [metric], weight_bits, act_bits, rounding=rounding, options=options,
                                     batch_size=ctx.batch_size, cache_dir=settings.cache_dir)[0]
        return tables[metric]
    return table


def allocate(model, calib, budgets, *, rounding: Rounding | str = Rounding.AUTO, options: QuantOptions = QuantOptions(),
             preprocess=None, **settings):
    """Chooses every layer's precision under `budgets` (keyword settings: those of `plan.Settings`);
    returns (assignment, Allocation, SensitivityTable)."""
    from onnxmpq.pipeline import plan

    config = plan.Settings(**settings)
    judged = config.max_drop is not None or config.method == "threshold"
    ctx = RunContext(load(model), calib, limit=config.limit, holdout=judged, preprocess=preprocess)
    rounding = Rounding(rounding).resolve(config.weight_bits, True)
    chosen = plan.choose(ctx, budgets, config, options, rounding,
                         sensitivity=table_source(ctx, config, rounding, options))
    return chosen.assignment, chosen.allocation, chosen.table


def sweep(model, output, calib, spec: str, settings, *, options: QuantOptions = QuantOptions(),
          rounding: Rounding | str = Rounding.AUTO, batch_size: int = 32, preprocess=None,
          write_models: bool = False) -> dict:
    """Pareto sweep of one budget (see `onnxmpq.sweep`); returns the frontier dict it also writes."""
    from onnxmpq.pipeline import sweep as _sweep

    return _sweep.run(model, output, calib, spec, settings, options=options, rounding=rounding,
                      batch_size=batch_size, preprocess=preprocess, write_models=write_models)
