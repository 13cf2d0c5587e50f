"""Fast probes (`sensitivity.fast`): output errors from a layer's moments, one noise probe per unit.

The oracles are independent: a layer's output error is read from the single-layer QDQ model that
`quantize.build` writes, run whole in onnxruntime without its graph optimisations (at load onnxruntime
turns DQ(INT4) + MatMul/Gemm into MatMulNBits, which reads its input at 8 bits: an error that the
exact probes see and that the layer's moments, which know only the QDQ graph, do not); the noise
probe's degradation from the float model with the noisy weight put in by hand. The bundled ResNet-20
on 32 calibration images checks that the fast ranks follow the exact ones.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS, build_cnn, build_encoder, feed_for, group_stats
from onnx import numpy_helper
from scipy.stats import spearmanr
from test_sensitivity import batches_for, build_branchy, build_tied, forbid_probing, load, nsr, run_whole

from onnxmpq import sensitivity
from onnxmpq.errors import OnnxmpqError
from onnxmpq.graph import engine, runtime
from onnxmpq.graph import model as graph
from onnxmpq.pipeline import api
from onnxmpq.rounding import round_nearest
from onnxmpq.rounding.linear import view_of
from onnxmpq.sensitivity import fast, probe
from onnxmpq.sensitivity.fast import moments
from onnxmpq.types import Candidate, Probes, QuantOptions, Rounding
from onnxmpq.write.build import build

ROOT = Path(__file__).resolve().parents[2]
RESNET = ROOT / "models" / "resnet20_cifar10.onnx"
CALIB = ROOT / "calibration" / "cifar10_train256.npz"
WBITS = [Candidate(2, None), Candidate(4, None), Candidate(8, None)]
FLOAT_BIAS = QuantOptions(bias="float")  # no INT32 bias rounding in the oracles' layer outputs


def weight_of(m: graph.Model, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in m.proto.graph.initializer if t.name == name)).astype(np.float32)


def run_plain(proto: onnx.ModelProto, batches, extra: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """`run_whole` with onnxruntime's graph optimisations off: the graph's own numerics."""
    proto2 = onnx.ModelProto()
    proto2.CopyFrom(proto)
    for name in extra:
        if name not in {o.name for o in proto2.graph.output}:
            proto2.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = runtime.session(proto2, optimize=False)
    names = [o.name for o in sess.get_outputs()]
    runs = [sess.run(names, feed) for feed in batches]
    return {n: np.concatenate([r[i] for r in runs]) for i, n in enumerate(names)}


def layer_error(m: graph.Model, spec, cand: Candidate, stats, batches, codes=None) -> float:
    """||y_q - y||^2 / N at the layer's op output in the single-layer QDQ model, run whole."""
    ref = run_plain(m.proto, batches, (spec.output,))
    proto, _ = build(m, {spec.name: cand}, stats, FLOAT_BIAS, weights={spec.name: codes} if codes else None)
    got = run_plain(proto, batches, (spec.output,))
    diff = got[spec.output].astype(np.float64) - ref[spec.output]
    return float(np.sum(diff ** 2) / sum(len(b["x"]) for b in batches))


def moments_error(m: graph.Model, spec, cand: Candidate, stats, batches, how: str = "moments") -> float:
    """The same error from the layer's moments (`Moments.output_error`), or with how="direct" from its
    outputs (`fast.direct_errors`)."""
    node = next(n for n in m.proto.graph.node if n.name == spec.name)
    weight = weight_of(m, spec.weight)
    view = view_of(node, weight.shape, weight_left=node.input[0] == spec.weight)
    xs = [run_whole(m.proto, [b], (spec.activation,))[spec.activation] if spec.activation not in b else b[spec.activation]
          for b in batches]
    group = m.points().group.get(spec.activation)
    quantizers = {cand.act_bits: lambda x: probe.fake_quant(x, cand.act_bits, stats[group], FLOAT_BIAS)} \
        if cand.act_bits else {}
    mats = view.to_matrices(weight.astype(np.float64))
    wq = round_nearest(weight, spec.channel_axis, _fmt(cand.weight_bits)).dequantize() if cand.weight_bits else weight
    wq_mats = view.to_matrices(wq.astype(np.float64))
    if how == "direct":
        return fast.direct_errors(view, xs, mats, {"t": (wq_mats, cand.act_bits)}, quantizers)["t"]
    return moments(view, xs, quantizers).output_error(mats, wq_mats, cand.act_bits)


def _fmt(bits: int):
    from onnxmpq.write.formats import weight_format
    return weight_format(bits)


# --- the output error from the moments ----------------------------------------------------------------


@pytest.mark.parametrize("how", ["moments", "direct"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_moments_error_equals_the_single_layer_models_output_error(name, how):
    """e = tr(dW H dW^T) / N, or ||dW X||^2 / N from the outputs, for every op view (Conv, grouped,
    ConvTranspose, MatMul both sides, Gemm)."""
    m = load(MODELS[name]())
    batches = batches_for(m, 6, 2)
    for spec in m.layers:
        for cand in WBITS:
            expected = layer_error(m, spec, cand, None, batches)
            got = moments_error(m, spec, cand, None, batches, how)
            assert got == pytest.approx(expected, rel=2e-3), (spec.name, cand)


@pytest.mark.parametrize("how", ["moments", "direct"])
@pytest.mark.parametrize("cand", [Candidate(4, 8), Candidate(2, 4), Candidate(None, 4)], ids=lambda c: c.key)
def test_moments_error_with_activation_bits_equals_the_single_layer_models(cand, how):
    """With the input read at a bits: ||W_q (X + E) - W X||^2 / N from H, C and H_E, or from the outputs
    dW X + W_q E (the cnn's two Convs, whose op outputs are read before any activation Q/DQ)."""
    m = load(build_cnn())
    batches = batches_for(m, 8, 2)
    stats = group_stats(m, {"x": np.concatenate([b["x"] for b in batches])})
    for spec in m.layers[:2]:
        expected = layer_error(m, spec, cand, stats, batches)
        assert expected > 0
        assert moments_error(m, spec, cand, stats, batches, how) == pytest.approx(expected, rel=2e-3), spec.name


def test_strided_moments_are_the_strided_sums_times_the_stride_and_estimate_the_full_ones():
    """moments(..., stride=s): s times the sums over every s-th column (starting one further per chunk);
    on smooth feature maps the output error from them is within a few percent of the full one."""
    conv = onnx.helper.make_node("Conv", ["x", "W"], ["y"], "c", pads=[1, 1, 1, 1])
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 4, 3, 3)).astype(np.float32)
    view = view_of(conv, w.shape)
    x = np.cumsum(np.cumsum(rng.normal(size=(40, 4, 12, 12)), axis=2), axis=3).astype(np.float32) / 6
    fq = {4: lambda t: (np.round(t * 2) / 2).astype(np.float32)}
    full, strided = moments(view, [x[:20], x[20:]], fq), moments(view, [x[:20], x[20:]], fq, stride=5)
    chunk = [view.columns(x[i:i + 20]) for i in (0, 20)]
    want = sum(5 * (c[:, :, k % 5::5].astype(np.float64) @ np.swapaxes(c[:, :, k % 5::5], 1, 2))
               for k, c in enumerate(chunk))
    np.testing.assert_allclose(strided.h, want, rtol=1e-4, atol=1e-2)  # float32 products against float64
    mats = view.to_matrices(w.astype(np.float64))
    wq = view.to_matrices(round_nearest(w, 0, _fmt(3)).dequantize().astype(np.float64))
    for bits in (None, 4):
        assert strided.output_error(mats, wq, bits) == pytest.approx(full.output_error(mats, wq, bits), rel=0.05)
        direct = fast.direct_errors(view, [x[:20], x[20:]], mats, {"t": (wq, bits)}, fq, stride=5)["t"]
        assert direct == pytest.approx(strided.output_error(mats, wq, bits), rel=1e-4)  # the same columns


def test_the_sweep_takes_the_cheaper_of_moments_and_outputs():
    """Products per column: direct 2 (1 + [a]) R K per target against the moments' (1 + 2A) K^2."""
    conv3x3, expansion, depthwise = np.zeros((1, 16, 144)), np.zeros((1, 144, 24)), np.zeros((32, 1, 9))
    few = {"w4a8": (None, 8), "w8a8": (None, 8), "noise": (None, None)}
    many = {f"w{b}a8": (None, 8) for b in range(2, 9)} | {"noise": (None, None)}
    assert fast._direct_is_cheaper(conv3x3, few, 1)  # 2 x 5 x 16 < 3 x 144
    assert not fast._direct_is_cheaper(conv3x3, many, 1)  # 2 x 15 x 16 > 3 x 144
    assert not fast._direct_is_cheaper(expansion, few, 1)  # 2 x 5 x 144 > 3 x 24
    assert fast._direct_is_cheaper(depthwise, few, 1) and not fast._direct_is_cheaper(depthwise, many, 1)


def test_gptq_codes_are_the_exact_probes():
    """GPTQ's H of the float input is the moments' H: the exact probe's codes (its scales to float32
    rounding: its C = sum X X^T is a second product, which BLAS may round differently from H's)."""
    m = load(build_cnn())
    batches = batches_for(m, 8, 2)
    stats = group_stats(m, {"x": np.concatenate([b["x"] for b in batches])})
    points = m.points()
    for spec in m.layers[:2]:
        node = next(n for n in m.proto.graph.node if n.name == spec.name)
        weight = weight_of(m, spec.weight)
        xs = [run_whole(m.proto, [b], (spec.activation,))[spec.activation] if spec.activation not in b
              else b[spec.activation] for b in batches]
        view = view_of(node, weight.shape)
        run = fast._Sweep(m, points, engine.Frontier(batches), stats, QuantOptions(), Rounding.GPTQ, 16, False)
        rounded = run.codes(spec, weight, xs, moments(view, xs, {}))
        for cand in (Candidate(3, None), Candidate(3, 4)):
            exact = probe.layer_codes(spec, weight, node, cand, xs, Rounding.GPTQ, QuantOptions(), stats, {},
                                      points.group.get(spec.activation))
            got = rounded(cand)
            assert got is not None and exact is not None
            np.testing.assert_array_equal(got.codes, exact.codes)
            np.testing.assert_allclose(got.scale, exact.scale, rtol=1e-6)


# --- the score ------------------------------------------------------------------------------------------


def test_score_is_the_noise_probes_degradation_times_the_error_ratio():
    """score(l, c) = NSR(float model with W + Z at l) * e_l(c) / e_l(Z), each piece computed here."""
    m = load(build_cnn())
    batches = batches_for(m, 8, 2)
    table = sensitivity.measure(m, batches, ["sqnr"], WBITS, options=FLOAT_BIAS, probes=Probes.FAST)[0]
    assert table.probes == "fast" and [row.name for row in table.layers] == [s.name for s in m.layers]
    ref = run_whole(m.proto, batches, tuple(s.output for s in m.layers))
    n = sum(len(b["x"]) for b in batches)
    for spec, row in zip(m.layers, table.layers):
        weight = weight_of(m, spec.weight)
        noisy = onnx.ModelProto()
        noisy.CopyFrom(m.proto)
        z = fast.weight_noise(weight, spec.channel_axis, zlib.crc32(spec.name.encode()))
        next(t for t in noisy.graph.initializer if t.name == spec.weight).CopyFrom(
            numpy_helper.from_array(weight + z, spec.weight))
        got = run_whole(noisy, batches, (spec.output,))
        damage = nsr(ref["y"], got["y"])
        noise_error = float(np.sum((got[spec.output].astype(np.float64) - ref[spec.output]) ** 2) / n)
        for cand in WBITS:
            expected = damage * layer_error(m, spec, cand, None, batches) / noise_error
            assert row.scores[cand.key] == pytest.approx(expected, rel=3e-3), (spec.name, cand)


def test_noise_on_a_shared_weight_reaches_only_the_probed_layer():
    m = load(build_tied())
    weight = weight_of(m, "Wt")
    noisy = fast.with_weight(m.proto, "mm1", "Wt", weight + 1.0)
    reads = {n.name: list(n.input) for n in noisy.graph.node}
    assert reads["mm1"][1] != "Wt" and reads["mm2"][1] == "Wt"
    onnx.checker.check_model(noisy)


def test_fast_table_has_the_exact_tables_rows_and_columns_and_falls_with_bits():
    """Every unit exact probes score is a row, with the same candidates; scores fall as weight bits rise,
    for weighted layers with and without a view (the encoder's Gather), and units without weights."""
    proto = build_encoder()
    m = load(proto)
    batches = [feed_for(proto, 8, 1), feed_for(proto, 8, 2)]
    stats = group_stats(m, {k: np.concatenate([b[k] for b in batches]) for k in batches[0]})
    cands = sensitivity.parse_candidates([2, 4, 8], [8, 16])
    exact = sensitivity.measure(m, batches, ["sqnr", "kl"], cands, stats)
    quick = sensitivity.measure(m, batches, ["sqnr", "kl"], cands, stats, probes=Probes.FAST)
    for a, b in zip(exact, quick):
        assert [(r.name, set(r.scores)) for r in a.layers] == [(r.name, set(r.scores)) for r in b.layers]
        for row in b.layers:
            assert all(np.isfinite(v) and v >= 0 for v in row.scores.values()), row.name
            if "w2a8" in row.scores:
                assert row.scores["w2a8"] > row.scores["w4a8"] > row.scores["w8a8"], row.name
            else:
                assert row.scores["a8"] > row.scores["a16"], row.name
    assert any(r.op_type == "Gather" for r in quick[0].layers)


def count_runs(monkeypatch, m: graph.Model) -> list[int]:
    """Counts the engine runs that reach the graph outputs (the float reference and the probes), not
    those of single ops."""
    outputs = {o.name for o in m.proto.graph.output}
    runs = [0]
    peek = engine.Frontier.peek

    def counted(self, proto, targets, extra=()):
        runs[0] += bool(outputs & set(targets))
        return peek(self, proto, targets, extra)
    monkeypatch.setattr(engine.Frontier, "peek", counted)
    return runs


@pytest.mark.parametrize("builder", [build_cnn, build_branchy], ids=["cnn", "branchy"])
def test_fast_runs_one_probe_per_unit_and_exact_one_per_candidate(builder, monkeypatch):
    m = load(builder())
    batches = batches_for(m, 4, 2)
    cands = [Candidate(b, None) for b in range(2, 9)]
    runs = count_runs(monkeypatch, m)
    sensitivity.measure(m, batches, ["sqnr", "kl"], cands, probes=Probes.FAST)
    fast_runs, runs[0] = runs[0], 0
    sensitivity.measure(m, batches, ["sqnr", "kl"], cands)
    assert fast_runs == 1 + len(m.layers)
    assert runs[0] == 1 + len(m.layers) * len(cands)


# --- settings and cache ----------------------------------------------------------------------------------


def test_probes_are_resolved_from_the_metrics():
    default = Probes.FAST if sensitivity.FAST_BY_DEFAULT else Probes.EXACT
    assert sensitivity.resolve_probes(None, ["sqnr", "kl"]) == default
    assert sensitivity.resolve_probes(None, ["sqnr", "output-entropy"]) == Probes.EXACT
    assert sensitivity.resolve_probes("exact", ["mutual-info"]) == Probes.EXACT
    assert sensitivity.resolve_probes("fast", ["kl", "weight-entropy"]) == Probes.FAST
    for metric in ("output-entropy", "mutual-info"):
        with pytest.raises(OnnxmpqError, match=f"cannot score metric {metric}") as info:
            sensitivity.resolve_probes("fast", ["sqnr", metric])
        assert "set search.probes to exact" in info.value.hint  # named by its config path outside the CLI


def test_cache_key_differs_between_probe_modes(tmp_path, monkeypatch):
    path, calib = tmp_path / "cnn.onnx", tmp_path / "calib.npz"
    onnx.save(build_cnn(), path)
    np.savez(calib, x=np.random.default_rng(3).normal(size=(16, 3, 8, 8)).astype(np.float32))
    kwargs = dict(metrics=("sqnr",), weight_bits=(2, 4), batch_size=8, rounding="nearest", cache_dir=tmp_path / "c")
    quick = api.sensitivity(path, calib, probes="fast", **kwargs)
    exact = api.sensitivity(path, calib, probes="exact", **kwargs)
    assert len(list((tmp_path / "c").glob("*.json"))) == 2
    assert quick[0].probes == "fast" and exact[0].probes == "exact"
    assert [l.scores for l in quick[0].layers] != [l.scores for l in exact[0].layers]
    with monkeypatch.context() as patch:
        forbid_probing(patch)
        patch.setattr(fast, "sweep", lambda *a, **k: pytest.fail("probed although cached"))
        assert api.sensitivity(path, calib, probes="fast", **kwargs) == quick
        assert api.sensitivity(path, calib, probes="exact", **kwargs) == exact


# --- the bundled ResNet-20 --------------------------------------------------------------------------------


def test_resnet_fast_ranks_follow_the_exact_ones():
    """ResNet-20, 32 calibration images, w2/w3/w4/w6/w8: Spearman over all (layer, width) scores and over
    the layers at each width."""
    m = graph.load(RESNET)
    batches = [{"input": np.load(CALIB)["input"][:32]}]
    cands = [Candidate(b, None) for b in (2, 3, 4, 6, 8)]
    exact, quick = (sensitivity.measure(m, batches, ["sqnr"], cands, probes=p)[0] for p in (Probes.EXACT, Probes.FAST))
    e = np.array([[r.scores[c.key] for c in cands] for r in exact.layers])
    f = np.array([[r.scores[c.key] for c in cands] for r in quick.layers])
    assert spearmanr(e.ravel(), f.ravel()).statistic > 0.95
    per_width = [spearmanr(e[:, j], f[:, j]).statistic for j in range(len(cands))]
    assert min(per_width) > 0.5 and np.mean(per_width) > 0.75, per_width


def test_fast_sweep_runs_on_the_first_samples_unless_gptq_needs_all():
    """Nearest probes: the table from fast.SAMPLES + 36 samples (batches of 48, the last cut short) is
    the table from the first fast.SAMPLES of them in the same batches; GPTQ probes: every sample."""
    m = load(build_cnn())
    n = fast.SAMPLES + 36
    data = np.random.default_rng(5).normal(size=(n, 3, 8, 8)).astype(np.float32)
    batches = [{"x": data[i:i + 48]} for i in range(0, n, 48)]
    cut = fast.sweep_batches(batches, Rounding.NEAREST)
    sizes = [len(b["x"]) for b in cut]
    assert sum(sizes) == fast.SAMPLES and sizes[:-1] == [48] * (len(sizes) - 1) and 0 < sizes[-1] <= 48
    assert fast.sweep_batches(batches, Rounding.GPTQ) == batches
    cands = [Candidate(2, None), Candidate(4, None)]
    whole = sensitivity.measure(m, batches, ["sqnr"], cands, probes=Probes.FAST)[0]
    head = sensitivity.measure(m, [{"x": b["x"].copy()} for b in cut], ["sqnr"], cands, probes=Probes.FAST)[0]
    assert whole.samples == head.samples == fast.SAMPLES
    assert [r.scores for r in whole.layers] == [r.scores for r in head.layers]
    gptq = sensitivity.measure(m, batches, ["sqnr"], cands[1:], rounding=Rounding.GPTQ, probes=Probes.FAST)[0]
    assert gptq.samples == n


def test_cli_probes_option(tmp_path):
    from conftest import cli, one_error_line

    path, calib = tmp_path / "cnn.onnx", tmp_path / "calib.npz"
    onnx.save(build_cnn(), path)
    np.savez(calib, x=np.random.default_rng(4).normal(size=(8, 3, 8, 8)).astype(np.float32))
    base = ["sensitivity", str(path), "--calib", str(calib), "--bits", "2,4", "--rounding", "nearest", "--json"]
    for probes in ("fast", "exact"):
        code, out, _ = cli(*base, "--probes", probes)
        assert code == 0 and json.loads(out)["probes"] == probes
    code, out, err = cli(*base, "--metric", "output-entropy", "--probes", "fast")
    assert code == 1 and "set --probes to exact" in one_error_line(err, out)


def test_quantize_reports_the_probes_its_allocation_used(tmp_path):
    from conftest import cli

    path, calib, out = tmp_path / "cnn.onnx", tmp_path / "calib.npz", tmp_path / "q.onnx"
    onnx.save(build_cnn(), path)
    np.savez(calib, x=np.random.default_rng(5).normal(size=(16, 3, 8, 8)).astype(np.float32))
    for probes in ("fast", "exact"):
        code, text, err = cli("quantize", path, "-o", out, "--calib", calib, "--budget", "avg-bits=3", "--bits", "2,4",
                              "--metric", "sqnr", "--rounding", "nearest", "--no-verify", "--probes", probes, "--json")
        assert code == 0, err
        assert json.loads(text)["allocation"]["probes"] == probes


def test_tables_from_outputs_and_from_moments_agree(monkeypatch):
    """ResNet-20 at W4/W8 (A8): the sweep takes the outputs on its 3x3 convs; forced to the moments, the
    same table to float rounding."""
    m = graph.load(RESNET)
    batches = [{"input": np.load(CALIB)["input"][:32]}]
    stats = group_stats(m, batches[0])
    cands = [Candidate(4, 8), Candidate(8, 8)]
    taken = []
    real = fast._direct_is_cheaper
    monkeypatch.setattr(fast, "_direct_is_cheaper", lambda *a: taken.append(real(*a)) or taken[-1])
    direct = sensitivity.measure(m, batches, ["sqnr"], cands, stats, probes=Probes.FAST)[0]
    assert sum(taken) >= 10, taken
    monkeypatch.setattr(fast, "_direct_is_cheaper", lambda *a: False)
    moments_ = sensitivity.measure(m, batches, ["sqnr"], cands, stats, probes=Probes.FAST)[0]
    for a, b in zip(direct.layers, moments_.layers):
        for key in a.scores:
            assert a.scores[key] == pytest.approx(b.scores[key], rel=1e-3, abs=1e-12), (a.name, key)
