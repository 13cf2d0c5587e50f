"""Issue 11, speed that is real: what onnxruntime runs after load (census) and how fast, for float,
onnxruntime's quantize_static W8A8, onnxmpq W8A8 / W4A8 / mixed (full-integer QDQ) and onnxmpq W8A8 in
the older layers-only form, on ResNet-20, ResNet-56 and a depthwise EfficientNet-Lite0-style CNN.

Timing: every variant of one model gets its own CPU session (2 intra-op threads, 1 inter-op thread,
spinning off) in this one process; after a warm-up, each of R rounds runs every session K times in a
row (the order rotated from round to round), so each round gives every variant a ms-per-batch figure
taken next to all the others. Reported: the median over rounds of each variant's ms and the median over
rounds of the per-round ratios variant / onnxruntime W8A8 and variant / float.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

import onnxmpq
from benchmarks import cnn, common
from onnxmpq.allocate import parse_budget
from onnxmpq.graph import runtime
from onnxmpq.types import QuantOptions, Scope

THREADS, BATCHES = 2, (1, 8)
WARMUP, ROUNDS, QUICK_ROUNDS = 5, 31, 7
BLOCK_MS = 150.0   # K = runs per block, chosen so K runs of onnxruntime W8A8 take about this long
TARGET = 1.05      # issue 11: onnxmpq W8A8 and W4A8 at most this times onnxruntime's W8A8, and below float
FLOAT, ORT = "float", "onnxruntime W8A8"
W8, W4, MIXED, LAYERS = "onnxmpq W8A8", "onnxmpq W4A8", "onnxmpq mixed (avg-bits=5)", "onnxmpq W8A8 scope=layers (before)"
MIXED_SEARCH = {"weight_bits": (2, 3, 4, 5, 6, 7, 8), "metric": "sqnr"}
INTEGER_PREFIXES = ("QLinear", "QGemm", "ConvInteger", "MatMulInteger", "MatMulNBits", "DynamicQuantize", "QAttention")
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


@dataclass(frozen=True)
class Subject:
    """One model to time: its file, a calibration .npz keyed by input name, and what it is."""

    name: str
    model: Path
    calib: Path
    note: str


def subjects() -> list[Subject]:
    model, calib = cnn.ensure(common.CACHE)
    return [Subject("resnet20", common.MODELS["resnet20"], common.CALIB, "CIFAR-10 ResNet-20 (bundled), 32x32 input"),
            Subject("resnet56", common.MODELS["resnet56"], common.CALIB, "CIFAR-10 ResNet-56 (bundled), 32x32 input"),
            Subject("effnet_lite0", model, calib, "EfficientNet-Lite0-style depthwise CNN (random weights), 224x224")]


def build_variants(subject: Subject, tmp: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Every variant's file, and a note per variant (the mixed model's weight-bit histogram)."""
    paths = {FLOAT: subject.model, ORT: tmp / f"{subject.name}_ort.onnx"}
    x = np.load(subject.calib)["input"]
    common.ort_quantize_static(subject.model, paths[ORT], "input", x)
    configs = {W8: dict(weight_bits=8, act_bits=8), W4: dict(weight_bits=4, act_bits=8),
               MIXED: dict(budgets=[parse_budget("avg-bits=5")], search=MIXED_SEARCH, limit=64),
               LAYERS: dict(weight_bits=8, act_bits=8, options=QuantOptions(scope=Scope.LAYERS))}
    notes = {}
    for i, (label, kwargs) in enumerate(configs.items()):
        paths[label] = tmp / f"{subject.name}_mpq{i}.onnx"
        report = onnxmpq.quantize(subject.model, paths[label], subject.calib, rounding="nearest", verify=False, **kwargs)
        if label == MIXED:
            bits = Counter(layer.weight_bits for layer in report.layers)
            notes[label] = (f"avg {report.avg_weight_bits:.2f} weight bits; layers per width: "
                            + ", ".join(f"W{b}: {n}" for b, n in sorted(bits.items(), key=lambda kv: kv[0] or 99)))
    return paths, notes


def session(path: Path) -> ort.InferenceSession:
    """A CPU session with THREADS intra-op threads, one inter-op thread and no spin-waiting."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def feed(sess: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    """Standard normal inputs of the session's input shapes, the free batch dimension set to `batch`."""
    rng = np.random.default_rng(batch)
    out = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else batch for d in i.shape]
        out[i.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def ms_per_run(sess: ort.InferenceSession, x: dict, runs: int) -> float:
    start = time.perf_counter()
    for _ in range(runs):
        sess.run(None, x)
    return (time.perf_counter() - start) / runs * 1e3


def interleaved(paths: dict[str, Path], batch: int, rounds: int) -> tuple[dict[str, list[float]], int]:
    """Per-round ms per batch of every variant (see the module doc), and K."""
    sessions = {label: session(path) for label, path in paths.items()}
    x = feed(sessions[FLOAT], batch)
    warm = {label: ms_per_run(s, x, WARMUP) for label, s in sessions.items()}
    k = max(1, round(BLOCK_MS / warm[ORT]))
    labels, times = list(sessions), {label: [] for label in sessions}
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            times[label].append(ms_per_run(sessions[label], x, k))
    return times, k


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of a's ms / b's ms in the same round."""
    return statistics.median(ta / tb for ta, tb in zip(times[a], times[b]))


def quartiles(times: dict[str, list[float]], a: str, b: str) -> str:
    """First and third quartiles of the per-round ratios a / b: the spread the median comes from."""
    q = statistics.quantiles([ta / tb for ta, tb in zip(times[a], times[b])], n=4)
    return f"{q[0]:.3f}-{q[2]:.3f}"


def census_cell(path: Path) -> tuple[str, runtime.Census]:
    """'float / integer compute ops (main integer ops)' of the graph onnxruntime runs after load."""
    c = runtime.census(path)
    main = [f"{op} {n}" for op, n in c.ops.items() if op.startswith(INTEGER_PREFIXES)]
    return f"{c.float_compute} / {c.int_compute}" + (f" ({', '.join(main)})" if main else ""), c


def leftovers(c: runtime.Census) -> str:
    """The ops after load that are neither integer kernels nor Q/DQ (float compute, layout, pooling...)."""
    rest = [f"{op} {n}" for op, n in c.ops.items() if not op.startswith(INTEGER_PREFIXES) and op not in QDQ_OPS]
    qdq = [f"{op} {c.ops[op]}" for op in sorted(QDQ_OPS) if op in c.ops]
    return f"other ops: {', '.join(rest) or 'none'}; Q/DQ left: {', '.join(qdq) or 'none'}"


def model_section(subject: Subject, tmp: Path, rounds: int) -> tuple[str, float]:
    """One model's table, target line and census details; returns the markdown and its wall time."""
    start = time.perf_counter()
    paths, notes = build_variants(subject, tmp)
    censuses = {label: census_cell(path) for label, path in paths.items()}
    timed = {batch: interleaved(paths, batch, rounds) for batch in BATCHES}
    rows = []
    for label, path in paths.items():
        row = [label, censuses[label][0], path.stat().st_size]
        for batch in BATCHES:
            times = timed[batch][0]
            row += [f"{statistics.median(times[label]):.3f}", f"{ratio(times, label, ORT):.3f}",
                    f"{ratio(times, label, FLOAT):.3f}"]
        rows.append(row)
    header = ["model", "float / integer compute ops after load", "file bytes"]
    for b in BATCHES:
        header += [f"ms batch {b}", f"ratio vs ORT W8A8 (b{b})", f"ratio vs float (b{b})"]
    ks = ", ".join(f"K={timed[b][1]} at batch {b}" for b in BATCHES)
    details = [f"- {label}: {leftovers(censuses[label][1])}" + (f"; {notes[label]}" if label in notes else "")
               for label in paths]
    body = [f"### {subject.name}: {subject.note}\n", common.table(header, rows), "",
            target_line(timed), "", f"{rounds} rounds, {ks}. Ops after load per variant:\n", *details, ""]
    return "\n".join(body), time.perf_counter() - start


def target_line(timed: dict) -> str:
    """Whether onnxmpq W8A8 and W4A8 are at most TARGET x onnxruntime's W8A8 and below float at every batch."""
    parts, ok = [], True
    for label in (W8, W4):
        for batch in BATCHES:
            times = timed[batch][0]
            vs_ort, vs_float = ratio(times, label, ORT), ratio(times, label, FLOAT)
            ok &= vs_ort <= TARGET and vs_float < 1.0
            parts.append(f"{label} b{batch} {vs_ort:.3f}x ORT (quartiles {quartiles(times, label, ORT)}), "
                         f"{vs_float:.3f}x float")
    verdict = "**holds**" if ok else "**does not hold**"
    return f"Target (issue 11: onnxmpq W8A8 and W4A8 <= {TARGET}x onnxruntime W8A8 and < float): {verdict} ({'; '.join(parts)})."


def run(ctx: common.Context) -> str:
    rounds = QUICK_ROUNDS if ctx.quick else ROUNDS
    parts = ["## Latency (issue 11: speed that is real)\n",
             "For each model: float; onnxruntime's quantize_static W8A8 (QDQ, per-channel, MinMax); onnxmpq "
             "W8A8, W4A8 (INT4 codes cast to INT8) and mixed (avg-bits=5 by SQNR over W2..W8, A8, 64 samples) "
             "in the default full-integer QDQ form; and onnxmpq W8A8 with `scope=layers`, the older form. "
             "All onnxmpq models with nearest rounding. Census: Conv/MatMul/Gemm ops that run on float kernels "
             "/ on integer kernels in the graph onnxruntime 1.32's CPU provider builds at load "
             f"(`onnxmpq.graph.runtime.census`). Latency: ms per batch, {THREADS} intra-op threads, 1 inter-op "
             "thread, spinning off, random normal inputs; all variants of a model timed interleaved in one "
             "process, rounds of K runs of each (order rotated per round); ms = median over rounds, ratios = "
             "median of the per-round ratios.\n",
             "The EfficientNet-Lite0-style model (`benchmarks/cnn.py`) has the real layer shapes (49 Conv, 16 "
             "of them depthwise, 4.63M parameters) but random He-normal weights with a folded BN-like scale: "
             "a latency and structure subject, not an accuracy one; its calibration set is 32 images of "
             "normal noise. The ResNets are calibrated on the bundled 256 CIFAR-10 training images.\n"]
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        for subject in subjects():
            body, seconds = model_section(subject, Path(tmp), rounds)
            parts.append(body)
            print(f"latency: {subject.name} done in {seconds:.0f} s", flush=True)
    return "\n".join(parts)
