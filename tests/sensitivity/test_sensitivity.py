"""The sensitivity stage: `measure` (probe engine and naive sweep), the cache, the workers.

Numbers are checked against independent computations: the single-layer QDQ model written by
`quantize.build` run whole in onnxruntime with NSR/KL/entropies computed here, and weight codes
rounded here by hand. The bundled ResNet-20 with 32 calibration images gives the realistic checks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import (
    MODELS,
    arr,
    build_cnn,
    build_constant_weights,
    build_unnamed,
    feed_for,
    group_stats,
    model,
    node,
    vi,
)
from onnx import TensorProto, helper, numpy_helper
from scipy.special import rel_entr, softmax

from onnxmpq import progress, sensitivity
from onnxmpq.errors import OnnxmpqError
from onnxmpq.graph import model as graph
from onnxmpq.pipeline import api
from onnxmpq.sensitivity import cache, parallel, probe
from onnxmpq.types import Candidate, LayerScores, Rounding, SensitivityTable
from onnxmpq.write.build import build

ROOT = Path(__file__).resolve().parents[2]
RESNET = ROOT / "models" / "resnet20_cifar10.onnx"
CALIB = ROOT / "calibration" / "cifar10_train256.npz"
WBITS = [Candidate(2, None), Candidate(4, None), Candidate(8, None)]
DATA_METRICS = ["sqnr", "kl", "output-entropy", "mutual-info"]


# --- helpers ----------------------------------------------------------------------------------------


def build_branchy():
    """Two outputs; a residual Add and an early head.

    x(N,3,6,6) -conv_a(4, pad 1)- r=Relu -conv_b(4, pad 1)- Add(r) -Flatten- fc(Gemm 10) -> y(N,10)
                                      r -ReduceMean(H,W)- aux(N,4)
    """
    return model(
        [node("Conv", ["x", "Wa", "Ba"], ["a"], "conv_a", pads=[1, 1, 1, 1]),
         node("Relu", ["a"], ["r"], "relu"),
         node("Conv", ["r", "Wb"], ["b"], "conv_b", pads=[1, 1, 1, 1]),
         node("Add", ["b", "r"], ["s"], "add"),
         node("Flatten", ["s"], ["f"], "flatten"),
         node("Gemm", ["f", "Wf", "Bf"], ["y"], "fc", transB=1),
         node("ReduceMean", ["r"], ["aux"], "head", axes=[2, 3], keepdims=0)],
        [vi("x", ["N", 3, 6, 6])], [vi("y", ["N", 10]), vi("aux", ["N", 4])],
        {"Wa": arr(30, 4, 3, 3, 3, scale=0.3), "Ba": arr(31, 4, scale=0.1), "Wb": arr(32, 4, 4, 3, 3, scale=0.2),
         "Wf": arr(33, 10, 144, scale=0.1), "Bf": arr(34, 10, scale=0.1)})


def build_shared_input():
    """Two convs read the same input x (an activation probe must quantize x for one of them only)."""
    return model([node("Conv", ["x", "Wp"], ["p"], "conv_p", pads=[1, 1, 1, 1]),
                  node("Conv", ["x", "Wq"], ["q"], "conv_q", pads=[1, 1, 1, 1]),
                  node("Mul", ["p", "q"], ["s"], "mul"),
                  node("Conv", ["s", "Wo"], ["y"], "conv_out")],
                 [vi("x", ["N", 2, 5, 5])], [vi("y", ["N", 2, 5, 5])],
                 {"Wp": arr(40, 2, 2, 3, 3), "Wq": arr(41, 2, 2, 3, 3), "Wo": arr(42, 2, 2, 1, 1)})


def build_tied():
    """x(N,6) @ Wt -Relu- @ Wt -> y: one weight tensor shared by two layers."""
    return model([node("MatMul", ["x", "Wt"], ["h"], "mm1"), node("Relu", ["h"], ["r"], "relu"),
                  node("MatMul", ["r", "Wt"], ["y"], "mm2")],
                 [vi("x", ["N", 6])], [vi("y", ["N", 6])], {"Wt": arr(43, 6, 6, scale=0.5)})


def load(proto) -> graph.Model:
    return graph.from_proto(proto)


def batches_for(m: graph.Model, batch: int, count: int, seed: int = 10) -> list[dict]:
    return [feed_for(m.proto, batch, seed + i) for i in range(count)]


def run_whole(proto: onnx.ModelProto, feeds: list[dict], extra: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """All outputs (plus `extra` tensors) of `proto` over the batches, concatenated, in plain onnxruntime."""
    proto2 = onnx.ModelProto()
    proto2.CopyFrom(proto)
    for name in extra:
        proto2.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(proto2.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    runs = [sess.run(names, feed) for feed in feeds]
    return {n: np.concatenate([r[i] for r in runs]) for i, n in enumerate(names)}


def nsr(ref: np.ndarray, y: np.ndarray) -> float:
    ref, y = ref.astype(np.float64), y.astype(np.float64)
    return float(((ref - y) ** 2).sum() / (ref ** 2).sum())


def kl_logits(ref: np.ndarray, y: np.ndarray) -> float:
    ref, y = ref.reshape(-1, ref.shape[-1]).astype(np.float64), y.reshape(-1, y.shape[-1]).astype(np.float64)
    return float(rel_entr(softmax(ref, axis=1), softmax(y, axis=1)).sum(axis=1).mean())


def entropy_on(values: np.ndarray, lo: float, hi: float, bins: int = 256) -> float:
    """Entropy (nats) of `values` clipped to [lo, hi] in `bins` equal bins (numpy's histogram)."""
    counts, _ = np.histogram(np.clip(values.astype(np.float64), lo, hi), bins=bins, range=(lo, hi))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def minmax_codes(w: np.ndarray, bits: int) -> np.ndarray:
    """Symmetric per-output-channel (axis 0) codes on the restricted grid, by hand."""
    qmax = 2 ** (bits - 1) - 1
    rows = w.reshape(w.shape[0], -1).astype(np.float32)
    scale = (np.abs(rows).max(axis=1) / np.float32(qmax)).astype(np.float32)
    return np.clip(np.rint(rows / scale[:, None]), -qmax, qmax)


def bit_entropy(codes: np.ndarray) -> float:
    _, counts = np.unique(codes, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def by_metric(tables) -> dict[str, SensitivityTable]:
    return {t.metric: t for t in tables}


def assert_tables_close(a: SensitivityTable, b: SensitivityTable, rtol: float = 1e-5, atol: float = 1e-12):
    assert a.metric == b.metric and a.candidates == b.candidates
    assert [(l.name, l.op_type) for l in a.layers] == [(l.name, l.op_type) for l in b.layers]
    for la, lb in zip(a.layers, b.layers):
        assert set(la.scores) == set(lb.scores)
        for key in la.scores:
            assert la.scores[key] == pytest.approx(lb.scores[key], rel=rtol, abs=atol), (a.metric, la.name, key)
        assert (la.extra is None) == (lb.extra is None)
        for key in la.extra or {}:
            assert la.extra[key] == pytest.approx(lb.extra[key], rel=rtol, abs=atol)


def assert_monotone(table: SensitivityTable, keys=("w2", "w4", "w8"), slack: float = 1e-6):
    """Fewer bits never hurt less (2 >= 4 >= 8, tiny slack at the top), and 2 bits strictly worse than 8."""
    for layer in table.layers:
        s = [layer.scores[k] for k in keys]
        for lo_bits, hi_bits in zip(s, s[1:]):
            assert lo_bits >= hi_bits - slack * max(hi_bits, 1e-3), (table.metric, layer.name, layer.scores)
        assert s[0] > s[-1], (table.metric, layer.name, layer.scores)


def assert_finite_nonnegative(table: SensitivityTable):
    for layer in table.layers:
        for key, value in layer.scores.items():
            assert math.isfinite(value) and value >= 0.0, (table.metric, layer.name, key, value)


# --- candidates -------------------------------------------------------------------------------------


def test_candidate_keys_combined_and_separate():
    assert [c.key for c in sensitivity.parse_candidates([2, 4, 8], [None])] == ["w2", "w4", "w8"]
    assert [c.key for c in sensitivity.parse_candidates([4, 8], [8])] == ["w4a8", "w8a8"]
    assert [c.key for c in sensitivity.parse_candidates([2, 4], [None, 8])] == ["w2", "w2a8", "w4", "w4a8"]
    assert [c.key for c in sensitivity.parse_candidates([2, 4], [4, 8], separate=True)] == ["w2", "w4", "a4", "a8"]


@pytest.mark.parametrize("weight_bits, act_bits", [([1], [None]), ([17], [None]), ([4], [1]), ([4], [17])])
def test_candidate_bits_outside_2_to_16_are_rejected(weight_bits, act_bits):
    with pytest.raises(OnnxmpqError, match="outside 2..16"):
        sensitivity.parse_candidates(weight_bits, act_bits)


# --- table structure --------------------------------------------------------------------------------


@pytest.mark.parametrize("builder", [build_cnn, build_unnamed, build_branchy], ids=["cnn", "unnamed", "branchy"])
def test_one_row_per_layer_in_network_order(builder):
    m = load(builder())
    batches = batches_for(m, 3, 2)
    seen = []
    tables = sensitivity.measure(m, batches, DATA_METRICS + ["weight-entropy"], WBITS, on_layer=seen.append)
    names = [spec.name for spec in m.layers]
    assert len(names) >= 2 and seen == names
    assert [t.metric for t in tables] == DATA_METRICS + ["weight-entropy"]
    for table in tables:
        assert [(l.name, l.op_type) for l in table.layers] == [(s.name, s.op_type) for s in m.layers]
        assert table.candidates == ("w2", "w4", "w8")
        assert all(list(l.scores) == ["w2", "w4", "w8"] for l in table.layers)
        assert table.samples == 6 and table.rounding == "nearest" and table.time_s >= 0
        assert_finite_nonnegative(table)


def test_table_json_round_trip_keeps_extras():
    m = load(build_cnn())
    tables = sensitivity.measure(m, batches_for(m, 4, 1), ["sqnr", "output-entropy"], WBITS)
    for table in tables:
        data = json.loads(json.dumps(table.to_dict()))
        assert set(data) == {"metric", "candidates", "samples", "time_s", "rounding", "probes", "layers"}
        assert SensitivityTable.from_dict(data) == table
    rows = tables[1].to_dict()["layers"]
    assert all(set(r) == {"name", "op_type", "scores", "entropy"} for r in rows)
    assert all(set(r) == {"name", "op_type", "scores"} for r in tables[0].to_dict()["layers"])


def test_measure_user_errors():
    relu = load(model([node("Relu", ["x"], ["y"], "relu")], [vi("x", ["N", 4])], [vi("y", ["N", 4])]))
    with pytest.raises(OnnxmpqError, match="no quantizable layer"):
        sensitivity.measure(relu, [{"x": np.ones((2, 4), np.float32)}], ["sqnr"], WBITS)
    m = load(build_cnn())
    with pytest.raises(OnnxmpqError, match="calibration data"):
        sensitivity.measure(m, [], ["sqnr"], WBITS)
    with pytest.raises(OnnxmpqError, match="unknown metric 'snr'"):
        sensitivity.measure(m, batches_for(m, 2, 1), ["snr"], WBITS)


# --- scores on tiny models --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sqnr_and_kl_fall_as_weight_bits_rise(name):
    m = load(MODELS[name]())
    tables = by_metric(sensitivity.measure(m, batches_for(m, 4, 2), ["sqnr", "kl"], WBITS))
    for table in tables.values():
        assert_finite_nonnegative(table)
        assert_monotone(table)


def test_sqnr_and_kl_fall_as_activation_bits_rise():
    m = load(build_cnn())
    batches = batches_for(m, 8, 2)
    stats = group_stats(m, {"x": np.concatenate([b["x"] for b in batches])})
    cands = sensitivity.parse_candidates([], [2, 4, 8], separate=True)
    for table in sensitivity.measure(m, batches, ["sqnr", "kl"], cands, stats):
        assert table.candidates == ("a2", "a4", "a8")
        assert_finite_nonnegative(table)
        assert_monotone(table, keys=("a2", "a4", "a8"))


@pytest.mark.parametrize("builder", [*MODELS.values(), build_branchy, build_unnamed, build_constant_weights],
                         ids=[*MODELS, "branchy", "unnamed", "constant_weights"])
def test_engine_equals_naive_sweep(builder):
    m = load(builder())
    batches = batches_for(m, 4, 2)
    fast = sensitivity.measure(m, batches, DATA_METRICS, WBITS)
    naive = sensitivity.measure(m, batches, DATA_METRICS, WBITS, naive=True)
    for a, b in zip(fast, naive):
        assert_tables_close(a, b, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("builder", [build_branchy, build_shared_input, build_tied], ids=["branchy", "shared", "tied"])
def test_engine_and_naive_sweep_equal_single_layer_models_with_activation_candidates(builder):
    m = load(builder())
    batches = batches_for(m, 8, 2)
    stats = group_stats(m, {"x": np.concatenate([b["x"] for b in batches])})
    cands = sensitivity.parse_candidates([4], [4, 8]) + [Candidate(None, 4)]
    fast = sensitivity.measure(m, batches, ["sqnr", "kl"], cands, stats)
    naive = sensitivity.measure(m, batches, ["sqnr", "kl"], cands, stats, naive=True)
    for a, b in zip(fast, naive):
        assert_tables_close(a, b, rtol=1e-4, atol=1e-9)
    ref = run_whole(m.proto, batches)
    outputs = list(ref)
    units = m.points().units
    # every unit is a row: the weighted layers at each candidate, the others (Add, Mul, Concat) at a4 and a8
    assert [row.name for row in fast[0].layers] == [u.name for u in units]
    for row, unit in zip(fast[0].layers, units):
        assert set(row.scores) == ({c.key for c in cands} if unit.layer else {"a4", "a8"})
        for key in row.scores:
            cand = next(c for c in cands + [Candidate(None, 8)] if c.key == key)
            got = run_whole(build(m, {unit.name: cand}, stats)[0], batches)
            expected = sum(nsr(ref[o], got[o]) for o in outputs)
            assert row.scores[key] == pytest.approx(expected, rel=1e-4, abs=1e-12), (unit.name, key)


@pytest.mark.parametrize("builder", [build_cnn, build_branchy], ids=["cnn", "branchy"])
def test_probe_matches_single_layer_model_run_whole(builder):
    """Each score = NSR / KL of the whole single-layer-quantized model in onnxruntime, summed over outputs."""
    m = load(builder())
    batches = batches_for(m, 5, 2)
    tables = by_metric(sensitivity.measure(m, batches, ["sqnr", "kl"], WBITS))
    outputs = [o.name for o in m.proto.graph.output]
    ref = run_whole(m.proto, batches)
    for spec in m.layers:
        for cand in WBITS:
            proto, _ = build(m, {spec.name: cand}, None)
            got = run_whole(proto, batches)
            row = {t: next(l for l in tables[t].layers if l.name == spec.name).scores[cand.key] for t in tables}
            assert row["sqnr"] == pytest.approx(sum(nsr(ref[o], got[o]) for o in outputs), rel=1e-4, abs=1e-12)
            assert row["kl"] == pytest.approx(sum(kl_logits(ref[o], got[o]) for o in outputs), rel=1e-4, abs=1e-9)


def test_probe_of_an_activation_candidate_matches_single_layer_model():
    m = load(build_cnn())
    batches = batches_for(m, 8, 2)
    stats = group_stats(m, {"x": np.concatenate([b["x"] for b in batches])})
    cand = Candidate(None, 4)
    table = sensitivity.measure(m, batches, ["sqnr"], [cand], stats)[0]
    ref = run_whole(m.proto, batches)["y"]
    for row, spec in zip(table.layers, m.layers):
        proto, _ = build(m, {spec.name: cand}, stats)
        assert row.scores["a4"] == pytest.approx(nsr(ref, run_whole(proto, batches)["y"]), rel=1e-4)


def test_output_entropy_against_histograms_of_the_layer_outputs():
    m = load(build_cnn())
    batches = batches_for(m, 16, 2)
    table = sensitivity.measure(m, batches, ["output-entropy"], WBITS)[0]
    for row, unit in zip(table.layers, m.points().units):
        spec = unit  # a unit's output is after the activation it takes in (conv1's is the Relu's)
        assert spec.output == {"conv1": "r1", "conv2": "c2", "fc": "y"}[unit.name]
        float_out = run_whole(m.proto, batches, (spec.output,))[spec.output]
        lo, hi = float(float_out.min()), float(float_out.max())
        h_float = entropy_on(float_out, lo, hi)
        assert row.extra["entropy"] == pytest.approx(h_float, abs=1e-6)
        assert 0 < h_float <= math.log(256)
        for cand in WBITS:
            proto, _ = build(m, {spec.name: cand}, None)
            quant_out = run_whole(proto, batches, (spec.output,))[spec.output]
            assert row.scores[cand.key] == pytest.approx(abs(h_float - entropy_on(quant_out, lo, hi)), abs=1e-6)


def test_sqnr_of_two_outputs_is_the_sum_and_an_untouched_output_adds_nothing():
    m = load(build_branchy())
    batches = batches_for(m, 5, 2)
    table = sensitivity.measure(m, batches, ["sqnr"], [Candidate(4, None)])[0]
    ref = run_whole(m.proto, batches)
    rows = {l.name: l.scores["w4"] for l in table.layers}
    for name in ("conv_b", "fc"):  # downstream of the aux head's input: only y moves
        got = run_whole(build(m, {name: Candidate(4, None)}, None)[0], batches)
        assert nsr(ref["aux"], got["aux"]) == 0.0
        assert rows[name] == pytest.approx(nsr(ref["y"], got["y"]), rel=1e-4)
    got = run_whole(build(m, {"conv_a": Candidate(4, None)}, None)[0], batches)
    assert nsr(ref["aux"], got["aux"]) > 0
    assert rows["conv_a"] == pytest.approx(nsr(ref["y"], got["y"]) + nsr(ref["aux"], got["aux"]), rel=1e-4)


def rank_mi(z: np.ndarray, labels: np.ndarray, bins: int = 16) -> float:
    """Plug-in I(Z; Y) in nats with Z cut into equal-frequency bins by rank (n a multiple of bins)."""
    zb = np.empty(len(z), dtype=np.int64)
    zb[np.argsort(z, kind="stable")] = np.arange(len(z)) * bins // len(z)
    joint = np.zeros((bins, labels.max() + 1))
    np.add.at(joint, (zb, labels), 1.0)
    joint /= joint.sum()
    outer = joint.sum(axis=1, keepdims=True) * joint.sum(axis=0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / outer[nz])).sum())


def test_mutual_info_against_observers_of_single_layer_models():
    """InfoQ's score by hand on the cnn: observers are the inputs of the last three layers that are not graph
    inputs (r1, f) and the output y; each layer is scored on the observers downstream of it, with the float
    model's argmax as the label and 32 unit projections drawn from default_rng(feature dim)."""
    m = load(build_cnn())
    batches = batches_for(m, 128, 2)  # 256 samples: 16 per bin
    table = sensitivity.measure(m, batches, ["mutual-info"], WBITS)[0]
    observers = ["f", "r1", "y"]
    ref = run_whole(m.proto, batches, ("r1", "f"))
    labels = ref["y"].argmax(axis=1)

    def smi(features):
        flat = features.reshape(len(labels), -1).astype(np.float64)
        theta = np.random.default_rng(flat.shape[1]).standard_normal((32, flat.shape[1]))
        theta /= np.linalg.norm(theta, axis=1, keepdims=True)
        return np.mean([rank_mi(flat @ t, labels) for t in theta])

    ref_smi = {o: smi(ref[o]) for o in observers}
    downstream = {"conv1": ["f", "r1", "y"], "conv2": ["f", "y"], "fc": ["y"]}
    for row in table.layers:
        for cand in WBITS:
            got = run_whole(build(m, {row.name: cand}, None)[0], batches, ("r1", "f"))
            names = downstream[row.name]
            drop = np.mean([abs(ref_smi[o] - smi(got[o])) for o in names])
            expected = drop / np.mean([ref_smi[o] for o in names]) / cand.weight_bits
            assert row.scores[cand.key] == pytest.approx(expected, rel=1e-6, abs=1e-12), (row.name, cand.key)
    assert max(l.scores["w2"] for l in table.layers) > 0


def test_gptq_rounding_is_recorded_used_and_engine_equals_naive():
    m = load(build_cnn())
    batches = batches_for(m, 16, 2)
    table = sensitivity.measure(m, batches, ["sqnr"], WBITS, rounding=Rounding.GPTQ)[0]
    assert table.rounding == "gptq"
    assert_finite_nonnegative(table)
    assert all(l.scores["w2"] > l.scores["w8"] for l in table.layers)
    assert_tables_close(table, sensitivity.measure(m, batches, ["sqnr"], WBITS, rounding=Rounding.GPTQ, naive=True)[0],
                        rtol=1e-4, atol=1e-9)
    nearest = sensitivity.measure(m, batches, ["sqnr"], WBITS)[0]
    assert [l.scores for l in nearest.layers] != [l.scores for l in table.layers]  # the rounding was really used


# --- weight entropy (data-free) ---------------------------------------------------------------------


def test_weight_entropy_needs_no_data_and_matches_hand_rounding():
    m = load(build_cnn())
    cands = [Candidate(b, None) for b in (2, 3, 4, 8, 16)]
    table = sensitivity.measure(m, [], ["weight-entropy"], cands)[0]
    assert table.samples == 0 and [l.name for l in table.layers] == ["conv1", "conv2", "fc"]
    weights = {t.name: numpy_helper.to_array(t) for t in m.proto.graph.initializer}
    for row, spec in zip(table.layers, m.layers):
        w = weights[spec.weight]
        h16 = bit_entropy(minmax_codes(w, 16))
        for cand in cands:
            expected = max(h16 - bit_entropy(minmax_codes(w, cand.weight_bits)), 0.0)
            assert row.scores[cand.key] == pytest.approx(expected, abs=1e-9), (spec.name, cand.key)
        s = [row.scores[c.key] for c in cands]
        assert s[0] > s[1] > s[2] > s[3] > s[4] == 0.0


def test_data_free_table_records_nearest_rounding():
    """weight-entropy alone never reads data, so its codes are nearest whatever rounding is asked for; the
    table must say so (an allocator or report trusting `rounding` would otherwise be misled)."""
    m = load(build_cnn())
    asked = sensitivity.measure(m, [], ["weight-entropy"], WBITS, rounding=Rounding.GPTQ)[0]
    plain = sensitivity.measure(m, [], ["weight-entropy"], WBITS)[0]
    assert [l.scores for l in asked.layers] == [l.scores for l in plain.layers]
    assert asked.rounding == plain.rounding == "nearest"


def test_weight_entropy_is_the_same_with_and_without_data():
    m = load(build_cnn())
    free = sensitivity.measure(m, [], ["weight-entropy"], WBITS)[0]
    with_data = by_metric(sensitivity.measure(m, batches_for(m, 4, 1), ["sqnr", "weight-entropy"], WBITS))
    assert [l.scores for l in free.layers] == [l.scores for l in with_data["weight-entropy"].layers]


# --- the bundled ResNet-20 --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet():
    """ResNet-20 probed at w2/w4/w8 on 32 images: the engine with every data metric, the naive sweep."""
    m = graph.load(RESNET)
    batches = [{"input": np.load(CALIB)["input"][:32]}]
    fast = by_metric(sensitivity.measure(m, batches, DATA_METRICS, WBITS))
    naive = by_metric(sensitivity.measure(m, batches, ["sqnr", "kl"], WBITS, naive=True))
    return m, batches, fast, naive


@pytest.mark.e2e
def test_resnet_tables_structure_and_order(resnet):
    m, _, fast, _ = resnet
    names = [spec.name for spec in m.layers]
    assert len(names) == 20 and names[0] == "/conv1/Conv" and names[-1] == "/linear/Gemm"
    for table in fast.values():
        assert [l.name for l in table.layers] == names
        assert table.samples == 32
        assert_finite_nonnegative(table)
    assert all(0 < l.extra["entropy"] <= math.log(256) for l in fast["output-entropy"].layers)
    assert max(l.scores["w2"] for l in fast["mutual-info"].layers) > 0


@pytest.mark.e2e
def test_resnet_sqnr_and_kl_fall_as_bits_rise(resnet):
    _, _, fast, _ = resnet
    assert_monotone(fast["sqnr"])
    assert_monotone(fast["kl"])


@pytest.mark.e2e
def test_resnet_engine_equals_naive_sweep(resnet):
    _, _, fast, naive = resnet
    for metric in ("sqnr", "kl"):
        assert_tables_close(fast[metric], naive[metric], rtol=1e-3, atol=1e-9)


@pytest.mark.e2e
@pytest.mark.parametrize("index", [0, 11, 19])
def test_resnet_probe_matches_single_layer_model(resnet, index):
    m, batches, fast, _ = resnet
    spec = m.layers[index]
    ref = run_whole(m.proto, batches)["logits"]
    got = run_whole(build(m, {spec.name: Candidate(4, None)}, None)[0], batches)["logits"]
    assert fast["sqnr"].layers[index].scores["w4"] == pytest.approx(nsr(ref, got), rel=1e-3)
    assert fast["kl"].layers[index].scores["w4"] == pytest.approx(kl_logits(ref, got), rel=1e-3)


# --- cache ------------------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path):
    """The cnn and 24 calibration samples on disk."""
    path = tmp_path / "cnn.onnx"
    onnx.save(build_cnn(), str(path))
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(3).normal(size=(24, 3, 8, 8)).astype(np.float32))
    return path, calib


def forbid_probing(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("probed although the cache should have answered")
    monkeypatch.setattr(sensitivity, "measure", boom)
    monkeypatch.setattr(sensitivity, "sweep", boom)
    monkeypatch.setattr(probe, "sweep", boom)


CACHED = dict(metrics=("sqnr", "output-entropy"), weight_bits=(2, 4, 8), batch_size=8, rounding="nearest")


def test_cache_hit_returns_equal_tables_without_probing(files, tmp_path, monkeypatch):
    model_path, calib = files
    first = api.sensitivity(model_path, calib, cache_dir=tmp_path / "cache", **CACHED)
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    forbid_probing(monkeypatch)
    again = api.sensitivity(model_path, calib, cache_dir=tmp_path / "cache", **CACHED)
    assert again == first
    with pytest.raises(AssertionError, match="probed"):  # the patch does catch a real probe
        api.sensitivity(model_path, calib, cache_dir=tmp_path / "other", **CACHED)


def test_cache_misses_when_a_setting_or_the_data_changes(files, tmp_path, monkeypatch):
    model_path, calib = files
    api.sensitivity(model_path, calib, cache_dir=tmp_path / "cache", **CACHED)
    with monkeypatch.context() as patch:
        forbid_probing(patch)
        with pytest.raises(AssertionError, match="probed"):
            api.sensitivity(model_path, calib, cache_dir=tmp_path / "cache", **{**CACHED, "weight_bits": (2, 4)})
        with pytest.raises(AssertionError, match="probed"):
            api.sensitivity(model_path, calib, cache_dir=tmp_path / "cache", **CACHED, limit=16)
    tables = api.sensitivity(model_path, calib, cache_dir=tmp_path / "cache", **{**CACHED, "weight_bits": (2, 4)})
    assert tables[0].candidates == ("w2", "w4")
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2


def _entry(cache_dir: Path) -> Path:
    (entry,) = cache_dir.glob("*.json")
    return entry


@pytest.mark.parametrize("damage", ["garbage", "tampered", "truncated", "not_an_object", "null"])
def test_corrupt_cache_entry_is_reported_and_rebuilt(files, tmp_path, monkeypatch, capsys, damage):
    model_path, calib = files
    monkeypatch.setattr(progress, "QUIET", False)
    first = api.sensitivity(model_path, calib, cache_dir=tmp_path / "cache", **CACHED)
    entry = _entry(tmp_path / "cache")
    text = entry.read_text()
    if damage == "garbage":
        entry.write_bytes(b"\x00\xff\xfe not json at all \x13")
    elif damage == "tampered":  # a changed score under the old checksum
        data = json.loads(text)
        data["tables"][0]["layers"][0]["scores"]["w2"] *= 10
        entry.write_text(json.dumps(data))
    elif damage == "truncated":
        entry.write_text(text[: len(text) // 2])
    elif damage == "not_an_object":
        entry.write_text("[1, 2, 3]")
    else:
        entry.write_text("null")
    capsys.readouterr()
    again = api.sensitivity(model_path, calib, cache_dir=tmp_path / "cache", **CACHED)
    err = capsys.readouterr().err
    assert "warning" in err and entry.name in err
    assert [[l.scores for l in t.layers] for t in again] == [[l.scores for l in t.layers] for t in first]
    # the entry was rewritten and now answers on its own
    assert cache.load(tmp_path / "cache", entry.stem) is not None


def test_stale_entry_under_another_key_is_not_trusted(files, tmp_path, monkeypatch, capsys):
    model_path, calib = files
    monkeypatch.setattr(progress, "QUIET", False)
    api.sensitivity(model_path, calib, cache_dir=tmp_path / "cache", **CACHED)
    entry = _entry(tmp_path / "cache")
    other = "0" * 64
    (tmp_path / "cache" / f"{other}.json").write_text(entry.read_text())
    capsys.readouterr()
    assert cache.load(tmp_path / "cache", other) is None
    assert "warning" in capsys.readouterr().err
    assert cache.load(tmp_path / "cache", entry.stem) is not None


# --- workers ----------------------------------------------------------------------------------------


def test_two_workers_give_the_same_tables_as_one(files, monkeypatch):
    model_path, calib = files
    kwargs = dict(metrics=("sqnr", "kl", "output-entropy", "weight-entropy"), weight_bits=(2, 4, 8), batch_size=8)
    one = api.sensitivity(model_path, calib, workers=1, **kwargs)
    pools = []

    class SpyPool(parallel.ProcessPoolExecutor):
        def __init__(self, workers, *args, **kw):
            pools.append(workers)
            super().__init__(workers, *args, **kw)

    monkeypatch.setattr(parallel, "ProcessPoolExecutor", SpyPool)
    two = api.sensitivity(model_path, calib, workers=2, **kwargs)
    assert pools == [2]
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert a.samples == b.samples == 24
        assert_tables_close(a, b, rtol=1e-6)


def test_parallel_merge_puts_candidates_back_in_order():
    """Workers get candidates round-robin ([w2, w8] and [w4]); the merged rows must read like one worker's:
    the same scores, keyed in the order of `candidates` (so the JSON is the same with 1 or 2 workers)."""
    def part(keys, value):
        return [SensitivityTable("sqnr", tuple(keys), (LayerScores("l", "Conv", {k: value for k in keys}),), 4, 1.0)]

    merged = parallel.merge([part(["w2", "w8"], 1.0), part(["w4"], 2.0)], WBITS)
    assert merged[0].candidates == ("w2", "w4", "w8")
    assert merged[0].layers[0].scores == {"w2": 1.0, "w8": 1.0, "w4": 2.0}
    assert list(merged[0].layers[0].scores) == ["w2", "w4", "w8"]


def test_sequence_outputs_give_one_label_per_time_step_and_aligned_observers():
    from onnxmpq.sensitivity.probe import align_rows, labels_of

    rng = np.random.default_rng(0)
    y = rng.normal(size=(4, 7, 5))                      # (N, T, C), as a CTC head gives
    labels = labels_of([[y[:2]], [y[2:]]], [2, 2])
    np.testing.assert_array_equal(labels, y.argmax(axis=2).ravel())
    feats = rng.normal(size=(4, 3, 1, 7))               # (N, C, 1, T): the time axis is last
    rows = align_rows(feats, 4, 28)
    assert rows.shape == (28, 3)
    np.testing.assert_array_equal(rows[7 * 2 + 5], feats[2, :, 0, 5])   # sample 2, step 5
    assert align_rows(rng.normal(size=(4, 6)), 4, 28) is None           # no time axis: not used
    assert align_rows(feats, 4, 4).shape == (4, 21)                     # class scores: one row per sample


def test_cache_hits_for_units_without_weights_at_two_widths(tmp_path, capsys):
    """An encoder at A8/A16: its Adds and Softmaxes score only a8/a16, and the entry is still reused."""
    from conftest import build_encoder

    proto = build_encoder()
    path, calib = tmp_path / "enc.onnx", tmp_path / "calib.npz"
    onnx.save(proto, path)
    np.savez(calib, **feed_for(proto, 8))
    kwargs = dict(metrics=["sqnr"], weight_bits=[8], act_bits=[8, 16], limit=8, cache_dir=tmp_path / "cache")
    first = api.sensitivity(path, calib, **kwargs)
    assert any(set(l.scores) == {"a8", "a16"} for l in first[0].layers)
    capsys.readouterr()
    again = api.sensitivity(path, calib, **kwargs)
    assert "unusable" not in capsys.readouterr().err
    assert again[0].to_dict() == first[0].to_dict()


def test_a_time_major_output_is_probed_with_every_metric(tmp_path):
    """x (N, 5, 4) -> MatMul -> Transpose -> y (5, N, 6): the batches' outputs were joined along their
    first axis (time), which fails when the last batch is smaller; labels and observers now turn the
    batch axis first, so rows are sample-major like the reference's."""
    from conftest import arr, model, node, vi

    from onnxmpq.sensitivity.probe import labels_of

    proto = model([node("MatMul", ["x", "W"], ["h"], "mm"), node("Transpose", ["h"], ["y"], "t", perm=[1, 0, 2])],
                  [vi("x", ["N", 5, 4])], [vi("y", [5, "N", 6])], {"W": arr(1, 4, 6)}, 17)
    path, calib = tmp_path / "tm.onnx", tmp_path / "c.npz"
    onnx.save(proto, path)
    x = np.random.default_rng(0).normal(size=(37, 5, 4)).astype(np.float32)
    np.savez(calib, x=x)
    tables = api.sensitivity(path, calib, metrics=["sqnr", "kl", "mutual-info", "output-entropy"], weight_bits=[2, 8],
                             act_bits=[8], batch_size=4)
    for table in tables:
        scores = {layer.name: layer.scores for layer in table.layers}["mm"]
        assert scores["w2a8"] >= scores["w8a8"] >= 0, table.metric
    y = x @ onnx.numpy_helper.to_array(proto.graph.initializer[0])          # (N, 5, 6), batch first
    time_major = [[np.transpose(y[i:i + 4], (1, 0, 2))] for i in range(0, 37, 4)]
    np.testing.assert_array_equal(labels_of(time_major, [len(y[i:i + 4]) for i in range(0, 37, 4)]),
                                  y.argmax(-1).ravel())


@pytest.mark.parametrize("metrics, wanted", [
    (["sqnr"], {probe.Need.OUTPUTS}),
    (["sqnr", "kl"], {probe.Need.OUTPUTS}),
    (["kl", "output-entropy"], {probe.Need.OUTPUTS, probe.Need.LAYER_OUTPUT}),
    (["mutual-info", "weight-entropy"], {probe.Need.OBSERVERS, probe.Need.WEIGHTS}),
])
def test_the_probe_engine_collects_the_union_of_what_the_metrics_need(monkeypatch, metrics, wanted):
    """A metric declares its data (`Metric.needs`); the engine is asked for exactly the union."""
    seen = []
    real = sensitivity.sweep

    def spy(*args, needs, **kwargs):
        seen.append(needs)
        return real(*args, needs=needs, **kwargs)

    monkeypatch.setattr(sensitivity, "sweep", spy)
    m = load(build_cnn())
    tables = sensitivity.measure(m, batches_for(m, 4, 1), metrics, WBITS)
    assert seen == [frozenset(wanted)] and [t.metric for t in tables] == metrics
    assert sensitivity.METRICS.get("weight-entropy").data_free and not sensitivity.METRICS.get("kl").data_free
