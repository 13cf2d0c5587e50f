"""From a model to a Problem (`allocate.problem.build_problem`) and the allocation stage end to end
(`onnxmpq quantize` with --profile, --keep, --method, --max-drop, --sweep) on ResNet-20.

Oracles: parameter counts read from the ONNX initializers, the profile's own rules, `hardware.check` on
the written model, onnx's checker and onnxruntime. The CLI runs share one module-scoped folder and a
sensitivity cache; `--metric weight-entropy` and `--rounding nearest` keep each run to seconds.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import arr, cli, node, one_error_line, vi
from conftest import model as make_model

from onnxmpq.allocate import Problem, parse_budget, solve, tied_ok, totals
from onnxmpq.allocate.problem import build_problem
from onnxmpq.errors import ConstraintError, OnnxmpqError
from onnxmpq.graph import model as graph
from onnxmpq.hardware import compliance as hardware
from onnxmpq.hardware import profiles
from onnxmpq.pipeline import api
from onnxmpq.pipeline.config import SearchConfig
from onnxmpq.sensitivity import parse_candidates
from onnxmpq.types import Candidate, LayerScores, SensitivityTable

ROOT = Path(__file__).resolve().parents[2]
RESNET = ROOT / "models" / "resnet20_cifar10.onnx"
CALIB = ROOT / "calibration" / "cifar10_train256.npz"
GEMM = "/linear/Gemm"
FIRST = "/conv1/Conv"


def fake_table(model, candidates, seed=0) -> SensitivityTable:
    """Scores that fall with the weight width (so wider is better), noisy per layer."""
    rng = np.random.default_rng(seed)
    rows = tuple(LayerScores(spec.name, spec.op_type,
                             {c.key: float(rng.uniform(0.5, 1.5) * 2.0 ** -(c.weight_bits or 16)
                                           + (0 if c.act_bits != 8 else 1e-4)) for c in candidates})
                 for spec in reversed(model.layers))
    return SensitivityTable("hand", tuple(c.key for c in candidates), rows, 0, 0.0)


def params_of(path) -> dict[str, int]:
    """{node name: weight element count} straight from the ONNX initializers."""
    proto = onnx.load(str(path))
    inits = {t.name: int(np.prod(t.dims)) for t in proto.graph.initializer}
    return {n.name: inits[n.input[1]] for n in proto.graph.node if n.op_type in ("Conv", "Gemm")}


@pytest.fixture(scope="module")
def resnet():
    return api.load(RESNET)


@pytest.fixture(scope="module")
def params():
    return params_of(RESNET)


# ---------------------------------------------------------------- build_problem


def test_npu_w4a8_allowed_choices(resnet):
    cands = parse_candidates((2, 4, 8), (8, 16))
    table = fake_table(resnet, cands)
    problem, fixed = build_problem(resnet, table, cands, [parse_budget("avg-bits=6")], profiles.load("npu-w4a8"))
    assert weighted(resnet, fixed) == {}  # the Adds and the pooling: fixed at a8, the profile's one width
    assert problem.layers == tuple(s.name for s in resnet.layers)
    keys = problem.candidates
    for l, name in enumerate(problem.layers):
        ok = {keys[c] for c in np.flatnonzero(problem.allowed[l])}
        assert ok == ({"w8a8"} if name == GEMM else {"w4a8", "w8a8"}), name
    assert problem.max_distinct == 2 and problem.ties == ()
    assert keys[-2:] == ("a8", "a16")  # the columns of the units without weights (fixed here: no row uses them)
    assert problem.weight_bits == tuple(int(k[1]) if k[0] == "w" else 0 for k in keys)
    assert problem.act_bits == tuple(int(k.split("a")[1]) for k in keys)
    rows = {r.name: r for r in table.layers}
    assert problem.scores[problem.layers.index(GEMM), keys.index("w2a16")] == rows[GEMM].scores["w2a16"]


def test_keep_moves_the_layer_out_and_its_cost_into_offsets(resnet, params):
    cands = parse_candidates((2, 3, 4, 8), (8,))
    total = sum(params.values())
    budgets = [parse_budget("avg-bits=3"), parse_budget("weight-bytes=80KB"), parse_budget("bitops=0.3x")]
    keep = {FIRST: Candidate(8, 8)}
    problem, fixed = build_problem(resnet, fake_table(resnet, cands), cands, budgets, profiles.load(None), keep=keep)
    assert weighted(resnet, fixed) == keep and FIRST not in problem.layers and len(problem.layers) == 19
    assert problem.fixed_widths == frozenset({8})
    first = resnet.layer(FIRST)
    assert params[FIRST] == first.params == 432
    assert problem.offsets["avg-bits"] == 432 * 8
    assert problem.limits["avg-bits"] == pytest.approx(3 * total - 432 * 8)
    # INT8 codes + 16 float32 scales + 16 INT8 zero points
    assert problem.offsets["weight-bytes"] == 432 + 16 * 4 + 16
    assert problem.limits["weight-bytes"] == pytest.approx(80_000 - 512)
    assert problem.offsets["bitops"] == first.macs * 64

    alloc = solve(problem, "ilp")
    chosen = {n: int(k[1]) for n, k in alloc.choice.items()}
    chosen[FIRST] = 8
    avg = sum(params[n] * b for n, b in chosen.items()) / total
    assert alloc.costs["avg-bits"] == pytest.approx(avg) and avg <= 3 + 1e-9
    w8a8 = sum(s.macs * 64 for s in resnet.layers)
    bitops = sum(s.macs * chosen[s.name] * 8 for s in resnet.layers)
    assert alloc.costs["bitops"] == pytest.approx(bitops / w8a8) and bitops <= 0.3 * w8a8 * (1 + 1e-9)
    assert alloc.costs["weight-bytes"] <= 80_000 * (1 + 1e-9)
    assert problem.user_value("avg-bits", 0.0) == pytest.approx(432 * 8 / total)


def test_keep_at_float(resnet, params):
    cands = parse_candidates((4, 8), (8,))
    problem, fixed = build_problem(resnet, fake_table(resnet, cands), cands, [parse_budget("avg-bits=8")],
                                   profiles.load("cpu-ort"), keep={GEMM: Candidate(None, None)})
    assert weighted(resnet, fixed) == {GEMM: Candidate(None, None)} and problem.fixed_widths == frozenset()
    assert problem.offsets["avg-bits"] == params[GEMM] * 32


def test_keep_unknown_layer_is_a_user_error(resnet):
    cands = parse_candidates((4, 8), (8,))
    with pytest.raises(OnnxmpqError) as info:
        build_problem(resnet, None, cands, [parse_budget("avg-bits=4")], profiles.load(None),
                      keep={"/conv99/Conv": Candidate(8, 8)})
    assert "/conv99/Conv" in str(info.value)


def test_int8_only_without_8_bits_names_the_layer(resnet):
    cands = parse_candidates((2, 4), (8,))
    with pytest.raises(ConstraintError) as info:
        build_problem(resnet, None, cands, [parse_budget("avg-bits=4")], profiles.load("int8-only"))
    assert info.value.exit_code == 2
    assert FIRST in str(info.value) and "int8-only" in str(info.value) and "w4a8" in str(info.value)


def test_profile_that_allows_nothing_for_an_op_leaves_it_float(resnet, params, tmp_path):
    path = tmp_path / "conv-only.yaml"
    path.write_text("name: conv-only\nops:\n  Conv:\n    weights: [4, 8]\n    activations: [8]\n"
                    "  default:\n    weights: [16]\n    activations: [16]\nfloat_layers: true\n")
    cands = parse_candidates((4, 8), (8,))
    problem, fixed = build_problem(resnet, None, cands, [parse_budget("avg-bits=8")], profiles.load(path))
    assert weighted(resnet, fixed) == {GEMM: Candidate(None, None)}
    # the Adds and the pooling may not take the candidates' 8 bits: the profile's widest width for them
    assert {c for n, c in fixed.items() if n not in weighted(resnet, fixed)} == {Candidate(None, 16)}
    assert problem.offsets["avg-bits"] == params[GEMM] * 32


def test_pin_from_a_yaml_profile(resnet, params, tmp_path):
    path = tmp_path / "pinned.yaml"
    path.write_text("name: pinned\nops:\n  default:\n    weights: [2, 4, 8]\n    activations: [8]\n"
                    f"pin:\n  {GEMM}: \"8:8\"\n  {FIRST}: \"4:8\"\n")
    cands = parse_candidates((2, 4, 8), (8,))
    profile = profiles.load(path)
    problem, fixed = build_problem(resnet, None, cands, [parse_budget("avg-bits=4")], profile)
    assert weighted(resnet, fixed) == {GEMM: Candidate(8, 8), FIRST: Candidate(4, 8)}
    assert GEMM not in problem.layers and FIRST not in problem.layers
    assert problem.fixed_widths == frozenset({4, 8})
    assert problem.offsets["avg-bits"] == params[GEMM] * 8 + params[FIRST] * 4
    # --keep wins over the profile's pin
    problem, fixed = build_problem(resnet, None, cands, [parse_budget("avg-bits=4")], profile,
                                   keep={GEMM: Candidate(2, 8)})
    assert fixed[GEMM] == Candidate(2, 8)


def test_pin_of_a_missing_layer_is_a_user_error(resnet, tmp_path):
    path = tmp_path / "pinned.yaml"
    path.write_text('ops:\n  default:\n    weights: [8]\npin:\n  /nope/Conv: "8:8"\n')
    with pytest.raises(OnnxmpqError) as info:
        build_problem(resnet, None, parse_candidates((8,), (8,)), [parse_budget("avg-bits=8")], profiles.load(path))
    assert "/nope/Conv" in str(info.value) and "pin" in str(info.value)


def weighted(model, fixed) -> dict:
    """The fixed units that are weighted layers (the units without weights with one width are fixed too)."""
    layers = {s.name for s in model.layers}
    return {n: c for n, c in fixed.items() if n in layers}


def build_fork():
    """x(N,3,8,8) -> convA, x -> convB; Add -> Relu -> convC(y). convA and convB read the same tensor x."""
    return make_model(
        [node("Conv", ["x", "WA"], ["a"], "convA", pads=[1, 1, 1, 1]),
         node("Conv", ["x", "WB"], ["b"], "convB", pads=[1, 1, 1, 1]),
         node("Add", ["a", "b"], ["s"], "add"), node("Relu", ["s"], ["r"], "relu"),
         node("Conv", ["r", "WC"], ["y"], "convC", pads=[1, 1, 1, 1])],
        [vi("x", ["N", 3, 8, 8])], [vi("y", ["N", 4, 8, 8])],
        {"WA": arr(31, 4, 3, 3, 3), "WB": arr(32, 4, 3, 3, 3), "WC": arr(33, 4, 4, 3, 3)})


def test_layers_reading_one_tensor_at_different_widths_cost_a_requantize(tmp_path):
    """convA and convB read x: they may read it at different widths (x stored at the widest, a requantize
    for the other), costed in BitOps; a profile without requantizes ties them instead."""
    path = tmp_path / "fork.onnx"
    onnx.save(build_fork(), str(path))
    fork = graph.load(path)
    names = [u.name for u in fork.points().units]
    assert names == ["convA", "convB", "add", "convC"]
    cands = parse_candidates((8,), (8, 16))
    # convA prefers a16, convB prefers a8 (by more), convC prefers a16; the Add does not care
    scores = {"convA": {"w8a8": 1.0, "w8a16": 0.0}, "convB": {"w8a8": 0.0, "w8a16": 3.0},
              "convC": {"w8a8": 1.0, "w8a16": 0.0}, "add": {"a8": 0.0, "a16": 0.0}}
    table = SensitivityTable("hand", ("w8a8", "w8a16", "a8", "a16"),
                             tuple(LayerScores(n, "Conv", scores[n]) for n in names), 0, 0)
    problem, _ = build_problem(fork, table, cands, [parse_budget("avg-bits=8")], profiles.load(None))
    assert problem.ties == ()
    for method in ("ilp", "ilp-cpsat"):
        alloc = solve(problem, method)
        assert (alloc.choice["convA"], alloc.choice["convB"], alloc.choice["convC"]) == ("w8a16", "w8a8", "w8a16")
    strict = profiles.parse("ops: {default: {weights: [8], activations: [8, 16]}}\nrequantize: false\n")
    problem, _ = build_problem(fork, table, cands, [parse_budget("avg-bits=8")], strict)
    tied = {tuple(sorted(problem.layers[i] for i in group)) for group in problem.ties}
    # x has no writer; a and b are written by the convs and read by the Add; r by the Add and read by convC
    assert tied == {("add", "convA", "convB", "convC")}
    for method in ("ilp", "ilp-cpsat"):
        alloc = solve(problem, method)
        assert len({alloc.choice[n][-2:] for n in names}) == 1, method  # one activation width for all
    assert tied_ok(problem, [problem.candidates.index(alloc.choice[n]) for n in problem.layers])


def test_requantize_bitops_are_in_the_budget(tmp_path):
    """BitOps of the fork with convA at a16 and convB at a8: x stored at 16 bits (the graph input is
    quantized at its widest reader) needs no requantize; a and b (written at 16 and 8) are read by the Add;
    an Add at a8 reads a through a requantize of n = 4*8*8 elements: n * 16 * 8 BitOps."""
    path = tmp_path / "fork.onnx"
    onnx.save(build_fork(), str(path))
    fork = graph.load(path)
    cands = parse_candidates((8,), (8, 16))
    problem, _ = build_problem(fork, None, cands, [parse_budget("bitops=1e12")], profiles.load(None))
    pick = {"convA": "w8a16", "convB": "w8a8", "add": "a8", "convC": "w8a8"}
    index = [problem.candidates.index(pick[n]) for n in problem.layers]
    macs = {u.name: u.macs for u in fork.points().units}
    plain = macs["convA"] * 8 * 16 + macs["convB"] * 64 + macs["convC"] * 64
    assert totals(problem, index)["bitops"] == plain + 4 * 8 * 8 * 16 * 8
    same = [problem.candidates.index({"convA": "w8a8", "add": "a8"}.get(n, pick[n])) for n in problem.layers]
    assert totals(problem, same)["bitops"] == macs["convA"] * 64 + macs["convB"] * 64 + macs["convC"] * 64
    tight = replace(problem, limits={"bitops": plain + 100.0})
    alloc = solve(tight, "ilp")  # the requantize does not fit: no mixed pair around the Add
    chosen = [tight.candidates.index(alloc.choice[n]) for n in tight.layers]
    assert totals(tight, chosen)["bitops"] <= plain + 100.0


# ---------------------------------------------------------------- the --max-drop searches (fake judge)


def drop_problem(allowed=None) -> Problem:
    """Four layers of 100 params at 2, 4 or 8 bits; the judge's drop is (8 - average bits) / 100."""
    bits = np.array([2, 4, 8])
    scores = np.array([[3.0, 1.0, 0.0], [4.0, 1.5, 0.0], [2.0, 0.5, 0.0], [5.0, 2.0, 0.0]])
    cost = np.tile(100.0 * bits, (4, 1))

    def fidelity(index):
        return (8 - float(np.mean([bits[c] for c in index]))) / 100

    return Problem(tuple(f"l{i}" for i in range(4)), ("w2a8", "w4a8", "w8a8"), scores, {"avg-bits": cost},
                   {"avg-bits": np.inf}, allowed=None if allowed is None else np.asarray(allowed, bool),
                   units={"avg-bits": 400.0}, offsets={"avg-bits": 0.0}, weight_bits=(2, 4, 8), act_bits=(8, 8, 8),
                   fidelity=fidelity)


@pytest.mark.parametrize("method", ["greedy", "ilp"])
def test_drop_search_takes_the_smallest_point_within_the_drop(method):
    from onnxmpq.pipeline import plan

    problem = drop_problem()
    alloc, search = plan._drop_search(problem, SearchConfig(method=method, max_drop=0.03))
    assert alloc.details["drop"] <= 0.03 and alloc.details["measured"] == len(search)
    within = [p for p in search if p["drop"] <= 0.03]
    assert alloc.costs["avg-bits"] == pytest.approx(min(p["avg-bits"] for p in within))
    assert alloc.costs["avg-bits"] == pytest.approx(8 - 100 * alloc.details["drop"])
    # monotone judge: the next point of the list is measured and over the limit
    points = {p["point"]: p for p in search}
    best = next(i for i, p in points.items() if p["avg-bits"] == pytest.approx(alloc.costs["avg-bits"]))
    assert points[best + 1]["drop"] > 0.03


def test_drop_search_most_precise_over_the_limit_exit_2():
    from onnxmpq.pipeline import plan

    problem = Problem(**{**drop_problem().__dict__, "fidelity": lambda index: 0.5})
    with pytest.raises(ConstraintError) as info:
        plan._drop_search(problem, SearchConfig(method="greedy", max_drop=0.1))
    assert info.value.exit_code == 2 and "most precise" in str(info.value)


def test_greedy_drop_search_with_a_rule_limited_layer():
    from onnxmpq.pipeline import plan

    problem = drop_problem(allowed=[[True] * 3, [True] * 3, [True] * 3, [False, True, True]])
    alloc, _ = plan._drop_search(problem, SearchConfig(method="greedy", max_drop=0.5))
    assert alloc.choice == {"l0": "w2a8", "l1": "w2a8", "l2": "w2a8", "l3": "w4a8"}


@pytest.mark.parametrize("method", ["ilp", "eagl"])
def test_ilp_drop_search_with_a_rule_limited_layer(method):
    """Layer 3 may not take 2 bits (a profile rule, or --keep): the smallest average is (2*3 + 4) / 4 = 2.5.
    Every point is within a drop of 0.5, so the answer is the most compressed feasible one, 2.5 bits."""
    from onnxmpq.pipeline import plan

    problem = drop_problem(allowed=[[True] * 3, [True] * 3, [True] * 3, [False, True, True]])
    alloc, _ = plan._drop_search(problem, SearchConfig(method=method, max_drop=0.5))
    assert alloc.costs["avg-bits"] == pytest.approx(2.5)


# ---------------------------------------------------------------- the CLI end to end


FAST = ["--metric", "weight-entropy", "--rounding", "nearest", "--limit", "32", "-q"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("plan")


@pytest.fixture(scope="module")
def quantize(folder):
    """Runs `onnxmpq quantize RESNET -o folder/NAME.onnx --calib CALIB ARGS --json` once per name."""
    runs = {}

    def run(name, *args, fast=FAST):
        if name not in runs:
            out = folder / f"{name}.onnx"
            code, stdout, err = cli("quantize", RESNET, "-o", out, "--calib", CALIB, "--cache", folder / "cache",
                                    *args, *fast, "--json")
            runs[name] = (code, json.loads(stdout) if code == 0 else None, stdout, err, out)
        return runs[name]
    return run


def bits_of(report) -> dict[str, tuple]:
    return {layer["name"]: (layer["weight_bits"], layer["act_bits"]) for layer in report["layers"]}


def test_npu_profile_end_to_end(quantize):
    code, report, _, err, out = quantize("npu", "--profile", "npu-w4a8", "--budget", "avg-bits=5")
    assert code == 0, err
    bits = bits_of(report)
    assert {w for w, _ in bits.values()} == {4, 8}
    assert {a for _, a in bits.values()} == {8}
    assert bits[GEMM] == (8, 8)
    assert report["avg_weight_bits"] <= 5 + 1e-9
    alloc = report["allocation"]
    assert alloc["profile"] == "npu-w4a8" and alloc["costs"]["avg-bits"] == pytest.approx(report["avg_weight_bits"])
    assert hardware.check(onnx.load(str(out)), "npu-w4a8") == []
    # the same file breaks int8-only (4-bit weights), so the check is not vacuous
    assert any(v.rule == "pair" for v in hardware.check(onnx.load(str(out)), "int8-only"))


def test_npu_profile_infeasible_names_the_smallest_value(quantize, params):
    code, _, stdout, err, out = quantize("npu-tight", "--profile", "npu-w4a8", "--budget", "avg-bits=3")
    assert code == 2
    smallest = sum(p * (8 if n == GEMM else 4) for n, p in params.items()) / sum(params.values())
    line = one_error_line(err, stdout)
    assert "avg-bits=3 " in line and f"smallest achievable is {smallest:.6g} " in line
    assert not out.exists()


def test_infeasible_budget_exit_2(quantize):
    code, _, stdout, err, out = quantize("tiny", "--budget", "avg-bits=1.5")
    assert code == 2
    assert "smallest achievable is 2 " in one_error_line(err, stdout)
    assert not out.exists()


def test_keep_end_to_end(quantize, params):
    code, report, _, err, _ = quantize("keep", "--keep", f"{FIRST}=8:8", "--budget", "avg-bits=3")
    assert code == 0, err
    bits = bits_of(report)
    assert bits[FIRST] == (8, 8)
    assert report["allocation"]["fixed"] == {FIRST: "w8a8"}
    assert report["allocation"]["keep"] == {FIRST: "w8a8"}
    avg = sum(params[n] * w for n, (w, _) in bits.items()) / sum(params.values())
    assert report["avg_weight_bits"] == pytest.approx(avg) and avg <= 3 + 1e-9
    assert report["allocation"]["costs"]["avg-bits"] == pytest.approx(avg)


def test_eagl_end_to_end(quantize):
    code, report, _, err, _ = quantize("eagl", "--method", "eagl", "--bits", "2,4", "--budget", "avg-bits=3")
    assert code == 0, err
    widths = {w for w, _ in bits_of(report).values()}
    assert widths <= {2, 4} and len(widths) == 2
    assert report["avg_weight_bits"] <= 3 + 1e-9
    alloc = report["allocation"]
    assert alloc["solver"].startswith("eagl") and alloc["metric"] == "weight-entropy"
    assert alloc["costs"]["avg-bits"] == pytest.approx(report["avg_weight_bits"])


def test_greedy_max_drop_search(quantize):
    code, report, _, err, _ = quantize("greedy-drop", "--method", "greedy", "--max-drop", "0.05")
    assert code == 0, err
    alloc = report["allocation"]
    assert alloc["budgets"] == [] and alloc["max_drop"] == 0.05
    details = alloc["details"]
    assert details["drop"] <= 0.05
    assert details["measured"] == len(alloc["search"]) >= 2
    drops = {p["point"]: p["drop"] for p in alloc["search"]}
    chosen = next(p for p in alloc["search"] if p["drop"] == details["drop"]
                  and p["avg-bits"] == pytest.approx(alloc["costs"]["avg-bits"]))
    # the binary search ends where the next point of the walk breaks the limit
    assert chosen["point"] + 1 in drops and drops[chosen["point"] + 1] > 0.05
    assert alloc["costs"]["avg-bits"] == pytest.approx(report["avg_weight_bits"]) and report["avg_weight_bits"] < 8
    check = report["verification"]
    # the search and the verification score nearest-rounded models on the same held-out samples (the 224
    # after the 32 used for calibration); allow one sample of slack for the two builds' statistics
    assert check["held_out"] and check["samples"] == 224
    assert check["drop"] <= 0.05 + 1 / check["samples"]


@pytest.mark.e2e
def test_threshold_max_drop(quantize):
    code, report, _, err, _ = quantize("threshold", "--method", "threshold", "--max-drop", "0.05", "--trials", "8",
                                       "--bits", "2,4,8", fast=["--rounding", "nearest", "--limit", "32", "-q"])
    assert code == 0, err
    alloc = report["allocation"]
    details = alloc["details"]
    assert set(details) >= {"tau", "window", "levels", "trials", "drop"}
    assert 0.5 <= details["tau"] <= 1.5 and details["window"] in (1, 3, 5, 7, 9)
    low, high = details["levels"]
    assert low < high and {low, high} <= {2, 4, 8} and details["trials"] == 8
    assert details["drop"] <= 0.05
    assert alloc["metric"] == "output-entropy" and alloc["solver"].startswith("threshold")
    assert {w for w, _ in bits_of(report).values()} <= {low, high}
    assert report["verification"]["drop"] <= 0.05 + 1 / report["verification"]["samples"]


def test_budget_answer_over_max_drop_exit_2(quantize):
    # the most precise choice is within 0.01 (the check before the sweep passes); the avg-bits=2 answer is not
    code, _, stdout, err, out = quantize("violated", "--budget", "avg-bits=2", "--max-drop", "0.01")
    assert code == 2
    line = one_error_line(err, stdout)
    assert "--max-drop 0.01" in line and "measured drop" in line
    assert not out.exists()


@pytest.mark.parametrize("value", ["1.5", "-0.1", "1"])
def test_max_drop_out_of_range_exit_1(quantize, value):
    code, _, stdout, err, out = quantize(f"bad-drop{value}", "--max-drop", value)
    assert code == 1
    assert "--max-drop" in one_error_line(err, stdout)
    assert not out.exists()


def test_no_budget_and_no_max_drop_keeps_uniform_bits(quantize):
    """Without --budget or --max-drop the method options do nothing: uniform W8A8."""
    code, report, _, err, _ = quantize("uniform", "--method", "greedy")
    assert code == 0, err
    assert report["allocation"] is None and set(bits_of(report).values()) == {(8, 8)}


@pytest.fixture(scope="module")
def sweep(folder):
    out = folder / "sw.onnx"
    code, stdout, err = cli("quantize", RESNET, "-o", out, "--calib", CALIB, "--cache", folder / "cache",
                            "--sweep", "avg-bits=3:5:1", "--sweep-models", "--json", *FAST)
    return code, stdout, err, out


def test_sweep_writes_frontier_and_plot(sweep):
    code, stdout, err, out = sweep
    assert code == 0, err
    result = json.loads(stdout)
    json_path, png = out.with_name("sw.sweep.json"), out.with_name("sw.sweep.png")
    assert json_path.exists() and png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(json_path.read_text())
    assert data["kind"] == "avg-bits" and data["points"] == result["points"]
    points = data["points"]
    assert [p["value"] for p in points] == [3, 4, 5]
    for p in points:
        assert "error" not in p, p
        assert p["avg_weight_bits"] <= p["value"] + 1e-9
        assert 0 <= p["drop"] <= 1
    assert data["frontier"] and set(data["frontier"]) <= {0, 1, 2}
    sizes = [p["weight_bytes"] for p in points]
    assert sizes == sorted(sizes)  # a larger budget never gives a smaller model here
    # every frontier point is undominated
    for i in data["frontier"]:
        assert not any(points[j]["weight_bytes"] < points[i]["weight_bytes"] and points[j]["drop"] < points[i]["drop"]
                       for j in range(3))
    assert not out.exists()


def test_sweep_models_are_valid_and_run(sweep):
    import onnxruntime as ort

    code, stdout, err, out = sweep
    assert code == 0, err
    points = json.loads(stdout)["points"]
    x = np.load(CALIB)["input"][:4]
    for p, value in zip(points, ("3", "4", "5")):
        path = out.with_name(f"sw.{value}.onnx")
        assert path.exists() and Path(p["model"]) == path
        onnx.checker.check_model(str(path), full_check=True)
        assert api.inspect(path)["avg_weight_bits"] == pytest.approx(p["avg_weight_bits"])
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (logits,) = sess.run(None, {sess.get_inputs()[0].name: x})
        assert logits.shape == (4, 10) and np.isfinite(logits).all()


def test_an_unreachable_drop_limit_fails_before_the_sensitivity_sweep(monkeypatch, tmp_path):
    """The most precise choice is judged first: a limit it cannot meet costs one build, not a sweep, and
    the error says how finely the held-out samples resolve a drop."""
    from onnxmpq.errors import ConstraintError
    from onnxmpq.pipeline import api, stages

    def no_sweep(*args, **kwargs):
        raise AssertionError("the sensitivity sweep ran")

    monkeypatch.setattr(stages, "measure", no_sweep)
    with pytest.raises(ConstraintError) as info:
        api.quantize(ROOT / "models" / "resnet20_cifar10.onnx", tmp_path / "q.onnx",
                     ROOT / "calibration" / "cifar10_train256.npz", limit=32, rounding="nearest",
                     search={"weight_bits": "2", "max_drop": 0.0})
    text = str(info.value)
    assert "most precise choice (w2a8 everywhere)" in text and "224 held-out samples" in text, text
    assert info.value.exit_code == 2 and not (tmp_path / "q.onnx").exists()


def test_a_budget_that_admits_one_allocation_measures_no_sensitivity(monkeypatch, tmp_path):
    """avg-bits=4 over candidates {4, 8} leaves every layer one choice: the sweep is skipped, and the
    written model has every layer at 4 bits."""
    from onnxmpq.pipeline import stages

    def no_sweep(*args, **kwargs):
        raise AssertionError("the sensitivity sweep ran")

    monkeypatch.setattr(stages, "measure", no_sweep)
    report = api.quantize(RESNET, tmp_path / "q.onnx", CALIB, limit=64, rounding="nearest", budgets=["avg-bits=4"],
                          search={"weight_bits": "4,8"}, verify=False)
    assert {layer.weight_bits for layer in report.layers} == {4}
    assert "sensitivity" not in report.stages


def test_under_a_tight_budget_only_the_layers_with_a_choice_are_probed(monkeypatch, tmp_path, params):
    """A budget a little over the cheapest total: a layer whose wider choice would overrun it on its own
    is not probed, and the probed ones are exactly those `allocate.reachable` leaves two choices."""
    from onnxmpq.pipeline import stages

    real, asked = stages.measure, {}

    def spy(*args, **kwargs):
        asked["only"] = kwargs["only"]
        tables = real(*args, **kwargs)
        asked["rows"] = {row.name for row in tables[0].layers}
        return tables

    monkeypatch.setattr(stages, "measure", spy)
    total = sum(params.values())
    small = min(params.values())  # one small layer at 8 bits fits; the large ones do not
    budget = (4 * total + 4 * small * 1.5) / total
    report = api.quantize(RESNET, tmp_path / "q.onnx", CALIB, limit=32, rounding="nearest",
                          budgets=[f"avg-bits={budget}"], search={"weight_bits": "4,8", "probes": "exact"},
                          verify=False)
    choices = {name: keys for name, keys in asked["only"].items() if len(keys) > 1}
    assert 0 < len(choices) < len(params) and set(choices) == asked["rows"]
    assert all(4 * params[name] * 1.0 <= 4 * small * 1.5 for name in choices)
    assert all(4 * params[name] > 4 * small * 1.5 for name in params if name not in choices)
    assert report.avg_weight_bits <= budget + 1e-9


@pytest.mark.parametrize("probe_rounding, probed", [("auto", "gptq"), (None, "nearest")])
def test_probes_round_as_probe_rounding_says_and_the_model_as_rounding_says(monkeypatch, tmp_path, probe_rounding,
                                                                              probed):
    from onnxmpq.pipeline import stages

    real, asked = stages.measure, []

    def spy(*args, **kwargs):
        asked.append(str(kwargs["rounding"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(stages, "measure", spy)
    report = api.quantize(RESNET, tmp_path / "q.onnx", CALIB, limit=16, rounding="gptq", budgets=["avg-bits=5"],
                          search={"weight_bits": "4,8", "metric": "sqnr", "probes": "fast",
                                  **({"probe_rounding": probe_rounding} if probe_rounding else {})}, verify=False)
    assert asked == [probed]
    assert report.settings["rounding"] == "gptq" and "gptq" in report.stages


def test_a_cached_full_table_serves_a_pruned_budget_and_a_pruned_table_never_a_full_one(monkeypatch, tmp_path, params):
    from onnxmpq.sensitivity import parallel

    real, runs = parallel.measure, []

    def counting(*args, **kwargs):
        runs.append(kwargs.get("only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(parallel, "measure", counting)
    small = min(params.values())
    tight = (4 * sum(params.values()) + 6 * small) / sum(params.values())

    def quantize(budget, cache):
        api.quantize(RESNET, tmp_path / "q.onnx", CALIB, limit=16, rounding="nearest", budgets=[f"avg-bits={budget}"],
                     search={"weight_bits": "4,8", "probes": "exact", "cache_dir": str(tmp_path / cache)},
                     verify=False)

    quantize(7, "full-first")       # nothing ruled out: the full table, cached
    quantize(tight, "full-first")   # served by it
    assert runs == [None]
    quantize(tight, "pruned-first")  # a narrowed table, cached under its narrowing
    quantize(7, "pruned-first")      # which cannot serve the full request
    assert runs[1] is not None and runs[2] is None and len(runs) == 3
