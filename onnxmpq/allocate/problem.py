"""From a model, a sensitivity table, budgets and a hardware profile to the arrays a solver sees.

Costs per (layer l, candidate c = (w, a)), with P_l parameters, K_l output channels, M_l MACs:

    weight-bytes  stored bytes of codes + float32 scales + zero points (`quantize.stored_weight_bytes`),
                  4 P_l for a float layer;      relative (`0.25x`): of the float32 weight bytes
    avg-bits      P_l * w  (32 for float);     the limit is avg-bits x sum_l P_l
    bitops        M_l * w * a (32 for a float side);  relative (`0.5x`): of W8A8 = sum_l 64 M_l
    latency-ms    d[l, c] - min_c d[l, c] from a `latency.LatencyTable`; the limit is
                  value - T_ref - sum_l min_c d[l, c]

Layers the user keeps (`--keep NAME=W[:A]`), the profile pins, or the profile allows nothing for
(float, when float layers are allowed) are fixed outside the problem: their costs are taken off the
limits (`Problem.offsets`) and their weight widths count towards `max_distinct_bits`. Layers that read
one activation tensor share one quantizer, so they are tied to one activation width.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from onnxmpq.allocate import Budget, Problem
from onnxmpq.errors import ConstraintError, OnnxmpqError
from onnxmpq.profiles import Profile
from onnxmpq.quantize import cast_to_int8, layer_formats, stored_weight_bytes
from onnxmpq.types import Candidate, LayerSpec, QuantOptions

FLOAT_BITS = 32


def layer_cost(kind: str, spec: LayerSpec, cand: Candidate, channels: int, options: QuantOptions,
               latency=None) -> float:
    """One budget's cost of one layer at one candidate (see the module docstring)."""
    w, a = cand.weight_bits or FLOAT_BITS, cand.act_bits or FLOAT_BITS
    if kind == "weight-bytes":
        wfmt, afmt = layer_formats(spec, cand, options)
        return float(stored_weight_bytes(wfmt, spec.params, channels, cast_to_int8(wfmt, afmt, options))
                     if wfmt else 4 * spec.params)
    if kind == "avg-bits":
        return float(spec.params * w)
    if kind == "bitops":
        return float(spec.macs * w * a)
    if latency is None:
        raise OnnxmpqError("a latency-ms budget needs measured latencies.",
                           "run `onnxmpq profile-latency` and pass --latency FILE, or let quantize measure them.")
    row = latency.layers.get(spec.name, {})
    if cand.key not in row:
        raise OnnxmpqError(f"the latency table has no entry for {spec.name} at {cand.key}.",
                           "re-run `onnxmpq profile-latency` with the same --bits and --act-bits.")
    return float(row[cand.key])


def build_problem(model, table, candidates: Sequence[Candidate], budgets: Sequence[Budget], profile: Profile,
                  options: QuantOptions = QuantOptions(), keep: Mapping[str, Candidate] | None = None,
                  latency=None) -> tuple[Problem, dict[str, Candidate]]:
    """(Problem over the free layers, {layer: Candidate} of the fixed ones)."""
    consts = {t.name: t for t in model.proto.graph.initializer}
    rows = {row.name: row for row in table.layers} if table is not None else {}
    fixed = _fixed_layers(model, candidates, profile, keep or {})
    free = [spec for spec in model.layers if spec.name not in fixed]
    channels = {spec.name: consts[spec.weight].dims[spec.channel_axis] for spec in model.layers}
    allowed = np.array([[profile.allows(spec.op_type, c) for c in candidates] for spec in free], bool).reshape(
        len(free), len(candidates))
    scores = np.array([[rows[s.name].scores[c.key] if s.name in rows else 0.0 for c in candidates] for s in free],
                      float).reshape(len(free), len(candidates))
    costs, limits, units, offsets = {}, {}, {}, {}
    for budget in budgets:
        kind = budget.kind
        cost = np.array([[layer_cost(kind, s, c, channels[s.name], options, latency) for c in candidates]
                         for s in free], float).reshape(len(free), len(candidates))
        offset = sum(layer_cost(kind, model.layer(n), c, channels[n], options, latency) for n, c in fixed.items())
        units[kind], limit = _unit_and_limit(model, budget, latency)
        if kind == "latency-ms":
            shift = np.where(allowed, cost, np.inf).min(axis=1, initial=np.inf)
            shift = np.where(np.isfinite(shift), shift, 0.0)
            cost = cost - shift[:, None]
            offset += float(shift.sum()) + latency.reference_ms
        costs[kind], limits[kind], offsets[kind] = cost, limit - offset, offset
    entropy = None
    if rows and all(rows[s.name].extra and "entropy" in rows[s.name].extra for s in free):
        entropy = np.array([rows[s.name].extra["entropy"] for s in free], float)
    problem = Problem(tuple(s.name for s in free), tuple(c.key for c in candidates), scores, costs, limits,
                      allowed=allowed, units=units, offsets=offsets,
                      weight_bits=tuple(c.weight_bits or 0 for c in candidates),
                      act_bits=tuple(c.act_bits or 0 for c in candidates), ties=_ties(free),
                      max_distinct=profile.max_distinct_bits,
                      fixed_widths=frozenset(c.weight_bits for c in fixed.values() if c.weight_bits),
                      entropy=entropy)
    return problem, fixed


def _unit_and_limit(model, budget: Budget, latency) -> tuple[float, float]:
    """(the unit of the value the user wrote, the limit in cost units)."""
    if budget.kind == "avg-bits":
        unit = float(sum(spec.params for spec in model.layers))
    elif budget.relative and budget.kind == "bitops":
        unit = float(sum(spec.macs * 64 for spec in model.layers))
    elif budget.relative:
        unit = float(sum(4 * spec.params for spec in model.layers))
    else:
        unit = 1.0
    return unit, budget.value * unit


def _fixed_layers(model, candidates, profile: Profile, keep: Mapping[str, Candidate]) -> dict[str, Candidate]:
    """Kept and pinned layers at their precision; layers the profile allows no candidate for stay float
    (or the rules are impossible for them)."""
    names = {spec.name for spec in model.layers}
    fixed = {}
    for source, pins in (("profile pin", profile.pin), ("--keep", keep)):
        for name, cand in pins.items():
            if name not in names:
                raise OnnxmpqError(f"{source} names {name!r}, which is not a quantizable layer.",
                                   "run `onnxmpq inspect MODEL` to list the layer names.")
            fixed[name] = cand
    for spec in model.layers:
        if spec.name in fixed or any(profile.allows(spec.op_type, c) for c in candidates):
            continue
        if not profile.float_layers:
            raise ConstraintError(f"profile {profile.name!r} allows none of the candidates "
                                  f"({', '.join(c.key for c in candidates)}) for {spec.op_type} layer {spec.name!r} "
                                  "and no float layer.", "add candidates the profile allows (--bits, --act-bits).")
        fixed[spec.name] = Candidate(None, None)
    return fixed


def _ties(free: Sequence[LayerSpec]) -> tuple[tuple[int, ...], ...]:
    """Groups (of 2 or more) of free layers that read the same activation tensor."""
    groups: dict[str, list[int]] = {}
    for i, spec in enumerate(free):
        groups.setdefault(spec.activation, []).append(i)
    return tuple(tuple(g) for g in groups.values() if len(g) > 1)
