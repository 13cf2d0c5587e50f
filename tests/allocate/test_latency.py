"""`onnxmpq.latency`: the LatencyTable file format and its additive prediction, `kernel_class`, `profile`
on a tiny model, and `quantize --budget latency-ms=...` with a synthetic table for ResNet-20 (no timing).

The synthetic table's deltas are chosen here, so the predicted latency of any allocation is known
without running the model: T = T_ref + sum of the chosen deltas.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import build_cnn, cli, feed_for, one_error_line

from onnxmpq import calibrate
from onnxmpq.allocate import parse_budget, solve
from onnxmpq.allocate.latency import LatencyTable, kernel_class, profile
from onnxmpq.errors import OnnxmpqError
from onnxmpq.graph import model as graph
from onnxmpq.pipeline import api
from onnxmpq.pipeline.config import SearchConfig
from onnxmpq.pipeline.context import RunContext
from onnxmpq.types import Candidate, QuantOptions

ROOT = Path(__file__).resolve().parents[2]
RESNET = ROOT / "models" / "resnet20_cifar10.onnx"
CALIB = ROOT / "calibration" / "cifar10_train256.npz"
FAST = ["--metric", "weight-entropy", "--rounding", "nearest", "--limit", "32", "-q", "--no-verify"]
REF_MS = 10.0


@pytest.fixture(scope="module")
def resnet():
    return api.load(RESNET)


def synthetic(resnet) -> LatencyTable:
    """Reference w8a8 at 10 ms; each layer at w4a8 saves 0.05..0.24 ms (more for later layers)."""
    layers = {spec.name: {"w8a8": 0.0, "w4a8": -round(0.05 + 0.01 * i, 6)} for i, spec in enumerate(resnet.layers)}
    return LatencyTable("w8a8", REF_MS, 12.5, layers, 1, 2, 30)


@pytest.fixture(scope="module")
def work(tmp_path_factory, resnet):
    folder = tmp_path_factory.mktemp("latency")
    table = synthetic(resnet)
    table.save(folder / "lat.json")
    return folder, table


# ---------------------------------------------------------------- LatencyTable


def test_table_round_trip(work):
    folder, table = work
    assert LatencyTable.from_dict(table.to_dict()) == table
    assert LatencyTable.load(folder / "lat.json") == table
    data = json.loads((folder / "lat.json").read_text())
    assert set(data) == {"reference", "reference_ms", "float_ms", "layers", "batch", "threads", "runs"}
    assert json.loads(json.dumps(table.to_dict())) == data


def test_predict_arithmetic():
    table = LatencyTable("w8a8", 5.0, 7.0, {"a": {"w8a8": 0.0, "w4a8": -0.5, "w8a16": 1.25},
                                            "b": {"w8a8": 0.0, "w4a8": -0.25}}, 1, 2, 30)
    assert table.predict({"a": Candidate(8, 8), "b": Candidate(8, 8)}) == pytest.approx(5.0)
    assert table.predict({"a": Candidate(4, 8), "b": Candidate(4, 8)}) == pytest.approx(4.25)
    assert table.predict({"a": Candidate(8, 16), "b": Candidate(4, 8)}) == pytest.approx(6.0)
    # layers and candidates the table does not hold count 0
    assert table.predict({"a": Candidate(4, 8), "zzz": Candidate(4, 8), "b": Candidate(2, 8)}) == pytest.approx(4.5)
    assert table.predict({}) == pytest.approx(5.0)


@pytest.mark.parametrize("text", [
    "not json at all {",
    "[1, 2, 3]",
    '{"reference": "w8a8"}',
    '{"reference": "w8a8", "reference_ms": 1, "float_ms": 1, "layers": [1, 2], "batch": 1, "threads": 1, "runs": 1}',
    '{"reference": "w8a8", "reference_ms": 1, "float_ms": 1, "layers": {"a": 5}, "batch": 1, "threads": 1, "runs": 1}',
    '{"reference": "w8a8", "reference_ms": 1, "float_ms": 1, "layers": {}, "batch": 1, "threads": 1, "runs": 1, '
    '"extra": 2}',
])
def test_corrupt_table_is_a_user_error(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(OnnxmpqError) as info:
        LatencyTable.load(path)
    assert info.value.hint and "profile-latency" in info.value.hint


def test_missing_table_file_is_a_user_error(tmp_path):
    with pytest.raises(OnnxmpqError):
        LatencyTable.load(tmp_path / "nope.json")


# ---------------------------------------------------------------- kernel_class


def test_kernel_class_native(resnet):
    spec = resnet.points().unit("/layer1/layer1.0/conv1/Conv")  # a unit: kernel classes are per unit
    native = QuantOptions(weight_layout="native")
    w3, w4, w8 = (kernel_class(spec, Candidate(w, 8), native) for w in (3, 4, 8))
    assert w3 == w4 != w8
    assert kernel_class(spec, Candidate(4, 16), native) != w4          # activation type differs
    assert kernel_class(spec, Candidate(2, 8), native) != w4           # INT2 container
    assert kernel_class(spec, Candidate(5, 8), native) == w8           # 5..8 bits all INT8


def test_kernel_class_auto_separates_16_bit_activations(resnet):
    spec = resnet.points().unit("/layer1/layer1.0/conv1/Conv")  # a unit: kernel classes are per unit
    auto = QuantOptions(weight_layout="auto")
    assert kernel_class(spec, Candidate(3, 8), auto) == kernel_class(spec, Candidate(4, 8), auto)
    assert kernel_class(spec, Candidate(4, 16), auto) != kernel_class(spec, Candidate(4, 8), auto)


@pytest.mark.parametrize("layout", ["auto", "int8-cast"])
def test_kernel_class_int8_cast_matches_w8a8(resnet, layout):
    spec = resnet.points().unit("/layer1/layer1.0/conv1/Conv")  # a unit: kernel classes are per unit
    options = QuantOptions(weight_layout=layout)
    assert kernel_class(spec, Candidate(4, 8), options) == kernel_class(spec, Candidate(8, 8), options)


# ---------------------------------------------------------------- profile on a tiny model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    onnx.save(build_cnn(), str(folder / "cnn.onnx"))
    model = graph.load(folder / "cnn.onnx")
    np.savez(folder / "calib.npz", x=feed_for(model.proto, batch=16)["x"])
    source = calibrate.read(folder / "calib.npz", model)
    stats = calibrate.collect(model, source, model.points().groups())
    return model, stats, {"x": feed_for(model.proto, batch=1)["x"]}


def test_profile_structure_native(tiny):
    model, stats, feed = tiny
    cands = [Candidate(3, 8), Candidate(4, 8), Candidate(8, 8)]
    table = profile(model, cands, stats, feed, QuantOptions(weight_layout="native"), runs=3, threads=1)
    assert table.reference == "w8a8" and table.batch == 1 and table.runs == 3
    assert table.reference_ms > 0 and table.float_ms > 0
    assert set(table.layers) == {s.name for s in model.layers}
    for row in table.layers.values():
        assert set(row) == {"w3a8", "w4a8", "w8a8"}
        assert row["w8a8"] == 0.0
        assert row["w3a8"] == row["w4a8"]  # one INT4 measurement serves both
    back = LatencyTable.from_dict(json.loads(json.dumps(table.to_dict())))
    assert back == table


def test_profile_auto_reuses_the_reference_for_int8_cast(tiny):
    model, stats, feed = tiny
    table = profile(model, [Candidate(4, 8), Candidate(8, 8)], stats, feed, QuantOptions(), runs=3, threads=1)
    assert all(row["w4a8"] == 0.0 for row in table.layers.values())


# ---------------------------------------------------------------- latency-ms budgets


def test_latency_problem_costs(resnet, work):
    """Costs shift so each layer's cheapest allowed choice is 0; the offset adds T_ref and the shifts back."""
    from onnxmpq.sensitivity import parse_candidates

    _, table = work
    cands = parse_candidates((4, 8), (8,))
    problem = api.allocation_problem(resnet, None, cands, [parse_budget("latency-ms=9.5")], latency=table)
    cost = problem.costs["latency-ms"]
    assert cost.min(axis=1).tolist() == [0.0] * 20
    saves = sum(0.05 + 0.01 * i for i in range(20))
    assert problem.offsets["latency-ms"] == pytest.approx(REF_MS - saves)
    assert problem.limits["latency-ms"] == pytest.approx(9.5 - (REF_MS - saves))
    alloc = solve(problem, "ilp")
    chosen = {n: Candidate(int(k[1]), 8) for n, k in alloc.choice.items()}
    assert alloc.costs["latency-ms"] == pytest.approx(table.predict(chosen)) and alloc.costs["latency-ms"] <= 9.5 + 1e-9


@pytest.fixture(scope="module")
def latency_run(work):
    folder, _ = work
    out = folder / "lat.onnx"
    code, stdout, err = cli("quantize", RESNET, "-o", out, "--calib", CALIB, "--budget", "latency-ms=9",
                            "--latency", folder / "lat.json", "--bits", "4,8", "--json",
                            *[a for a in FAST if a != "--no-verify"])
    return code, stdout, err, out


def test_latency_budget_honoured(latency_run, work):
    code, stdout, err, out = latency_run
    _, table = work
    assert code == 0, err
    report = json.loads(stdout)
    alloc = report["allocation"]
    assert alloc["budgets"] == [{"kind": "latency-ms", "value": 9.0, "relative": False}]
    chosen = {layer["name"]: Candidate(layer["weight_bits"], layer["act_bits"]) for layer in report["layers"]}
    assert {c.key for c in chosen.values()} <= {"w4a8", "w8a8"}
    expected = REF_MS + sum(table.layers[n][c.key] for n, c in chosen.items())
    assert expected <= 9.0 + 1e-9
    assert alloc["costs"]["latency-ms"] == pytest.approx(expected)
    assert report["verification"]["predicted_latency_ms"] == pytest.approx(expected)
    assert report["verification"]["latency_ms"] > 0
    assert out.exists()


def test_latency_budget_below_achievable_exit_2(work, tmp_path):
    folder, _ = work
    smallest = REF_MS - sum(0.05 + 0.01 * i for i in range(20))   # every layer at w4a8: 6.1 ms
    code, stdout, err = cli("quantize", RESNET, "-o", tmp_path / "q.onnx", "--calib", CALIB, "--budget",
                            "latency-ms=5", "--latency", folder / "lat.json", "--bits", "4,8", *FAST)
    assert code == 2
    line = one_error_line(err, stdout)
    assert "latency-ms=5 " in line and f"smallest achievable is {smallest:.6g} " in line
    assert not (tmp_path / "q.onnx").exists()


def test_latency_table_without_a_candidate_exit_1(work, tmp_path):
    """The table holds w4a8 and w8a8; asking for 2-bit candidates needs entries it does not have."""
    folder, _ = work
    code, stdout, err = cli("quantize", RESNET, "-o", tmp_path / "q.onnx", "--calib", CALIB, "--budget",
                            "latency-ms=9", "--latency", folder / "lat.json", "--bits", "2,4,8", *FAST)
    assert code == 1
    assert "w2a8" in one_error_line(err, stdout)


def test_corrupt_latency_file_via_cli_exit_1(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    code, stdout, err = cli("quantize", RESNET, "-o", tmp_path / "q.onnx", "--calib", CALIB, "--budget",
                            "latency-ms=9", "--latency", bad, "--bits", "4,8", *FAST)
    assert code == 1
    assert "latency table" in one_error_line(err, stdout)


def test_latency_entry_that_is_not_a_number_is_a_user_error(work, tmp_path, resnet):
    """A hand-edited table with text where a delta belongs: one error line, exit 1, no traceback."""
    folder, table = work
    data = table.to_dict()
    data["layers"][resnet.layers[3].name]["w4a8"] = "fast"
    path = tmp_path / "text.json"
    path.write_text(json.dumps(data))
    code, stdout, err = cli("quantize", RESNET, "-o", tmp_path / "q.onnx", "--calib", CALIB, "--budget",
                            "latency-ms=9", "--latency", path, "--bits", "4,8", *FAST)
    assert code == 1
    one_error_line(err, stdout)


# ---------------------------------------------------------------- measured latencies (tiny model, no --latency)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-quantize")
    onnx.save(build_cnn(), str(folder / "cnn.onnx"))
    proto = onnx.load(str(folder / "cnn.onnx"))
    np.savez(folder / "calib.npz", x=feed_for(proto, batch=64)["x"])
    return folder


def quantize_tiny(folder, name, keep=None):

    settings = SearchConfig(metric="weight-entropy", weight_bits=(4, 8), keep=keep or {})
    return api.quantize(folder / "cnn.onnx", folder / f"{name}.onnx", folder / "calib.npz",
                        budgets=[parse_budget("latency-ms=1000")], search=settings, rounding="nearest", limit=32)


def test_measured_latency_budget(tiny_files):
    report = quantize_tiny(tiny_files, "measured")
    costs = report.allocation["costs"]["latency-ms"]
    assert 0 < costs <= 1000
    assert report.verification["predicted_latency_ms"] == pytest.approx(costs)


def test_predicted_latency_is_rescaled_by_the_float_speed_now(tiny_files):
    """T_now = T_pred * float_ms(now) / float_ms(table): a table measured on a machine running float at
    2 ms predicts 5 ms; verification measures float again and rescales the prediction by the same ratio."""
    from types import SimpleNamespace

    report = quantize_tiny(tiny_files, "rescaled")
    chosen = {layer.name: Candidate(layer.weight_bits, layer.act_bits) for layer in report.layers}
    table = LatencyTable("w8a8", 5.0, 2.0, {}, 1, 2, 30)
    ctx = RunContext(api.load(tiny_files / "cnn.onnx"), tiny_files / "calib.npz", limit=32, holdout=True)
    v = api.verification(ctx, Path(report.output), chosen=SimpleNamespace(latency=table, assignment=chosen))
    assert v["predicted_latency_ms"] == 5.0
    assert v["predicted_latency_now_ms"] == pytest.approx(5.0 * v["float_latency_ms"] / 2.0)


def test_measured_latency_budget_with_a_float_layer_kept(tiny_files):
    report = quantize_tiny(tiny_files, "kept", keep={"fc": Candidate(None, None)})
    assert report.allocation["fixed"] == {"fc": "float"}
    assert report.verification["predicted_latency_ms"] == pytest.approx(report.allocation["costs"]["latency-ms"])


def test_latency_budget_over_two_activation_widths(resnet):
    """With A8 and A16 the problem has `aN` columns for the units without weights; a table measured with
    the same --bits/--act-bits has no weighted layer at `a8` (float weights), so no layer is offered it."""
    from onnxmpq.sensitivity import parse_candidates

    points = resnet.points()
    layers = {u.name: ({"w8a8": -0.04, "w8a16": 0.0} if u.layer else {"a8": -0.02, "a16": 0.0}) for u in points.units}
    table = LatencyTable("w8a16", 3.0, 1.0, layers, 1, 2, 30)
    cands = parse_candidates((8,), (8, 16))
    problem = api.allocation_problem(resnet, None, cands, [parse_budget("latency-ms=2.5")], latency=table)
    assert {"a8", "a16"} <= set(problem.candidates)
    weighted = [i for i, name in enumerate(problem.layers) if points.unit(name).layer]
    for i in weighted:  # a weighted layer is offered only what the table timed
        assert [problem.candidates[c] for c in np.flatnonzero(problem.allowed[i])] == ["w8a8", "w8a16"]
    alloc = solve(problem, "ilp")
    chosen = {n: Candidate(8 if points.unit(n).layer else None, int(k.rsplit("a", 1)[1])) for n, k in alloc.choice.items()}
    assert alloc.costs["latency-ms"] == pytest.approx(table.predict(chosen)) and alloc.costs["latency-ms"] <= 2.5 + 1e-9
