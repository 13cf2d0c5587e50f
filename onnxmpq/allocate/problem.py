"""From a model's units, a sensitivity table, budgets and a hardware profile to the arrays a solver sees.

Rows are the units (`points.Unit`): the weighted layers, whose candidates are (w, a) pairs, and, when
there is more than one activation width to choose from, the units without weights (a residual Add, a
Softmax), whose candidates are widths `aN` alone. Costs per (unit u, candidate c = (w, a)), with P_u
parameters, K_u output channels, M_u MACs:

    weight-bytes  stored bytes of codes + float32 scales + zero points (`quantize.layer_weight_bytes`),
                  4 P_u for a float layer, 0 without weights;   relative (`0.25x`): of the float32 bytes
    avg-bits      P_u * w  (32 for float);     the limit is avg-bits x sum_u P_u
    bitops        M_u * w * a for a layer, M_u * a * a without weights (a MatMul of two activations), a
                  float side 32; plus, per tensor read at another width than it is stored at, n * b1 * b2
                  (`Link`);  relative (`0.5x`): of W8A8 = sum_u 64 M_u
    latency-ms    d[u, c] - min_c d[u, c] from a `latency.LatencyTable`; the limit is
                  value - T_ref - sum_u min_c d[u, c]

Units the user keeps (`--keep NAME=W[:A]`), the profile pins, the profile allows nothing for (float, when
float layers are allowed), and units without weights that have a single width to take are fixed outside
the problem: their costs are taken off the limits (`Problem.offsets`) and their weight widths count
towards `max_distinct_bits`. Ties (rows that must share one activation width): the units around an op of
the profile's `tie` list, and every writer with its readers when the profile forbids requantizes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from onnxmpq.allocate import Budget, Link, Problem
from onnxmpq.errors import ConstraintError, OnnxmpqError, option
from onnxmpq.graph.points import Points, Unit
from onnxmpq.hardware.profiles import Profile
from onnxmpq.types import Candidate, QuantOptions, SensitivityTable
from onnxmpq.write.build import layer_formats, layer_weight_bytes, weight_cast

if TYPE_CHECKING:
    from onnxmpq.allocate.latency import LatencyTable
    from onnxmpq.graph.model import Model

FLOAT_BITS = 32


def unit_cost(kind: str, unit: Unit, cand: Candidate, channels: int, options: QuantOptions,
              latency: LatencyTable | None = None) -> float:
    """One budget's cost of one unit at one candidate (see the module docstring; links aside)."""
    w, a = cand.weight_bits or FLOAT_BITS, cand.act_bits or FLOAT_BITS
    spec = unit.layer
    if kind == "weight-bytes":
        if spec is None:
            return 0.0
        wfmt, afmt = layer_formats(spec, cand, options)
        if wfmt is None:
            return 4.0 * spec.params
        return float(layer_weight_bytes(spec, wfmt, channels, weight_cast(spec, wfmt, afmt, options)))
    if kind == "avg-bits":
        return float(spec.params * w) if spec else 0.0
    if kind == "bitops":
        return float(unit.macs * (w if spec else a) * a)
    row = _measured_table(latency).layers.get(unit.name)
    if row is None:
        return 0.0  # a unit the table does not list (nothing to choose when it was measured)
    if cand.key not in row:
        raise OnnxmpqError(f"the latency table has no entry for {unit.name} at {cand.key}.",
                           "re-run `onnxmpq profile-latency` with the same candidate widths.")
    return float(row[cand.key])


def _measured_table(latency: LatencyTable | None) -> LatencyTable:
    if latency is None:
        raise OnnxmpqError("a latency-ms budget needs measured latencies.",
                           f"run `onnxmpq profile-latency` and set {option('search.latency')}, or let quantize measure them.")
    return latency


def candidate_columns(points: Points, candidates: Sequence[Candidate]) -> list[Candidate]:
    """The problem's columns: the (w, a) candidates, then `aN` for each activation width when the units
    without weights have more than one to choose from."""
    acts = list(dict.fromkeys(c.act_bits for c in candidates))
    extra = [Candidate(None, a) for a in acts] if len(acts) > 1 and any(u.layer is None for u in points.units) else []
    return list(candidates) + [c for c in extra if c not in candidates]


def build_problem(model: Model, table: SensitivityTable | None, candidates: Sequence[Candidate],
                  budgets: Sequence[Budget], profile: Profile, options: QuantOptions = QuantOptions(),
                  keep: Mapping[str, Candidate] | None = None,
                  latency: LatencyTable | None = None) -> tuple[Problem, dict[str, Candidate]]:
    """(Problem over the free units, {unit: Candidate} of the fixed ones)."""
    points = model.points(options)
    columns = candidate_columns(points, candidates)
    consts = model.index.consts
    rows = {row.name: row for row in table.layers} if table is not None else {}
    fixed = _fixed_units(points, candidates, columns, profile, keep or {})
    free = [u for u in points.units if u.name not in fixed]
    channels = {u.name: consts[u.layer.weight].dims[u.layer.channel_axis] if u.layer else 0 for u in points.units}
    timed = latency if any(b.kind == "latency-ms" for b in budgets) else None
    allowed = np.array([[_admits(profile, u, c) and _measured(timed, u, c, candidates) for c in columns]
                        for u in free], bool).reshape(len(free), len(columns))
    scores = np.array([[rows[u.name].scores.get(c.key, 0.0) if u.name in rows else 0.0 for c in columns]
                       for u in free], float).reshape(len(free), len(columns))
    costs, limits, units, offsets = {}, {}, {}, {}
    for budget in budgets:
        kind = budget.kind
        cost = np.array([[unit_cost(kind, u, c, channels[u.name], options, latency)
                          if ok or kind != "latency-ms" else 0.0 for c, ok in zip(columns, row)]
                         for u, row in zip(free, allowed)], float).reshape(len(free), len(columns))
        offset = sum(unit_cost(kind, points.unit(n), c, channels[n], options, latency) for n, c in fixed.items())
        units[kind], limit = _unit_and_limit(points, budget)
        if kind == "latency-ms":
            shift = np.where(allowed, cost, np.inf).min(axis=1, initial=np.inf)
            shift = np.where(np.isfinite(shift), shift, 0.0)
            cost = cost - shift[:, None]
            offset += float(shift.sum()) + _measured_table(latency).reference_ms
        costs[kind], limits[kind], offsets[kind] = cost, limit - offset, offset
    # every free unit's raw output entropy, when the table has it for each (the threshold method's input)
    found = [extra["entropy"] for u in free if u.name in rows and (extra := rows[u.name].extra) and "entropy" in extra]
    entropy = np.array(found, float) if rows and len(found) == len(free) else None
    problem = Problem(tuple(u.name for u in free), tuple(c.key for c in columns), scores, costs, limits,
                      allowed=allowed, units=units, offsets=offsets,
                      weight_bits=tuple(c.weight_bits or 0 for c in columns),
                      act_bits=tuple(c.act_bits or 0 for c in columns), ties=_ties(points, free, profile),
                      max_distinct=profile.max_distinct_bits,
                      fixed_widths=frozenset(c.weight_bits for c in fixed.values() if c.weight_bits),
                      entropy=entropy, links=_links(points, free, fixed) if "bitops" in costs else (),
                      weighted=tuple(u.layer is not None for u in free))
    return problem, fixed


def _admits(profile: Profile, unit: Unit, cand: Candidate) -> bool:
    if unit.layer is None:
        return cand.weight_bits is None and profile.allows_act(unit.op_type, cand.act_bits)
    return profile.allows(unit.op_type, cand)


def _measured(latency: LatencyTable | None, unit: Unit, cand: Candidate, candidates: Sequence[Candidate]) -> bool:
    """Whether a latency-ms budget can price `cand` for `unit`: an asked-for candidate always (a missing
    entry is then an error), an extra `aN` column of a weighted layer (float weights) only when the table
    timed it (profile-latency times the asked-for candidates)."""
    if latency is None or unit.layer is None or cand in candidates:
        return True
    row = latency.layers.get(unit.name)
    return row is None or cand.key in row


def _unit_and_limit(points: Points, budget: Budget) -> tuple[float, float]:
    """(the unit of the value the user wrote, the limit in cost units)."""
    if budget.kind == "avg-bits":
        unit = float(sum(u.params for u in points.units))
    elif budget.relative and budget.kind == "bitops":
        unit = float(sum(u.macs * 64 for u in points.units))
    elif budget.relative:
        unit = float(sum(4 * u.params for u in points.units))
    else:
        unit = 1.0
    return unit, budget.value * unit


def _fixed_units(points: Points, candidates: Sequence[Candidate], columns: Sequence[Candidate], profile: Profile,
                 keep: Mapping[str, Candidate]) -> dict[str, Candidate]:
    """Kept and pinned units at their precision; units the profile allows no candidate stay float (or the
    rules are impossible for them); units without weights with one width to take, at that width."""
    fixed = {}
    names = {u.name for u in points.units}
    for source, pins in (("profile pin", profile.pin), (option("search.keep"), keep)):
        for name, cand in pins.items():
            if name not in names:
                raise OnnxmpqError(f"{source} names {name!r}, which is not a quantizable layer or unit.",
                                   "list the names with `onnxmpq inspect MODEL`.")
            unit = points.unit(name)
            fixed[name] = cand if unit.layer else Candidate(None, cand.act_bits)
    acts = list(dict.fromkeys(c.act_bits for c in candidates))
    for unit in points.units:
        if unit.name in fixed:
            continue
        if unit.layer is None:
            widths = [a for a in acts if profile.allows_act(unit.op_type, a)]
            if len(widths) == 1:
                fixed[unit.name] = Candidate(None, widths[0])
            elif not widths:
                fixed[unit.name] = _nearest_width(unit, profile)
            continue
        if not any(_admits(profile, unit, c) for c in columns):
            if not profile.float_layers:
                raise ConstraintError(f"profile {profile.name!r} allows none of the candidates "
                                      f"({', '.join(c.key for c in candidates)}) for {unit.op_type} layer "
                                      f"{unit.name!r} and no float layer.",
                                      f"add candidates the profile allows ({option('search.weight_bits')}, "
                                      f"{option('precision.act_bits')}).")
            fixed[unit.name] = Candidate(None, None)
    return fixed


def _nearest_width(unit: Unit, profile: Profile) -> Candidate:
    """A unit without weights that no candidate width suits: the profile's widest width for it, else float."""
    rule = profile.rule(unit.op_type)
    widths = [a for a in rule.activations if a]
    if widths:
        return Candidate(None, max(widths))
    if profile.float_layers:
        return Candidate(None, None)
    raise ConstraintError(f"profile {profile.name!r} allows no activation width for {unit.op_type} "
                          f"{unit.name!r}.", "fix the profile's rule for it.")


def _ties(points: Points, free: Sequence[Unit], profile: Profile) -> tuple[tuple[int, ...], ...]:
    """Rows that must share one activation width (see the module docstring)."""
    row = {u.name: i for i, u in enumerate(free)}
    groups: list[set[str | None]] = []
    for unit in free:
        if unit.op_type in profile.tie:
            groups.append({unit.name, *(points.source.get(t) for t in unit.reads)})
    if not profile.requantize:
        for tensor, readers in points.readers.items():
            groups.append({points.source.get(tensor), *readers})
    merged: list[set[int]] = []
    for group in groups:
        rows = {row[n] for n in group if n in row}
        for other in [m for m in merged if m & rows]:
            rows |= other
            merged.remove(other)
        if len(rows) > 1:
            merged.append(rows)
    return tuple(tuple(sorted(g)) for g in merged)


def _links(points: Points, free: Sequence[Unit], fixed: Mapping[str, Candidate]) -> tuple[Link, ...]:
    """The tensors that may be read at another width than they are stored at (a requantize's BitOps)."""
    row = {u.name: i for i, u in enumerate(free)}
    out = []
    for tensor, readers in points.readers.items():
        source = points.source.get(tensor)
        if source is None or (source not in row and not any(r in row for r in readers)):
            continue
        out.append(Link(row.get(source), tuple(row[r] for r in readers if r in row), points.elements.get(tensor, 1),
                        (fixed[source].act_bits or 0) if source in fixed else 0,
                        tuple(fixed[r].act_bits or 0 for r in readers if r in fixed)))
    return tuple(out)
