"""Hostile and odd inputs through every CLI command that applies: no traceback, no hang, no damage.

The contract checked for every run: the exit code is 0, 1 (user error) or 2 (budget or rule violated);
a failed run prints a short error (a few lines, never "Traceback") on stderr and leaves no output file
and no stray temporary file (`.onnxmpq-*`) anywhere; a successful quantize writes a model that passes
`onnx.checker.check_model(full_check=True)`, runs in onnxruntime's CPU provider (unless the input holds
a custom-domain op that onnxruntime cannot run) and reads back with `inspect`; the input files (model,
external data, calibration data, neighbours) keep their bytes and mtime. Where the contract says a
refusal is required (external data outside the model's folder, an infeasible budget, an output that is
an input, bits outside 2..16, ...) the exact exit code is asserted too.

Cases are built in tmp_path by the tests themselves. The first quantize of every malformed-file case
(and its inspect) runs as a subprocess of the installed `onnxmpq` script, the truest check for
tracebacks (16 subprocesses, those of one case started together); every other command runs in-process through
`onnxmpq.cli.main` under a SIGALRM watchdog, so a hang fails the case instead of blocking the suite.
`HOSTILE_VERBOSE=1 pytest -s tests/e2e/test_hostile.py` prints every command with its exit code.

Cases: 73 parametrized, running 379 commands in all (plus an `inspect` of every model written):
  malformed files (10): truncated protobuf, random bytes, text file named .onnx, empty file, a model
      without a graph, external data missing, external data at "../secret.bin" and at an absolute path
      (both must be refused), external data file too short, external data in a sub-folder (valid);
  graphs (19): empty graph, only custom-domain ops ("com.example"), a custom op beside a Conv, unnamed
      nodes and duplicate node names, dynamic dims, a zero-size weight dim, a zero-size input dim,
      weights in Constant nodes, one initializer shared by two Convs, a Conv inside If (condition
      computed, and condition fed as a rank-0 input) / Loop / Scan, a node reading an undefined tensor,
      two nodes writing one tensor, initializers listed as graph inputs (IR 3), float16, a weight tied
      between Gather and Gemm with an int64 input, names with spaces, '=', ':', '/', unicode, 300 chars;
  opsets 8..25 (18) of a small Conv+Gemm model built directly at each opset: quantize, inspect and
      sensitivity must all succeed (none needs a skip with onnx 1.23 / onnxruntime 1.32; a skip with the
      reason is taken where either cannot build or run the float model);
  weights (4): NaN, +Inf, -Inf, all zero;
  calibration data (11, all refused with exit 1): NaN, Inf, an empty .npz, 0 samples, wrong input name,
      an extra key, rank 2 and rank 3 for a rank-4 input, int64 and string dtypes, wrong shape;
  options (11): bits outside 2..16 (16 spellings over -w, -a, --layer-bits, --bits, --act-bits), an
      infeasible budget (`--budget avg-bits=1.5 --bits 2,4` and two more: exit 2), malformed budgets,
      output path equal to the model / the calibration file / the model spelt another way, --report onto
      the model and onto the calibration file, output / report / plot into a non-existent folder,
      nonsense numbers (--limit 0, --batch-size 0, --percentile 200, unknown metric, ...), a negative
      solver time limit, directories where files are expected.

Bugs found are marked xfail(strict=True) with the reason in `XFAIL`.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import arr, build_cnn, build_constant_weights, build_if_model, build_unnamed, feed_for, model, node, vi
from onnx import TensorProto, helper, numpy_helper

from onnxmpq.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
# the console script installed beside the interpreter running the tests (the project's .venv), else .venv's
CLI = next((p for p in (Path(sys.executable).parent / "onnxmpq", ROOT / ".venv" / "bin" / "onnxmpq") if p.exists()),
           ROOT / ".venv" / "bin" / "onnxmpq")
TIMEOUT = 120  # seconds per command: a hang fails the case
MAX_ERR_LINES = 4
# numpy warns while GPTQ rounds the Inf/NaN weights of the weight cases; the outcome is what is checked
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
ANY = frozenset({0, 1, 2})
USER_ERROR = frozenset({1})
VERBOSE = bool(os.environ.get("HOSTILE_VERBOSE"))  # print every command, its exit code and last stderr line


# ---------------------------------------------------------------- case description


@dataclass
class Run:
    """One command: argv (paths as Path), the exit codes allowed, and the model it writes on success."""

    argv: list
    codes: frozenset = ANY
    output: Path | None = None
    message: str | None = None  # a word the error must contain (case-insensitive) when the run fails
    sub: bool = False           # run the installed script in a subprocess (else onnxmpq.cli.main in-process)


@dataclass
class Case:
    runs: list[Run]
    feed: dict | None = None          # inputs to run a written model with (default: from the calibration data)
    runnable: bool = True             # False: the model holds ops onnxruntime cannot run (custom domain)
    forbidden: list[Path] = field(default_factory=list)  # paths that must not exist after the runs


def in_dir(d: Path) -> Path:
    (d / "in").mkdir(exist_ok=True)
    return d / "in"


def out_dir(d: Path) -> Path:
    (d / "out").mkdir(exist_ok=True)
    return d / "out"


def save(d: Path, proto: onnx.ModelProto, name: str = "model.onnx") -> Path:
    path = in_dir(d) / name
    path.write_bytes(proto.SerializeToString())
    return path


def calib_for(d: Path, proto: onnx.ModelProto, batch: int = 4, name: str = "calib.npz", **override) -> Path:
    """An .npz with one array per graph input that is not an initializer (batch dim = `batch`)."""
    inits = {t.name for t in proto.graph.initializer}
    feed = {k: v for k, v in feed_for(proto, batch).items() if k not in inits}
    feed.update(override)
    path = in_dir(d) / name
    np.savez(path, **feed)
    return path


def standard_runs(d: Path, m: Path, c: Path | None) -> list[Run]:
    """quantize W8A8 (nearest), W4A8 (auto = GPTQ), weight-only W2 without data; inspect; sensitivity;
    evaluate against the input model; and quantize with a JSON report."""
    o = out_dir(d)
    runs = [Run(["-q", "quantize", m, "-o", o / "w2.onnx", "-w", "2", "-a", "float"], output=o / "w2.onnx"),
            Run(["inspect", m, "--json"])]
    if c is not None:
        runs += [
            Run(["-q", "quantize", m, "-o", o / "w8a8.onnx", "--calib", c, "--limit", "8", "-w", "8", "-a", "8",
                 "--report", o / "w8a8.json"], output=o / "w8a8.onnx"),
            Run(["-q", "quantize", m, "-o", o / "w4a8.onnx", "--calib", c, "--limit", "8", "-w", "4", "-a", "8"],
                output=o / "w4a8.onnx"),
            Run(["-q", "sensitivity", m, "--calib", c, "--limit", "8", "--bits", "4,8", "--json",
                 "-o", o / "sens.json"]),
            Run(["-q", "evaluate", m, "--data", c, "--reference", m, "--limit", "8", "--json"]),
        ]
    return runs


def data_runs(d: Path, m: Path, c: Path, codes=USER_ERROR, message=None) -> list[Run]:
    """Every command that reads calibration or evaluation data, each expected to refuse `c`."""
    o = out_dir(d)
    return [Run(["-q", "quantize", m, "-o", o / "q.onnx", "--calib", c, "--limit", "8"], codes, o / "q.onnx", message),
            Run(["-q", "quantize", m, "-o", o / "q4.onnx", "--calib", c, "-w", "4", "-a", "float"], codes,
                o / "q4.onnx", message),
            Run(["-q", "sensitivity", m, "--calib", c, "--limit", "8", "--bits", "4", "--json"], codes, None, message),
            Run(["-q", "evaluate", m, "--data", c, "--reference", m, "--json"], codes, None, message),
            Run(["-q", "compare", m, m, "--data", c, "--json"], codes, None, message)]


# ---------------------------------------------------------------- builders of odd models


def conv_gemm(opset: int) -> onnx.ModelProto:
    """x(N,3,6,6) -Conv3x3+b- Relu -Flatten- Gemm(5, transB)+c- y(N,5), built directly at `opset`."""
    return model(
        [node("Conv", ["x", "W1", "B1"], ["c1"], "conv", pads=[1, 1, 1, 1]),
         node("Relu", ["c1"], ["r1"], "relu"),
         node("Flatten", ["r1"], ["f"], "flatten"),
         node("Gemm", ["f", "W2", "B2"], ["y"], "fc", transB=1)],
        [vi("x", ["N", 3, 6, 6])], [vi("y", ["N", 5])],
        {"W1": arr(31, 4, 3, 3, 3, scale=0.3), "B1": arr(32, 4, scale=0.1), "W2": arr(33, 5, 144, scale=0.1),
         "B2": arr(34, 5, scale=0.1)}, opset)


def custom_only() -> onnx.ModelProto:
    m = model([helper.make_node("Mystery", ["x"], ["h"], name="mystery", domain="com.example"),
               helper.make_node("Enigma", ["h"], ["y"], name="enigma", domain="com.example")],
              [vi("x", ["N", 4])], [vi("y", ["N", 4])])
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    return m


def custom_beside_conv() -> onnx.ModelProto:
    m = model([node("Conv", ["x", "W"], ["c"], "conv", pads=[1, 1, 1, 1]),
               helper.make_node("Mystery", ["c"], ["y"], name="mystery", domain="com.example")],
              [vi("x", ["N", 2, 4, 4])], [vi("y", ["N", 3, 4, 4])], {"W": arr(40, 3, 2, 3, 3)})
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    return m


def dynamic_dims() -> onnx.ModelProto:
    """x(N,3,H,W) -Conv- GlobalAveragePool -Flatten- Gemm -> y(N,4), and a MatMul over a dynamic T axis."""
    return model([node("Conv", ["x", "W1"], ["c"], "conv", pads=[1, 1, 1, 1]),
                  node("GlobalAveragePool", ["c"], ["p"], "gap"),
                  node("Flatten", ["p"], ["f"], "flatten"),
                  node("Gemm", ["f", "W2"], ["y"], "fc"),
                  node("MatMul", ["s", "W3"], ["z"], "mm")],
                 [vi("x", ["N", 3, "H", "W"]), vi("s", ["N", "T", 6])], [vi("y", ["N", 4]), vi("z", ["N", "T", 2])],
                 {"W1": arr(41, 5, 3, 3, 3), "W2": arr(42, 5, 4), "W3": arr(43, 6, 2)})


def zero_weight_dim() -> onnx.ModelProto:
    """A Gemm whose weight has 0 output columns beside an ordinary one: y0(N,0), y(N,3)."""
    return model([node("Gemm", ["x", "W0"], ["y0"], "empty_fc"), node("Gemm", ["x", "W1"], ["y"], "fc")],
                 [vi("x", ["N", 6])], [vi("y0", ["N", 0]), vi("y", ["N", 3])],
                 {"W0": np.zeros((6, 0), np.float32), "W1": arr(44, 6, 3)})


def zero_input_dim() -> onnx.ModelProto:
    """x(N,0) @ W(0,4) + b: a MatMul over a zero-size reduction axis (the output is the bias)."""
    return model([node("MatMul", ["x", "W"], ["m"], "mm"), node("Add", ["m", "b"], ["y"], "add")],
                 [vi("x", ["N", 0])], [vi("y", ["N", 4])], {"W": np.zeros((0, 4), np.float32), "b": arr(45, 4)})


def shared_weight() -> onnx.ModelProto:
    """Two Convs reading the same initializer W, their outputs added."""
    return model([node("Conv", ["x", "W"], ["a"], "conv_a", pads=[1, 1, 1, 1]),
                  node("Relu", ["a"], ["r"], "relu"),
                  node("Conv", ["r", "W", "B"], ["b"], "conv_b", pads=[1, 1, 1, 1]),
                  node("Add", ["a", "b"], ["y"], "add")],
                 [vi("x", ["N", 3, 5, 5])], [vi("y", ["N", 3, 5, 5])], {"W": arr(46, 3, 3, 3, 3, scale=0.3),
                                                                         "B": arr(47, 3, scale=0.1)})


def loop_model() -> onnx.ModelProto:
    """Conv, then a Loop (2 trips) whose body applies a Conv to the carried tensor."""
    body = helper.make_graph(
        [node("Conv", ["h_in", "Wloop"], ["h_out"], "conv_in_loop", pads=[1, 1, 1, 1]),
         node("Identity", ["cond_in"], ["cond_out"], "cond_id")],
        "body", [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL), vi("h_in", ["N", 2, 4, 4])],
        [vi("cond_out", [], TensorProto.BOOL), vi("h_out", ["N", 2, 4, 4])],
        [numpy_helper.from_array(arr(48, 2, 2, 3, 3, scale=0.3), "Wloop")])
    return model([node("Conv", ["x", "Wtop"], ["h"], "conv_top", pads=[1, 1, 1, 1]),
                  node("Loop", ["trips", "yes", "h"], ["y"], "loop", body=body)],
                 [vi("x", ["N", 2, 4, 4])], [vi("y", ["N", 2, 4, 4])],
                 {"Wtop": arr(49, 2, 2, 3, 3, scale=0.3), "trips": np.array(2, np.int64), "yes": np.array(True)})


def scan_model() -> onnx.ModelProto:
    """x(N,T=3,2,4,4) scanned over axis 1 with a Conv in the body, then Flatten + Gemm -> y(N,5)."""
    body = helper.make_graph([node("Conv", ["s", "Wscan"], ["t"], "conv_in_scan", pads=[1, 1, 1, 1])], "body",
                             [vi("s", ["N", 2, 4, 4])], [vi("t", ["N", 2, 4, 4])],
                             [numpy_helper.from_array(arr(50, 2, 2, 3, 3, scale=0.3), "Wscan")])
    return model([node("Scan", ["x"], ["st"], "scan", body=body, num_scan_inputs=1, scan_input_axes=[1],
                       scan_output_axes=[1]),
                  node("Flatten", ["st"], ["f"], "flatten"),
                  node("Gemm", ["f", "Wfc"], ["y"], "fc", transB=1)],
                 [vi("x", ["N", 3, 2, 4, 4])], [vi("y", ["N", 5])], {"Wfc": arr(51, 5, 96, scale=0.1)})


def if_model_computed_cond() -> onnx.ModelProto:
    """conftest's If model with its condition computed in the graph (mean(x) > -1e9), not fed as a scalar."""
    m = build_if_model()
    del m.graph.input[1]
    cond_nodes = [node("ReduceMean", ["x"], ["mean"], "mean", keepdims=0),
                  node("Greater", ["mean", "floor"], ["cond"], "greater")]
    for i, n in enumerate(cond_nodes):
        m.graph.node.insert(i, n)
    m.graph.initializer.append(numpy_helper.from_array(np.array(-1e9, np.float32), "floor"))
    return m


def undefined_input() -> onnx.ModelProto:
    return model([node("Conv", ["x", "W"], ["c"], "conv"), node("Add", ["c", "ghost"], ["y"], "add")],
                 [vi("x", ["N", 2, 3, 3])], [vi("y", ["N", 2, 1, 1])], {"W": arr(52, 2, 2, 3, 3)})


def two_writers() -> onnx.ModelProto:
    """Two nodes writing the same tensor (not SSA)."""
    return model([node("Conv", ["x", "W"], ["c"], "conv_1"), node("Conv", ["x", "W"], ["c"], "conv_2"),
                  node("Relu", ["c"], ["y"], "relu")],
                 [vi("x", ["N", 2, 3, 3])], [vi("y", ["N", 2, 1, 1])], {"W": arr(53, 2, 2, 3, 3)})


def initializer_as_input() -> onnx.ModelProto:
    """An IR-3 style model listing its weight among the graph inputs."""
    m = conv_gemm(9)
    m.graph.input.extend([helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                          for t in m.graph.initializer])
    m.ir_version = 3
    return m


def float16_model() -> onnx.ModelProto:
    return model([node("Conv", ["x", "W"], ["c"], "conv", pads=[1, 1, 1, 1]),
                  node("Flatten", ["c"], ["f"], "flatten"),
                  node("MatMul", ["f", "W2"], ["y"], "mm")],
                 [vi("x", ["N", 2, 3, 3], TensorProto.FLOAT16)], [vi("y", ["N", 4], TensorProto.FLOAT16)],
                 {"W": arr(54, 3, 2, 3, 3).astype(np.float16), "W2": arr(55, 27, 4).astype(np.float16)})


def with_weight_value(value: float) -> onnx.ModelProto:
    m = build_cnn()
    for t in m.graph.initializer:
        if t.name == "W1":
            w = numpy_helper.to_array(t).copy()
            if value == 0.0:
                w[:] = 0
            else:
                w[1, 0, 1, 1] = value
            t.CopyFrom(numpy_helper.from_array(w, "W1"))
    return m


# ---------------------------------------------------------------- cases


def external(d: Path, location: str | None = None, *, drop: bool = False, truncate: bool = False,
             subfolder: bool = False) -> Case:
    """The cnn with its tensors in an external file; the file or the location is then tampered with."""
    folder = in_dir(d)
    path = folder / "model.onnx"
    data_loc = "sub/weights.data" if subfolder else "weights.data"
    if subfolder:
        (folder / "sub").mkdir()
    onnx.save(build_cnn(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=data_loc, size_threshold=64)
    (d / "secret.bin").write_bytes((folder / data_loc).read_bytes())  # a readable file outside the model folder
    if drop:
        (folder / data_loc).unlink()
    if truncate:
        data = (folder / data_loc).read_bytes()
        (folder / data_loc).write_bytes(data[: len(data) // 3])
    if location is not None:
        proto = onnx.load(str(path), load_external_data=False)
        for t in proto.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location.replace("SECRET", str(d / "secret.bin"))
        path.write_bytes(proto.SerializeToString())
    c = calib_for(d, build_cnn())
    refuse = location is not None or drop or truncate
    runs = standard_runs(d, path, c) if not refuse else [
        Run(["-q", "quantize", path, "-o", out_dir(d) / "q.onnx", "--calib", c, "--limit", "4"], USER_ERROR,
            out_dir(d) / "q.onnx"),
        Run(["-q", "quantize", path, "-o", out_dir(d) / "w8.onnx", "-w", "8", "-a", "float"], USER_ERROR,
            out_dir(d) / "w8.onnx"),
        Run(["inspect", path, "--json"], USER_ERROR),
        Run(["-q", "sensitivity", path, "--calib", c, "--limit", "4", "--bits", "8", "--json"], USER_ERROR),
        Run(["-q", "evaluate", path, "--data", c, "--json"], USER_ERROR)]
    return subprocess_case(Case(runs), inspect=False)


def subprocess_case(case: Case, inspect: bool = True) -> Case:
    """The first quantize (and inspect) run as real subprocesses of the installed script, in parallel; the
    other commands in-process (each subprocess costs ~2 s of interpreter and import start-up)."""
    first = next(r for r in case.runs if r.argv[:2] == ["-q", "quantize"])
    for r in case.runs:
        r.sub = r is first or (inspect and r.argv[0] == "inspect")
    return case


def malformed(d: Path, content: bytes) -> Case:
    m = in_dir(d) / "model.onnx"
    m.write_bytes(content)
    c = calib_for(d, build_cnn())
    o = out_dir(d)
    case = Case([Run(["-q", "quantize", m, "-o", o / "q.onnx", "--calib", c], USER_ERROR, o / "q.onnx"),
                 Run(["inspect", m, "--json"], USER_ERROR),
                 Run(["-q", "sensitivity", m, "--calib", c, "--limit", "4", "--json"], USER_ERROR),
                 Run(["-q", "evaluate", m, "--data", c, "--json"], USER_ERROR),
                 Run(["-q", "compare", m, "--data", c, "--json"], USER_ERROR)])
    return subprocess_case(case)


def graph_case(d: Path, proto: onnx.ModelProto, *, runnable: bool = True, codes=ANY, readers=None, **kw) -> Case:
    """`codes` binds the runs that write a model (quantize); `readers` (default: `codes`) binds inspect,
    sensitivity and evaluate, which only read the model."""
    m = save(d, proto)
    c = calib_for(d, proto)
    runs = standard_runs(d, m, c)
    for r in runs:
        r.codes = codes if r.output is not None or readers is None else readers
    return Case(runs, runnable=runnable, **kw)


def opset_case(d: Path, opset: int) -> Case:
    proto = conv_gemm(opset)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # pragma: no cover - depends on the onnx version
        pytest.skip(f"onnx cannot build Conv+Gemm at opset {opset}: {exc}")
    try:
        ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:
        pytest.skip(f"onnxruntime cannot run opset {opset}: {str(exc).splitlines()[0]}")
    case = graph_case(d, proto)
    # a valid model at a supported opset must quantize cleanly; GPTQ and evaluate do not depend on the
    # opset (it is upgraded at load), so 18 opsets run quantize W2 and W8A8, inspect and sensitivity
    case.runs = [r for r in case.runs if not (r.output and r.output.name == "w4a8.onnx") and "evaluate" not in r.argv]
    for r in case.runs:
        r.codes = frozenset({0})
    return case


def weight_case(d: Path, value: float) -> Case:
    proto = with_weight_value(value)
    m = save(d, proto)
    c = calib_for(d, build_cnn())
    return Case(standard_runs(d, m, c))


def calib_case(d: Path, message: str | None = None, **arrays) -> Case:
    proto = build_cnn()
    m = save(d, proto)
    c = in_dir(d) / "calib.npz"
    np.savez(c, **arrays)
    return Case(data_runs(d, m, c, message=message), feed=feed_for(proto))


def good_cnn(d: Path) -> tuple[Path, Path]:
    proto = build_cnn()
    return save(d, proto), calib_for(d, proto)


def bits_case(d: Path) -> Case:
    m, c = good_cnn(d)
    o = out_dir(d)
    q = ["-q", "quantize", m, "-o", o / "q.onnx", "--calib", c, "--limit", "4"]
    runs = [Run(q + args, USER_ERROR, o / "q.onnx", "bit") for args in (
        ["-w", "1"], ["-w", "17"], ["-w", "-3"], ["-w", "4.5"], ["-w", "abc"], ["-a", "1"], ["-a", "32"],
        ["--layer-bits", "conv1=1"], ["--layer-bits", "conv1=8:17"], ["--layer-bits", "conv1=99:8"],
        ["--budget", "avg-bits=4", "--bits", "1,4"], ["--budget", "avg-bits=4", "--bits", "4,20"])]
    runs += [Run(["-q", "sensitivity", m, "--calib", c, "--limit", "4", "--bits", bits, "--json"], USER_ERROR,
                 None, "bit") for bits in ("1,4", "4,17", "0x8")]
    runs.append(Run(["-q", "sensitivity", m, "--calib", c, "--limit", "4", "--act-bits", "1", "--json"], USER_ERROR,
                    None, "bit"))
    return Case(runs)


def budget_case(d: Path) -> Case:
    m, c = good_cnn(d)
    o = out_dir(d)
    q = ["-q", "quantize", m, "-o", o / "q.onnx", "--calib", c, "--limit", "8"]
    return Case([Run(q + ["--budget", "avg-bits=1.5", "--bits", "2,4"], frozenset({2}), o / "q.onnx"),
                 Run(q + ["--budget", "weight-bytes=10B", "--bits", "2,4"], frozenset({2}), o / "q.onnx"),
                 Run(q + ["--budget", "bitops=0.001x", "--bits", "2,4", "-a", "8"], frozenset({2}), o / "q.onnx")])


def bad_budget_case(d: Path) -> Case:
    m, c = good_cnn(d)
    o = out_dir(d)
    q = ["-q", "quantize", m, "-o", o / "q.onnx", "--calib", c, "--limit", "8"]
    return Case([Run(q + ["--budget", text], USER_ERROR, o / "q.onnx") for text in
                 ("avg-bits", "avg-bits=", "avg-bits=-3", "avg-bits=nan", "avg-bits=inf", "speed=3",
                  "weight-bytes=3 parsecs", "avg-bits=0.5x", "bitops=0x")])


def same_path_case(d: Path) -> Case:
    m, c = good_cnn(d)
    other_spelling = in_dir(d) / ".." / "in" / "model.onnx"
    return Case([Run(["-q", "quantize", m, "-o", m, "--calib", c], USER_ERROR, None, "input"),
                 Run(["-q", "quantize", m, "-o", m, "-w", "8", "-a", "float"], USER_ERROR, None, "input"),
                 Run(["-q", "quantize", m, "-o", other_spelling, "-w", "8", "-a", "float"], USER_ERROR, None, "input"),
                 Run(["-q", "quantize", m, "-o", c, "--calib", c], USER_ERROR, None, "input"),
                 Run(["-q", "sensitivity", m, "--calib", c, "--limit", "4", "--bits", "8", "-o", m], USER_ERROR,
                     None, "input"),
                 Run(["-q", "sensitivity", m, "--calib", c, "--limit", "4", "--bits", "8", "-o", c], USER_ERROR,
                     None, "input")])


def report_onto_input_case(d: Path, which: str) -> Case:
    """--report naming the input model or the calibration file must be refused like -o is; the input stays."""
    m, c = good_cnn(d)
    o = out_dir(d)
    return Case([Run(["-q", "quantize", m, "-o", o / "q.onnx", "--calib", c, "--limit", "4", "--report",
                      m if which == "model" else c], USER_ERROR, o / "q.onnx", "input")])


def missing_folder_case(d: Path) -> Case:
    m, c = good_cnn(d)
    gone = d / "no" / "such" / "folder"
    return Case([Run(["-q", "quantize", m, "-o", gone / "q.onnx", "--calib", c, "--limit", "4"], USER_ERROR, None,
                     "folder"),
                 Run(["-q", "quantize", m, "-o", gone / "q.onnx", "-w", "8", "-a", "float"], USER_ERROR, None,
                     "folder"),
                 Run(["-q", "sensitivity", m, "--calib", c, "--limit", "4", "--bits", "8", "-o", gone / "s.json"],
                     USER_ERROR, None, "folder"),
                 Run(["-q", "sensitivity", m, "--calib", c, "--limit", "4", "--bits", "8", "--plot", gone / "s.png"],
                     USER_ERROR, None, "folder")], forbidden=[d / "no"])


def report_missing_folder_case(d: Path) -> Case:
    """A report into a missing folder must fail before the model is written (no half-done run)."""
    m, _ = good_cnn(d)
    o = out_dir(d)
    return Case([Run(["-q", "quantize", m, "-o", o / "q.onnx", "-w", "8", "-a", "float", "--report",
                      d / "nope" / "r.json"], USER_ERROR, o / "q.onnx", "folder")], forbidden=[d / "nope"])


def bad_numbers_case(d: Path) -> Case:
    """Nonsense sizes and settings: refused (1) where nothing sensible exists, else any clean outcome."""
    m, c = good_cnn(d)
    o = out_dir(d)
    q = ["-q", "quantize", m, "--calib", c]
    s = ["-q", "sensitivity", m, "--calib", c, "--bits", "4", "--json"]
    return Case([Run(q + ["-o", o / "a.onnx", "--limit", "0"], USER_ERROR, o / "a.onnx"),
                 Run(q + ["-o", o / "b.onnx", "--limit", "-5"], USER_ERROR, o / "b.onnx"),
                 Run(q + ["-o", o / "c.onnx", "--batch-size", "0"], USER_ERROR, o / "c.onnx"),
                 Run(q + ["-o", o / "d.onnx", "--limit", "4", "--act-range", "percentile", "--percentile", "200"],
                     ANY, o / "d.onnx"),
                 Run(q + ["-o", o / "e.onnx", "--limit", "4", "--act-range", "percentile", "--percentile", "-1"],
                     ANY, o / "e.onnx"),
                 Run(q + ["-o", o / "g.onnx", "--limit", "4", "--budget", "avg-bits=4", "--bits", "4,8",
                          "--metric", "no-such-metric"], USER_ERROR, o / "g.onnx"),
                 Run(q + ["-o", o / "h.onnx", "--limit", "4", "--layer-bits", "no_such_layer=4"], USER_ERROR,
                     o / "h.onnx", "no_such_layer"),
                 Run(q + ["-o", o / "i.onnx", "--limit", "4", "--layer-bits", "=4"], USER_ERROR, o / "i.onnx"),
                 Run(q + ["-o", o / "j.onnx", "--limit", "4", "--allocation", c], USER_ERROR, o / "j.onnx"),
                 Run(s + ["--limit", "0"], USER_ERROR),
                 Run(s + ["--limit", "4", "--metric", "bogus"], USER_ERROR, None, "bogus"),
                 Run(s + ["--limit", "4", "--metric", ","], USER_ERROR),
                 Run(s + ["--limit", "4", "--workers", "0"], ANY),
                 Run(["-q", "evaluate", m, "--data", c, "--batch-size", "0"], USER_ERROR),
                 Run(["-q", "evaluate", m, "--data", c, "--limit", "0"], USER_ERROR)])


def negative_time_limit_case(d: Path) -> Case:
    """A feasible budget with a negative solver time limit: a user error (1) about the time limit, not a
    budget violation (2); run as a subprocess so that the solver's own stderr lines are seen too."""
    m, c = good_cnn(d)
    o = out_dir(d)
    return Case([Run(["-q", "quantize", m, "-o", o / "q.onnx", "--calib", c, "--limit", "4", "--budget",
                      "avg-bits=4", "--bits", "2,4", "--time-limit", "-1"], USER_ERROR, o / "q.onnx", "time",
                     sub=True)])


def output_is_directory_case(d: Path) -> Case:
    m, c = good_cnn(d)
    o = out_dir(d)
    return Case([Run(["-q", "quantize", m, "-o", o, "-w", "8", "-a", "float"], USER_ERROR),
                 Run(["-q", "quantize", in_dir(d), "-o", o / "q.onnx", "-w", "8", "-a", "float"], USER_ERROR,
                     o / "q.onnx"),
                 Run(["inspect", in_dir(d)], USER_ERROR),
                 Run(["-q", "sensitivity", m, "--calib", c, "--limit", "4", "--bits", "8", "-o", o], USER_ERROR),
                 Run(["-q", "quantize", m, "-o", o / "r.onnx", "-w", "8", "-a", "float", "--report-dir", m],
                     USER_ERROR, o / "r.onnx")])


def tied_embedding() -> onnx.ModelProto:
    """ids(N,) int64 -Gather(E)- h(N,8) -Gemm(E, transB)- logits(N,10): one weight read by Gather and Gemm."""
    return model([node("Gather", ["E", "ids"], ["h"], "embed"),
                  node("Relu", ["h"], ["r"], "relu"),
                  node("Gemm", ["r", "E"], ["y"], "tied_head", transB=1)],
                 [vi("ids", ["N"], TensorProto.INT64)], [vi("y", ["N", 10])], {"E": arr(56, 10, 8)})


def weird_names() -> onnx.ModelProto:
    """Node and tensor names with spaces, '=', ':', '/', unicode and 300 characters."""
    long = "L" * 300
    return model([node("Conv", ["in put:0", "w/é ight=1"], ["c 1"], "conv = 1: é/ü", pads=[1, 1, 1, 1]),
                  node("Relu", ["c 1"], ["r:1"], "relu:0"),
                  node("Flatten", ["r:1"], [long], "flat//"),
                  node("Gemm", [long, "W2"], ["out"], long, transB=1)],
                 [vi("in put:0", ["N", 2, 3, 3])], [vi("out", ["N", 4])],
                 {"w/é ight=1": arr(57, 3, 2, 3, 3), "W2": arr(58, 4, 27)})


def weird_names_case(d: Path) -> Case:
    proto = weird_names()
    m = save(d, proto)
    c = calib_for(d, proto)
    o = out_dir(d)
    runs = standard_runs(d, m, c)
    for r in runs:
        r.codes = frozenset({0})
    runs.append(Run(["-q", "quantize", m, "-o", o / "named.onnx", "--calib", c, "--limit", "4",
                     "--layer-bits", "conv = 1: é/ü=2:16", "--layer-bits", f"{'L' * 300}=float:8"],
                    frozenset({0}), o / "named.onnx"))
    return Case(runs)


def tied_embedding_case(d: Path) -> Case:
    proto = tied_embedding()
    m = save(d, proto)
    c = in_dir(d) / "calib.npz"
    np.savez(c, ids=np.random.default_rng(2).integers(0, 10, size=8).astype(np.int64))
    case = Case(standard_runs(d, m, c), feed={"ids": np.arange(10, dtype=np.int64)})
    for r in case.runs:
        r.codes = frozenset({0})
    return case


X = np.random.default_rng(0).normal(size=(4, 3, 8, 8)).astype(np.float32)


def _with(value, where=(0, 0, 0, 0)):
    x = X.copy()
    x[where] = value
    return x


CASES = {
    # malformed files (subprocess)
    "truncated_protobuf": lambda d: malformed(d, build_cnn().SerializeToString()[:700]),
    "random_bytes": lambda d: malformed(d, np.random.default_rng(1).bytes(4096)),
    "text_file": lambda d: malformed(d, b"this is a text file, not a model\n" * 20),
    "empty_file": lambda d: malformed(d, b""),
    "no_graph": lambda d: malformed(d, onnx.ModelProto(ir_version=8, producer_name="x").SerializeToString()),
    "external_missing": lambda d: external(d, drop=True),
    "external_outside": lambda d: external(d, "../secret.bin"),
    "external_absolute": lambda d: external(d, "SECRET"),
    "external_truncated": lambda d: external(d, truncate=True),
    "external_subfolder_ok": lambda d: external(d, subfolder=True),
    # graphs
    "empty_graph": lambda d: graph_case(d, model([], [vi("x", ["N", 4])], [vi("x", ["N", 4])]), codes=USER_ERROR),
    "custom_ops_only": lambda d: graph_case(d, custom_only(), runnable=False),
    "custom_op_beside_conv": lambda d: graph_case(d, custom_beside_conv(), runnable=False),
    "unnamed_and_duplicate_names": lambda d: graph_case(d, build_unnamed(), codes=frozenset({0})),
    "dynamic_dims": lambda d: graph_case(d, dynamic_dims(), codes=frozenset({0})),
    "zero_size_weight_dim": lambda d: graph_case(d, zero_weight_dim()),
    "zero_size_input_dim": lambda d: graph_case(d, zero_input_dim()),
    "constant_weights": lambda d: graph_case(d, build_constant_weights(), codes=frozenset({0})),
    "shared_weight": lambda d: graph_case(d, shared_weight(), codes=frozenset({0})),
    "if_subgraph": lambda d: graph_case(d, if_model_computed_cond(), codes=frozenset({0})),
    # a rank-0 input (the If condition) has no batch axis: commands that feed data end in a clear error
    "scalar_input_if_cond": lambda d: graph_case(d, build_if_model(), codes=frozenset({0, 1})),
    "loop_subgraph": lambda d: graph_case(d, loop_model(), codes=frozenset({0})),
    "scan_subgraph": lambda d: graph_case(d, scan_model(), codes=frozenset({0})),
    "undefined_input": lambda d: graph_case(d, undefined_input(), codes=USER_ERROR, readers=ANY),
    "two_writers": lambda d: graph_case(d, two_writers(), codes=USER_ERROR),
    "initializer_as_input": lambda d: graph_case(d, initializer_as_input(), codes=frozenset({0})),
    "float16": lambda d: graph_case(d, float16_model()),
    "tied_embedding_int_input": tied_embedding_case,
    "weird_names": weird_names_case,
    # weights
    "weights_nan": lambda d: weight_case(d, float("nan")),
    "weights_pos_inf": lambda d: weight_case(d, float("inf")),
    "weights_neg_inf": lambda d: weight_case(d, float("-inf")),
    "weights_all_zero": lambda d: weight_case(d, 0.0),
    # calibration data (every command that reads it must refuse it)
    "calib_nan": lambda d: calib_case(d, x=_with(np.nan)),
    "calib_inf": lambda d: calib_case(d, x=_with(np.inf)),
    "calib_empty_npz": lambda d: calib_case(d),
    "calib_zero_samples": lambda d: calib_case(d, x=X[:0]),
    "calib_wrong_name": lambda d: calib_case(d, y=X),
    "calib_extra_key": lambda d: calib_case(d, "unexpected", x=X, mask=np.ones((4, 2), np.float32)),
    "calib_rank2": lambda d: calib_case(d, x=X.reshape(4, -1)),
    "calib_rank3": lambda d: calib_case(d, x=X[:, 0]),
    "calib_int64": lambda d: calib_case(d, x=X.astype(np.int64)),
    "calib_string": lambda d: calib_case(d, x=np.array(["a"] * 4)),
    "calib_wrong_shape": lambda d: calib_case(d, x=np.zeros((4, 3, 9, 9), np.float32)),
    # options
    "bits_out_of_range": bits_case,
    "infeasible_budget": budget_case,
    "malformed_budgets": bad_budget_case,
    "output_is_input": same_path_case,
    "report_onto_model": lambda d: report_onto_input_case(d, "model"),
    "report_onto_calib": lambda d: report_onto_input_case(d, "calib"),
    "output_folder_missing": missing_folder_case,
    "report_folder_missing": report_missing_folder_case,
    "bad_numbers": bad_numbers_case,
    "negative_time_limit": negative_time_limit_case,
    "output_is_a_directory": output_is_directory_case,
}
CASES.update({f"opset_{v}": functools.partial(opset_case, opset=v) for v in range(8, 26)})

# Bugs this corpus exposed in onnxmpq: each case stays a strict xfail until its bug is fixed.
XFAIL: dict[str, str] = {}


def params():
    for name in CASES:
        marks = [pytest.mark.xfail(reason=XFAIL[name], strict=True)] if name in XFAIL else []
        yield pytest.param(name, id=name, marks=marks)


# ---------------------------------------------------------------- running and checking


class Hang(BaseException):
    """Raised by the watchdog; a BaseException so that no `except Exception` in onnxmpq swallows it."""


def _alarm(signum, frame):
    raise Hang(f"command did not finish in {TIMEOUT} s")


def run_in_process(capsys, argv) -> tuple[int, str]:
    capsys.readouterr()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIMEOUT)
    try:
        code = main([str(a) for a in argv])
    except KeyboardInterrupt:
        raise
    except BaseException:
        code = -1
        sys.stderr.write(traceback.format_exc())
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    _, err = capsys.readouterr()
    return code, err


def start_subprocess(argv, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([str(CLI), *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=cwd, stdin=subprocess.DEVNULL)


def finish_subprocess(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return -2, f"HANG: no exit within {TIMEOUT} s"
    return proc.returncode, err


def snapshot(root: Path, skip: Path) -> dict[str, tuple[bytes, int]]:
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and skip not in path.parents:
            files[str(path.relative_to(root))] = (path.read_bytes(), path.stat().st_mtime_ns)
    return files


def feed_from(case: Case, written: onnx.ModelProto, calib: Path | None) -> dict:
    if case.feed is not None:
        return case.feed
    if calib is not None and calib.exists():
        try:
            with np.load(calib) as data:
                return {k: (data[k][:2] if data[k].ndim else data[k]) for k in data.files}
        except Exception:
            pass
    return feed_for(written)


def check_written(case: Case, run: Run, capsys):
    """A model quantize reported as written: full checker, onnxruntime, and `inspect` reads it back."""
    path = run.output
    assert path is not None and path.is_file(), f"exit 0 but no model at {path}"
    onnx.checker.check_model(str(path), full_check=True)
    if case.runnable:
        written = onnx.load(str(path))
        calib = next((Path(run.argv[i + 1]) for i, a in enumerate(run.argv) if a == "--calib"), None)
        feed = feed_from(case, written, calib)
        names = {i.name for i in written.graph.input}
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs = sess.run(None, {k: v for k, v in feed.items() if k in names})
        assert outputs
    code, err = run_in_process(capsys, ["inspect", path, "--json"])
    assert code == 0, f"inspect of the written model failed ({code}):\n{err}"


@pytest.mark.parametrize("name", list(params()))
def test_hostile_input(name, tmp_path, capsys):
    case = CASES[name](tmp_path)
    before = snapshot(tmp_path, out_dir(tmp_path))
    # subprocess runs start together (2 cores; each is mostly interpreter start-up), in-process runs follow
    procs = {i: start_subprocess(r.argv, tmp_path) for i, r in enumerate(case.runs) if r.sub}
    try:
        problems = check_runs(case, tmp_path, procs, capsys, before)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert not problems, "\n".join(problems)


def check_runs(case: Case, tmp_path: Path, procs: dict, capsys, before: dict) -> list[str]:
    """Runs the case's commands in order (collecting the subprocesses') and returns every breach of the
    contract found; `before` is the snapshot of the input files taken before anything ran."""
    outdir = out_dir(tmp_path)
    written, problems = set(), []
    for i, run in enumerate(case.runs):
        argv = [str(a) for a in run.argv]
        shown = "onnxmpq " + " ".join(a.replace(str(tmp_path), "$TMP") for a in argv)
        code, err = finish_subprocess(procs[i]) if run.sub else run_in_process(capsys, argv)
        lines = err.strip().splitlines()
        if VERBOSE:
            print(f"[{code}] {shown}\n      {lines[-1][:200] if lines else ''}", file=sys.__stdout__)
        tail = "\n  " + "\n  ".join(lines[-6:])
        if code not in run.codes:
            problems.append(f"{shown}: exit {code}, expected {sorted(run.codes)}; stderr tail:{tail}")
        if code != 0:
            if "Traceback" in err or len(lines) > MAX_ERR_LINES or not lines:
                problems.append(f"{shown}: exit {code} with a traceback or a long/empty error:{tail}")
            elif run.message and run.message.lower() not in err.lower():
                problems.append(f"{shown}: the error does not mention {run.message!r}: {err.strip()}")
            if run.output is not None and run.output.exists() and run.output not in written:
                problems.append(f"{shown}: failed but left {run.output.name} behind")
        elif run.output is not None:
            try:
                check_written(case, run, capsys)
                written.add(run.output)
            except Exception as exc:
                text = str(exc).strip()
                problems.append(f"{shown}: exit 0 but the model is broken: {type(exc).__name__}: "
                                f"{text.splitlines()[-1][:300] if text else ''}")
        after = snapshot(tmp_path, outdir)
        if after != before:
            changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            problems.append(f"{shown}: input files changed, appeared or vanished: {changed}")
            before = after
        stray = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                 if p.name.startswith((".onnxmpq", "onnxmpq-")) or p.suffix == ".tmp"]
        if stray:
            problems.append(f"{shown}: stray temporary files {sorted(stray)}")
            break
    for path in case.forbidden:
        if path.exists():
            problems.append(f"{path.relative_to(tmp_path)} was created")
    return problems
