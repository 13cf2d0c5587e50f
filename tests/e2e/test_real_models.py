"""Real models beyond the bundled ResNets: mnist-8 (opset 8, ONNX test-data folders) and PP-OCRv4
recognition (opset 12, weights in Constant nodes, dynamic height and width, MatMul layers)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxmpq.graph import model as graph
from onnxmpq.graph import runtime
from onnxmpq.pipeline import api


def package_file(package: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / relative
    return path if path.exists() else None


MNIST = package_file("qonnx", "data/onnx/mnist-conv/model.onnx")
OCR = package_file("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx")


@pytest.mark.skipif(MNIST is None, reason="qonnx (mnist-8) not installed")
def test_mnist8_opset8_loads_upgrades_and_quantizes(tmp_path):
    model = graph.load(MNIST)
    assert model.opset >= 13
    # the MatMul's weight sits behind a Reshape; its bias Add joins it as a Gemm (and the Conv biases, written
    # as Adds, join the Convs)
    assert [l.op_type for l in model.layers] == ["Conv", "Conv", "Gemm"]
    assert all(l.bias for l in model.layers)
    assert model.layers[2].params == 256 * 10
    out = tmp_path / "mnist_w4a8.onnx"
    # the model's own test_data_set_0 folder is the calibration source
    report = api.quantize(model, out, MNIST.parent, weight_bits=4, act_bits=8)
    assert [l.weight_bits for l in report.layers] == [4, 4, 4]
    # all three run on integer kernels
    kernels = runtime.census(out)
    assert kernels.float_compute == 0 and kernels.int_compute == 3
    # 4-bit codes of a 26 KB model plus the integer graph's Q/DQ pairs (one per tensor) and INT32 biases
    assert report.file_bytes < 0.40 * MNIST.stat().st_size
    onnx.checker.check_model(str(out), full_check=True)
    x = numpy_helper.to_array(onnx.load_tensor(str(MNIST.parent / "test_data_set_0" / "input_0.pb")))
    expected = numpy_helper.to_array(onnx.load_tensor(str(MNIST.parent / "test_data_set_0" / "output_0.pb")))
    y = runtime.session(str(out)).run(None, {"Input3": x})[0]
    y_ref = ReferenceEvaluator(str(out)).run(None, {"Input3": x})[0]
    assert np.abs(y - y_ref).max() < 0.02 * np.abs(y_ref).max()
    assert y.argmax() == expected.argmax()


@pytest.mark.skipif(OCR is None, reason="rapidocr-onnxruntime (PP-OCRv4) not installed")
def test_ppocr_constant_weights_dynamic_dims_quantize(tmp_path):
    model = graph.load(OCR)
    ops = [l.op_type for l in model.layers]
    assert ops.count("Conv") == 38 and ops.count("MatMul") >= 5
    assert model.inputs[0].shape[2:] == (None, None)
    rng = np.random.default_rng(0)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.uniform(-1, 1, (4, 3, 48, 160)).astype(np.float32))
    out = tmp_path / "ocr_w8a8.onnx"
    report = api.quantize(model, out, calib, weight_bits=8, act_bits=8)
    assert report.layers[0].macs == 432 * 24 * 80  # stride-2 stem: MACs known once the width is
    assert report.weight_bytes < 0.27 * report.float_weight_bytes
    onnx.checker.check_model(str(out), full_check=True)
    x = rng.uniform(-1, 1, (2, 3, 48, 160)).astype(np.float32)
    y = runtime.session(str(out)).run(None, {"x": x})[0]
    y_float = runtime.session(str(OCR)).run(None, {"x": x})[0]
    assert y.shape == y_float.shape and np.allclose(y.sum(-1), 1, atol=1e-3)
