"""Fast probes: one network run per unit instead of one per (unit, candidate).

For unit l at candidate c the exact probe measures D(l, c), the metric's degradation with l alone at c.
The fast sweep factors it into the unit's own output error, computed for every candidate without
running the network, and a gain measured by one noise probe per unit:

    score(l, c) = g_l * e_l(c),    g_l = D(l, noise) / e_l(noise)

- e_l(c), the output error: the squared error that quantizing l at c adds to its output tensor t_l
  (a weighted layer's op output, before an absorbed activation; else the unit's output), summed over
  a sample's elements and averaged over the N calibration samples. For a weighted layer with a
  `LinearView` (X the im2col columns of its input, W its float matrices, W_q the dequantized codes the
  exact probe would use, dW = W - W_q, E = fq_a(X) - X the error of reading X at a bits, E = 0 without
  activation bits):
      e = [tr(dW H dW^T) - 2 tr(dW C W_q^T) + tr(W_q H_E W_q^T)] / N,
      H = sum X X^T,  C = sum X E^T,  H_E = sum E E^T,
  that is ||W_q (X + E) - W X||^2 / N, the exact error of the layer's linear output (written in error
  terms only, never as a difference of large traces), over about 64 columns per row of H (every s-th
  im2col column, the sums times s; as GPTQ's statistics are taken, `rounding.gptq`). Where the layer
  has few output rows R per group beside K, the same e is summed from its outputs instead,
  sum ||dW X + W_q E||^2 / N over the same columns (`direct_errors`): one or two R x K products per
  candidate against 1 + 2A products K x K for the moments, whichever costs less (GPTQ-rounded probes
  take the moments, whose H their codes need).
  A layer without a view gets e by running its op alone from the cut with the probe's weights.
  Activation bits also add, for every tensor the unit writes at a bits (and, for a unit without
  weights, every one it reads), the fake-quantization error ||fq_a(t) - t||^2 / N of the float
  tensor, counted at t_l.
- D(l, noise), e_l(noise): the network run once with noise at l and the rest float, scored by the
  metric against the float model in the metric's own units (sqnr: error power at the network outputs
  over their signal power). A weighted layer's noise is on its weights: W + Z, Z Gaussian with, on
  output channel k, the standard deviation of channel k's residual when W is rounded to nearest on a
  NOISE_BITS grid; its output error e_l(noise) = tr(Z H Z^T) / N by the same formula (or by running
  the op). A unit without weights gets Gaussian noise added to its output, of power e_l at its
  smallest activation width.

g_l * e_l(c) = D(l, c) holds where the metric grows in proportion to the power of the error at t_l
and the quantization error reaches the outputs as the noise does; a smooth divergence with its minimum
at the float output (sqnr, kl) grows so for small errors. BENCHMARKS.md measures how well the ranks hold.

The whole fast sweep (reference, moments, noise probes) runs on the first SAMPLES calibration samples
(`sweep_batches`), all of them where the probes round with GPTQ, which needs H of every sample. The
scores are ratios measured on the same samples; on ResNet-20/56 (widths 2-8) the tables from 128 of
the 256 bundled samples rank against the exact 256-sample tables as those from all 256 do (Spearman
over every score: sqnr 0.994 / 0.991 both ways, kl 0.993 / 0.982 against 0.993 / 0.986; per width kl
0.88 / 0.81 against 0.89 / 0.83) in 0.7-0.8x the time; from 64, kl fell to 0.70 per width on ResNet-56.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxmpq.graph import model as graph
from onnxmpq.graph.engine import Frontier
from onnxmpq.graph.points import Points, Unit
from onnxmpq.rounding import QuantizedWeight, per_channel, round_nearest
from onnxmpq.rounding.gptq import COLUMN_BUDGET, GptqSettings, column_stride
from onnxmpq.rounding.linear import LinearView, view_of
from onnxmpq.sensitivity.probe import Only, Probe, Reference, fake_quant, layer_codes, probed_units, reference
from onnxmpq.types import Candidate, LayerSpec, QuantOptions, Rounding, TensorStats
from onnxmpq.write.build import build
from onnxmpq.write.formats import weight_format

NOISE = "onnxmpq/noise"   # the tensor a unit's output noise is fed as
NOISE_BITS = 4            # the grid whose rounding residual sets a weight noise's scale per channel
SAMPLES = 128             # calibration samples the fast sweep runs on when no GPTQ rounding needs them all


@dataclass(frozen=True)
class Moments:
    """Sums over `samples` samples of a layer's input columns X (G, K, n) and of the error
    E_a = fq_a(X) - X of reading them at each activation width a: H = sum X X^T, C_a = sum X E_a^T,
    H_a = sum E_a E_a^T, each (G, K, K)."""

    h: np.ndarray
    c: Mapping[int, np.ndarray]
    h_err: Mapping[int, np.ndarray]
    samples: int

    def output_error(self, w: np.ndarray, wq: np.ndarray, bits: int | None) -> float:
        """e = [tr(dW H dW^T) - 2 tr(dW C_a W_q^T) + tr(W_q H_a W_q^T)] / N, dW = w - wq, w and wq (G, R, K)."""
        dw = w - wq
        total = np.einsum("grk,grk->", dw @ self.h, dw)
        if bits:
            total += np.einsum("grk,grk->", wq @ self.h_err[bits], wq)
            total -= 2 * np.einsum("grk,grk->", dw @ self.c[bits], wq)
        return float(max(total, 0.0) / self.samples)


def _column_chunks(view: LinearView, xs: Sequence[np.ndarray],
                   quantizers: Mapping[int, Callable[[np.ndarray], np.ndarray]],
                   stride: int) -> Iterator[tuple[np.ndarray, dict[int, np.ndarray]]]:
    """The columns X of the batches `xs`, a few samples at a time (COLUMN_BUDGET), with E_a, the columns
    of fq_a(x) - x, for each width of `quantizers`; with `stride` s every s-th column only, starting one
    further each chunk (as `gptq.accumulate` takes them)."""
    chunks = 0
    for x in xs:
        x = np.asarray(x, np.float32)
        step = max(1, COLUMN_BUDGET // max(view.columns(x[:1]).size, 1))
        for i in range(0, len(x), step):
            chunk, start = x[i:i + step], chunks % stride
            chunks += 1
            yield (view.columns(chunk, start, stride),
                   {a: view.columns(fq(chunk) - chunk, start, stride) for a, fq in quantizers.items()})


def moments(view: LinearView, xs: Sequence[np.ndarray],
            quantizers: Mapping[int, Callable[[np.ndarray], np.ndarray]], stride: int = 1) -> Moments:
    """`Moments` of the batches `xs` of a layer's input, im2col'd a few samples at a time (COLUMN_BUDGET);
    `quantizers` maps each activation width to the fake quantizer of the layer's input. With `stride`
    s > 1 the sums run over every s-th column (as `gptq.accumulate` takes them) times s: an estimate of
    the sums over all columns, so that errors from them add to errors of whole tensors."""
    sums: dict[tuple[str, int], np.ndarray] = {}

    def add(key: tuple[str, int], a: np.ndarray, b: np.ndarray) -> None:
        product = a @ np.swapaxes(b, 1, 2)  # float32 products of a chunk, summed in float64
        sums[key] = sums[key] + product if key in sums else product.astype(np.float64)

    for cols, errs in _column_chunks(view, xs, quantizers, stride):
        add(("h", 0), cols, cols)
        for bits, err in errs.items():
            add(("c", bits), cols, err)
            add(("e", bits), err, err)
    if stride > 1:
        sums = {key: value * stride for key, value in sums.items()}
    return Moments(sums[("h", 0)], {b: sums[("c", b)] for b in quantizers}, {b: sums[("e", b)] for b in quantizers},
                   sum(len(x) for x in xs))


def direct_errors(view: LinearView, xs: Sequence[np.ndarray], w: np.ndarray,
                  targets: Mapping[str, tuple[np.ndarray, int | None]],
                  quantizers: Mapping[int, Callable[[np.ndarray], np.ndarray]], stride: int = 1) -> dict[str, float]:
    """The output error of each target (W_t, a), the one `Moments.output_error` gives, from the layer's
    outputs instead of its moments: e_t = sum ||dW_t X + W_t E_a||^2 / N, dW_t = W_t - W, over the
    columns X of the batches `xs` (E_a the columns of fq_a(x) - x, zero for a None; every s-th column
    times s with `stride` s, as `moments` takes them). One R x K by K x n product per target and width
    (two with activation bits) instead of 1 + 2A of K x K by K x n: the cheaper where R, the layer's
    output rows per group, is small beside K and the targets are few (`_direct_is_cheaper`)."""
    deltas = {key: ((wt - w).astype(np.float32), wt.astype(np.float32), a) for key, (wt, a) in targets.items()}
    totals = dict.fromkeys(targets, 0.0)
    for cols, errs in _column_chunks(view, xs, quantizers, stride):
        for key, (dw, wt, a) in deltas.items():
            out = dw @ cols
            if a:
                out += wt @ errs[a]
            flat = out.astype(np.float64).ravel()
            totals[key] += float(flat @ flat)
    samples = sum(len(x) for x in xs)
    return {key: total * stride / samples for key, total in totals.items()}


def _direct_is_cheaper(w: np.ndarray, targets: Mapping[str, tuple[np.ndarray, int | None]], acts: int) -> bool:
    """Products per column: direct_errors 2 sum_t (1 + [a_t]) R K against the moments' (1 + 2A) K K. The
    factor 2 is measured (numpy on 2 cores, R x K by K x n products and their float64 sums against
    the moments' K x n by n x K): with it the rule picks the faster on 3x3 convs of 16-64 rows, a
    144 x 24 expansion and a depthwise layer, for 3 to 15 targets."""
    rows, k = w.shape[1], w.shape[2]
    return 2 * sum(1 + bool(a) for _, a in targets.values()) * rows < (1 + 2 * acts) * k


def sweep_batches(batches: Sequence[Mapping[str, np.ndarray]], rounding: Rounding) -> list[Mapping[str, np.ndarray]]:
    """The batches a fast sweep runs on: the first SAMPLES samples (the last batch cut short), or every
    batch where the probes round with GPTQ."""
    if rounding == Rounding.GPTQ:
        return list(batches)
    out: list[Mapping[str, np.ndarray]] = []
    left = SAMPLES
    for feed in batches:
        if left <= 0:
            break
        n = len(next(iter(feed.values())))
        out.append(feed if n <= left else {name: value[:left] for name, value in feed.items()})
        left -= n
    return out


def weight_noise(weight: np.ndarray, axis: int, seed: int) -> np.ndarray:
    """Z: Gaussian, on each output channel of the standard deviation of that channel's residual
    w - Q(w) when rounded to nearest (min/max scale) on a NOISE_BITS grid."""
    residual = weight - round_nearest(weight, axis, weight_format(NOISE_BITS)).dequantize()
    sigma = np.sqrt(np.mean(per_channel(residual, axis).astype(np.float64) ** 2, axis=1))
    shape = [1] * weight.ndim
    shape[axis] = -1
    z: np.ndarray = np.random.default_rng(seed).standard_normal(weight.shape) * sigma.reshape(shape)
    return z.astype(np.float32)


def with_weight(proto: onnx.ModelProto, node_name: str, weight: str, value: np.ndarray) -> onnx.ModelProto:
    """A copy of `proto` whose node `node_name` reads `value` in place of its weight `weight` (a new
    initializer: another layer sharing the weight keeps the float one)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    noisy = f"{weight}/onnxmpq_noisy"
    out.graph.initializer.append(numpy_helper.from_array(value, noisy))
    for node in out.graph.node:
        if node.name == node_name:
            node.input[:] = [noisy if i == weight else i for i in node.input]
    return out


def with_noise(proto: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    """A copy of `proto` with the tensor NOISE (fed with the cut) added to `tensor`: its producer's output
    is renamed and the sum takes the name, so every reader (a graph output too) sees the noise."""
    clean = f"{tensor}/onnxmpq_clean"
    nodes = []
    for node in proto.graph.node:
        if tensor in node.output:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.output[:] = [clean if o == tensor else o for o in node.output]
            nodes += [copy, helper.make_node("Add", [clean, NOISE], [tensor], f"{NOISE}/add")]
        else:
            nodes.append(node)
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


@dataclass(frozen=True)
class UnitErrors:
    """The fast sweep's findings for one unit: the noise probe, the output error of its noise and of each
    candidate (by candidate key), and the codes each candidate was rounded to (None: weights float)."""

    unit: Unit
    noise: Probe
    noise_error: float
    errors: Mapping[str, float]
    codes: Mapping[str, QuantizedWeight | None]

    def ratios(self) -> dict[str, float]:
        """e_l(c) / e_l(noise) per candidate: the score is the noise probe's degradation times this."""
        return {k: e / self.noise_error if self.noise_error > 0 else 0.0 for k, e in self.errors.items()}


@dataclass(frozen=True)
class _Sweep:
    """What every unit of one fast sweep shares."""

    model: graph.Model
    points: Points
    front: Frontier
    stats: Mapping[str, TensorStats] | None
    options: QuantOptions
    rounding: Rounding
    samples: int
    naive: bool

    def fake_quant(self, tensor: str, bits: int, x: np.ndarray) -> np.ndarray:
        group = self.points.group.get(tensor)
        return fake_quant(x, bits, (self.stats or {}).get(group) if group else None, self.options)

    def runner(self, batches) -> Frontier:
        return Frontier(batches) if self.naive else self.front

    def codes(self, spec: LayerSpec, weight: np.ndarray, xs: Sequence[np.ndarray], m: Moments | None) \
            -> Callable[[Candidate], QuantizedWeight | None]:
        """The codes of each candidate, as the exact probe rounds them (`probe.layer_codes`; GPTQ's H of
        the float input is the moments' H, summed the same way)."""
        node = next(n for n in self.model.proto.graph.node if n.name == spec.name)
        cache: dict = {None: (m.h, m.h)} if m is not None else {}
        group = self.points.group.get(spec.activation)
        return lambda cand: layer_codes(spec, weight, node, cand, xs, self.rounding, self.options, self.stats, cache,
                                        group)


def sweep(model: graph.Model, batches: Sequence[Mapping[str, np.ndarray]], candidates: Sequence[Candidate],
          unit_acts: Sequence[Candidate], stats, options: QuantOptions, rounding: Rounding, *, naive: bool = False,
          only: Only = None, on_unit: Callable[[UnitErrors, Reference], None]) -> None:
    """The fast sweep (see the module docstring) over the units `probe.sweep` probes, in graph order;
    calls `on_unit(findings, reference)` for each. One network run per unit, plus runs of single ops."""
    model, points, probed = probed_units(model, candidates, unit_acts, options, only)
    ref = reference(model, [u for u, _ in probed], batches, False)
    run = _Sweep(model, points, Frontier(batches), stats, options, rounding,
                 sum(len(next(iter(b.values()))) for b in batches), naive)
    for unit, cands in probed:
        cut = run.front.advance(model.proto, list(unit.inputs))
        at = {name: cut.column(k) for k, name in enumerate(unit.inputs)}
        acts = sorted({c.act_bits for c in cands if c.act_bits})
        act_error = _act_errors(run, unit, acts, at)
        if unit.layer is None:
            errors = {c.key: act_error[c.act_bits] for c in cands if c.act_bits}
            noise, noise_error = _output_noise(run, batches, unit, act_error[acts[0]])
            on_unit(UnitErrors(unit, noise, noise_error, errors, {}), ref)
        else:
            found = _layer(run, batches, unit, unit.layer, cands, at)
            errors = {c.key: found.errors[c.key] + act_error.get(c.act_bits or 0, 0.0) for c in cands}
            on_unit(replace(found, errors=errors), ref)


def _act_errors(run: _Sweep, unit: Unit, acts: Sequence[int], at: Mapping[str, Sequence[np.ndarray]]) -> dict[int, float]:
    """Per activation width: the fake-quantization error of the tensors the unit writes (and, without
    weights, reads) at that width, summed and per sample."""
    if not acts:
        return {}
    missing = [t for t in unit.writes if t not in at]
    values = dict(zip(missing, map(list, zip(*run.front.peek(run.model.proto, missing))))) if missing else {}
    tensors = {t: at[t] if t in at else values[t] for t in unit.writes}
    if unit.layer is None:
        tensors.update({t: at[t] for t in unit.reads if t in at})
    return {bits: sum(float(np.sum((run.fake_quant(t, bits, x) - x).astype(np.float64) ** 2))
                      for t, xs in tensors.items() for x in xs) / run.samples for bits in acts}


def _layer(run: _Sweep, batches, unit: Unit, spec: LayerSpec, cands: Sequence[Candidate],
           at: Mapping[str, Sequence[np.ndarray]]) -> UnitErrors:
    """A weighted layer's weight-noise probe and the output error of each candidate's weights and input:
    where it has a view, from its moments (if they fit GptqSettings' memory budget) or its outputs,
    whichever costs less (`_direct_is_cheaper`); else by running its op alone."""
    model = run.model
    node = next(n for n in model.proto.graph.node if n.name == spec.name)
    weight = numpy_helper.to_array(next(t for t in model.proto.graph.initializer if t.name == spec.weight))
    weight = weight.astype(np.float32)
    noise = weight_noise(weight, spec.channel_axis, zlib.crc32(spec.name.encode()))
    noisy = with_weight(model.proto, spec.name, spec.weight, weight + noise)
    view = view_of(node, weight.shape, weight_left=node.input[0] == spec.weight)
    acts = sorted({c.act_bits for c in cands if c.act_bits})
    mats = view.to_matrices(weight.astype(np.float64)) if view is not None else None
    full = run.rounding == Rounding.GPTQ  # GPTQ rounds against H of every sample, as the exact probe does
    fits = mats is not None and 8 * (1 + 2 * len(acts)) * mats.shape[0] * mats.shape[2] ** 2 \
        <= GptqSettings().memory_budget
    if mats is not None and view is not None and spec.activation in at and (fits or not full):
        quantizers = {a: (lambda x, a=a: run.fake_quant(spec.activation, a, x)) for a in acts}
        xs = at[spec.activation]
        stride = column_stride(view, xs[0].shape, sum(len(x) for x in xs), GptqSettings().columns_per_k)
        m = moments(view, xs, quantizers, stride) if full else None  # GPTQ's codes need the moments' H
        rounded = run.codes(spec, weight, xs, m)
        codes = {c.key: rounded(c) for c in cands}
        targets = {c.key: (view.to_matrices(q.dequantize().astype(np.float64)) if (q := codes[c.key]) else mats,
                           c.act_bits) for c in cands}
        targets[NOISE] = (view.to_matrices((weight + noise).astype(np.float64)), None)
        if m is None and fits and not _direct_is_cheaper(mats, targets, len(acts)):
            m = moments(view, xs, quantizers, stride)
        errors = ({key: m.output_error(mats, wt, a) for key, (wt, a) in targets.items()} if m is not None
                  else direct_errors(view, xs, mats, targets, quantizers, stride))
        noise_error = errors.pop(NOISE)
    else:
        rounded = run.codes(spec, weight, at.get(spec.activation, []), None)
        codes = {c.key: rounded(c) for c in cands}
        float_out = [v[0] for v in run.front.peek(model.proto, [spec.output])]
        errors = {}
        for c in cands:
            q = codes[c.key]
            proto, _ = build(model, {spec.name: c}, run.stats, run.options, weights={spec.name: q} if q else None)
            errors[c.key] = _error(run.front.peek(proto, [spec.output]), float_out, run.samples)
        noise_error = _error(run.front.peek(noisy, [spec.output]), float_out, run.samples)
    values = run.runner(batches).peek(noisy, [o.name for o in model.proto.graph.output])
    return UnitErrors(unit, Probe(Candidate(None, None), values, None, {}, None), noise_error, errors, codes)


def _error(got: Sequence[Sequence[np.ndarray]], ref: Sequence[np.ndarray], samples: int) -> float:
    """sum (y - y_ref)^2 / N over the batches of one tensor."""
    return sum(float(np.sum((np.asarray(g[0], np.float64) - r) ** 2)) for g, r in zip(got, ref)) / samples


def _output_noise(run: _Sweep, batches, unit: Unit, power: float) -> tuple[Probe, float]:
    """The network run with Gaussian noise of `power` per sample added to the unit's output; (probe, power)."""
    clean = [v[0] for v in run.front.peek(run.model.proto, [unit.output])]
    rng = np.random.default_rng(zlib.crc32(unit.name.encode()))
    draws = [rng.standard_normal(np.shape(c)) for c in clean]
    scale = np.sqrt(max(power, 1e-30) * run.samples / max(sum(float(np.sum(d ** 2)) for d in draws), 1e-30))
    feeds = [{NOISE: (d * scale).astype(np.asarray(c).dtype)} for d, c in zip(draws, clean)]
    measured = sum(float(np.sum(f[NOISE].astype(np.float64) ** 2)) for f in feeds) / run.samples
    outputs = [o.name for o in run.model.proto.graph.output]
    values = run.runner(batches).peek(with_noise(run.model.proto, unit.output), outputs, feeds)
    return Probe(Candidate(None, None), values, None, {}, None), measured
