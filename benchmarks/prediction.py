"""Issue 11, latency-ms budgets on integer graphs: how close the report's predicted latency comes to the
one verification measures, on the bundled ResNets.

For each model and candidate set: `onnxmpq.allocate.latency.profile` (what `profile-latency` runs) measures the
table, `onnxmpq.quantize` chooses under a latency-ms budget (with avg-bits for the weight-width sets)
and verifies the written model (its latency timed in alternation with float, batch 1, 2 threads). The
table predicts T = T_ref + sum d[u, c_u]; "now" rescales it by float_ms(verification) / float_ms(table)
(the machine's speed then against now). Error = predicted / measured - 1.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnxmpq
from benchmarks import common
from onnxmpq.allocate import latency, parse_budget
from onnxmpq.pipeline import api
from onnxmpq.pipeline.config import SearchConfig
from onnxmpq.pipeline.context import RunContext
from onnxmpq.sensitivity import parse_candidates
from onnxmpq.types import QuantOptions

SETS = {  # label -> (weight bits, act bits, extra budgets, latency budget as a fraction between min and max)
    "W4/W8, A8 (avg-bits=5)": ((4, 8), (8,), ["avg-bits=5"], 1.0),
    "W8, A8/A16": ((8,), (8, 16), [], 0.5),
}


def _table(model: Path, weights, acts) -> latency.LatencyTable:
    ctx = RunContext(api.load(model), common.CALIB, limit=64)
    return latency.profile(ctx.model, parse_candidates(weights, acts), ctx.stats(QuantOptions()), ctx.first())


def rows(tmp: Path) -> list[list]:
    out = []
    for name in ("resnet20", "resnet56"):
        model = common.MODELS[name]
        for label, (weights, acts, extra, where) in SETS.items():
            table = _table(model, weights, acts)
            table.save(tmp / "lat.json")
            low = table.reference_ms + sum(min(row.values()) for row in table.layers.values())
            budget = low + where * (table.reference_ms - low)
            settings = SearchConfig(metric="sqnr", weight_bits=weights, latency=str(tmp / "lat.json"))
            report = onnxmpq.quantize(model, tmp / "q.onnx", common.CALIB, rounding="nearest", search=settings, act_bits=acts,
                                      budgets=[parse_budget(b) for b in extra] + [parse_budget(f"latency-ms={budget}")])
            v = report.verification
            out.append([name, label, f"{budget:.3f}", f"{v['predicted_latency_ms']:.3f}",
                        f"{v['predicted_latency_now_ms']:.3f}", f"{v['latency_ms']:.3f}",
                        f"{100 * (v['predicted_latency_ms'] / v['latency_ms'] - 1):+.0f}%",
                        f"{100 * (v['predicted_latency_now_ms'] / v['latency_ms'] - 1):+.0f}%"])
            print(out[-1], flush=True)
    return out


def run(ctx: common.Context) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        body = rows(Path(tmp))
    head = ["model", "candidates", "budget ms", "predicted ms", "predicted now ms", "measured ms", "error",
            "error now"]
    return "\n".join(["## Latency prediction (issue 11)\n", __doc__.split("\n\n", 1)[1].strip() + "\n",
                      common.table(head, body), "", READING])


READING = (
    "Reading: the target (within 10%) does not hold. For weight-width mixes at A8 every candidate runs the "
    "same INT8 kernels (the table's changes are 0), so the prediction is the reference model's time, and "
    "the error is timing drift between two sub-millisecond measurements minutes apart (rescaled by the "
    "float model's speed, 6-10%). For A8/A16 mixes the additive model is wrong: a unit switched alone from "
    "the all-A16 reference changes little, while a mix puts requantizes (DQ at one width, Q at the other) "
    "on every boundary between widths and breaks onnxruntime's fusions, so the written model runs far "
    "slower than predicted (ResNet-56: 4.3 ms measured against 1.0 predicted and 1.1 for all-A16). The "
    "fix needs a cost per tensor whose writer and reader widths differ (the requantize links the BitOps "
    "budget already has), timed per tensor size, in the latency-ms problem.\n")
