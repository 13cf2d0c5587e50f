"""AIMET-ONNX's automatic mixed precision on one model, for benchmarks/aimet.py (run under AIMET's venv).

Imports aimet_onnx, never onnxmpq: it runs in its own interpreter with the versions of
benchmarks/requirements-aimet.txt. The search is AIMET's `choose_mixed_precision` (Pandey et al. 2023):
phase 1 scores each quantizer group at each candidate with AIMET's SQNR callback on calibration
images, phase 2 walks the sorted list with a binary search against the labelled accuracy callback.

    /tmp/venv-aimet/bin/python benchmarks/aimet_amp.py MODEL --calib C.npz --judge J.npz --out DIR

C.npz holds `input` (calibration images), J.npz `input` and `labels` (the callback's labelled set).
Writes DIR/model.onnx (AIMET's sim exported as QDQ), DIR/result.json: per Conv/Gemm node its weight and
input-activation bits, AIMET's own accuracies, and the seconds of each step.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

START = time.perf_counter()

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from aimet_onnx.amp.mixed_precision_algo import EvalCallbackFactory  # noqa: E402
from aimet_onnx.common.amp.utils import AMPSearchAlgo  # noqa: E402
from aimet_onnx.common.defs import CallbackFunc, QuantizationDataType, QuantScheme  # noqa: E402
from aimet_onnx.mixed_precision import choose_mixed_precision  # noqa: E402
from aimet_onnx.quantsim import QuantizationSimModel  # noqa: E402

IMPORTED = time.perf_counter()
INT = QuantizationDataType.int
# (activation (bits, dtype), parameter (bits, dtype)): W8A8 and W4A8
CANDIDATES = [((8, INT), (8, INT)), ((8, INT), (4, INT))]
CONFIG = Path(__import__("aimet_onnx").__file__).parent / "common" / "quantsim_config" / "default_config_per_channel.json"


class Loader:
    """The data loader AIMET's SQNR callback iterates: batches of inputs, with a batch_size."""

    def __init__(self, x: np.ndarray, batch_size: int):
        self.x, self.batch_size = x, batch_size

    def __iter__(self):
        return (self.x[i:i + self.batch_size] for i in range(0, len(self.x), self.batch_size))

    def __len__(self):
        return -(-len(self.x) // self.batch_size)


def top1(session, x: np.ndarray, labels: np.ndarray, batch: int = 250) -> float:
    """Fraction of `x` whose arg-max logit is its label."""
    name = session.get_inputs()[0].name
    hits = sum(int((session.run(None, {name: x[i:i + batch]})[0].argmax(1) == labels[i:i + batch]).sum())
               for i in range(0, len(x), batch))
    return hits / len(x)


MOVES = {"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity", "MaxPool", "Pad", "Slice"}


def layer_bits(sim: QuantizationSimModel, model: onnx.ModelProto) -> dict:
    """{Conv/Gemm node: {weight_bits, act_bits}} read off the sim's enabled quantizers (None = float).

    An input with no quantizer of its own whose producer only moves values (Flatten, Pad, ...) takes the
    bits of the quantizer in front of that producer: the values stay on its grid.
    """
    quantizers = sim.qc_quantize_op_dict
    producer = {o: n for n in model.graph.node for o in n.output}

    def bits(name):
        q = quantizers.get(name)
        if q is not None and q.enabled:
            return q.bitwidth
        node = producer.get(name)
        return bits(node.input[0]) if node is not None and node.op_type in MOVES else None

    return {n.name: {"weight_bits": bits(n.input[1]), "act_bits": bits(n.input[0])}
            for n in model.graph.node if n.op_type in ("Conv", "Gemm")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--calib", required=True, help=".npz with `input`: calibration images")
    parser.add_argument("--judge", required=True, help=".npz with `input`, `labels`: phase-2 callback set")
    parser.add_argument("--out", required=True, help="folder for model.onnx and result.json")
    parser.add_argument("--drop", type=float, default=0.01, help="allowed top-1 drop (fraction)")
    parser.add_argument("--sqnr-samples", type=int, default=128, help="images of the phase-1 SQNR callback")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calib = np.load(args.calib)["input"].astype(np.float32)
    judge = np.load(args.judge)
    jx, jy = judge["input"].astype(np.float32), judge["labels"]
    times = {"import": IMPORTED - START}

    t = time.perf_counter()
    model = onnx.load(args.model)
    sim = QuantizationSimModel(onnx.load(args.model), param_type="int8", activation_type="int8",
                               quant_scheme=QuantScheme.min_max, config_file=str(CONFIG),
                               providers=["CPUExecutionProvider"])
    name = sim.session.get_inputs()[0].name
    batches = [{name: calib[i:i + 32]} for i in range(0, len(calib), 32)]

    def forward_pass(session, _args=None):
        for item in batches:
            session.run(None, item)

    sim.compute_encodings(batches)
    times["sim+encodings"] = time.perf_counter() - t

    t = time.perf_counter()
    phase1 = EvalCallbackFactory(Loader(calib, 32), forward_fn=lambda s, x: s.run(None, {name: x})[0])
    phase1 = phase1.sqnr(sim, num_samples=args.sqnr_samples)
    phase2 = CallbackFunc(lambda session, _: top1(session, jx, jy))
    with tempfile.TemporaryDirectory() as results:
        pareto = choose_mixed_precision(sim, CANDIDATES, phase1, phase2, allowed_accuracy_drop=args.drop,
                                        results_dir=results, clean_start=True,
                                        forward_pass_callback=CallbackFunc(forward_pass),
                                        amp_search_algo=AMPSearchAlgo.Binary)
    times["amp"] = time.perf_counter() - t

    t = time.perf_counter()
    qdq = sim.to_onnx_qdq()
    onnx.save(qdq, str(out / "model.onnx"))
    times["export"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - START
    result = {"layers": layer_bits(sim, model), "judge_top1_sim": top1(sim.session, jx, jy),
              "pareto_points": None if pareto is None else len(pareto), "seconds": times,
              "candidates": "W8A8, W4A8 (per-channel symmetric weights, min-max)", "pid": os.getpid()}
    (out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
