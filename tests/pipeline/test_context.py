"""The run context: one read of the data, a held-out split, memoised statistics, one float reference,
and the model specialised once for the data's shapes (the dynamic-dims BitOps bug)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import arr, model, node, vi

import onnxmpq.calibrate
from onnxmpq.allocate import parse_budget
from onnxmpq.errors import OnnxmpqError
from onnxmpq.pipeline import api, context, stages
from onnxmpq.pipeline.config import SearchConfig
from onnxmpq.pipeline.context import HELD_OUT, RunContext, Samples, split_sizes
from onnxmpq.types import Batch, Candidate, QuantOptions

ROOT = Path(__file__).resolve().parents[2]
RESNET, CALIB = ROOT / "models" / "resnet20_cifar10.onnx", ROOT / "calibration" / "cifar10_train256.npz"


def fully_convolutional(h: int | str = "H", w: int | str = "W") -> onnx.ModelProto:
    """x(N,3,H,W) -Conv3x3(8)- Relu -Conv3x3/2(8)- Relu -GlobalAveragePool- Flatten -Gemm(10)- y(N,10):
    MACs grow with H*W, so they are only defined for a given input size."""
    return model(
        [node("Conv", ["x", "W1", "B1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
         node("Relu", ["c1"], ["r1"], "relu1"),
         node("Conv", ["r1", "W2", "B2"], ["c2"], "conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
         node("Relu", ["c2"], ["r2"], "relu2"),
         node("GlobalAveragePool", ["r2"], ["p"], "pool"),
         node("Flatten", ["p"], ["f"], "flatten"),
         node("Gemm", ["f", "W3", "B3"], ["y"], "fc", transB=1)],
        [vi("x", ["N", 3, h, w])], [vi("y", ["N", 10])],
        {"W1": arr(1, 8, 3, 3, 3, scale=0.3), "B1": arr(2, 8, scale=0.1), "W2": arr(3, 8, 8, 3, 3, scale=0.2),
         "B2": arr(4, 8, scale=0.1), "W3": arr(5, 10, 8, scale=0.3), "B3": arr(6, 10, scale=0.1)})


@pytest.fixture(scope="module")
def dynamic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dynamic")
    onnx.save(fully_convolutional(), folder / "dyn.onnx")
    onnx.save(fully_convolutional(16, 16), folder / "static.onnx")
    np.savez(folder / "calib.npz", x=np.random.default_rng(0).normal(size=(40, 3, 16, 16)).astype(np.float32))
    return folder


def test_split_sizes():
    assert split_sizes(1000, 256, holdout=True) == (256, HELD_OUT)     # beyond the limit: the next 256
    assert split_sizes(300, 256, holdout=True) == (256, 44)
    assert split_sizes(256, 256, holdout=True) == (205, 51)            # no more: the last fifth
    assert split_sizes(4, 256, holdout=True) == (4, 0)                 # too few to split
    assert split_sizes(1000, 256, holdout=False) == (256, 0)
    assert split_sizes(100, 256, holdout=False) == (100, 0)


def test_samples_keep_runs_of_one_shape_and_slice_across_them():
    batches = [Batch({"x": np.full((3, 2, w), w, np.float32)}) for w in (4, 4, 6)]
    samples = Samples.gather(iter(batches), 8)
    assert len(samples) == 8 and [c["x"].shape for c in samples.chunks] == [(6, 2, 4), (2, 2, 6)]
    assert [b.size for b in samples.batches(4)] == [4, 2, 2]             # a batch never mixes shapes
    tail = samples.slice(5, 8)
    assert [c["x"].shape[0] for c in tail.chunks] == [1, 2] and tail.chunks[1]["x"][0, 0, 0] == 6
    assert [b.size for b in Samples(samples.chunks, fixed_batch=1).batches(64)] == [1] * 8
    with pytest.raises(OnnxmpqError, match="batch size"):
        next(samples.batches(0))


def test_held_out_samples_are_not_the_calibration_samples(dynamic):
    ctx = RunContext(api.load(dynamic / "dyn.onnx"), dynamic / "calib.npz", limit=256, holdout=True)
    data = np.load(dynamic / "calib.npz")["x"]
    assert len(ctx.calibration) == 32 and len(ctx.held_out) == 8
    np.testing.assert_array_equal(ctx.calibration.chunks[0]["x"], data[:32])
    np.testing.assert_array_equal(ctx.held_out.chunks[0]["x"], data[32:])
    assert ctx.judge.held_out and ctx.judge.score(ctx.model.proto).samples == 8


def test_statistics_are_collected_once_and_memoised(dynamic, monkeypatch):
    calls = []
    real = onnxmpq.calibrate.collect
    monkeypatch.setattr(onnxmpq.calibrate, "collect", lambda *a, **k: calls.append(1) or real(*a, **k))
    ctx = RunContext(api.load(dynamic / "dyn.onnx"), dynamic / "calib.npz")
    part = ctx.stats(QuantOptions(), ["conv1"])
    everything = ctx.stats(QuantOptions())
    assert set(part) < set(everything) and len(calls) == 1 and ctx.passes["stats"] == 1
    assert all(everything[g] is part[g] for g in part)


def test_gptq_fits_on_the_calibration_split_and_is_verified_on_the_rest(dynamic, monkeypatch):
    seen = []
    real = stages.sequential.round_model
    monkeypatch.setattr(stages.sequential, "round_model",
                        lambda m, a, source, *rest, **kw: seen.append(len(source)) or real(m, a, source, *rest, **kw))
    report = api.quantize(dynamic / "dyn.onnx", dynamic / "g.onnx", dynamic / "calib.npz", weight_bits=4,
                          rounding="gptq")
    assert seen == [32]
    assert report.verification["held_out"] and report.verification["samples"] == 8


def test_one_quantize_reads_the_data_once_and_runs_the_float_reference_once(dynamic, monkeypatch, tmp_path):
    """--budget, --max-drop and --report-dir (the Pareto curve) together: one read of the calibration
    file, one statistics pass, one float reference."""
    counts = {"read": 0, "collect": 0, "reference": 0}

    def counting(name, real):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(onnxmpq.calibrate, "open_source", counting("read", onnxmpq.calibrate.open_source))
    monkeypatch.setattr(onnxmpq.calibrate, "collect", counting("collect", onnxmpq.calibrate.collect))
    monkeypatch.setattr(context, "Judge", counting("reference", context.Judge))
    settings = SearchConfig(metric="sqnr", weight_bits=(4, 8), max_drop=0.5)
    report = api.quantize(dynamic / "dyn.onnx", tmp_path / "q.onnx", dynamic / "calib.npz",
                          budgets=[parse_budget("avg-bits=6")], search=settings, rounding="gptq",
                          report_dir=tmp_path / "report")
    assert (tmp_path / "report" / "report.html").exists() and report.verification["held_out"]
    assert counts == {"read": 1, "collect": 1, "reference": 1}
    # the report records the time of each stage the run went through
    assert {"calibrate", "sensitivity", "solve", "gptq", "write", "verify"} <= set(report.stages)
    assert all(t >= 0 for t in report.stages.values()) and sum(report.stages.values()) <= report.time_s + 1


@pytest.mark.parametrize("kind", ["bitops", "weight-bytes", "avg-bits", "latency-ms"])
def test_budgets_hold_on_the_written_model_when_input_dims_are_dynamic(dynamic, tmp_path, kind):
    """The problem counts MACs at the data's real size (16x16), like the report: a bitops budget under
    W8A8 used to be solved for dims of 1 and reported 'optimal' while the written model was over it."""
    w8 = api.quantize(dynamic / "static.onnx", tmp_path / "w8.onnx", dynamic / "calib.npz", rounding="nearest",
                      verify=False)
    value = {"bitops": 0.6 * w8.bitops, "weight-bytes": 0.6 * w8.weight_bytes, "avg-bits": 5.0,
             "latency-ms": 1000.0}[kind]
    settings = SearchConfig(metric="sqnr", weight_bits=(2, 4, 8))
    report = api.quantize(dynamic / "dyn.onnx", tmp_path / "q.onnx", dynamic / "calib.npz", rounding="nearest",
                          budgets=[parse_budget(f"{kind}={value!r}")], search=settings, verify=False)
    written = {"bitops": report.bitops, "weight-bytes": report.weight_bytes, "avg-bits": report.avg_weight_bits,
               "latency-ms": report.allocation["costs"].get("latency-ms")}[kind]
    assert written <= value * (1 + 1e-9), (kind, written, value)
    assert report.allocation["costs"][kind] == pytest.approx(written)
    # the same choice on the model whose dims are static counts the same BitOps
    bits = {layer.name: Candidate(layer.weight_bits, layer.act_bits) for layer in report.layers}
    again = api.quantize(dynamic / "static.onnx", tmp_path / "s.onnx", dynamic / "calib.npz", rounding="nearest",
                         layer_bits=bits, verify=False)
    assert again.bitops == report.bitops




def test_batch_size_reaches_statistics_probes_and_verification(dynamic, monkeypatch, tmp_path):
    """--batch-size bounds every onnxruntime call of a run (a model fixed at a small batch needs it)."""
    from onnxmpq.graph import runtime

    sizes = []
    real = runtime.run
    def spy(sess, feed, *args, **kwargs):
        sizes.append(len(next(iter(feed.values()))))
        return real(sess, feed, *args, **kwargs)

    monkeypatch.setattr(runtime, "run", spy)
    api.quantize(dynamic / "dyn.onnx", tmp_path / "q.onnx", dynamic / "calib.npz", rounding="nearest", batch_size=3,
                 budgets=[parse_budget("avg-bits=6")], search=SearchConfig(metric="sqnr", weight_bits=(4, 8)))
    assert sizes and max(sizes) == 3, sorted(set(sizes))
