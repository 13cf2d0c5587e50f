"""A model over 2 GB read and written with external data (slow: builds 2.3 GB of weights; `make test-all`)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxmpq.graph import runtime
from onnxmpq.pipeline import api
from onnxmpq.types import Candidate

pytestmark = pytest.mark.slow

WIDTH, LAYERS = 8192, 9          # 9 x 8192 x 8192 float32 = 2.42 GB of weights


def big_model(folder):
    """A chain of MatMuls with 256 MB weights each, saved with external data (protobuf's 2 GB limit)."""
    rng = np.random.default_rng(0)
    inits, nodes, name = [], [], "x"
    for i in range(LAYERS):
        w = rng.standard_normal((WIDTH, WIDTH), dtype=np.float32) * np.float32(1 / np.sqrt(WIDTH))
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [name, f"w{i}"], [f"y{i}"], name=f"mm{i}"))
        name = f"y{i}"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, WIDTH])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    path = folder / "big.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="big.onnx.data")
    return path


def test_over_2gb_model_round_trips_with_external_data(tmp_path):
    src = big_model(tmp_path)
    assert (tmp_path / "big.onnx.data").stat().st_size > 2 ** 31
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    # one layer at 8 bits, the rest float: the output stays over 2 GB and must be written externally too
    bits = {f"mm{i}": Candidate(None, None) for i in range(1, LAYERS)} | {"mm0": Candidate(8, None)}
    report = api.quantize(src, out, weight_bits=None, act_bits=None, layer_bits=bits, rounding="nearest")
    data = out.with_name("q.onnx.data")
    assert data.exists() and data.stat().st_size > 2 ** 31 - 2 ** 28
    assert report.file_bytes == out.stat().st_size + data.stat().st_size
    onnx.checker.check_model(str(out), full_check=True)
    assert api.inspect(out)["layers"][0]["weight_bits"] == 8
    x = np.random.default_rng(1).standard_normal((1, WIDTH)).astype(np.float32)
    y = runtime.session(str(out)).run(None, {"x": x})[0]
    y_ref = runtime.session(str(src)).run(None, {"x": x})[0]
    assert np.abs(y - y_ref).max() < 0.05 * np.abs(y_ref).max()
