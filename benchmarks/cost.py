"""Issue 13: the cost of a mixed-precision run, end to end, against the issue's targets.

Each row is one `onnxmpq quantize` in a fresh process (`onnxmpq.cli.main.main`), timed wall clock and
measured for peak resident memory (VmHWM); the per-stage seconds come from the report's `stages`
(`progress.timings`). Rows:

- the EfficientNet-Lite0-style depthwise CNN of `benchmarks/cnn.py` (49 Conv, 4.6M parameters, random
  weights; 224x224) calibrated on 64 noise images, `--budget avg-bits=4 -a 8` (target: <= 90 s, <= 2 GB);
- the bundled ResNet-56, `--budget avg-bits=3` with the default 7 weight widths (target: <= 30 s);

each with the defaults (fast probes rounded to nearest), with exact probes, and on ResNet-56 with the
probes of before this issue (exact, GPTQ-rounded); no sensitivity cache (every run measures its
table), verification on.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import cnn, common

_CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
from onnxmpq.cli.main import main
start = time.perf_counter()
code = main({args!r})
wall = time.perf_counter() - start
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({{"code": code, "wall_s": wall, "peak_mb": hwm / 1024}}))
"""


def _run(args: list[str]) -> dict:
    code = _CHILD.format(root=str(common.ROOT), args=[str(a) for a in args])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"quantize failed: {done.stderr[-2000:]}")
    return json.loads(lines[-1])


def _row(label: str, target: str, model: Path, calib: Path, budget: str, flags: list[str], tmp: Path) -> list:
    out, report = tmp / "m.onnx", tmp / "r.json"
    args = ["-q", "quantize", model, "-o", out, "--calib", calib, "--budget", budget, "-a", "8", "--report", report,
            *flags]
    got = _run(args)
    shown = " ".join(flags) or "defaults"
    if got["code"] != 0:
        return [label, shown, target, f"exit {got['code']}", "", "", "", ""]
    rep = json.loads(report.read_text())
    stages = ", ".join(f"{k} {v:.1f}" for k, v in rep.get("stages", {}).items())
    return [label, shown, target, f"{got['wall_s']:.1f}", f"{got['peak_mb']:.0f}",
            f"{rep['avg_weight_bits']:.2f}", f"{rep['verification']['drop']:.4f}" if rep.get("verification") else "",
            stages]


# (flags, on the CNN too): the defaults (fast probes rounded to nearest); exact probes; the probes as they were
# before issue 13 (exact, rounded as the written model, GPTQ), on ResNet-56 only (about two minutes there)
VARIANTS = (([], True), (["--probes", "exact"], True), (["--probes", "exact", "--probe-rounding", "auto"], False))


def run(ctx: common.Context) -> str:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, _ = cnn.ensure(tmp / "effnet")
        calib = tmp / "effnet" / "calib64.npz"
        np.savez(calib, **{cnn.INPUT: cnn.calibration(64)})
        for flags, on_cnn in VARIANTS:
            if on_cnn:
                rows.append(_row("effnet_lite0 (64 x 224x224), avg-bits=4", "<= 90 s, <= 2048 MB", model, calib,
                                 "avg-bits=4", flags, tmp))
                print(rows[-1], flush=True)
            rows.append(_row("resnet56 (256 x 32x32), avg-bits=3, W2..W8", "<= 30 s", common.MODELS["resnet56"],
                             common.CALIB, "avg-bits=3", flags, tmp))
            print(rows[-1], flush=True)
    return "\n".join([
        "## Cost of a mixed-precision run (issue 13)\n",
        "`onnxmpq quantize MODEL --calib ... --budget ... -a 8` plus the row's flags, in a fresh process per row, no "
        "sensitivity cache, verification on; wall seconds and peak resident memory (VmHWM) of the whole process, "
        "seconds per stage from the report. Before this issue (its text, measured on the same kind of machine): "
        "EfficientNet-Lite0 653 s of search, 10 min 54 s wall, 7.2 GB peak; ResNet-56 at avg-bits=3, 183 s.\n",
        common.table(["model", "flags", "target", "wall s", "peak MB", "avg W", "drop", "stages (s)"], rows), ""])
