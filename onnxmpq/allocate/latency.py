"""Measured latency per layer and candidate, in onnxruntime on this machine, for `latency-ms` budgets.

A reference model has every layer at the reference candidate (the most precise one probed). For layer
l and candidate c the whole model is timed with only l switched to c; the additive model predicts

    T(assignment) = T_ref + sum_l d[l, c_l],   d[l, c] = T(ref with l at c) - T_ref   (d[l, ref] = 0)

Timing is the median over `runs` single-batch runs after a warm-up, with onnxruntime's default optimisations
and `threads` intra-op threads; T_ref is timed in alternation with the float model, the way verification times
a written model against float (timed alone, a model runs with warmer caches and reads up to 25% faster than
verification then measures it); each d[l, c] is measured paired, the variant's and the reference's runs
alternating, so a machine that slows down mid-way shifts both alike. Candidates that give a layer the same
ONNX types (weight container, Cast layout, activation type; e.g. W3 and W4 both in INT4) run the same kernels,
so one measurement serves them all. BitOps miss what this sees: an INT4 Conv without the INT8 Cast runs as
dequantize + float Conv, slower than its W8A8 kernel.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from onnx import TensorProto

from onnxmpq import paths
from onnxmpq.errors import OnnxmpqError
from onnxmpq.graph import runtime
from onnxmpq.types import Candidate, QuantOptions
from onnxmpq.write.build import build, layer_formats, weight_cast
from onnxmpq.write.save import write_json

if TYPE_CHECKING:
    import onnx
    import onnxruntime

    from onnxmpq.graph.model import Model
    from onnxmpq.graph.points import Unit
    from onnxmpq.types import TensorStats

Feed = Mapping[str, np.ndarray]
KernelClass = tuple[int | None, int | None]

RUNS = 30
WARMUP = 5


@dataclass(frozen=True)
class LatencyTable:
    reference: str                        # candidate key every other layer is at
    reference_ms: float
    float_ms: float
    layers: Mapping[str, Mapping[str, float]]  # layer -> candidate key -> d[l, c] in ms
    batch: int
    threads: int
    runs: int

    def predict(self, assignment: Mapping[str, Candidate]) -> float:
        """T_ref + sum of the chosen candidates' changes (layers not in the table count 0)."""
        return self.reference_ms + sum(self.layers.get(name, {}).get(c.key, 0.0) for name, c in assignment.items())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyTable:
        try:
            table = cls(**{**data, "layers": {k: dict(v) for k, v in data["layers"].items()}})
            for value in [table.reference_ms, table.float_ms] + [v for row in table.layers.values() for v in row.values()]:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                    raise TypeError(f"{value!r} is not a time in ms")
            return table
        except (TypeError, KeyError, AttributeError, ValueError) as exc:
            raise OnnxmpqError(f"not a latency table ({exc}).", "write one with `onnxmpq profile-latency`.") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        write_json(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LatencyTable:
        hint = "write one with `onnxmpq profile-latency`."
        try:
            return cls.from_dict(json.loads(paths.read_regular(path, "latency table", hint)))
        except ValueError as exc:
            raise OnnxmpqError(f"cannot read latency table {str(path)!r}: {exc}.", hint) from None


def _warm(proto: onnx.ModelProto | str, feed: Feed, threads: int) -> onnxruntime.InferenceSession:
    """A warmed-up session whose idle threads do not spin (sessions are timed in turn)."""
    sess = runtime.session(proto, threads, spin=False)
    for _ in range(WARMUP):
        runtime.run(sess, dict(feed))
    return sess


def _once(sess: onnxruntime.InferenceSession, feed: Feed) -> float:
    start = time.perf_counter()
    sess.run(None, dict(feed))
    return time.perf_counter() - start


def _alternate(first: onnxruntime.InferenceSession, second: onnxruntime.InferenceSession, feed: Feed,
               runs: int) -> tuple[float, float]:
    """Median ms of each of two sessions over alternating runs (a machine that slows down mid-way slows
    both alike)."""
    a, b = [], []
    for _ in range(runs):
        a.append(_once(first, feed))
        b.append(_once(second, feed))
    return float(np.median(a) * 1e3), float(np.median(b) * 1e3)


def paired_delta(ref_sess: onnxruntime.InferenceSession, proto: onnx.ModelProto, feed: Feed, runs: int = RUNS,
                 threads: int = 2) -> float:
    """median(T_variant) - median(T_ref) in ms over alternating runs of the two sessions."""
    ref, var = _alternate(ref_sess, _warm(proto, feed, threads), feed, runs)
    return var - ref


def time_pair(a: onnx.ModelProto | str, b: onnx.ModelProto | str, feed: Feed, runs: int = RUNS,
              threads: int = 2) -> tuple[float, float]:
    """Median ms per run of models `a` and `b` (protos or paths), timed in alternation in this process."""
    return _alternate(_warm(a, feed, threads), _warm(b, feed, threads), feed, runs)


def kernel_class(unit: Unit, cand: Candidate, options: QuantOptions) -> KernelClass:
    """What decides a unit's kernels: the ONNX types and layout a candidate gives it."""
    wfmt, afmt = layer_formats(unit.layer, cand, options)
    cast = bool(wfmt and unit.layer and weight_cast(unit.layer, wfmt, afmt, options))
    return (TensorProto.INT8 if cast else (wfmt.onnx_type if wfmt else None), afmt.onnx_type if afmt else None)


def profile(model: Model, candidates: Sequence[Candidate], stats: Mapping[str, TensorStats], feed: Feed,
            options: QuantOptions = QuantOptions(), runs: int = RUNS, threads: int = 2,
            on_layer: Callable[[str], object] | None = None,
            fixed: Mapping[str, Candidate] | None = None) -> LatencyTable:
    """Times the reference and every (unit, kernel class) switch; see the module docstring. `fixed`
    adds a unit's own precision (a kept or pinned layer, or float) to what is timed for it. Units without
    weights are timed at each activation width when there are several."""
    points = model.points(options)
    if not points.units:
        raise OnnxmpqError("the model has no quantizable layer to time.", "run `onnxmpq inspect MODEL`.")
    ref = max(candidates, key=lambda c: ((c.weight_bits or 32), (c.act_bits or 32)))
    acts = [Candidate(None, a) for a in dict.fromkeys(c.act_bits for c in candidates)]
    base = {u.name: ref if u.layer else Candidate(None, ref.act_bits) for u in points.units}
    ref_proto = build(model, base, stats, options)[0]
    t_ref, t_float = time_pair(ref_proto, model.proto, feed, runs, threads)  # as verification times a model
    ref_sess = _warm(ref_proto, feed, threads)
    layers = {}
    for unit in points.units:
        own = list(candidates) if unit.layer else (acts if len(acts) > 1 else [])
        own += [(fixed or {})[unit.name]] if unit.name in (fixed or {}) else []
        measured: dict[KernelClass, float] = {kernel_class(unit, base[unit.name], options): 0.0}
        row = {}
        for cand in own:
            key = kernel_class(unit, cand, options)
            if key not in measured:
                proto, _ = build(model, {**base, unit.name: cand}, stats, options)
                measured[key] = paired_delta(ref_sess, proto, feed, runs, threads)
            row[cand.key] = measured[key]
        if row:
            layers[unit.name] = row
        if on_layer:
            on_layer(unit.name)
    batch = len(next(iter(feed.values())))
    return LatencyTable(ref.key, t_ref, t_float, layers, batch, threads, runs)
