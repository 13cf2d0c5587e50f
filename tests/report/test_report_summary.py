"""Tests of onnxmpq.export: atomic model and JSON writes, report totals and notes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import build_cnn, model, node, vi
from onnx import TensorProto, numpy_helper

from onnxmpq.errors import InternalError, OnnxmpqError
from onnxmpq.graph import model as graph
from onnxmpq.report.summary import Report, storage_notes, summarize
from onnxmpq.types import Candidate
from onnxmpq.write.build import GUARD_SUFFIX, LayerResult, TensorResult, UnitResult, Written, build
from onnxmpq.write.save import save_model, write_json


def quantized_cnn(wb=4):
    m = graph.from_proto(build_cnn())
    return build(m, {layer.name: Candidate(wb, None) for layer in m.layers}, None)[0]


def invalid_model():
    """Passes protobuf serialization but not the checker: a node reads a tensor nobody produces."""
    return model([node("Relu", ["missing"], ["y"], "r")], [vi("x", [1])], [vi("y", [1])])


def type_clash_model():
    """Fails the checker's shape inference: Add of float16 and float."""
    return model([node("Add", ["x", "c"], ["y"], "add")], [vi("x", [2], TensorProto.FLOAT16)],
                 [vi("y", [2], TensorProto.FLOAT16)], {"c": np.ones(2, np.float32)})


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


# --- save_model -----------------------------------------------------------------------------------


@pytest.mark.parametrize("wb", [2, 4, 8])
def test_save_model_writes_a_checked_model_and_returns_its_size(tmp_path, wb):
    proto = quantized_cnn(wb)
    path = tmp_path / "q.onnx"
    size = save_model(proto, path)
    assert listing(tmp_path) == ["q.onnx"]
    assert size == path.stat().st_size
    back = onnx.load(str(path))
    onnx.checker.check_model(back, full_check=True)
    assert back.SerializeToString() == proto.SerializeToString()


def test_save_model_replaces_an_existing_file(tmp_path):
    path = tmp_path / "q.onnx"
    path.write_bytes(b"old")
    save_model(quantized_cnn(), path)
    assert onnx.load(str(path)).graph.node
    assert listing(tmp_path) == ["q.onnx"]


@pytest.mark.parametrize("bad", [invalid_model, type_clash_model])
def test_invalid_model_raises_internal_error_and_leaves_nothing_behind(tmp_path, bad):
    path = tmp_path / "q.onnx"
    path.write_bytes(b"previous result")
    with pytest.raises(InternalError):
        save_model(bad(), path)
    assert listing(tmp_path) == ["q.onnx"]
    assert path.read_bytes() == b"previous result"


def test_external_data_is_written_beside_the_model(tmp_path):
    proto = quantized_cnn(16)  # the 10x64 INT16 codes (1280 bytes) go to the .data file
    original = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    path = tmp_path / "big.onnx"
    size = save_model(proto, path, external_threshold=0)
    assert listing(tmp_path) == ["big.onnx", "big.onnx.data"]
    assert size == path.stat().st_size + (tmp_path / "big.onnx.data").stat().st_size
    back = onnx.load(str(path))
    onnx.checker.check_model(str(path), full_check=True)
    for t in back.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(t), original[t.name])
    reloaded = graph.load(path)  # the loader accepts the files the exporter writes
    assert reloaded.proto.graph.node


def test_save_model_with_external_data_leaves_its_argument_alone(tmp_path):
    proto = quantized_cnn(16)
    before = proto.SerializeToString()
    save_model(proto, tmp_path / "big.onnx", external_threshold=0)
    assert proto.SerializeToString() == before


def test_external_threshold_with_only_small_tensors_still_writes_a_loadable_model(tmp_path):
    proto = quantized_cnn(4)  # every tensor is under onnx's 1 KB externalisation threshold
    path = tmp_path / "small.onnx"
    size = save_model(proto, path, external_threshold=0)
    assert size == sum(p.stat().st_size for p in tmp_path.iterdir())
    assert not [name for name in listing(tmp_path) if name.startswith(".onnxmpq-")]
    onnx.checker.check_model(str(path), full_check=True)


def test_missing_output_folder_is_a_user_error(tmp_path):
    with pytest.raises(OnnxmpqError, match="does not exist"):
        save_model(quantized_cnn(), tmp_path / "no" / "q.onnx")


# --- write_json -----------------------------------------------------------------------------------


def test_write_json_round_trips_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "r.json"
    obj = {"a": [1, 2.5, None], "b": {"c": "d"}}
    write_json(obj, path)
    assert json.loads(path.read_text()) == obj
    assert path.read_text().endswith("\n")
    assert listing(tmp_path) == ["r.json"]


def test_write_json_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "r.json"
    write_json({"v": 1}, path)
    with pytest.raises(TypeError):
        write_json({"v": object()}, path)
    assert json.loads(path.read_text()) == {"v": 1}
    assert listing(tmp_path) == ["r.json"]


# --- summaries ------------------------------------------------------------------------------------


def result(name, wb, ab, params, macs, wbytes, wtype="INT8"):
    return LayerResult(name, "Conv", wb, ab, params, macs, wbytes, wtype, "UINT8" if ab else "float")


def test_summarize_totals_by_hand():
    rows = [result("a", 4, 8, 100, 1000, 60), result("b", None, None, 50, 500, 200, "float32"),
            result("c", 2, None, 10, 20, 10)]
    # a MatMul of two activations at 8 bits (300 MACs), an Add (no MACs), and a tensor of 7 elements stored at
    # 16 bits and requantized to 8 for one reader
    units = (UnitResult("qk", "MatMul", 8, 300, "QLinearMatMul"), UnitResult("add", "Add", 8, 0, "QLinearAdd"))
    tensors = (TensorResult("t", "t", 16, "UINT16", 0.1, 0, "add", (8,), 7),
               TensorResult("u", "u", 8, "UINT8", 0.1, 0, "add", (), 5))
    totals = summarize(Written(tuple(rows), units, tensors))
    assert totals["weight_bytes"] == 60 + 200 + 10
    assert totals["float_weight_bytes"] == 4 * (100 + 50 + 10)
    assert totals["avg_weight_bits"] == pytest.approx((100 * 4 + 50 * 32 + 10 * 2) / 160)
    assert totals["bitops"] == 1000 * 4 * 8 + 500 * 32 * 32 + 20 * 2 * 32 + 300 * 8 * 8 + 7 * 16 * 8


def test_summarize_of_nothing_is_zero():
    assert summarize(Written((), (), ())) == {"weight_bytes": 0, "float_weight_bytes": 0, "avg_weight_bits": 0.0,
                                              "bitops": 0}


def test_storage_notes_name_each_unusual_storage():
    assert storage_notes([result("a", 8, 8, 1, 1, 1)]) == []
    int2 = storage_notes([result("a", 2, 8, 1, 1, 1, "INT2" + GUARD_SUFFIX)])
    assert len(int2) == 1 and "INT2" in int2[0]
    narrow = storage_notes([result("a", 3, 8, 1, 1, 1, "INT4 (3-bit range)")])
    assert len(narrow) == 1 and "wider type" in narrow[0]
    act_only = storage_notes([result("a", None, 8, 1, 1, 1, "float32")])
    assert len(act_only) == 1 and "float weights" in act_only[0]


def test_report_to_dict_is_json_ready(tmp_path):
    report = Report(model="m.onnx", output="q.onnx", layers=[result("a", 4, 8, 100, 1000, 60)], weight_bytes=60,
                    float_weight_bytes=400, avg_weight_bits=4.0, bitops=32000, file_bytes=1, float_file_bytes=2,
                    opset=21, time_s=0.1, skipped=[("n", "why")])
    out = report.to_dict()
    assert out["skipped"] == [{"name": "n", "reason": "why"}]
    assert out["layers"][0]["name"] == "a" and out["layers"][0]["weight_bits"] == 4
    write_json(out, tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text())["bitops"] == 32000


def test_helper_models_are_what_they_claim():
    # guard the fixtures above: each bad model really fails the checker
    for bad in (invalid_model(), type_clash_model()):
        with pytest.raises((onnx.checker.ValidationError, onnx.shape_inference.InferenceError)):
            onnx.checker.check_model(bad, full_check=True)


def test_the_report_says_where_the_bytes_are_and_when_the_file_grew(tmp_path):
    """A tiny CNN: its Q/DQ pairs, scales and names outweigh what 8-bit weights save, and the report says
    so; the breakdown adds up to the serialized model."""
    import numpy as np
    from conftest import arr, feed_for, model, node, vi

    import onnxmpq

    convs = [node("Conv", [f"x{i}", f"W{i}"], [f"x{i + 1}"], f"conv{i}") for i in range(6)]  # 1x1, 2 -> 2
    proto = model(convs, [vi("x0", ["N", 2, 4, 4])], [vi("x6", ["N", 2, 4, 4])],
                  {f"W{i}": arr(i, 2, 2, 1, 1) for i in range(6)})
    onnx.save(proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", **feed_for(proto, 8))
    report = onnxmpq.quantize(tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "c.npz", weight_bits=8, act_bits=8,
                              verify=False)
    written = onnx.load(str(tmp_path / "q.onnx"))
    assert sum(report.file_breakdown.values()) == written.ByteSize() == report.file_bytes
    assert report.file_breakdown["weight_codes"] >= sum(l.params for l in report.layers)  # one byte per weight
    assert report.file_bytes > report.float_file_bytes
    assert any(n.startswith("the quantized file is larger than its input") for n in report.notes)


def test_a_weight_shared_by_two_convs_is_stored_once_and_long_names_are_shortened(tmp_path):
    """Two Convs reading one float weight, rounded alike, share one set of codes and scales in the file;
    an internal tensor name of 300 characters is shortened at load (graph input/output names are kept),
    and the quantized model still computes what an unshared, unshortened one does (ReferenceEvaluator)."""
    import numpy as np
    from conftest import arr, feed_for, model, node, vi
    from onnx.reference import ReferenceEvaluator

    import onnxmpq

    long = "t" * 300
    proto = model([node("Conv", ["x", "W"], [long], "conv_a", pads=[1, 1, 1, 1]), node("Relu", [long], ["r"], "relu"),
                   node("Conv", ["r", "W"], ["y"], "conv_b", pads=[1, 1, 1, 1])],
                  [vi("x", ["N", 4, 6, 6])], [vi("y", ["N", 4, 6, 6])], {"W": arr(1, 4, 4, 3, 3)})
    unshared = model([node("Conv", ["x", "W"], ["c"], "conv_a", pads=[1, 1, 1, 1]), node("Relu", ["c"], ["r"], "relu"),
                      node("Conv", ["r", "W2"], ["y"], "conv_b", pads=[1, 1, 1, 1])],
                     [vi("x", ["N", 4, 6, 6])], [vi("y", ["N", 4, 6, 6])], {"W": arr(1, 4, 4, 3, 3), "W2": arr(1, 4, 4, 3, 3)})
    onnx.save(proto, tmp_path / "m.onnx")
    onnx.save(unshared, tmp_path / "u.onnx")
    np.savez(tmp_path / "c.npz", **feed_for(proto, 8))
    for name in ("m", "u"):
        onnxmpq.quantize(tmp_path / f"{name}.onnx", tmp_path / f"{name}_q.onnx", tmp_path / "c.npz", weight_bits=8,
                         act_bits=8, rounding="nearest", verify=False)
    shared, apart = onnx.load(str(tmp_path / "m_q.onnx")), onnx.load(str(tmp_path / "u_q.onnx"))
    codes = [t for t in shared.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(codes) == 1  # one set of codes for both Convs
    names = {o for n in shared.graph.node for o in n.output} | {i for n in shared.graph.node for i in n.input}
    assert max(len(n) for n in names) < 100 and [o.name for o in shared.graph.output] == ["y"]
    feed = feed_for(proto, 3)
    np.testing.assert_allclose(ReferenceEvaluator(shared).run(None, feed)[0],
                               ReferenceEvaluator(apart).run(None, feed)[0], rtol=1e-5, atol=1e-5)


def test_a_constant_a_subgraph_reads_is_never_folded_into_its_twin():
    """A and B hold the same codes; B is also read inside an If branch, so B keeps its name and data."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from onnxmpq.write.editor import share_constants

    codes = np.arange(100, dtype=np.int8)
    branch = helper.make_graph([helper.make_node("DequantizeLinear", ["B", "s"], ["inner"], name="dq_in")], "b", [],
                               [helper.make_tensor_value_info("inner", TensorProto.FLOAT, [100])])
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["A", "s"], ["a"], name="dq_a"),
         helper.make_node("DequantizeLinear", ["B", "s"], ["b"], name="dq_b"),
         helper.make_node("If", ["c"], ["y"], name="if", then_branch=branch, else_branch=branch)],
        "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [100]) for n in ("a", "b", "y")],
        [numpy_helper.from_array(codes, "A"), numpy_helper.from_array(codes.copy(), "B"),
         numpy_helper.from_array(np.float32(0.1), "s")])
    assert share_constants(graph) == 0
    assert {t.name for t in graph.initializer} == {"A", "B", "s"}
    twin = helper.make_graph(list(graph.node)[:2], "g2", [], list(graph.output)[:2], list(graph.initializer))
    assert share_constants(twin) == 1 and [n.input[0] for n in twin.node] == ["A", "A"]
