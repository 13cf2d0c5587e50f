"""The stages of a run, on its `RunContext`: load, assign uniform widths, measure sensitivity, round,
build and verify. `api` (one run) and `sweep` (many allocations on one context) both compose them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from onnxmpq import progress
from onnxmpq.allocate import latency
from onnxmpq.errors import OnnxmpqError, option
from onnxmpq.graph import model as graph
from onnxmpq.graph import runtime
from onnxmpq.graph.model import Model
from onnxmpq.hardware import profiles
from onnxmpq.pipeline.config import SearchConfig
from onnxmpq.pipeline.context import RunContext
from onnxmpq.rounding import sequential
from onnxmpq.sensitivity import METRICS, cache, fast, parallel, parse_candidates, resolve_probes
from onnxmpq.sensitivity.probe import Only
from onnxmpq.types import Candidate, Probes, QuantOptions, Rounding
from onnxmpq.write.build import build


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
    rules = profiles.load(profile)
    return dataclasses.replace(options, integer_ops=options.integer_ops | rules.integer_ops,
                               tie_ops=options.tie_ops | frozenset(rules.tie))


def materialize(ctx: RunContext, assignment, options: QuantOptions, rounding: Rounding, batch_size: int = 32):
    """Statistics, rounding and the QDQ writer for one assignment: (proto, results, notes)."""
    rounding = rounding.resolve([c.weight_bits for c in assignment.values()], ctx.has_data)
    acts = [name for name, cand in assignment.items() if cand.act_bits]
    if not ctx.has_data and (acts or rounding == Rounding.GPTQ):
        raise OnnxmpqError(f"{'gptq rounding' if rounding == Rounding.GPTQ else 'quantized activations'} "
                           "needs calibration data.", f"set {option('data.calib')}.")
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


def measure(ctx: RunContext, metrics: Sequence[str], weight_bits: Sequence[int], act_bits: Sequence[int | None], *,
            separate: bool = False, rounding: Rounding | str = Rounding.AUTO, options: QuantOptions = QuantOptions(),
            batch_size: int = 64, workers: int = 1, cache_dir=None, naive: bool = False, executor: str = "process",
            address: str | None = None, probes: Probes | str | None = None, only: Only = None) -> list:
    """The sensitivity tables of `sensitivity`, measured on the run's calibration samples and statistics
    (`only`: the candidates to probe each unit at, see `probe.probed_units`)."""
    candidates = parse_candidates(weight_bits, act_bits, separate)
    data_free = all(METRICS.get(name).data_free for name in metrics)
    probes = resolve_probes(probes, metrics)
    rounding = Rounding(rounding).resolve(weight_bits, ctx.has_data and not data_free)
    batches, stats = [], None
    if not data_free:
        if not ctx.has_data:
            raise OnnxmpqError(f"metric(s) {', '.join(metrics)} need calibration data.", f"set {option('data.calib')}.")
        batches = ctx.require_data("sensitivity").feeds(batch_size)
        if any(c.act_bits for c in candidates):
            stats = ctx.stats(options)
    model = ctx.model
    keys = [c.key for c in candidates]
    settings = {"metrics": list(metrics), "candidates": keys, "rounding": str(rounding),
                "options": repr(options), "naive": naive, "probes": str(probes)}
    if probes == Probes.FAST:
        settings["fast_samples"] = fast.SAMPLES
    # a table of every candidate serves any narrower request; a narrowed one only the same narrowing
    narrowed = {**settings, "only": {k: sorted(v) for k, v in sorted(only.items())}} if only is not None else None
    if cache_dir:
        for wanted in [settings] + ([narrowed] if narrowed else []):
            hit = cache.load(cache_dir, cache.cache_key(model.proto, batches, wanted), list(metrics), keys)
            if hit is not None:
                return hit
    key = cache.cache_key(model.proto, batches, narrowed or settings) if cache_dir else None
    points = model.points(options)
    several_acts = len({c.act_bits for c in candidates}) > 1 and not data_free
    units = points.units if several_acts else points.layers
    todo = sum(1 for u in units if only is None or len(only.get(u.name, (0, 0))) > 1)
    with progress.bar("sensitivity", todo, unit="unit") as advance:
        tables = parallel.measure(model, batches, list(metrics), candidates, stats, options, Rounding(rounding),
                                  workers=workers, naive=naive, executor=executor, address=address,
                                  on_layer=lambda name: advance(1), probes=probes, only=only)
    if key:
        cache.store(cache_dir, key, tables)
    return tables


def table_source(ctx: RunContext, settings: SearchConfig, rounding: Rounding, options: QuantOptions):
    """The `sensitivity(metric, weight_bits, act_bits)` callable `plan.choose` takes: one measured table
    per metric, with the run's samples and cache, kept for later calls (a sweep). The probes round as
    `settings.probe_rounding` says (auto: `rounding`, the written model's)."""
    tables: dict = {}
    if settings.probe_rounding != Rounding.AUTO:
        rounding = settings.probe_rounding

    def table(metric: str, weight_bits, act_bits, only: Only = None):
        key = (metric, None if only is None else tuple(sorted((k, tuple(sorted(v))) for k, v in only.items())))
        if key not in tables:
            tables[key] = measure(ctx, [metric], weight_bits, act_bits, rounding=rounding, options=options,
                                  batch_size=ctx.batch_size, cache_dir=settings.cache_dir, probes=settings.probes,
                                  only=only)[0]
        return tables[key]
    return table
