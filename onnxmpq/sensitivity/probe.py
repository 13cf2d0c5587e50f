"""The probe engine: for every layer and candidate, quantize that layer alone and see what the network
does, re-running only the part of the graph downstream of the layer.

One float `Frontier` walks the graph layer by layer (one forward pass in all); at each layer it holds
the float values at the cut just before the layer, and every probe of that layer runs the probe model
from that cut to the outputs (`Frontier.peek`). The float outputs, the float model's predictions (the
label stand-in) and the observer activations are computed once. `naive=True` runs every probe from the
graph inputs instead: the baseline the benchmark compares with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
from onnx import numpy_helper

from onnxmpq.calibrate.ranges import act_params, choose_range
from onnxmpq.errors import InternalError, OnnxmpqError
from onnxmpq.graph import model as graph
from onnxmpq.graph.engine import Frontier
from onnxmpq.graph.points import Points, Unit
from onnxmpq.rounding import QuantizedWeight, round_nearest
from onnxmpq.rounding.gptq import GptqSettings, accumulate, round_layer
from onnxmpq.rounding.linear import view_of
from onnxmpq.types import Candidate, LayerSpec, QuantOptions, Rounding, TensorStats
from onnxmpq.write.build import build
from onnxmpq.write.formats import act_format, required_opset, weight_format

N_OBSERVERS = 3
Only = Mapping[str, frozenset[str]] | None  # unit name -> the candidate keys to probe it at (None: all)


@dataclass
class Reference:
    """What the float model gives once: outputs per batch, labels per sample, observer features."""

    outputs: list[list[np.ndarray]]
    labels: np.ndarray
    observers: dict[str, np.ndarray] = field(default_factory=dict)
    downstream: dict[str, set[str]] = field(default_factory=dict)
    smi: dict[str, float] = field(default_factory=dict)  # reference sliced MI per observer, filled lazily


@dataclass
class Probe:
    """One probe's result: the network outputs per batch, the probed layer's output, observer features."""

    cand: Candidate
    outputs: list[list[np.ndarray]]
    layer_output: np.ndarray | None
    observers: dict[str, np.ndarray]
    codes: QuantizedWeight | None


def observers_of(model: graph.Model) -> list[str]:
    """Observer tensors for the mutual-information metric: the inputs of the last few weighted layers and
    the first network output (downstream of every layer)."""
    names = [spec.activation for spec in model.layers[-N_OBSERVERS:]] + [model.proto.graph.output[0].name]
    return list(dict.fromkeys(n for n in names if n not in {i.name for i in model.proto.graph.input}))


def unit_candidates(unit: Unit, candidates: Sequence[Candidate]) -> list[Candidate]:
    """The candidates a unit is probed at: all of them for a weighted layer; for a unit without weights
    its distinct activation widths, or none when it has fewer than two (nothing to choose)."""
    if unit.layer is not None:
        return list(candidates)
    acts = [Candidate(None, a) for a in dict.fromkeys(c.act_bits for c in candidates)]
    return acts if len(acts) > 1 else []


def batch_first(y: np.ndarray, n: int) -> np.ndarray | None:
    """`y` with its batch axis (the first of size n, the batch fed) first: a time-major [T, N, C] head
    becomes [N, T, C]; None when no axis has that size."""
    y = np.asarray(y)
    if y.ndim and y.shape[0] == n:
        return y
    axis = next((a for a in range(1, y.ndim) if y.shape[a] == n), None)
    return None if axis is None else np.moveaxis(y, axis, 0)


def labels_of(outputs: list[list[np.ndarray]], sizes: Sequence[int]) -> np.ndarray:
    """The float model's prediction for each row of the first output: argmax over its last axis. A class
    score output (N, C) gives one label per sample; a sequence (N, T, C), as OCR's CTC head gives,
    one label per time step (N*T rows, sample-major), since a whole sequence's label would be unique per
    sample. `sizes` are the batches' sample counts (an output whose batch is not on axis 0 is turned)."""
    labels = []
    for batch, n in zip(outputs, sizes):
        y = np.asarray(batch[0], dtype=np.float64)
        if y.size == 0:
            raise OnnxmpqError(f"the model's first output has shape {y.shape}: no scores to compare.",
                               "probe a model whose first output holds values per sample.")
        turned = batch_first(y, n) if y.ndim > 1 else y
        if turned is None:
            raise OnnxmpqError(f"the model's first output has shape {y.shape}, no axis of the batch's {n} samples.",
                               "probe a model whose first output holds values per sample.")
        y = turned.reshape(n, -1, turned.shape[-1]) if turned.ndim > 1 else turned.reshape(-1, 1, 1)
        labels.append(y.argmax(axis=2).ravel())
    return np.concatenate(labels)


def observer_rows(values: list[np.ndarray], sizes: Sequence[int], n_rows: int) -> np.ndarray | None:
    """One observer tensor over all batches as one row per label (see `align_rows`), its batch axis
    first; None when a batch has no axis of its sample count."""
    turned = [t for v, n in zip(values, sizes) if (t := batch_first(v, n)) is not None]
    if len(turned) < len(values):
        return None
    return align_rows(np.concatenate(turned), sum(sizes), n_rows)


def align_rows(features: np.ndarray, n_samples: int, n_rows: int) -> np.ndarray | None:
    """Observer features as one row per label: (N, D) when each sample has one label; for sequence labels
    (n_rows = N*T) the axis of size T moved next to the batch axis and the rest flattened, (N*T, D);
    None when the tensor has no axis of that length (such an observer is not used)."""
    if n_rows == n_samples:
        return features.reshape(n_samples, -1)
    steps = n_rows // n_samples
    axis = next((a for a in range(1, features.ndim) if features.shape[a] == steps), None)
    if axis is None:
        return None
    return np.moveaxis(features, axis, 1).reshape(n_rows, -1)


def reference(model: graph.Model, units: Sequence[Unit], batches, with_observers: bool) -> Reference:
    outputs = [o.name for o in model.proto.graph.output]
    observers = observers_of(model) if with_observers else []
    targets = list(dict.fromkeys(outputs + observers))
    values = [dict(zip(targets, v)) for v in Frontier(batches).peek(model.proto, targets)]
    ref_outputs = [[v[o] for o in outputs] for v in values]
    sizes = [len(next(iter(feed.values()))) for feed in batches]
    ref = Reference(ref_outputs, labels_of(ref_outputs, sizes))
    for name in observers:
        rows = observer_rows([v[name] for v in values], sizes, len(ref.labels))
        if rows is not None:
            ref.observers[name] = rows
    for unit in units:
        ref.downstream[unit.name] = model.index.descendants(unit.output) & set(ref.observers)
    return ref


def layer_codes(spec: LayerSpec, weight: np.ndarray, node, cand: Candidate, x_batches, rounding: Rounding,
                options: QuantOptions, stats, cache: dict, group: str | None) -> QuantizedWeight | None:
    """The codes the probe uses: nearest, or GPTQ against H of the layer's (float or act-quantized) input."""
    if not cand.weight_bits:
        return None
    fmt = weight_format(cand.weight_bits, options.int2_container == "int4")
    view = view_of(node, weight.shape, weight_left=node.input[0] == spec.weight) if rounding == Rounding.GPTQ else None
    if view is None:
        return round_nearest(weight, spec.channel_axis, fmt, options.weight_range, spec.name)
    key = cand.act_bits
    if key not in cache:
        cache[key] = accumulate(view, ((x, fake_quant(x, cand.act_bits, (stats or {}).get(group), options))
                                       for x in x_batches))
    return round_layer(weight, view, cache[key], fmt, spec.channel_axis, GptqSettings())


def fake_quant(x: np.ndarray, bits: int | None, tensor_stats, options: QuantOptions) -> np.ndarray:
    """x through the activation quantizer the writer would put in front of the layer."""
    if not bits or tensor_stats is None:
        return x
    fmt = act_format(bits)
    p = act_params(*choose_range(tensor_stats, fmt, options.act_range, options.percentile), fmt)
    q = np.clip(np.rint(x / p.scale) + p.zero_point, fmt.qmin, fmt.qmax)
    return ((q - p.zero_point) * p.scale).astype(np.float32)


class Need(StrEnum):
    """What a metric reads of a probe. The engine collects the union of what the asked-for metrics need,
    and only that: the network outputs always (float and probed), a unit's own output (float and probed)
    and the observers (the inputs of the last layers) when a metric needs them; `weights` alone (the
    rounded codes) needs no calibration data."""

    OUTPUTS = "outputs"
    LAYER_OUTPUT = "layer-output"
    OBSERVERS = "observers"
    WEIGHTS = "weights"


def probed_units(model: graph.Model, candidates: Sequence[Candidate], unit_acts: Sequence[Candidate],
                 options: QuantOptions, only: Only = None) -> tuple[graph.Model, Points, list[tuple[Unit, list[Candidate]]]]:
    """What a sweep probes: the model at the opset its candidates' formats need, its points, and each
    unit with its candidates (`candidates` for weighted layers, `unit_acts` for the others), units
    without any left out. `only` narrows a named unit to the candidate keys it lists, and a unit left
    with fewer than two is not probed (nothing to choose between)."""
    formats = [f for c in (*candidates, *unit_acts) for f in (
        weight_format(c.weight_bits, options.int2_container == "int4") if c.weight_bits else None,
        act_format(c.act_bits) if c.act_bits else None) if f]
    model = graph.at_opset(model, required_opset(formats))
    points = model.points(options)
    probed = [(u, unit_candidates(u, candidates if u.layer else unit_acts)) for u in points.units]
    if only is not None:
        probed = [(u, [c for c in cands if c.key in only[u.name]]) if u.name in only else (u, cands)
                  for u, cands in probed]
        probed = [(u, cands) for u, cands in probed if u.name not in only or len(cands) > 1]
    return model, points, [(u, c) for u, c in probed if c]


def sweep(model: graph.Model, batches: Sequence[Mapping[str, np.ndarray]], candidates: Sequence[Candidate],
          unit_acts: Sequence[Candidate], stats, options: QuantOptions, rounding: Rounding, *,
          needs: frozenset[Need], naive: bool = False, only: Only = None,
          on_layer: Callable[[Unit, Reference, np.ndarray | None, Iterator[Probe]], None]):
    """Probes every weighted layer at `candidates` and every unit without weights at the activation widths
    of `unit_acts` (`unit_candidates`; narrowed by `only`, see `probed_units`), collecting what `needs`
    names; calls `on_layer(unit, reference, float_unit_output, probes)` for each unit probed, `probes`
    yielding one probe at a time (run when asked for, so that only one candidate's outputs are held at
    once)."""
    needs_layer_output, with_observers = Need.LAYER_OUTPUT in needs, Need.OBSERVERS in needs
    model, points, probed = probed_units(model, candidates, unit_acts, options, only)
    ref = reference(model, [u for u, _ in probed], batches, with_observers)
    run = _Run(model, points, Frontier(batches), batches, stats, options, rounding, ref, needs_layer_output, naive)
    for unit, cands in probed:
        cut = run.front.advance(model.proto, list(unit.inputs))
        spec = unit.layer
        x = cut.column(list(unit.inputs).index(spec.activation)) if spec and spec.activation in unit.inputs else []
        float_out = None
        if needs_layer_output:
            float_out = np.concatenate([v[0] for v in run.front.peek(model.proto, [unit.output])])
        on_layer(unit, ref, float_out, run.probes(unit, cands, x))


@dataclass(frozen=True)
class _Run:
    """What every probe of one exact sweep shares."""

    model: graph.Model
    points: Points
    front: Frontier
    batches: Sequence[Mapping[str, np.ndarray]]
    stats: Mapping[str, TensorStats] | None
    options: QuantOptions
    rounding: Rounding
    ref: Reference
    needs_layer_output: bool
    naive: bool

    def probes(self, unit: Unit, cands: Sequence[Candidate], x: Sequence[np.ndarray]) -> Iterator[Probe]:
        """The probe of `unit` at each of `cands` in turn, from the frontier's cut (`x`: the unit's input)."""
        model, spec = self.model, unit.layer
        outputs = [o.name for o in model.proto.graph.output]
        weight = numpy_helper.to_array(model.index.consts[spec.weight]).astype(np.float32) if spec else None
        node = next((n for n in model.proto.graph.node if spec and n.name == spec.name), None)
        cache: dict = {}
        observers = sorted(self.ref.downstream.get(unit.name, ()))
        targets = list(dict.fromkeys(outputs + ([unit.output] if self.needs_layer_output else []) + observers))
        group = self.points.group.get(spec.activation) if spec else None
        sizes = [len(next(iter(feed.values()))) for feed in self.batches]
        for cand in cands:
            codes = layer_codes(spec, weight, node, cand, x, self.rounding, self.options, self.stats, cache, group) \
                if spec and weight is not None else None
            proto, _ = build(model, {unit.name: cand}, self.stats, self.options,
                             weights={unit.name: codes} if codes else None)
            runner = Frontier(self.batches) if self.naive else self.front
            values = [dict(zip(targets, v)) for v in runner.peek(proto, targets)]
            probe = Probe(cand, [[v[o] for o in outputs] for v in values], None, {}, codes)
            if self.needs_layer_output:
                probe.layer_output = np.concatenate([v[unit.output] for v in values])
            for name in observers:
                rows = observer_rows([v[name] for v in values], sizes, len(self.ref.labels))
                if rows is None:  # the reference aligned this tensor, and Q/DQ leaves its shape alone
                    raise InternalError(f"observer {name!r} has no row axis in the probe of {unit.name!r}")
                probe.observers[name] = rows
            del values
            yield probe
