"""Tests of onnxmpq.graph.engine.Frontier: a graph run segment by segment over cached batches.

Oracle: one full onnxruntime run of the same proto with every asked-for tensor as an extra output.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from conftest import activation_stats, arr, group_stats, model, node, vi

from onnxmpq.calibrate import with_outputs
from onnxmpq.graph import engine
from onnxmpq.graph import model as graph
from onnxmpq.graph.engine import Frontier
from onnxmpq.types import Candidate, QuantOptions, Scope
from onnxmpq.write.build import build as build_qdq

BATCH_SIZES = (1, 3, 5)


def build_branchy():
    """x(N,3,8,8) -Conv c1- Relu r1 -+- Conv ca - Relu ra -+- Add s -Split(sp1, sp2)- Mul m -+- Concat k
                                    +- Conv cb (1x1) ------+            (s is also an output)  |
                                    +------------------------------------------------------- r1 -+
    k -Conv c2 (stride 2)- Flatten f -Gemm- y(N,10)."""
    return model(
        [node("Conv", ["x", "W1", "B1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
         node("Relu", ["c1"], ["r1"], "relu1"),
         node("Conv", ["r1", "Wa"], ["ca"], "conv_a", pads=[1, 1, 1, 1]),
         node("Relu", ["ca"], ["ra"], "relu_a"),
         node("Conv", ["r1", "Wb"], ["cb"], "conv_b"),
         node("Add", ["ra", "cb"], ["s"], "add"),
         node("Split", ["s"], ["sp1", "sp2"], "split", axis=1),
         node("Mul", ["sp1", "sp2"], ["m"], "mul"),
         node("Concat", ["m", "r1"], ["k"], "concat", axis=1),
         node("Conv", ["k", "W2"], ["c2"], "conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
         node("Flatten", ["c2"], ["f"], "flatten"),
         node("Gemm", ["f", "W3", "B3"], ["y"], "fc", transB=1)],
        [vi("x", ["N", 3, 8, 8])], [vi("y", ["N", 10]), vi("s", ["N", 4, 8, 8])],
        {"W1": arr(1, 4, 3, 3, 3, scale=0.3), "B1": arr(2, 4, scale=0.1), "Wa": arr(3, 4, 4, 3, 3, scale=0.3),
         "Wb": arr(4, 4, 4, 1, 1, scale=0.5), "W2": arr(5, 4, 6, 3, 3, scale=0.2), "W3": arr(6, 10, 64, scale=0.2),
         "B3": arr(7, 10, scale=0.1)})


# asked for one after the other, in topological order (lists are asked for together)
TARGETS = [["x"], ["r1"], ["ra"], ["cb"], ["s"], ["sp1"], ["m", "k"], ["c2"], ["y"]]


def batches(sizes=BATCH_SIZES, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(n, 3, 8, 8)).astype(np.float32)} for n in sizes]


def full_run(proto, batch, names):
    """The named tensors from one onnxruntime run of the whole proto."""
    sess = ort.InferenceSession(with_outputs(proto, names).SerializeToString(), providers=["CPUExecutionProvider"])
    fetch = [n for n in names if n not in batch]
    got = dict(zip(fetch, sess.run(fetch, batch)))
    return [batch[n] if n in batch else got[n] for n in names]


def expected_cut(proto, run_nodes: set[str], inputs) -> set[str]:
    """Tensors computed so far (graph inputs and outputs of the nodes run) that a node not yet run reads,
    or that are graph outputs."""
    nodes = list(proto.graph.node)
    computed = set(inputs) | {o for n in nodes if n.name in run_nodes for o in n.output}
    live = {i for n in nodes if n.name not in run_nodes for i in n.input} | {o.name for o in proto.graph.output}
    return computed & live


def ancestors(proto, names) -> set[str]:
    """Names of the nodes that the tensors `names` depend on."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    out, stack = set(), list(names)
    while stack:
        n = producer.get(stack.pop())
        if n is not None and n.name not in out:
            out.add(n.name)
            stack.extend(n.input)
    return out


def test_successive_targets_equal_a_full_run():
    proto = build_branchy()
    data = batches()
    front = Frontier(data)
    for targets in TARGETS:
        got = front.advance(proto, targets)
        assert len(got) == len(data)
        for values, batch in zip(got, data):
            want = full_run(proto, batch, targets)
            assert len(values) == len(targets)
            for v, w in zip(values, want):
                assert v.shape == w.shape and v.shape[0] == batch["x"].shape[0]
                np.testing.assert_allclose(v, w, rtol=1e-6, atol=1e-6)


def test_the_cut_holds_only_what_is_still_needed():
    proto = build_branchy()
    front = Frontier(batches())
    run_nodes: set[str] = set()
    for targets in TARGETS:
        front.advance(proto, targets)
        run_nodes |= ancestors(proto, targets)
        want = expected_cut(proto, run_nodes, ["x"])
        for vals in front.values:
            assert set(vals) == want, targets
    assert "x" not in front.values[0]
    # at the end only the graph outputs remain
    assert set(front.values[0]) == {"y", "s"}


def test_cut_drops_the_input_once_read():
    proto = build_branchy()
    front = Frontier(batches())
    assert set(front.values[0]) == {"x"}
    front.advance(proto, ["r1"])
    assert set(front.values[0]) == {"r1"}
    front.advance(proto, ["ra"])
    assert set(front.values[0]) == {"r1", "ra"}  # r1: conv_b and concat still read it
    front.advance(proto, ["s"])
    assert set(front.values[0]) == {"r1", "s"}  # s: a graph output, and split reads it


def test_tensor_at_the_cut_is_returned_without_running(monkeypatch):
    proto = build_branchy()
    data = batches()
    front = Frontier(data)
    first = front.advance(proto, ["ra"])
    calls = []
    monkeypatch.setattr(engine.runtime, "session", lambda *a, **k: calls.append(a) or pytest.fail("ran"))
    again = front.advance(proto, ["ra"])
    r1 = front.advance(proto, ["r1"])
    assert not calls
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a[0], b[0])
    for values, batch in zip(r1, data):
        np.testing.assert_allclose(values[0], full_run(proto, batch, ["r1"])[0], rtol=1e-6, atol=1e-6)
    # the graph input itself, before anything ran
    fresh = Frontier(data)
    [[x0], *_] = fresh.advance(proto, ["x"])
    np.testing.assert_array_equal(x0, data[0]["x"])


def test_targets_mixing_the_cut_and_later_tensors():
    """One call may ask for a tensor at the cut together with one computed from another part of it."""
    proto = build_branchy()
    data = batches()
    front = Frontier(data)
    front.advance(proto, ["ra"])  # cut: r1, ra
    got = front.advance(proto, ["ra", "cb"])  # the segment computing cb reads r1 only
    for values, batch in zip(got, data):
        for v, w in zip(values, full_run(proto, batch, ["ra", "cb"])):
            np.testing.assert_allclose(v, w, rtol=1e-6, atol=1e-6)


def quantized_tail():
    """The float model and its QDQ version with every layer after relu1 quantized (W4A8)."""
    m = graph.from_proto(build_branchy())
    calib = {"x": np.random.default_rng(9).normal(size=(4, 3, 8, 8)).astype(np.float32)}
    tail = [spec for spec in m.layers if spec.name != "conv1"]
    stats = activation_stats(m.proto, calib, [spec.activation for spec in tail])
    layers_only = QuantOptions(scope=Scope.LAYERS)  # Q/DQ in front of the layers only: concat reads r1 itself
    qproto, _ = build_qdq(m, {spec.name: Candidate(4, 8) for spec in tail}, stats, layers_only)
    return m, qproto


def test_advancing_with_a_modified_proto_gives_the_modified_model():
    m, qproto = quantized_tail()
    assert len(qproto.graph.node) > len(m.proto.graph.node)  # Q/DQ pairs were inserted
    data = batches()
    front = Frontier(data)
    front.advance(m.proto, ["r1"])  # the part before the cut is the same in both models
    mid = front.advance(qproto, ["s"])
    # the quantizers of conv_a/conv_b have run; concat still reads r1 itself, split reads s
    assert set(front.values[0]) == {"r1", "s"}
    end = front.advance(qproto, ["y"])
    assert set(front.values[0]) == {"s", "y"}
    for batch, s, y in zip(data, mid, end):
        want_s, want_y = full_run(qproto, batch, ["s", "y"])
        np.testing.assert_allclose(s[0], want_s, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(y[0], want_y, rtol=1e-5, atol=1e-5)
        # and the quantization really changed the values
        assert not np.allclose(y[0], full_run(m.proto, batch, ["y"])[0], rtol=1e-3, atol=1e-3)


def test_advancing_through_the_inserted_nodes_one_layer_at_a_time():
    """As GPTQ uses it: each step a new proto in which one more layer is quantized, asked for that
    layer's quantized input (the DequantizeLinear output in front of it)."""
    m = graph.from_proto(build_branchy())
    calib = {"x": np.random.default_rng(9).normal(size=(4, 3, 8, 8)).astype(np.float32)}
    stats = group_stats(m, calib)
    data = batches()
    front = Frontier(data)
    assignment = {}
    for unit in m.points().units:  # the units without weights (add, mul, concat) join in graph order too
        assignment[unit.name] = Candidate(4 if unit.layer else None, 8)
        if unit.layer is None:
            continue
        spec = unit.layer
        qproto, _ = build_qdq(m, assignment, stats)
        layer = next(n for n in qproto.graph.node if n.name == spec.name)
        target = layer.input[0]
        assert target != spec.activation  # a DequantizeLinear output
        got = front.advance(qproto, [target])
        for values, batch in zip(got, data):
            np.testing.assert_allclose(values[0], full_run(qproto, batch, [target])[0], rtol=1e-5, atol=1e-5)


def test_one_batch_straight_to_the_output():
    proto = build_branchy()
    data = batches(sizes=(2,))
    front = Frontier(data)
    [[y]] = front.advance(proto, ["y"])
    np.testing.assert_allclose(y, full_run(proto, data[0], ["y"])[0], rtol=1e-6, atol=1e-6)


def test_non_float_tensors_at_the_cut_without_value_info():
    """A proto without value_info (not shape-inferred) whose cut holds an int64 tensor (a Shape output):
    the segments must not declare it float."""
    proto = model([node("Conv", ["x", "W"], ["c"], "conv", pads=[1, 1, 1, 1]), node("Relu", ["c"], ["r"], "relu"),
                   node("Shape", ["r"], ["s"], "shape"), node("Flatten", ["r"], ["a"], "flat"),
                   node("Neg", ["a"], ["na"], "neg"), node("Reshape", ["na", "s"], ["b"], "reshape"),
                   node("Add", ["b", "r"], ["y"], "add")],
                  [vi("x", ["N", 2, 4, 4])], [vi("y", None)], {"W": arr(8, 3, 2, 3, 3)})
    assert not proto.graph.value_info
    data = [{"x": arr(9, 2, 2, 4, 4)}, {"x": arr(10, 3, 2, 4, 4)}]
    front = Frontier(data)
    shapes = front.advance(proto, ["s"])
    front.advance(proto, ["na"])
    assert front.values[0]["s"].dtype == np.int64
    ys = front.advance(proto, ["y"])
    for batch, [s], [y] in zip(data, shapes, ys):
        np.testing.assert_array_equal(s, batch["x"].shape[:1] + (3, 4, 4))
        np.testing.assert_allclose(y, full_run(proto, batch, ["y"])[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("budget", [0, 2000])
def test_a_spilled_frontier_gives_the_values_of_one_in_ram(budget):
    """Budget 0: every batch on disk; 2000 bytes: the first batch fits, the others spill."""
    proto = build_branchy()
    data = batches()
    ram, disk = Frontier(data), Frontier(data, budget=budget)
    for targets in TARGETS:
        want, got = ram.advance(proto, targets), disk.advance(proto, targets)
        assert disk.values.spilled
        assert len(got) == len(want)
        for w, g in zip(want, got):
            for a, b in zip(w, g):
                np.testing.assert_array_equal(a, b)
        assert disk.values.names() == ram.values.names()
        for w, g in zip(ram.peek(proto, ["y"]), disk.peek(proto, ["y"])):
            np.testing.assert_array_equal(w[0], g[0])


def test_a_spilled_frontier_holds_at_most_a_batch_beyond_its_budget():
    proto = build_branchy()
    data = batches(sizes=(4,) * 6)
    front = Frontier(data, budget=0)
    widest = 0
    for targets in TARGETS:
        front.advance(proto, targets)
        front.peek(proto, ["y"])
        widest = max(widest, max(sum(v.nbytes for v in front.values[i].values()) for i in range(len(data))))
    # the cut of one batch (plus the outputs a move adds to it), never the set's
    assert 0 < front.values.peak_resident <= 2 * widest
    assert front.values.spilled_bytes > len(data) * front.values.peak_resident / 2


def test_spilled_values_read_after_the_frontier_moved_on_are_refused():
    proto = build_branchy()
    front = Frontier(batches(), budget=0)
    old = front.advance(proto, ["r1"])
    front.advance(proto, ["s"])
    with pytest.raises(engine.InternalError):
        old[0]


def test_the_spill_folder_goes_with_the_frontier():
    proto = build_branchy()
    front = Frontier(batches(), budget=0)
    front.advance(proto, ["ra"])
    folder = front.values.folder
    assert folder is not None and any(folder.iterdir())
    front.close()
    assert not folder.exists()
