"""Sensitivity: how much the network suffers when one layer is quantized at one candidate precision.

`measure(model, batches, metrics, candidates)` probes every unit (`points.Unit`: a weighted layer at every
candidate, a unit without weights at every activation width when there are several) with the rest of the
network in float (`probe.sweep`) and scores each probe with every asked-for metric of
the METRICS registry; `weight-entropy` needs no data. Scores are degradations: larger = more damage.
With `probes=fast` (`fast.sweep`) each unit is run once, with noise, and every candidate's score is the
noise probe's degradation scaled by the candidate's output error; only the metrics marked
`scales_with_power` are scored so. Results are cached on disk by model hash, calibration data hash and
settings (`cache`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from onnx import numpy_helper

from onnxmpq.errors import InternalError, OnnxmpqError, option
from onnxmpq.graph.model import Model
from onnxmpq.graph.points import Unit
from onnxmpq.registry import Registry
from onnxmpq.rounding import round_nearest
from onnxmpq.sensitivity import fast
from onnxmpq.sensitivity import metrics as m
from onnxmpq.sensitivity.probe import Need, Only, Probe, Reference, sweep, unit_candidates
from onnxmpq.types import Candidate, LayerScores, Probes, QuantOptions, Rounding, SensitivityTable
from onnxmpq.write.formats import weight_format

ENTROPY_BINS = 256
N_PROJECTIONS = 32


@dataclass(frozen=True)
class LayerContext:
    """What a metric may look at for one unit: the float reference, its weight (None without one) and the
    float output of the unit."""

    unit: Unit
    weight: np.ndarray | None
    ref: Reference
    float_output: np.ndarray | None

    @property
    def layer_output(self) -> np.ndarray:
        """The float output of the unit, which `sweep` keeps for the metrics that need `Need.LAYER_OUTPUT`."""
        if self.float_output is None:
            raise InternalError(f"the float output of {self.unit.name!r} was not kept (Need.LAYER_OUTPUT not asked)")
        return self.float_output

    @functools.cached_property
    def output_range(self) -> tuple[float, float]:
        return float(self.layer_output.min()), float(self.layer_output.max())

    @functools.cached_property
    def output_entropy(self) -> float:
        """Entropy of the float layer output on ENTROPY_BINS bins over its range."""
        return m.histogram_entropy(self.layer_output, *self.output_range, ENTROPY_BINS)

    @functools.cached_property
    def weight_entropy_16(self) -> float:
        """Entropy of the weight codes on a 16-bit grid (the near-float reference of weight-entropy)."""
        if self.weight is None or self.unit.layer is None:
            raise InternalError(f"weight-entropy asked of {self.unit.name!r}, a unit without weights")
        return m.weight_entropy(round_nearest(self.weight, self.unit.layer.channel_axis, weight_format(16)).codes)


@dataclass(frozen=True)
class Metric:
    """A registered metric: `score(ctx, probe)` -> degradation; `extra(ctx)` -> per-layer facts.
    `scales_with_power`: the degradation grows in proportion to the power of a small error at a layer
    (a smooth divergence of the outputs with its minimum at the float model), so fast probes may score it."""

    name: str
    score: Callable[[LayerContext, Probe], float]
    needs: frozenset[Need] = frozenset({Need.OUTPUTS})
    extra: Callable[[LayerContext], dict] | None = None
    scales_with_power: bool = False

    @property
    def data_free(self) -> bool:
        """Scored from the weights alone (no calibration data)."""
        return not self.needs - {Need.WEIGHTS}


METRICS: Registry[Metric] = Registry("metric")


def _register(metric: Metric) -> None:
    METRICS.register(metric.name)(metric)


def _concat(batches: list[list[np.ndarray]], k: int) -> np.ndarray:
    """Output k of every batch as rows (rows, C): the metrics score rows, and an output whose first axis
    is not the batch (a time-major [T, N, C] head) cannot be joined along it."""
    return np.concatenate([m.rows(b[k]) for b in batches])


def _per_output(fn) -> Callable[[LayerContext, Probe], float]:
    def score(ctx: LayerContext, probe: Probe) -> float:
        n = len(ctx.ref.outputs[0])
        return m.aggregate([fn(_concat(ctx.ref.outputs, k), _concat(probe.outputs, k)) for k in range(n)])
    return score


def _output_entropy(ctx: LayerContext, probe: Probe) -> float:
    if probe.layer_output is None:
        raise InternalError(f"the probe of {ctx.unit.name!r} kept no layer output (Need.LAYER_OUTPUT not asked)")
    quant = m.histogram_entropy(probe.layer_output, *ctx.output_range, ENTROPY_BINS)
    return m.entropy_loss(ctx.output_entropy, quant)


def _raw_entropy(ctx: LayerContext) -> dict:
    return {"entropy": ctx.output_entropy}


def _weight_entropy(ctx: LayerContext, probe: Probe) -> float:
    if probe.codes is None:
        return 0.0
    return m.weight_entropy_loss(ctx.weight_entropy_16, m.weight_entropy(probe.codes.codes))


def _projections(dim: int) -> np.ndarray:
    """N_PROJECTIONS random unit directions in R^dim, the same for every run (seeded by dim)."""
    rng = np.random.default_rng(dim)
    theta = rng.standard_normal((N_PROJECTIONS, dim))
    return theta / np.linalg.norm(theta, axis=1, keepdims=True)


def _mutual_info(ctx: LayerContext, probe: Probe) -> float:
    names = sorted(probe.observers)
    if not names:
        return 0.0
    ref_smi, probe_smi = [], []
    for name in names:
        theta = _projections(ctx.ref.observers[name].shape[1])
        if name not in ctx.ref.smi:
            ctx.ref.smi[name] = m.sliced_mutual_information(ctx.ref.observers[name], ctx.ref.labels, theta)
        ref_smi.append(ctx.ref.smi[name])
        probe_smi.append(m.sliced_mutual_information(probe.observers[name], ctx.ref.labels, theta))
    bits = probe.cand.weight_bits or probe.cand.act_bits or 32
    return m.mi_drop(ref_smi, probe_smi, bits)


_register(Metric("sqnr", _per_output(m.noise_to_signal), scales_with_power=True))
_register(Metric("kl", _per_output(m.kl_divergence), scales_with_power=True))
_register(Metric("output-entropy", _output_entropy, frozenset({Need.LAYER_OUTPUT}), extra=_raw_entropy))
_register(Metric("mutual-info", _mutual_info, frozenset({Need.OBSERVERS})))
_register(Metric("weight-entropy", _weight_entropy, frozenset({Need.WEIGHTS})))


def parse_candidates(weight_bits: Sequence[int], act_bits: Sequence[int | None], separate: bool = False) -> list[Candidate]:
    """w x a candidates (`w4a8`), or with `separate` weight-only (`w4`) and activation-only (`a8`) ones."""
    for bits in list(weight_bits) + [a for a in act_bits if a]:
        if not 2 <= bits <= 16:
            raise OnnxmpqError(f"bit-width {bits} is outside 2..16.", f"use {option('search.weight_bits')} values from 2 to 16.")
    if separate:
        cands = [Candidate(w, None) for w in weight_bits] + [Candidate(None, a) for a in act_bits if a]
    else:
        cands = [Candidate(w, a) for w in weight_bits for a in act_bits if w or a]
    if not cands:
        raise OnnxmpqError("no candidate precision to probe.",
                           f"give weight bits ({option('search.weight_bits')} 2,4,8) or activation bits.")
    return cands


# Fast probes by default where the metrics allow them, since the allocations they choose are as good.
# Measured (BENCHMARKS.md, issue 13): the ranks are looser than the exact ones (Sensitivity, fast
# probes: over every (layer, width) score rho = 0.955-0.994; within one width 0.74-0.89 on average and
# down to -0.26 at W2; against the true W2 damage 0.57-0.73 where the exact probes give 0.84-0.96), but
# the GPTQ-written models they choose score the same (Probe rounding: ResNet-20 at avg-bits 2.5/3/3.5
# top-1 0.7898/0.8065/0.8062 against 0.7930/0.8057/0.8054, ResNet-56 at 2.5/3 0.8230/0.8266 against
# 0.8219/0.8286, each within the 0.4-point noise of 10,000 test images) from a sweep 3x cheaper.
FAST_BY_DEFAULT = True


def resolve_probes(probes: Probes | str | None, metric_names: Sequence[str]) -> Probes:
    """The probes a sweep of `metric_names` uses: those asked for, or by default (None) `fast` when
    FAST_BY_DEFAULT and every metric that needs data scales with noise power, else `exact`. Fast probes
    asked for a metric that does not scale so are refused."""
    metrics = [METRICS.get(name) for name in metric_names]
    unscaled = [x.name for x in metrics if not x.data_free and not x.scales_with_power]
    if probes is None:
        return Probes.FAST if FAST_BY_DEFAULT and not unscaled else Probes.EXACT
    if Probes(probes) == Probes.FAST and unscaled:
        scaled = ", ".join(n for n in METRICS if METRICS.get(n).scales_with_power)
        raise OnnxmpqError(f"fast probes cannot score metric {unscaled[0]}: it does not grow with the power of "
                           "the error at a layer.", f"set {option('search.probes')} to exact, or use a metric among "
                           f"{scaled}.")
    return Probes(probes)


def measure(model: Model, batches: Sequence[Mapping[str, np.ndarray]], metric_names: Sequence[str],
            candidates: Sequence[Candidate], stats=None, options: QuantOptions = QuantOptions(),
            rounding: Rounding = Rounding.NEAREST, naive: bool = False,
            on_layer: Callable[[str], object] | None = None,
            unit_acts: Sequence[int | None] | None = None, probes: Probes = Probes.EXACT,
            only: Only = None) -> list[SensitivityTable]:
    """One SensitivityTable per metric (see the module docstring); `unit_acts` are the activation widths
    the units without weights are probed at (default: those of `candidates`; () for none); `only`
    narrows the units it names to the candidate keys it lists (`probe.probed_units`), and the table
    then has no row for a unit left with one."""
    start = time.perf_counter()
    metrics = [METRICS.get(name) for name in metric_names]
    if not metrics:
        raise OnnxmpqError("no metric named.", "ask for at least one, e.g. sqnr.")
    points = model.points(options)
    if not points.units:
        raise OnnxmpqError("the model has no quantizable layer.", "run `onnxmpq inspect MODEL` to see what it holds.")
    acts = [Candidate(None, a) for a in (unit_acts if unit_acts is not None else [c.act_bits for c in candidates])]
    keys = list(dict.fromkeys([c.key for c in candidates] + [c.key for u in points.units if u.layer is None
                                                             for c in unit_candidates(u, acts)]))
    rows: dict[str, list[LayerScores]] = {metric.name: [] for metric in metrics}
    consts = model.index.consts

    def score_layer(unit, ref, float_out, probes):
        weight = numpy_helper.to_array(consts[unit.layer.weight]).astype(np.float32) if unit.layer else None
        ctx = LayerContext(unit, weight, ref, float_out)
        scores: dict[str, dict[str, float]] = {metric.name: {} for metric in metrics}
        for probe in probes:  # one at a time: each probe is scored, then let go
            for metric in metrics:
                scores[metric.name][probe.cand.key] = float(metric.score(ctx, probe))
        for metric in metrics:
            extra = metric.extra(ctx) if metric.extra else None
            rows[metric.name].append(LayerScores(unit.name, unit.op_type, scores[metric.name], extra))
        if on_layer:
            on_layer(unit.name)

    def score_unit(found: fast.UnitErrors, ref: Reference) -> None:
        unit = found.unit
        weight = numpy_helper.to_array(consts[unit.layer.weight]).astype(np.float32) if unit.layer else None
        for metric, scores in fast_scores(metrics, LayerContext(unit, weight, ref, None), found).items():
            rows[metric].append(LayerScores(unit.name, unit.op_type, scores))
        if on_layer:
            on_layer(unit.name)

    if all(metric.data_free for metric in metrics):
        keys = [c.key for c in candidates]
        _data_free(points, candidates, options, score_layer, consts)
        rounding, probes = Rounding.NEAREST, Probes.EXACT  # the data-free path rounds to nearest whatever was asked
    elif not batches:
        raise OnnxmpqError("these metrics need calibration data.", f"set {option('data.calib')}.")
    elif probes == Probes.FAST:
        resolve_probes(probes, metric_names)
        batches = fast.sweep_batches(batches, rounding)
        fast.sweep(model, batches, candidates, acts, stats, options, rounding, naive=naive, only=only,
                   on_unit=score_unit)
    else:
        sweep(model, batches, candidates, acts, stats, options, rounding,
              needs=frozenset().union(*(x.needs for x in metrics)), naive=naive, only=only, on_layer=score_layer)
    samples = sum(len(next(iter(b.values()))) for b in batches) if batches else 0
    elapsed = time.perf_counter() - start
    return [SensitivityTable(metric.name, tuple(keys), tuple(rows[metric.name]), samples, elapsed, str(rounding),
                             str(probes)) for metric in metrics]


def fast_scores(metrics: Sequence[Metric], ctx: LayerContext, found: fast.UnitErrors) -> dict[str, dict[str, float]]:
    """One unit's scores per metric from its fast probe: D(noise) * e(c) / e(noise) for the metrics that
    scale with power (`fast`), the rounded codes' scores for the data-free ones."""
    ratios = found.ratios()
    out = {}
    for metric in metrics:
        if metric.data_free:
            out[metric.name] = {k: float(metric.score(ctx, Probe(Candidate(None, None), [], None, {},
                                                                 found.codes.get(k)))) for k in found.errors}
        else:
            damage = float(metric.score(ctx, found.noise))
            out[metric.name] = {k: damage * r for k, r in ratios.items()}
    return out


def _data_free(points, candidates, options: QuantOptions, score_layer, consts) -> None:
    """Scores from the weights alone (weighted layers only: the units without weights have nothing to score)."""
    for unit in points.layers:
        spec = unit.layer
        weight = numpy_helper.to_array(consts[spec.weight]).astype(np.float32)
        probes = [Probe(c, [], None, {}, round_nearest(weight, spec.channel_axis, weight_format(c.weight_bits),
                                                       options.weight_range, spec.name) if c.weight_bits else None)
                  for c in candidates]
        score_layer(unit, Reference([], np.zeros(0)), None, probes)
