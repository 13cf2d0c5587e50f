"""Full-integer QDQ graphs as users get them: every tensor an integer kernel touches quantized, the model
running on onnxruntime's integer kernels after its load-time optimisation (`runtime.census`), the same QDQ
arithmetic in onnxruntime and in onnx's reference evaluator, requantizes where widths meet, embeddings per
row, and a BERT-style encoder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import arr, build_cnn, build_encoder, feed_for, group_stats, model, node, uniform, vi
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxmpq import calibrate
from onnxmpq.graph import model as graph
from onnxmpq.graph import runtime
from onnxmpq.pipeline import api
from onnxmpq.rounding import round_nearest
from onnxmpq.types import Candidate, QuantOptions, Scope
from onnxmpq.write.build import build
from onnxmpq.write.formats import weight_format

ROOT = Path(__file__).resolve().parents[2]
CALIB = ROOT / "calibration" / "cifar10_train256.npz"


def run_ort(proto, feed, optimize=True):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feed)


def build_zoo():
    """x(N,3,8,8) -Conv+Clip(0,6)- MaxPool -depthwise Conv+LeakyRelu- Conv -swish (Sigmoid, Mul)- Pad -Resize x2-
    Conv/2 + HardSwish -+- Concat(., Conv 1x1) - AveragePool - Conv - Tanh - Sub(tanh, conv) - Div 2 -
    GlobalAveragePool - Flatten - Gemm - Softmax -> y(N,10)."""
    def c(name, *shape):
        return {name: arr(len(name) * 7 + shape[0], *shape, scale=0.4)}
    inits = {**c("W1", 8, 3, 3, 3), **c("Wd", 8, 1, 3, 3), **c("W3", 8, 8, 1, 1), **c("W4", 8, 8, 3, 3),
             **c("W5", 4, 8, 1, 1), **c("W6", 6, 12, 1, 1), **c("W7", 10, 6), "B7": arr(9, 10, scale=0.1),
             "lo": np.array(0, np.float32), "hi": np.array(6, np.float32), "two": np.array(2, np.float32),
             "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "scales": np.array([1, 1, 2, 2], np.float32)}
    nodes = [
        node("Conv", ["x", "W1"], ["c1"], "conv1", pads=[1, 1, 1, 1]), node("Clip", ["c1", "lo", "hi"], ["r1"], "clip"),
        node("MaxPool", ["r1"], ["p1"], "maxpool", kernel_shape=[2, 2], strides=[2, 2]),
        node("Conv", ["p1", "Wd"], ["c2"], "depthwise", group=8, pads=[1, 1, 1, 1]),
        node("LeakyRelu", ["c2"], ["l2"], "leaky", alpha=0.1),
        node("Conv", ["l2", "W3"], ["c3"], "conv3"), node("Sigmoid", ["c3"], ["s3"], "sigmoid"),
        node("Mul", ["c3", "s3"], ["m3"], "swish"), node("Pad", ["m3", "pads"], ["pd"], "pad"),
        node("Resize", ["pd", "", "scales"], ["rs"], "resize", mode="nearest"),
        node("Conv", ["rs", "W4"], ["c4"], "conv4", strides=[2, 2], pads=[1, 1, 1, 1]),
        node("HardSwish", ["c4"], ["hs"], "hardswish"), node("Conv", ["hs", "W5"], ["c5"], "conv5"),
        node("Concat", ["hs", "c5"], ["cat"], "concat", axis=1),
        node("AveragePool", ["cat"], ["ap"], "avgpool", kernel_shape=[2, 2], strides=[2, 2]),
        node("Conv", ["ap", "W6"], ["c6"], "conv6"), node("Tanh", ["c6"], ["th"], "tanh"),
        node("Sub", ["th", "c6"], ["sb"], "sub"), node("Div", ["sb", "two"], ["dv"], "div"),
        node("GlobalAveragePool", ["dv"], ["g"], "gap"), node("Flatten", ["g"], ["f"], "flatten"),
        node("Gemm", ["f", "W7", "B7"], ["logits"], "fc", transB=1), node("Softmax", ["logits"], ["y"], "softmax")]
    return model(nodes, [vi("x", ["N", 3, 8, 8])], [vi("y", ["N", 10])], inits, opset=14)


def quantize_all(proto, wb=8, ab=8, options=QuantOptions(), calib_batch=32):
    m = graph.from_proto(proto)
    calib = feed_for(m.proto, calib_batch, seed=3)
    q, written = build(m, uniform(m, wb, ab, options), group_stats(m, calib, options), options)
    onnx.checker.check_model(q, full_check=True)
    return m, q, written


def test_zoo_runs_on_integer_kernels_and_matches_the_reference():
    m, q, written = quantize_all(build_zoo())
    units = {u.name: u.op_type for u in m.points().units}
    assert set(units) >= {"conv1", "depthwise", "leaky", "sigmoid", "swish", "concat", "avgpool", "sub", "div", "gap"}
    kernels = runtime.census(q)
    for op, count in {"QLinearConv": 6, "QLinearLeakyRelu": 1, "QLinearSigmoid": 1, "QLinearMul": 1,
                      "QLinearConcat": 1, "QLinearAveragePool": 1, "QLinearGlobalAveragePool": 1, "QGemm": 1}.items():
        assert kernels.ops.get(op) == count, (op, kernels.ops)
    assert kernels.float_compute == 0
    feed = feed_for(m.proto, 6, seed=5)
    want = ReferenceEvaluator(q).run(None, feed)[0]
    exact = run_ort(q, feed, optimize=False)[0]
    # the same QDQ arithmetic; float ops (Tanh, HardSwish, ...) may flip a rounding here and there
    assert np.abs(exact - want).max() < 0.02
    fused = run_ort(q, feed)[0]
    float_y = run_ort(m.proto, feed)[0]
    assert np.abs(fused - float_y).mean() < 0.02 and (fused.argmax(1) == float_y.argmax(1)).mean() >= 5 / 6
    # the shared scales: MaxPool, Pad, Resize pass their input's through; the Concat's inputs share one
    groups = m.points().group
    assert groups["p1"] == groups["r1"] and groups["rs"] == groups["pd"] == groups["m3"]
    assert groups["hs"] == groups["c5"] == groups["cat"]
    assert {t.name for t in written.tensors} == set(groups)  # every point written at 8 bits
    assert all(t.bits == 8 for t in written.tensors if t.source)


@pytest.mark.parametrize("wb", [8, 4])
def test_bundled_resnets_run_without_a_float_conv(wb):
    """The issue's census: W8A8 and W4A8 (INT8-cast layout) ResNets: every Conv and the Gemm integer."""
    for name in ("resnet20", "resnet56"):
        path = ROOT / "models" / f"{name}_cifar10.onnx"
        m = graph.load(path)
        stats = calibrate.collect(m, calibrate.read(CALIB, m, limit=32), m.points().groups())
        q, _ = build(m, uniform(m, wb, 8), stats)
        kernels = runtime.census(q)
        convs = sum(1 for s in m.layers if s.op_type == "Conv")
        assert kernels.float_compute == 0 and kernels.ops["QLinearConv"] == convs and kernels.ops["QGemm"] == 1
        assert kernels.ops["QLinearAdd"] == sum(1 for u in m.points().units if u.op_type == "Add")


def test_scope_layers_leaves_the_float_convs_of_the_older_form():
    m = graph.load(ROOT / "models" / "resnet20_cifar10.onnx")
    options = QuantOptions(scope=Scope.LAYERS)
    stats = calibrate.collect(m, calibrate.read(CALIB, m, limit=32), m.points(options).groups())
    q, _ = build(m, uniform(m, 8, 8, options), stats, options)
    assert runtime.census(q).float_compute > 0


def test_a_tensor_read_at_another_width_goes_through_a_requantize():
    m = graph.from_proto(build_cnn())
    feed = feed_for(m.proto, 16, seed=2)
    q, written = build(m, {"conv1": Candidate(8, 16), "conv2": Candidate(8, 8), "fc": Candidate(8, 8)},
                       group_stats(m, feed))
    onnx.checker.check_model(q, full_check=True)
    producer = {o: n for n in q.graph.node for o in n.output}
    conv2 = next(n for n in q.graph.node if n.name == "conv2")
    dq8 = producer[conv2.input[0]]
    q8 = producer[dq8.input[0]]
    dq16 = producer[q8.input[0]]
    assert (dq8.op_type, q8.op_type, dq16.op_type) == ("DequantizeLinear", "QuantizeLinear", "DequantizeLinear")
    inits = {t.name: t for t in q.graph.initializer}
    assert inits[q8.input[2]].data_type == TensorProto.UINT8 and inits[dq16.input[2]].data_type == TensorProto.UINT16
    r1 = next(t for t in written.tensors if t.name == "r1")
    assert r1.bits == 16 and r1.requantized == (8,)
    assert written.requantize_bitops == 8 * 8 * 8 * 16 * 8  # r1: 8 channels of 8x8 at 16 -> 8 bits
    want = ReferenceEvaluator(q).run(None, feed)[0]
    np.testing.assert_allclose(run_ort(q, feed, optimize=False)[0], want, rtol=0, atol=1e-3 * float(np.ptp(want)))


def test_embedding_rows_are_dequantized_after_the_lookup():
    m = graph.from_proto(build_encoder())
    table = numpy_helper.to_array(next(t for t in m.proto.graph.initializer if t.name == "emb.words"))
    q, written = build(m, {"emb/Gather": Candidate(4, None)}, None)
    onnx.checker.check_model(q, full_check=True)
    row = next(r for r in written.layers if r.name == "emb/Gather")
    assert row.weight_bits == 4 and row.weight_bytes == 50 * 32 // 2 + 4 * 50  # packed codes + a scale per row
    codes = next(t for t in q.graph.initializer if t.data_type == TensorProto.INT4)
    assert list(codes.dims) == [50, 32]
    ids = np.array([[3, 1, 4, 1, 5, 9, 2, 6], [0, 49, 7, 7, 8, 2, 1, 0]], np.int64)
    expected = round_nearest(table, 0, weight_format(4)).dequantize()[ids]
    probe = onnx.ModelProto()
    probe.CopyFrom(q)
    probe.graph.output.append(helper.make_tensor_value_info("emb/Gather", TensorProto.FLOAT, None))
    for values in (ReferenceEvaluator(probe).run(None, {"ids": ids}), run_ort(probe, {"ids": ids})):
        np.testing.assert_allclose(values[-1], expected, rtol=1e-6, atol=1e-7)


def test_encoder_w8a8_every_matmul_integer_and_close_to_float():
    m, q, _ = quantize_all(build_encoder(), calib_batch=64)
    kernels = runtime.census(q)
    matmuls = sum(1 for n in m.proto.graph.node if n.op_type == "MatMul")
    assert kernels.float_compute == 0 and kernels.int_compute == matmuls == 16
    assert kernels.ops.get("QLinearSoftmax") == 2
    ids = np.random.default_rng(7).integers(0, 50, (32, 8)).astype(np.int64)
    a, b = run_ort(m.proto, {"ids": ids})[0].ravel(), run_ort(q, {"ids": ids})[0].ravel()
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) >= 0.99


def masked_feed(n: int, seed: int) -> dict[str, np.ndarray]:
    """Token ids with BERT's attention mask: each row keeps a random 2..8 of its 8 tokens."""
    rng = np.random.default_rng(seed)
    keep = rng.integers(2, 9, n)
    return {"ids": rng.integers(0, 50, (n, 8)).astype(np.int64),
            "attention_mask": (np.arange(8)[None, :] < keep[:, None]).astype(np.int64)}


def cosine(a, b) -> float:
    a, b = np.ravel(a), np.ravel(b)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_masked_encoder_w8a8_keeps_the_logits_range_off_the_mask():
    """The masked scores (-10000 at padded keys) feed only the Softmax: their group is declared logits and
    its range stops LOGIT_SPAN below the smallest row maximum, not at -10000, so W8A8 stays close to float;
    with the full range (the floor dropped) the scores lose their resolution."""
    m = graph.from_proto(build_encoder(mask=True))
    points = m.points()
    masked = {points.group[f"l{i}/mask"] for i in range(2)}
    assert set(points.logits) == masked and set(points.logits.values()) == {-1}
    stats = group_stats(m, masked_feed(64, 3))
    for g in masked:
        assert stats[g].min <= -9000 and stats[g].floor > -50
    q, _ = build(m, uniform(m, 8, 8), stats)
    onnx.checker.check_model(q, full_check=True)
    unfloored = {g: dataclasses.replace(s, floor=None) for g, s in stats.items()}
    q_full, _ = build(m, uniform(m, 8, 8), unfloored)
    test = masked_feed(32, 9)
    ref = run_ort(m.proto, test)[0]
    keep = test["attention_mask"].astype(bool)  # padded positions' outputs are not used
    good, full = run_ort(q, test)[0][keep], run_ort(q_full, test)[0][keep]
    assert cosine(ref[keep], good) >= 0.99 and cosine(ref[keep], full) < cosine(ref[keep], good) - 0.01
    assert cosine(ref[keep], ReferenceEvaluator(q).run(None, test)[0][keep]) >= 0.99  # the exact QDQ arithmetic


def test_encoder_allocation_puts_some_units_at_16_bits(tmp_path):
    """W8 with A8 or A16 per unit under a BitOps budget between uniform A8 and A16: the allocator lifts the
    units whose 8-bit activations hurt most (LayerNorm, Softmax regions where they do), requantizes at the
    borders, meets the budget, and the model stays integer where it is 8-bit."""
    src = tmp_path / "encoder.onnx"
    onnx.save(build_encoder(), str(src))
    calib = tmp_path / "ids.npz"
    np.savez(calib, ids=np.random.default_rng(3).integers(0, 50, (96, 8)).astype(np.int64))
    report = api.quantize(src, tmp_path / "mixed.onnx", calib, budgets=[api_budget("bitops=1.4x")],
                          act_bits=(8, 16), search={"weight_bits": (8,), "metric": "sqnr"},
                          rounding="nearest", verify=False)
    # (the embedding table is weight-only: None)
    widths = ({u.act_bits for u in report.units} | {r.act_bits for r in report.layers}) - {None}
    assert widths == {8, 16}
    assert report.bitops <= 1.4 * sum(r.macs * 64 for r in report.layers) + \
        1.4 * sum(u.macs * 64 for u in report.units) + 1
    ids = np.random.default_rng(8).integers(0, 50, (16, 8)).astype(np.int64)
    a = run_ort(graph.load(src).proto, {"ids": ids})[0].ravel()
    mixed = ort.InferenceSession(str(tmp_path / "mixed.onnx"), providers=["CPUExecutionProvider"])
    b = mixed.run(None, {"ids": ids})[0]
    assert a @ b.ravel() / np.linalg.norm(a) / np.linalg.norm(b) >= 0.99


def api_budget(text):
    from onnxmpq.allocate import parse_budget
    return parse_budget(text)


def test_inspect_lists_every_quantized_tensor_and_the_embedding(tmp_path):
    import json

    from conftest import cli

    m = graph.from_proto(build_encoder())
    feed = {"ids": np.random.default_rng(4).integers(0, 50, (32, 8)).astype(np.int64)}
    assignment = uniform(m, 8, 8)
    assignment["l0.ln1/LN"] = Candidate(None, 16)  # one LayerNorm at 16 bits: requantizes around it
    q, written = build(m, assignment, group_stats(m, feed))
    path = tmp_path / "enc.onnx"
    onnx.save(q, str(path))
    code, out, _ = cli("inspect", path, "--json")
    assert code == 0
    info = json.loads(out)
    layers = {l["name"]: l for l in info["layers"]}
    assert layers["emb/Gather"]["weight_bits"] == 8 and layers["emb/Gather"]["act_bits"] is None
    assert layers["emb/Gather"]["weight_bytes"] == 50 * 32 + 4 * 50
    tensors = info["tensors"]
    assert {t["name"] for t in tensors} >= {t.name for t in written.tensors if t.bits}
    ln_out = next(t for t in written.tensors if t.name == "l0.ln1/LN")
    assert ln_out.bits == 16 and ln_out.requantized == (8,)  # the next projections read it at 8 bits
    requantized = [t for t in tensors if t["requantized_from"] == 16]
    assert [t["name"] for t in requantized] == ["l0.ln1/LN"] and requantized[0]["bits"] == 8
    assert info["requantizes"] == sum(len(t.requantized) for t in written.tensors)
    for t in tensors:
        assert t["scale"] > 0 and t["type_name"] in ("UINT8", "UINT16") and t["bits"] in (8, 16)
