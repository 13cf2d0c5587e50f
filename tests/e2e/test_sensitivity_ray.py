"""The Ray executor of the sensitivity sweep, exercised on a local Ray instance."""

from __future__ import annotations

import numpy as np
import pytest

from onnxmpq.graph import model as graph
from onnxmpq.sensitivity import measure, parse_candidates
from onnxmpq.sensitivity.parallel import measure as parallel_measure
from onnxmpq.types import QuantOptions, Rounding

ray = pytest.importorskip("ray")


def test_ray_tasks_give_the_same_tables_as_one_process(cnn):
    model = graph.from_proto(cnn)
    rng = np.random.default_rng(0)
    name = model.inputs[0].name
    shape = [d or 4 for d in model.inputs[0].shape]
    batches = [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(2)]
    cands = parse_candidates([2, 4, 8], [None])
    local = measure(model, batches, ["sqnr", "kl"], cands, None, QuantOptions(), Rounding.NEAREST)
    remote = parallel_measure(model, batches, ["sqnr", "kl"], cands, None, QuantOptions(), Rounding.NEAREST,
                              workers=2, executor="ray")
    for a, b in zip(local, remote):
        assert [l.name for l in a.layers] == [l.name for l in b.layers]
        for la, lb in zip(a.layers, b.layers):
            assert list(la.scores) == list(lb.scores)
            np.testing.assert_allclose(list(la.scores.values()), list(lb.scores.values()), rtol=1e-4, atol=1e-9)
