"""End to end through the CLI: the bundled ResNet-20 with the bundled calibration set, and bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator

from onnxmpq.cli.main import main
from onnxmpq.graph import runtime

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "resnet20_cifar10.onnx"
CALIB = ROOT / "calibration" / "cifar10_train256.npz"
TEST_IMAGES = ROOT / "data" / "cifar10-test"


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def w4a8(tmp_path_factory) -> tuple[Path, dict]:
    """ResNet-20 quantized W4A8 once for the module (with 64 calibration samples to stay quick)."""
    out = tmp_path_factory.mktemp("e2e") / "r20_w4a8.onnx"
    report = out.with_suffix(".json")
    code = main(["-q", "quantize", str(MODEL), "-o", str(out), "--calib", str(CALIB), "-w", "4", "-a", "8",
                 "--limit", "64", "--report", str(report)])
    assert code == 0
    return out, json.loads(report.read_text())


def test_quantize_writes_a_smaller_valid_model(w4a8):
    out, report = w4a8
    onnx.checker.check_model(str(out), full_check=True)
    # 4-bit codes are 1/8 of float32; per-channel scales and zero points add a few percent
    assert 0.125 * report["float_weight_bytes"] < report["weight_bytes"] < 0.14 * report["float_weight_bytes"]
    assert out.stat().st_size < 0.25 * MODEL.stat().st_size
    assert report["avg_weight_bits"] == 4.0
    assert len(report["layers"]) == 20
    first = report["layers"][0]
    assert {"name", "op_type", "weight_bits", "act_bits", "params", "macs", "weight_bytes"} <= set(first)
    assert report["bitops"] == sum(l["macs"] * 4 * 8 for l in report["layers"])


def test_quantized_model_agrees_with_reference_evaluator_and_float(w4a8):
    out, _ = w4a8
    x = np.load(CALIB)["input"][100:108]
    ort_y = runtime.session(str(out)).run(None, {"input": x})[0]
    ref_y = ReferenceEvaluator(str(out)).run(None, {"input": x})[0]
    # onnxruntime may run integer kernels; the two must still agree to a small fraction of the logit scale
    assert np.abs(ort_y - ref_y).max() < 0.05 * np.abs(ref_y).max()
    float_y = runtime.session(str(MODEL)).run(None, {"input": x})[0]
    assert (ort_y.argmax(1) == float_y.argmax(1)).mean() >= 0.75


def test_inspect_reads_back_the_bits(w4a8, capsys):
    out, report = w4a8
    code, stdout, _ = run(capsys, "inspect", out, "--json")
    assert code == 0
    info = json.loads(stdout)
    assert [(l["weight_bits"], l["act_bits"]) for l in info["layers"]] == [(4, 8)] * 20
    assert info["weight_bytes"] == report["weight_bytes"]


def test_evaluate_with_labels_and_reference(w4a8, capsys):
    out, _ = w4a8
    code, stdout, _ = run(capsys, "evaluate", out, "--data", TEST_IMAGES, "--reference", MODEL,
                          "--limit", "200", "--json")
    assert code == 0
    result = json.loads(stdout)
    assert result["samples"] == 200
    assert 0.5 < result["top1"] <= 1 and 0.6 < result["agreement"] <= 1
    assert result["kl"] > 0 and result["sqnr_db"] > 3


def test_per_layer_bits_by_hand(tmp_path, capsys):
    out = tmp_path / "mixed.onnx"
    code, stdout, _ = run(capsys, "-q", "quantize", MODEL, "-o", out, "--calib", CALIB, "--limit", "16",
                          "-w", "8", "-a", "8", "--layer-bits", "/conv1/Conv=2:16",
                          "--layer-bits", "/linear/Gemm=float:float", "--json")
    assert code == 0
    layers = {l["name"]: l for l in json.loads(stdout)["layers"]}
    assert (layers["/conv1/Conv"]["weight_bits"], layers["/conv1/Conv"]["act_bits"]) == (2, 16)
    assert layers["/linear/Gemm"]["weight_bits"] is None
    assert layers["/layer1/layer1.0/conv1/Conv"]["weight_bits"] == 8
    onnx.checker.check_model(str(out), full_check=True)
    runtime.session(str(out)).run(None, {"input": np.load(CALIB)["input"][:2]})


def test_allocation_file_round_trip(tmp_path, capsys, w4a8):
    _, report = w4a8
    alloc = tmp_path / "alloc.json"
    report["layers"][3]["weight_bits"] = 6
    alloc.write_text(json.dumps(report))
    code, stdout, _ = run(capsys, "-q", "quantize", MODEL, "-o", tmp_path / "m.onnx", "--calib", CALIB,
                          "--limit", "8", "--allocation", alloc, "--json")
    assert code == 0
    bits = [l["weight_bits"] for l in json.loads(stdout)["layers"]]
    assert bits[3] == 6 and bits.count(4) == 19


@pytest.mark.parametrize("make_args, message", [
    (lambda d: ["quantize", d / "missing.onnx", "-o", d / "o.onnx"], "does not exist"),
    (lambda d: ["quantize", d / "garbage.onnx", "-o", d / "o.onnx"], "not a readable ONNX model"),
    (lambda d: ["quantize", MODEL, "-o", MODEL, "--calib", CALIB], "would overwrite an input"),
    (lambda d: ["quantize", MODEL, "-o", d / "o.onnx", "--calib", d / "nope"], "nope"),
    (lambda d: ["quantize", MODEL, "-o", d / "o.onnx", "--calib", CALIB, "--layer-bits", "nope=4"], "nope"),
    (lambda d: ["quantize", MODEL, "-o", d / "o.onnx", "--calib", d / "nan.npz"], "NaN"),
    (lambda d: ["quantize", MODEL, "-o", d / "o.onnx", "--calib", d / "shape.npz"], "input"),
    (lambda d: ["quantize", MODEL, "-o", d / "o.onnx", "-w", "1"], "bit-width"),
    (lambda d: ["quantize", MODEL, "-o", d / "o.onnx"], "calibration data"),
    (lambda d: ["evaluate", MODEL, "--data", d / "empty"], "empty"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, make_args, message):
    (tmp_path / "garbage.onnx").write_bytes(b"\x08\x07this is not a protobuf" * 10)
    x = np.load(CALIB)["input"][:4].copy()
    x[0, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", input=x)
    np.savez(tmp_path / "shape.npz", input=np.zeros((2, 3, 16, 16), np.float32))
    (tmp_path / "empty").mkdir()
    before = MODEL.read_bytes()
    code, stdout, err = run(capsys, *make_args(tmp_path))
    assert code == 1
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert MODEL.read_bytes() == before
    assert not (tmp_path / "o.onnx").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".onnxmpq-")]


def test_existing_output_replaced_only_by_a_complete_model(tmp_path, capsys):
    out = tmp_path / "o.onnx"
    out.write_bytes(b"previous")
    code, _, _ = run(capsys, "-q", "quantize", MODEL, "-o", out, "-w", "8", "-a", "8", "--calib", tmp_path / "none")
    assert code == 1 and out.read_bytes() == b"previous"
    code, _, _ = run(capsys, "-q", "quantize", MODEL, "-o", out, "-w", "8", "-a", "float")
    assert code == 0
    onnx.checker.check_model(str(out), full_check=True)
