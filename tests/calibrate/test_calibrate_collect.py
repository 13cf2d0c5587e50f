"""`calibrate.collect`: the statistics pass slices batches whose activations exceed STATS_BUDGET."""

from __future__ import annotations

import numpy as np
from conftest import build_cnn

from onnxmpq import calibrate
from onnxmpq.graph import model as graph
from onnxmpq.graph import runtime
from onnxmpq.pipeline.context import Samples

TENSORS = ["c1", "r1", "c2", "y"]


def run_sizes(monkeypatch) -> list[int]:
    sizes: list[int] = []
    real = runtime.run
    monkeypatch.setattr(runtime, "run", lambda sess, feed, names: sizes.append(len(feed["x"])) or real(sess, feed, names))
    return sizes


def test_batches_over_the_budget_run_in_slices_with_the_same_extremes_and_counts(monkeypatch):
    m = graph.from_proto(build_cnn())
    x = np.random.default_rng(3).normal(size=(40, 3, 8, 8)).astype(np.float32)
    source = Samples(({"x": x},))
    whole = calibrate.collect(m, source, TENSORS, batch_size=16)
    per_sample = 4 * (8 * 8 * 8 * 2 + 4 * 4 * 4 + 10)  # c1, r1, c2, y of one sample, float32
    monkeypatch.setattr(calibrate, "STATS_BUDGET", 3 * per_sample)
    sizes = run_sizes(monkeypatch)
    sliced = calibrate.collect(m, source, TENSORS, batch_size=16)
    assert sizes[0] == 1 and max(sizes[1:]) == 3 and sum(sizes[1:]) == 40  # one probing run, then slices of 3
    for name in TENSORS:
        a, b = whole[name], sliced[name]
        assert (a.min, a.max, a.count, a.zeros) == (b.min, b.max, b.count, b.zeros), name
        assert int(np.sum(a.hist)) == int(np.sum(b.hist)) == a.count


def test_batches_within_the_budget_run_whole(monkeypatch):
    m = graph.from_proto(build_cnn())
    x = np.random.default_rng(4).normal(size=(40, 3, 8, 8)).astype(np.float32)
    sizes = run_sizes(monkeypatch)
    calibrate.collect(m, Samples(({"x": x},)), TENSORS, batch_size=16)
    assert sizes == [1, 16, 16, 8]
