"""The Python API: the same jobs as the CLI, as functions.

Example:
    >>> import onnxmpq
    >>> report = onnxmpq.quantize("models/resnet20_cifar10.onnx", "out.onnx",
    ...                           calib="calibration/cifar10_train256.npz", weight_bits=4, act_bits=8)
    >>> report.weight_bytes < report.float_weight_bytes
    True

`run(QuantizeConfig)` is the one entry point of a quantize run; `quantize(...)` is its keyword form,
and the CLI and `onnxmpq run CONFIG.yaml` build the same config (`onnxmpq.pipeline.config`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from onnxmpq import calibrate, paths, progress
from onnxmpq.allocate import SOLVERS, Budget
from onnxmpq.allocate.problem import build_problem
from onnxmpq.errors import InternalError, OnnxmpqError, option
from onnxmpq.graph import model as graph
from onnxmpq.graph import qdq
from onnxmpq.graph.model import Model
from onnxmpq.hardware import profiles
from onnxmpq.pipeline import config, plan, sweep
from onnxmpq.pipeline.config import DataConfig, SearchConfig
from onnxmpq.pipeline.context import RunContext
from onnxmpq.pipeline.stages import (
    assign,
    load,
    materialize,
    measure,
    model_files,
    table_source,
    verification,
    with_profile_rules,
)
from onnxmpq.report import html as pages
from onnxmpq.report.html import FILES
from onnxmpq.report.summary import FLOAT_BITS, Report, file_breakdown, storage_notes, summarize
from onnxmpq.sensitivity import METRICS
from onnxmpq.types import Candidate, Probes, QuantOptions, Rounding
from onnxmpq.verify.evaluate import Evaluation
from onnxmpq.verify.evaluate import evaluate as _evaluate
from onnxmpq.write.save import save_model, write_json

__all__ = ["allocation_problem", "assign", "compare", "evaluate", "inspect", "load", "quantize", "read_allocation",
           "run", "sensitivity"]


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


def quantize(model: str | os.PathLike | Model, output: str | os.PathLike, calib=None, *, weight_bits: int | None = 8,
             act_bits: int | None | Sequence[int | None] = 8, layer_bits: Mapping[str, Candidate] | None = None,
             options: QuantOptions = QuantOptions(), rounding: Rounding | str = Rounding.AUTO,
             batch_size: int = DataConfig().batch_size, limit: int | None = None, preprocess=None,
             budgets: Sequence[Budget | str] = (), search: SearchConfig | Mapping | None = None,
             verify: bool = True, report_dir: str | os.PathLike | None = None, stable: bool = False) -> Report:
    """Quantizes `model` to `output` and returns the report: the keyword form of `run` (see
    `onnxmpq.pipeline.config` for every setting and `onnxmpq quantize --help` for what it does).

    With `budgets` (or `search.max_drop`) every layer's precision is chosen under `search` (a
    `SearchConfig` or a mapping of its fields: metric, method, candidate widths, profile, kept layers);
    `layer_bits` then override single layers. `act_bits` may list several activation candidates then.
    `rounding="gptq"` rounds each layer against the inputs the quantized network gives it, after a
    least-squares re-fit to the float outputs (see `onnxmpq.rounding.gptq`); `auto` (the default) uses
    gptq when a layer has fewer than 8 weight bits and `calib` is given. With `calib` and `verify`, the
    written file is scored against the float model on held-out samples and timed (report
    `verification`). `report_dir` also writes report.json and report.html with plots (see
    `onnxmpq.report`); `stable` leaves the run-dependent timings out of that report.json.
    """
    search = search if isinstance(search, SearchConfig) else config.build_section("search", dict(search or {}))
    if budgets:
        search = dataclasses.replace(search, budgets=config.parse_budgets(list(budgets), "search.budgets"))
    acts = tuple(act_bits) if isinstance(act_bits, (list, tuple)) else (act_bits,)
    path_of = lambda value: None if value is None else str(value)  # noqa: E731
    cfg = config.QuantizeConfig(  # every keyword through its field's parser, as the CLI's and YAML's values
        model=str(model.path) if isinstance(model, Model) and model.path else "<memory>" if isinstance(model, Model)
        else str(model),
        data=config.build_section("data", {"calib": calib if isinstance(calib, (str, os.PathLike)) else None,
                                           "limit": DataConfig().limit if limit is None else limit,
                                           "batch_size": batch_size}),
        precision=config.build_section("precision", {"weight_bits": weight_bits, "act_bits": acts,
                                                     "layer_bits": dict(layer_bits or {}), "rounding": rounding}),
        quantizers=options, search=search,
        output=config.build_section("output", {"path": str(output), "verify": verify,
                                               "report_dir": path_of(report_dir), "stable_report": stable}))
    report = run(cfg, preprocess, model=load(model), calib=calib)
    if not isinstance(report, Report):
        raise InternalError("a run without a sweep returned no report")
    return report


def run(cfg: config.QuantizeConfig, preprocess=None, *, model: Model | None = None, calib=None) -> Report | dict:
    """Runs one quantize configuration: a Pareto sweep when `cfg.sweep.spec` is set (returns the
    frontier dict it also writes), else one model (returns its Report, and writes `output.report`).
    `model` and `calib` may be given as objects (a loaded Model, a calibration data reader)."""
    cfg = cfg.check()
    model = load(cfg.model if model is None else model)
    calib = cfg.data.calib if calib is None else calib
    check_paths(cfg, model, calib)
    overrides = read_allocation(cfg.precision.allocation) if cfg.precision.allocation else {}
    if overrides:
        cfg = dataclasses.replace(cfg, precision=dataclasses.replace(
            cfg.precision, layer_bits={**overrides, **cfg.precision.layer_bits}))
    if cfg.sweep.spec:
        return sweep.run(cfg, model, preprocess)
    report = run_model(cfg, model, calib, preprocess)
    if cfg.output.report:
        write_json(report.to_dict(stable=cfg.output.stable_report), cfg.output.report)
    return report


def check_paths(cfg: config.QuantizeConfig, model: Model, calib) -> None:
    """Every file the run writes against every file it reads (see `paths.check_writes`), before any work;
    each named as the front end in use names its setting."""
    out, search = cfg.output, cfg.search
    writes = {option("output.report"): out.report,
              **paths.folder_files(out.report_dir, FILES, option("output.report_dir"))}
    writes.update(sweep.outputs(out.path, cfg.sweep.spec, cfg.sweep.models) if cfg.sweep.spec
                  else {option("output.path"): out.path})
    profile = search.profile if search.profile and search.profile not in profiles.BUILTINS else None
    paths.check_writes(writes, {"model": model.path, option("data.calib"): calib,
                                option("precision.allocation"): cfg.precision.allocation,
                                option("search.latency"): search.latency,
                                option("search.profile"): profile if profile and Path(profile).exists() else None,
                                **model_files(model)})
    if out.report_dir is not None:
        paths.check_new_folder(out.report_dir)


def run_model(cfg: config.QuantizeConfig, model: Model, calib=None, preprocess=None) -> Report:
    """One model from a checked config whose paths were checked (`run`); the report records the time
    of each stage (`Report.stages`)."""
    with progress.timings() as stages:
        return _run_model(cfg, model, calib, preprocess, stages)


def _run_model(cfg: config.QuantizeConfig, model: Model, calib, preprocess, stages: dict[str, float]) -> Report:
    start = time.perf_counter()
    search, precision, out = cfg.search, cfg.precision, cfg.output
    options = with_profile_rules(cfg.quantizers, search.profile if search.choosing else None)
    verify = out.verify and calib is not None
    output = Path(str(out.path))
    if not model.layers:
        raise OnnxmpqError("the model has no quantizable layer (Conv, ConvTranspose, Gemm, MatMul with a constant weight).",
                           "nothing to do; run `onnxmpq inspect MODEL` to see what it holds.")
    judged = verify or (search.choosing and (search.max_drop is not None or SOLVERS.get(search.method).judge
                                             or out.report_dir is not None))
    ctx = RunContext(model, calib, limit=cfg.data.limit, holdout=judged, preprocess=preprocess,
                     batch_size=cfg.data.batch_size)
    model, chosen, rounding = ctx.model, None, precision.rounding
    if search.choosing:
        if calib is None:
            raise OnnxmpqError("choosing bits under a budget needs calibration data.", f"set {option('data.calib')}.")
        rounding = rounding.resolve(search.weight_bits, True)
        chosen = plan.choose(ctx, search, precision.act_bits, options,
                             sensitivity=table_source(ctx, search, rounding, options),
                             prune=out.report_dir is None)
        assignment = {**chosen.assignment, **precision.layer_bits}
    else:
        assignment = assign(model, precision.weight_bits, precision.act_bits[0], precision.layer_bits, options)
    proto, results, notes = materialize(ctx, assignment, options, rounding, cfg.data.batch_size)
    with progress.bar("write", 1, unit="file") as advance:
        file_bytes = save_model(proto, output)
        advance(1)
    breakdown = file_breakdown(proto)
    float_file_bytes = model.path.stat().st_size if model.path else model.proto.ByteSize()
    if file_bytes > float_file_bytes:
        notes.append(f"the quantized file is larger than its input ({file_bytes:,d} against {float_file_bytes:,d} "
                     "bytes): " + ", ".join(f"{k.replace('_', ' ')} {v:,d}" for k, v in breakdown.items())
                     + "; small layers carry a Q/DQ pair per tensor and a scale per channel, which can outweigh "
                     f"what their narrower weights save (keep such layers float with {option('precision.layer_bits')} "
                     "NAME=float)")
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
        allocation=_allocation_dict(chosen, cfg, {s.name for s in model.layers}),
        verification=checked, stages=dict(stages),
        settings={"rounding": str(rounding.resolve([c.weight_bits for c in assignment.values()], calib is not None)),
                  "weight_range": str(options.weight_range), "act_range": str(options.act_range),
                  "percentile": options.percentile, "int2_container": options.int2_container, "bias": options.bias,
                  "weight_layout": options.weight_layout, "scope": str(options.scope),
                  "integer_ops": sorted(options.integer_ops)},
        **summarize(results))
    if out.report_dir is not None:
        with progress.bar("report", 1, unit="page") as advance:
            curve = sweep.pareto_points(chosen, ctx, options) if chosen is not None else []
            figs = pages.figures(report.to_dict(), chosen, curve)
            pages.write(report.to_dict(stable=out.stable_report), out.report_dir, figs)
            advance(1)
    return report


def _allocation_dict(chosen, cfg: config.QuantizeConfig, layers) -> dict | None:
    if chosen is None:
        return None
    alloc, search = chosen.allocation, cfg.search
    return {"solver": alloc.solver, "status": alloc.status, "objective": alloc.objective,
            "budgets": [{"kind": b.kind, "value": b.value, "relative": b.relative} for b in search.budgets],
            "costs": dict(alloc.costs), "details": dict(alloc.details),
            "fixed": {name: c.key for name, c in chosen.fixed.items()  # units without weights only when asked
                      if name in layers or name in search.keep or name in chosen.profile.pin},
            "search": list(chosen.search), "act_bits": list(cfg.precision.act_bits),
            **plan.search_dict(search, cfg.data.limit)}


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
                rounding: Rounding | str = Rounding.NEAREST, options: QuantOptions = QuantOptions(),
                limit: int = 256, batch_size: int = 64, workers: int = 1, cache_dir=None, preprocess=None,
                naive: bool = False, executor: str = "process", address: str | None = None,
                probes: Probes | str | None = None) -> list:
    """Sensitivity tables, one per metric (see `onnxmpq sensitivity --help` and `onnxmpq.sensitivity`).

    The calibration samples (at most `limit`) are held in memory with the activations at the probe
    engine's cut; `workers` > 1 splits the candidates over processes; `probes` fast or exact (default:
    `sensitivity.resolve_probes`); `rounding` of the probes nearest by default, as quantize's
    (`search.probe_rounding`).
    """
    model = load(model)
    data_free = all(METRICS.get(name).data_free for name in metrics)
    ctx = RunContext(model, None if data_free else calib, limit=limit, preprocess=preprocess, batch_size=batch_size)
    return measure(ctx, metrics, weight_bits, act_bits, separate=separate, rounding=rounding, options=options,
                   batch_size=batch_size, workers=workers, cache_dir=cache_dir, naive=naive, executor=executor,
                   address=address, probes=probes)


def allocation_problem(model: Model, table, candidates: Sequence[Candidate], budgets, options: QuantOptions = QuantOptions(),
                       profile=None, keep=None, latency=None):
    """The solver's view of `model` (see `onnxmpq.allocate.problem`); layers the rules fix are left out."""
    return build_problem(model, table, candidates, budgets, profiles.load(profile), options, keep, latency)[0]


